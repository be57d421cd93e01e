"""`model.name: selector` for the trainer: the K-expert Selector and its generator on the
offline question-generation task (`moe_scale.data.selector_sources.offline_qg`).

Each step trains the selector by hard EM against the guidance focus and the generator with the
guidance focus (`SelectorSeq2Seq.forward`); the examples each expert wins are counted over the
whole run (checkpointed with the data position). The final report decodes the K outputs per
test source (one per expert, thresholded focus, greedy) and gives top-1 BLEU, oracle BLEU
(best of K) and pairwise Self-BLEU against the one reference per source, and the win counts.
The hard mixture routes whole examples, not tokens, so the `moe` section and expert
parallelism do not apply (parallel.ep_size must be 1; data parallelism works).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TYPE_CHECKING

import numpy as np
from torch import nn

from moe_scale.data.selector import PAD, Batch, Vocab, collate
from moe_scale.data.selector_sources import offline_qg
from moe_scale.models.selector.config import GeneratorConfig, SelectorConfig
from moe_scale.models.selector.metrics import diversity_report
from moe_scale.models.selector.model import SelectorSeq2Seq
from moe_scale.validation import ConfigError, check

if TYPE_CHECKING:
    from moe_scale.train.config import Config
from moe_scale.train.tasks import TaskDef, TaskLoss


@dataclass
class SelectorSection:
    """Sizes of the selector and of its generator (embed_dim, hidden_dim, dropout are shared).

    num_experts   K focuses per source;  threshold   test-time focus threshold (0.15 in the paper)
    focus_dim, copy, max_len   the generator's focus embedding, pointer-generator copy, output length
    """

    name: str = "selector"
    num_experts: int = 3
    embed_dim: int = 64
    hidden_dim: int = 128
    expert_dim: int = 64
    answer_dim: int = 0
    dropout: float = 0.1
    threshold: float = 0.15
    focus_dim: int = 16
    copy: bool = True
    max_len: int = 30

    def configs(self, vocab_size: int) -> tuple[SelectorConfig, GeneratorConfig]:
        shared = dict(vocab_size=vocab_size, embed_dim=self.embed_dim, hidden_dim=self.hidden_dim,
                      answer_dim=self.answer_dim, dropout=self.dropout)
        return (SelectorConfig(num_experts=self.num_experts, expert_dim=self.expert_dim, threshold=self.threshold,
                               **shared),
                GeneratorConfig(focus_dim=self.focus_dim, copy=self.copy, max_len=self.max_len, **shared))


@dataclass
class SelectorData:
    """The offline task: every source has 8 valid questions (4 types x 2 phrasings).

    train_sources, targets_per_source   training pairs = their product (targets drawn by the prior)
    test_sources    test sources, one reference question each (as SQuAD has)
    min_freq        words rarer than this in training stay out of the vocabulary (copied instead)
    batch_size      examples per rank per micro-step
    split_seed      fixes the generated data; the test set uses split_seed + 1000
    """

    train_sources: int = 3000
    targets_per_source: int = 8
    test_sources: int = 300
    min_freq: int = 20
    batch_size: int = 64
    split_seed: int = 0

    def __post_init__(self):
        for key in ("train_sources", "targets_per_source", "test_sources", "batch_size", "min_freq"):
            check(getattr(self, key) >= 1, f"data.{key} must be >= 1, got {getattr(self, key)}")


class SelectorTask:
    find_unused_parameters = False

    def __init__(self, cfg: Config, rt):
        d = cfg.data
        self.train = offline_qg(d.train_sources, seed=d.split_seed, targets_per_source=d.targets_per_source)
        self.test = offline_qg(d.test_sources, seed=d.split_seed + 1000, targets_per_source=1)
        self.vocab = Vocab.build([ex.source for ex in self.train] + [ex.target for ex in self.train],
                                 min_freq=d.min_freq)
        self.batch_size, self.seed, self.rank = d.batch_size, cfg.train.seed, rt.rank
        self.threshold = cfg.model.threshold
        self.batches_drawn = 0
        self.wins = [0] * cfg.model.num_experts
        self.model = SelectorSeq2Seq(*cfg.model.configs(len(self.vocab)))

    def next_batch(self) -> Batch:
        rng = np.random.default_rng([self.seed, self.batches_drawn, self.rank])
        self.batches_drawn += 1
        pick = rng.choice(len(self.train), size=self.batch_size, replace=len(self.train) < self.batch_size)
        return collate([self.train[j] for j in pick], self.vocab)

    def loss(self, model: nn.Module, batch: Batch, device) -> TaskLoss:
        batch = batch.to(device)
        loss, stats = model(batch)
        extras = {"selector_loss": float(stats.selector_loss), "generator_loss": float(stats.generator_loss)}
        if model.training:
            wins = stats.wins_K.tolist()
            self.wins = [a + b for a, b in zip(self.wins, wins)]
            extras.update({f"wins/expert{k}": float(w) for k, w in enumerate(wins)})
        return TaskLoss(stats.generator_loss, loss, [], int((batch.tgt_out_BT != PAD).sum()), extras)

    def val_batches(self, n: int):
        for b in range(n):
            examples = [self.test[(b * self.batch_size + i) % len(self.test)] for i in range(self.batch_size)]
            yield collate(examples, self.vocab)

    def val_metrics(self, val_loss: float) -> dict[str, float]:
        """val_loss is the generator's NLL per token given the guidance focus."""
        return {"val_loss": val_loss}

    def final_report(self, model: nn.Module, device, collective: bool) -> dict[str, Any]:
        was_training = model.training
        model.eval()
        outputs = []
        for i in range(0, len(self.test), 100):
            batch = collate(self.test[i : i + 100], self.vocab).to(device)
            gens = model.generate(batch, threshold=self.threshold)
            for b in range(gens.ids_BKL.shape[0]):
                outputs.append([" ".join(self.vocab.decode(ids, batch.oovs[b])) for ids in gens.ids_BKL[b]])
        model.train(was_training)
        refs = [[" ".join(ex.target)] for ex in self.test]
        report = diversity_report(outputs, refs)
        return {**report, "expert_wins": list(self.wins), "test_sources": len(self.test),
                "focus_threshold": self.threshold,
                "examples": [{"source": " ".join(ex.source), "reference": r[0], "outputs": o}
                             for ex, r, o in list(zip(self.test, refs, outputs))[:3]]}

    def format_report(self, report: dict[str, Any]) -> str:
        lines = [f"K={len(report['expert_wins'])} outputs per source on {report['test_sources']} test sources: "
                 f"top-1 BLEU {report['top1_bleu']:.1f}  oracle BLEU {report['oracle_bleu']:.1f}  "
                 f"Self-BLEU {report['self_bleu']:.1f} (lower = more diverse)",
                 f"examples won per expert over training: {report['expert_wins']}"]
        for ex in report["examples"][:2]:
            lines.append(f"  {ex['source']}\n    -> " + "\n    -> ".join(ex["outputs"]))
        return "\n".join(lines)

    def state_dict(self) -> dict[str, Any]:
        return {"batches_drawn": self.batches_drawn, "wins": list(self.wins)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batches_drawn, self.wins = int(state["batches_drawn"]), [int(w) for w in state["wins"]]


def check_config(cfg: Config) -> None:
    check(cfg.model.name == "selector", f"model.name must be selector here, got {cfg.model.name!r}")
    check(cfg.parallel.ep_size == 1,
          "the Selector's hard mixture routes whole examples inside one process; set parallel.ep_size=1")
    try:
        cfg.model.configs(vocab_size=100)
    except ValueError as err:
        raise ConfigError(f"model: {err}") from None


TASK = TaskDef(SelectorSection, SelectorData, SelectorTask, check_config)
