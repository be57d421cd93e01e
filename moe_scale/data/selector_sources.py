"""Where Selector examples come from: SQuAD (question generation), CNN/DailyMail
(summarisation), and an offline question-generation task with several valid targets per source.

The real datasets load through HF `datasets` (`squad`, `cnn_dailymail` 3.0.0) or from local
files in the same formats (SQuAD v1.1 json; CNN/DM rows as jsonl or csv with `article`,
`highlights`, `id`), and both go through the same row converters.
"""

from __future__ import annotations

import csv
import json
import random
import re
from pathlib import Path

from moe_scale.data.selector import Example, qg_guidance, summary_guidance, tokenize, tokenize_with_spans

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _sentence_bounds(context: str) -> list[tuple[int, int]]:
    bounds, start = [], 0
    for m in _SENTENCE_END.finditer(context):
        bounds.append((start, m.start()))
        start = m.end()
    bounds.append((start, len(context)))
    return bounds


def squad_example(context: str, question: str, answer_text: str, answer_start: int) -> Example | None:
    """The sentence(s) holding the answer -> the question; None if the answer is not in the context.

    The answer span is the tokens overlapping the answer's characters (Zhou et al. 2017's
    sentence-level QG setting, which Cho et al. follow).
    """
    answer_end = answer_start + len(answer_text)
    if not answer_text or context[answer_start:answer_end] != answer_text:
        return None
    bounds = _sentence_bounds(context)
    ends = [e for _, e in bounds[:-1]] + [len(context)]
    first = next(i for i, e in enumerate(ends) if answer_start < e)
    last = next(i for i in range(first, len(ends)) if answer_end <= ends[i])
    sent_start, sent_end = bounds[first][0], bounds[last][1]
    tokens = tokenize_with_spans(context[sent_start:sent_end])
    source = [t for t, _, _ in tokens]
    inside = [i for i, (_, s, e) in enumerate(tokens) if s + sent_start < answer_end and e + sent_start > answer_start]
    target = tokenize(question)
    if not source or not target or not inside:
        return None
    span = (inside[0], inside[-1] + 1)
    return Example(source, target, qg_guidance(source, target, span), answer_span=span)


def squad_rows_from_json(path: str | Path):
    """Rows in the HF `squad` layout (context, question, answers{text, answer_start}) from a
    SQuAD v1.1 json file."""
    data = json.loads(Path(path).read_text())["data"]
    for article in data:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                yield {
                    "id": qa["id"],
                    "context": paragraph["context"],
                    "question": qa["question"],
                    "answers": {
                        "text": [a["text"] for a in qa["answers"]],
                        "answer_start": [a["answer_start"] for a in qa["answers"]],
                    },
                }


def load_squad_qg(split: str = "train", path: str | Path | None = None, limit: int | None = None) -> list[Example]:
    """SQuAD question generation examples, from HF `datasets` or a local SQuAD json file."""
    if path is None:
        import datasets

        rows = datasets.load_dataset("squad", split=split)
    else:
        rows = squad_rows_from_json(path)

    def make(row) -> Example | None:
        answers = row["answers"]
        if not answers["text"]:
            return None
        return squad_example(row["context"], row["question"], answers["text"][0], answers["answer_start"][0])

    return _collect(rows, make, limit)


def _collect(rows, make, limit: int | None) -> list[Example]:
    """`make(row)` for each row, skipping None, each example its own group, at most `limit`."""
    examples = []
    for row in rows:
        ex = make(row)
        if ex is not None:
            ex.group = len(examples)
            examples.append(ex)
        if limit is not None and len(examples) >= limit:
            break
    return examples


def cnndm_example(article: str, highlights: str, max_src_len: int = 400) -> Example | None:
    """Article (first max_src_len tokens) -> highlights, with the greedy longest-match focus."""
    source = tokenize(article)[:max_src_len]
    target = tokenize(highlights)
    if not source or not target:
        return None
    return Example(source, target, summary_guidance(source, target))


def cnndm_rows_from_file(path: str | Path):
    """Rows (article, highlights, id) from a local .jsonl or .csv file in the HF layout."""
    path = Path(path)
    if path.suffix == ".jsonl":
        with path.open() as f:
            yield from (json.loads(line) for line in f if line.strip())
    elif path.suffix == ".csv":
        with path.open(newline="") as f:
            yield from csv.DictReader(f)
    else:
        raise ValueError(f"CNN/DM local files are .jsonl or .csv, got {path.name}")


def load_cnndm(
    split: str = "train", path: str | Path | None = None, limit: int | None = None, max_src_len: int = 400
) -> list[Example]:
    """CNN/DailyMail summarisation examples, from HF `datasets` (3.0.0) or a local file."""
    if path is None:
        import datasets

        rows = datasets.load_dataset("cnn_dailymail", "3.0.0", split=split)
    else:
        rows = cnndm_rows_from_file(path)
    return _collect(rows, lambda row: cnndm_example(row["article"], row["highlights"], max_src_len), limit)


# ---- Offline task: one sentence with several facts, several valid questions ---------------
#
# A source states five facts (who did what, to which object, where, when). A question asks
# about one fact and mentions a type-specific subset of the others, so each question type needs
# its own focus; each type has two phrasings. As in real question data, the valid questions are
# not equally frequent: the types have a skewed prior and each type a dominant phrasing. A
# likelihood-ranked K-best list (beam search) therefore spends outputs on phrasings of the
# most frequent type, while K content selections can cover K different types.

_SYLLABLES = "ka ro li ma te su no vi da be lo ra mi ze pa to".split()
_VERBS = [
    ("bought", "buy"), ("sold", "sell"), ("painted", "paint"), ("found", "find"), ("washed", "wash"),
    ("repaired", "repair"), ("borrowed", "borrow"), ("cleaned", "clean"), ("lost", "lose"), ("ordered", "order"),
]
_ADJECTIVES = "red blue green old new small large cheap shiny broken".split()
_NOUNS = "car bike lamp chair table boat guitar clock radio camera kite piano".split()
_PLACES = "paris london rome berlin madrid vienna oslo lisbon prague dublin athens warsaw".split()
_DAYS = "monday tuesday wednesday thursday friday saturday sunday".split()

_SOURCES = (
    "{name} {past} the {adj} {noun} in {place} on {day} .",
    "on {day} , {name} {past} the {adj} {noun} in {place} .",
    "in {place} , {name} {past} the {adj} {noun} on {day} .",
)
# Question type -> (prior, its phrasings as (template, probability)).
QUESTIONS = {
    "who": (0.4, (("who {past} the {adj} {noun} in {place} ?", 0.6),
                  ("which person {past} the {adj} {noun} in {place} ?", 0.4))),
    "what": (0.3, (("what did {name} {base} on {day} ?", 0.6), ("what was {past} by {name} on {day} ?", 0.4))),
    "where": (0.2, (("where did {name} {base} the {noun} ?", 0.6),
                    ("in which city did {name} {base} the {noun} ?", 0.4))),
    "when": (0.1, (("when did {name} {base} the {adj} {noun} ?", 0.6),
                   ("on which day did {name} {base} the {adj} {noun} ?", 0.4))),
}
_TEMPLATES = [t for prior, phrasings in QUESTIONS.values() for t, _ in phrasings]
_WEIGHTS = [prior * p for prior, phrasings in QUESTIONS.values() for _, p in phrasings]


def _names(rng: random.Random, count: int) -> list[str]:
    names: set[str] = set()
    while len(names) < count:
        names.add("".join(rng.choice(_SYLLABLES) for _ in range(rng.choice((2, 3)))))
    return sorted(names)


def offline_qg_groups(
    num_sources: int, seed: int = 0, num_names: int = 4000
) -> list[tuple[list[str], list[list[str]]]]:
    """`num_sources` sources, each with all its valid questions in `QUESTIONS` order.

    Deterministic in `seed`. Names come from a large pool, so most are rare or unseen in
    training: the generator must copy them from the source.
    """
    rng = random.Random(seed)
    names = _names(random.Random(1234), num_names)
    groups = []
    for _ in range(num_sources):
        past, base = rng.choice(_VERBS)
        slots = dict(
            name=rng.choice(names), past=past, base=base, adj=rng.choice(_ADJECTIVES),
            noun=rng.choice(_NOUNS), place=rng.choice(_PLACES), day=rng.choice(_DAYS),
        )
        source = rng.choice(_SOURCES).format(**slots).split()
        groups.append((source, [t.format(**slots).split() for t in _TEMPLATES]))
    return groups


def offline_qg(num_sources: int, seed: int = 0, targets_per_source: int | None = 8) -> list[Example]:
    """Examples of the offline task; `group` is the source's index.

    targets_per_source   questions drawn (with replacement) from the task's distribution for
                         each source: 8 for training, 1 for a test set with one reference per
                         source (as SQuAD has); None = every valid question once (coverage)
    """
    if targets_per_source is not None and targets_per_source < 1:
        raise ValueError(f"targets_per_source must be >= 1 or None, got {targets_per_source}")
    draw = random.Random(seed + 1)
    examples = []
    for g, (source, targets) in enumerate(offline_qg_groups(num_sources, seed)):
        if targets_per_source is not None:
            targets = draw.choices(targets, weights=_WEIGHTS, k=targets_per_source)
        examples.extend(Example(source, t, qg_guidance(source, t), group=g) for t in targets)
    return examples
