"""Text side of the Selector task: tokens, guidance focus, vocabulary, batches.

An `Example` is one (source, target) pair with its answer span (question generation) and
its guidance focus: the 0/1 tag per source token that the selector learns to predict and
the generator is trained with (Cho et al. 2019, sec. 3.3).

    question generation   source tokens whose stem occurs in the target, that are neither
                          stopwords nor punctuation nor inside the answer span
    summarisation         source phrases copied into the target, found by greedy longest
                          match over the target (Gehrmann et al. 2018's alignment)

`collate` turns examples into padded tensors, with the extended (copy) vocabulary of a
pointer-generator: a source word outside the vocabulary gets id `V + j`, j its rank among
the example's out-of-vocabulary words, so the decoder can emit it by copying.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from functools import lru_cache

import torch
from nltk.stem.porter import PorterStemmer
from torch import Tensor

TOKEN_RE = re.compile(r"\w+(?:['\-]\w+)*|[^\w\s]")

# Function words never tagged as focus (the usual English list, plus question words).
STOPWORDS = frozenset(
    """a about above after again against all am an and any are as at be because been before being
    below between both but by can could did do does doing down during each few for from further had
    has have having he her here hers herself him himself his how i if in into is it its itself just
    me more most my myself no nor not now of off on once only or other our ours ourselves out over
    own same she should so some such than that the their theirs them themselves then there these
    they this those through to too under until up very was we were what when where which while who
    whom why will with would you your yours yourself yourselves 's 't 'd 'll 're 've n't""".split()
)

_STEMMER = PorterStemmer()


def tokenize(text: str) -> list[str]:
    """Lower-cased word and punctuation tokens."""
    return [m.group(0).lower() for m in TOKEN_RE.finditer(text)]


def tokenize_with_spans(text: str) -> list[tuple[str, int, int]]:
    """Lower-cased tokens with their character spans `[start, end)` in `text`."""
    return [(m.group(0).lower(), m.start(), m.end()) for m in TOKEN_RE.finditer(text)]


@lru_cache(maxsize=1 << 16)
def stem(token: str) -> str:
    return _STEMMER.stem(token)


def is_content(token: str) -> bool:
    """Not a stopword and not pure punctuation."""
    return token not in STOPWORDS and any(c.isalnum() for c in token)


def qg_guidance(source: list[str], target: list[str], answer_span: tuple[int, int] | None = None) -> list[int]:
    """Focus for question generation: content source tokens whose stem occurs in the target.

    answer_span is `[start, end)` in source tokens; its tokens are never focus (the answer
    is marked separately and must not be asked about).
    """
    target_stems = {stem(t) for t in target if is_content(t)}
    start, end = answer_span if answer_span is not None else (0, 0)
    return [
        int(is_content(tok) and not start <= i < end and stem(tok) in target_stems)
        for i, tok in enumerate(source)
    ]


def summary_guidance(source: list[str], target: list[str], max_n: int = 30) -> list[int]:
    """Focus for summarisation: greedy longest match of target phrases in the source.

    Scan the target left to right; at each position take the longest phrase (at most max_n
    tokens) that also occurs in the source, tag its first not-yet-tagged occurrence (else the
    first), and jump past it. A single-token match that is a stopword or punctuation is skipped:
    alone it says nothing about content.
    """
    positions = defaultdict(list)
    for n in range(1, max_n + 1):
        for p in range(len(source) - n + 1):
            positions[tuple(source[p : p + n])].append(p)
    focus = [0] * len(source)
    j = 0
    while j < len(target):
        n = 0
        while n < max_n and j + n < len(target) and tuple(target[j : j + n + 1]) in positions:
            n += 1
        if n == 0 or (n == 1 and not is_content(target[j])):
            j += 1
            continue
        starts = positions[tuple(target[j : j + n])]
        p = next((s for s in starts if not all(focus[s : s + n])), starts[0])
        focus[p : p + n] = [1] * n
        j += n
    return focus


@dataclass
class Example:
    """One (source, target) pair; `focus` is the guidance, one 0/1 per source token.

    answer_span   `[start, end)` of the answer in source tokens (question generation), or None
    group         id of the source: examples with the same group share the source and are
                  alternative valid targets for it (used to measure coverage of the targets)
    """

    source: list[str]
    target: list[str]
    focus: list[int]
    answer_span: tuple[int, int] | None = None
    group: int = -1

    def __post_init__(self):
        if len(self.focus) != len(self.source):
            raise ValueError(f"focus has {len(self.focus)} tags for {len(self.source)} source tokens")
        if self.answer_span is not None:
            start, end = self.answer_span
            if not 0 <= start < end <= len(self.source):
                raise ValueError(f"answer_span {self.answer_span} is outside the {len(self.source)} source tokens")


PAD, UNK, BOS, EOS = 0, 1, 2, 3
SPECIALS = ("<pad>", "<unk>", "<s>", "</s>")


@dataclass
class Vocab:
    """Word <-> id; ids 0..3 are <pad>, <unk>, <s>, </s>."""

    itos: list[str]
    stoi: dict[str, int] = field(init=False)

    def __post_init__(self):
        if tuple(self.itos[:4]) != SPECIALS:
            raise ValueError(f"a vocabulary starts with {SPECIALS}, got {self.itos[:4]}")
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    @classmethod
    def build(cls, sentences, max_size: int = 50_000, min_freq: int = 1) -> "Vocab":
        """Most frequent words first, ties broken alphabetically (deterministic)."""
        counts = Counter(tok for sentence in sentences for tok in sentence)
        words = [w for w, c in counts.items() if c >= min_freq and w not in SPECIALS]
        words.sort(key=lambda w: (-counts[w], w))
        return cls(list(SPECIALS) + words[: max(max_size - len(SPECIALS), 0)])

    def __len__(self) -> int:
        return len(self.itos)

    def id(self, token: str) -> int:
        return self.stoi.get(token, UNK)

    def decode(self, ids, oovs: list[str] = ()) -> list[str]:
        """Ids (extended ids included) to tokens, stopping at </s> and skipping <s>/<pad>."""
        out = []
        for i in ids:
            i = int(i)
            if i == EOS:
                break
            if i in (PAD, BOS):
                continue
            out.append(self.itos[i] if i < len(self.itos) else oovs[i - len(self.itos)])
        return out


# Answer-position tags (BIO over the answer span); pad positions are masked, not tagged.
TAG_O, TAG_B, TAG_I = 0, 1, 2


@dataclass
class Batch:
    """Padded tensors of B examples; S = longest source, T = longest target + 1.

    src_BS         source ids, out-of-vocabulary words as <unk>
    src_ext_BS     source ids in the extended vocabulary (OOV word j of an example = V + j)
    src_mask_BS    True on real tokens
    answer_BS      BIO answer-position tags (all O without an answer span)
    focus_BS       guidance focus, float 0/1 (0 on padding)
    tgt_in_BT      <s> + target, OOV as <unk> (decoder inputs)
    tgt_out_BT     target + </s> in the extended vocabulary, <pad> after the end
    oovs           per example, its out-of-vocabulary source words in id order
    num_oov        max len(oovs): the extended vocabulary has V + num_oov entries
    """

    src_BS: Tensor
    src_ext_BS: Tensor
    src_mask_BS: Tensor
    answer_BS: Tensor
    focus_BS: Tensor
    tgt_in_BT: Tensor
    tgt_out_BT: Tensor
    oovs: list[list[str]]
    groups: list[int]

    @property
    def num_oov(self) -> int:
        return max((len(o) for o in self.oovs), default=0)

    def to(self, device) -> "Batch":
        moved = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in self.__dict__.items()}
        return Batch(**moved)


def collate(
    examples: list[Example], vocab: Vocab, max_src_len: int | None = None, max_tgt_len: int | None = None
) -> Batch:
    """Pad and encode examples; sources and targets are truncated to the given lengths."""
    B = len(examples)
    sources = [ex.source[:max_src_len] for ex in examples]
    targets = [ex.target[:max_tgt_len] for ex in examples]
    S = max(max(len(s) for s in sources), 1)
    T = max(len(t) for t in targets) + 1
    src = torch.full((B, S), PAD, dtype=torch.long)
    src_ext = torch.full((B, S), PAD, dtype=torch.long)
    answer = torch.full((B, S), TAG_O, dtype=torch.long)
    focus = torch.zeros(B, S)
    tgt_in = torch.full((B, T), PAD, dtype=torch.long)
    tgt_out = torch.full((B, T), PAD, dtype=torch.long)
    all_oovs = []
    V = len(vocab)
    for b, (ex, source, target) in enumerate(zip(examples, sources, targets)):
        oovs: list[str] = []
        for i, tok in enumerate(source):
            wid = vocab.id(tok)
            src[b, i] = wid
            if wid == UNK:
                if tok not in oovs:
                    oovs.append(tok)
                src_ext[b, i] = V + oovs.index(tok)
            else:
                src_ext[b, i] = wid
        focus[b, : len(source)] = torch.tensor(ex.focus[: len(source)], dtype=torch.float)
        if ex.answer_span is not None:
            start, end = ex.answer_span
            if start < len(source):
                answer[b, start] = TAG_B
                answer[b, start + 1 : min(end, len(source))] = TAG_I
        ids_in = [BOS] + [vocab.id(t) for t in target]
        ids_out = [vocab.id(t) if vocab.id(t) != UNK or t not in oovs else V + oovs.index(t) for t in target] + [EOS]
        tgt_in[b, : len(ids_in)] = torch.tensor(ids_in)
        tgt_out[b, : len(ids_out)] = torch.tensor(ids_out)
        all_oovs.append(oovs)
    return Batch(src, src_ext, src != PAD, answer, focus, tgt_in, tgt_out, all_oovs, [ex.group for ex in examples])
