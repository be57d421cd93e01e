"""Per-task evaluation metrics (pure functions over tensors and strings).

    accuracy         classes: top-1; sequences: exact match of the greedy decoding
    token_accuracy   teacher-forced argmax == target, over non-padding target tokens
    bleu             corpus BLEU (sacrebleu) of greedy decodings, translation and captioning
    log_ppl          mean negative log-likelihood (nats) per target token / per example
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.nn.functional as F
from torch import Tensor

from moe_scale.data.multimodel.tasks import Task
from moe_scale.data.multimodel.vocab import PAD_ID


def token_sums(logits_BTV: Tensor, targets_BT: Tensor) -> tuple[float, int, int]:
    """(summed NLL, correct argmax tokens, target tokens) over non-padding positions."""
    real = targets_BT != PAD_ID
    nll = F.cross_entropy(logits_BTV.flatten(0, 1).float(), targets_BT.flatten(), reduction="none")
    correct = (logits_BTV.argmax(-1) == targets_BT) & real
    return float(nll[real.flatten()].sum()), int(correct.sum()), int(real.sum())


def class_sums(logits_BC: Tensor, labels_B: Tensor) -> tuple[float, int, int]:
    """(summed NLL, correct, examples)."""
    nll = F.cross_entropy(logits_BC.float(), labels_B, reduction="sum")
    return float(nll), int((logits_BC.argmax(-1) == labels_B).sum()), int(labels_B.numel())


def exact_matches(decoded_BL: Tensor, targets_BT: Tensor) -> int:
    """Sequences whose decoding equals the target up to and including EOS."""
    n = 0
    for hyp, ref in zip(decoded_BL.tolist(), targets_BT.tolist()):
        ref = [t for t in ref if t != PAD_ID]
        n += hyp[: len(ref)] == ref
    return n


def bleu(hypotheses: list[str], references: list[str]) -> float:
    import sacrebleu

    return float(sacrebleu.corpus_bleu(hypotheses, [references]).score)


def majority_baseline(task: Task, max_examples: int | None = None) -> dict[str, float]:
    """Chance level: always answer the most frequent training class / target sequence (accuracy,
    BLEU), and the most frequent training token at each target position (token accuracy), on
    the first `max_examples` evaluation examples (as `evaluate` scores them)."""
    evals = task.eval[:max_examples]
    if task.spec.is_classification:
        top, _ = Counter(e.targets for e in task.train).most_common(1)[0]
        return {"accuracy": sum(e.targets == top for e in evals) / len(evals)}
    top_seq, _ = Counter(tuple(e.targets.tolist()) for e in task.train).most_common(1)[0]
    by_position: dict[int, Counter] = {}
    for e in task.train:
        for t, tok in enumerate(e.targets.tolist()):
            by_position.setdefault(t, Counter())[tok] += 1
    guess = {t: c.most_common(1)[0][0] for t, c in by_position.items()}
    correct = sum(guess.get(t) == tok for e in evals for t, tok in enumerate(e.targets.tolist()))
    total = sum(len(e.targets) for e in evals)
    chance = {
        "accuracy": sum(tuple(e.targets.tolist()) == top_seq for e in evals) / len(evals),
        "token_accuracy": correct / total,
    }
    if task.spec.bleu:
        refs = [task.vocab.decode(e.targets) for e in evals]
        chance["bleu"] = bleu([task.vocab.decode(top_seq)] * len(refs), refs)
    return chance
