"""Accuracy and diversity of K outputs per source (Cho et al. 2019, sec. 5).

Texts are whitespace-joined token lists; BLEU-4 is sacrebleu's corpus BLEU (13a tokenizer,
scores 0..100), ROUGE is Google's rouge-score (F1, stemmed, 0..1).

    top1_bleu       corpus BLEU of each example's first (highest-scoring) output
    oracle_bleu     corpus BLEU of each example's best output by sentence BLEU against its
                    references (best of K)
    self_bleu       pairwise BLEU (Shen et al. 2019): the mean over ordered pairs i != j of the
                    corpus BLEU of outputs i against outputs j; 100 = all K identical
"""

from __future__ import annotations

from itertools import permutations

import sacrebleu


def _bleu(hyps: list[str], refs: list[list[str]]) -> float:
    """Corpus BLEU; refs[i] holds the references of hyps[i] (any number, at least one)."""
    width = max(len(r) for r in refs)
    streams = [[r[j] if j < len(r) else None for r in refs] for j in range(width)]
    return sacrebleu.corpus_bleu(hyps, streams, tokenize="13a", force=True).score


def sentence_bleu(hyp: str, refs: list[str]) -> float:
    return sacrebleu.sentence_bleu(hyp, refs, tokenize="13a").score


def top1_bleu(outputs: list[list[str]], refs: list[list[str]]) -> float:
    """outputs[i]: the K outputs of example i, best first; refs[i]: its references."""
    return _bleu([o[0] for o in outputs], refs)


def oracle_bleu(outputs: list[list[str]], refs: list[list[str]]) -> float:
    best = [max(o, key=lambda h: sentence_bleu(h, r)) for o, r in zip(outputs, refs)]
    return _bleu(best, refs)


def self_bleu(outputs: list[list[str]]) -> float:
    k = len(outputs[0])
    if k < 2 or any(len(o) != k for o in outputs):
        raise ValueError("self-BLEU needs the same K >= 2 outputs for every example")
    pairs = list(permutations(range(k), 2))
    return sum(_bleu([o[i] for o in outputs], [[o[j]] for o in outputs]) for i, j in pairs) / len(pairs)


def rouge(hyps: list[str], refs: list[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 of hyps[i] against refs[i] (rouge-score, Porter-stemmed)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for h, r in zip(hyps, refs):
        for name, score in scorer.score(r, h).items():
            totals[name] += score.fmeasure
    return {name: total / max(len(hyps), 1) for name, total in totals.items()}


def diversity_report(outputs: list[list[str]], refs: list[list[str]]) -> dict[str, float]:
    """The three numbers the paper reports for question generation."""
    return {
        "top1_bleu": top1_bleu(outputs, refs),
        "oracle_bleu": oracle_bleu(outputs, refs),
        "self_bleu": self_bleu(outputs),
    }
