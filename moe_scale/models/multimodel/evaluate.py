"""Per-task evaluation of a MultiModel on the tasks of `moe_scale.data.multimodel`."""

from __future__ import annotations

import torch

from moe_scale.data.multimodel.metrics import bleu, class_sums, exact_matches, token_sums
from moe_scale.data.multimodel.tasks import Task, collate
from moe_scale.models.multimodel.model import MultiModel


@torch.no_grad()
def evaluate(model: MultiModel, task: Task, batch_size: int = 100, max_examples: int | None = None,
             decode: bool = True, device="cpu") -> dict[str, float]:
    """Metrics of one task on its evaluation split.

    classes: accuracy, log_ppl. Sequences: token_accuracy and log_ppl (teacher forced), and with
    decode=True accuracy (exact match of the greedy decoding) and, for BLEU tasks, bleu.
    """
    was_training = model.training
    model.eval()
    examples = task.eval[:max_examples]
    nll = correct = count = exact = 0
    hyps, refs = [], []
    for start in range(0, len(examples), batch_size):
        batch = collate(task.spec, examples[start : start + batch_size]).to(device)
        _, _, out = model.loss(batch)
        if task.spec.is_classification:
            n, c, k = class_sums(out.logits, batch.targets)
        else:
            n, c, k = token_sums(out.logits, batch.targets)
            if decode:
                decoded = model.greedy_decode(
                    batch.inputs, input_modality=batch.input_modality, target_space_B=batch.target_space,
                    max_len=batch.targets.shape[1] + 5, input_mask=batch.input_mask,
                )
                exact += exact_matches(decoded, batch.targets)
                hyps += [task.vocab.decode(row) for row in decoded.tolist()]
                refs += [task.vocab.decode(row) for row in batch.targets.tolist()]
        nll, correct, count = nll + n, correct + c, count + k
    model.train(was_training)
    if task.spec.is_classification:
        return {"accuracy": correct / count, "log_ppl": nll / count}
    metrics = {"token_accuracy": correct / count, "log_ppl": nll / count}
    if decode:
        metrics["accuracy"] = exact / len(examples)
        if task.spec.bleu:
            metrics["bleu"] = bleu(hyps, refs)
    return metrics
