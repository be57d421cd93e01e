"""`model.name: lm` for the trainer: packed blocks of byte or BPE tokens, next-token cross-entropy.

With `data.tokenizer: bpe`, rank 0 fits the tokenizer on the training split (or copies
`data.tokenizer_path`) into RUN_DIR/tokenizer.json before any rank tokenizes; a resumed run, and
`moe-scale generate`, read it back from there, so the ids never change under a checkpoint.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, TYPE_CHECKING

from torch import nn

from moe_scale.data.text import TextBlocks, load_documents, split_documents
from moe_scale.data.tokenizer import TOKENIZER_FILE, BPETokenizer
from moe_scale.models.lm.config import LMConfig, LMDataConfig
from moe_scale.models.lm.model import MoELM, lm_loss
from moe_scale.validation import ConfigError, check

if TYPE_CHECKING:
    from moe_scale.train.config import Config
from moe_scale.train.tasks import TaskDef, TaskLoss


def build_model(cfg: Config) -> MoELM:
    return MoELM.from_config(cfg.model, cfg.moe_config() if cfg.model.num_moe_layers else None)


class LMTask:
    find_unused_parameters = False

    def __init__(self, cfg: Config, rt):
        self.cfg = cfg
        self.bytes_per_token = 1.0
        if rt.is_main:
            self._load_data(cfg, rt)
        rt.barrier()  # the other ranks then read the tokenizer and the cache rank 0 built
        if not rt.is_main:
            self._load_data(cfg, rt)
        self.model = build_model(cfg)

    def _load_data(self, cfg: Config, rt) -> None:
        d = cfg.data
        docs = load_documents(d.dataset, d.dataset_config, d.split, d.text_field, d.max_documents, d.cache_dir,
                              d.data_files)
        tokenizer = None
        if d.tokenizer == "bpe":
            tokenizer = prepare_tokenizer(cfg, docs, Path(cfg.train.run_dir), rt.is_main)
            self.bytes_per_token = bytes_per_token(tokenizer, split_documents(docs, d.val_fraction, want_val=True))
        self.data = TextBlocks.load(docs=docs, tokenizer=tokenizer, val_fraction=d.val_fraction, seq_len=d.seq_len,
                                    batch_size=d.batch_size, rank=rt.rank, world=rt.world_size, seed=cfg.train.seed)

    def load_start_weights(self, model: nn.Module, runs, *, ep_rank: int = 0, ep_size: int = 1) -> str | None:
        """model.init_from / upcycle_from into `model` (this rank's experts); what was loaded, or None.
        The trainer calls it at step 0 of a run without a checkpoint (`runs`: `train.runs.RunReader`)."""
        m = self.cfg.model
        if m.init_from is None and m.upcycle_from is None:
            return None
        from moe_scale.models.lm.hf.start import load_start_weights

        return load_start_weights(model, self.cfg, runs, ep_rank=ep_rank, ep_size=ep_size)

    def next_batch(self):
        return self.data.next_train_batch()

    def loss(self, model: nn.Module, batch, device) -> TaskLoss:
        x_BT, y_BT = (t.to(device, non_blocking=True) for t in batch)
        logits_BTV, stats = model(x_BT)
        loss = lm_loss(logits_BTV, y_BT)
        total = loss + sum((s.aux_loss for s in stats), loss.new_zeros(()))
        return TaskLoss(loss, total, stats, tokens=y_BT.numel())

    def val_batches(self, n: int):
        return self.data.val_batches(n)

    def val_metrics(self, val_loss: float) -> dict[str, float]:
        return {"val_loss": val_loss, "val_bpb": val_loss / math.log(2) / self.bytes_per_token}

    def final_report(self, model: nn.Module, device, collective: bool) -> dict[str, Any] | None:
        return None

    def format_report(self, report: dict[str, Any]) -> str:
        return ""

    def state_dict(self) -> dict[str, Any]:
        return self.data.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.data.load_state_dict(state)


def prepare_tokenizer(cfg: Config, docs, run_dir: Path, is_main: bool) -> BPETokenizer:
    """RUN_DIR/tokenizer.json, written first by the main rank when the run has none yet.

    A run that has one (a resume, or a run directory of `moe-scale convert`) keeps it. Otherwise it
    is `data.tokenizer_path`, the tokenizer.json of model.init_from / upcycle_from, or BPE fitted
    to `model.vocab_size` ids on the training split (the first `data.bpe_max_documents` documents).
    """
    d, m = cfg.data, cfg.model
    path = run_dir / TOKENIZER_FILE
    source = d.tokenizer_path or carried_tokenizer(m)
    if is_main and not path.is_file():
        if source is not None:
            tokenizer = BPETokenizer.load(source)
        else:
            train = split_documents(docs, d.val_fraction, want_val=False)
            if d.bpe_max_documents is not None:
                train = train.select(range(min(d.bpe_max_documents, len(train))))
            texts = (batch["text"] for batch in train.iter(batch_size=1000))
            tokenizer = BPETokenizer.train((t for batch in texts for t in batch), m.vocab_size)
        run_dir.mkdir(parents=True, exist_ok=True)
        tokenizer.save(path)
    tokenizer = BPETokenizer.load(path)
    if tokenizer.vocab_size > m.vocab_size:
        raise ConfigError(f"the tokenizer {path} has {tokenizer.vocab_size} ids but model.vocab_size={m.vocab_size}; "
                          f"set model.vocab_size={tokenizer.vocab_size}")
    return tokenizer


def carried_tokenizer(m: LMConfig) -> Path | None:
    """The tokenizer.json of the directory a run starts from (model.init_from / upcycle_from), if it has one."""
    start = m.init_from or m.upcycle_from
    if start is None or not (Path(start) / TOKENIZER_FILE).is_file():
        return None
    return Path(start) / TOKENIZER_FILE


def bytes_per_token(tokenizer, docs, max_documents: int = 1000) -> float:
    """UTF-8 bytes per token over (the first documents of) `docs`, each EOS counted as one byte as the
    byte tokenizer's NUL is, so `val_bpb` is bits per byte under either tokenizer."""
    texts = docs.select(range(min(max_documents, len(docs))))["text"]
    tokens = sum(len(ids) + 1 for ids in tokenizer.encode_batch(texts))
    return sum(len(t.encode("utf-8")) + 1 for t in texts) / max(tokens, 1)


def check_config(cfg: Config) -> None:
    m, d = cfg.model, cfg.data
    if d.tokenizer == "byte":
        check(m.vocab_size >= 256, f"data.tokenizer=byte needs model.vocab_size >= 256, got {m.vocab_size}")
    else:
        check(m.vocab_size > 257, f"data.tokenizer=bpe needs model.vocab_size > 257 (256 byte tokens, the "
                                   f"end-of-document token and merges), got {m.vocab_size}")
    check(d.seq_len <= m.max_seq_len,
          f"data.seq_len={d.seq_len} exceeds model.max_seq_len={m.max_seq_len}; "
          f"raise model.max_seq_len or lower data.seq_len")
    if m.moe_every:
        dense = f" minus model.n_dense_layers={m.n_dense_layers}" if m.n_dense_layers else ""
        check(m.num_moe_layers > 0,
              f"model.moe_every={m.moe_every} > model.n_layers={m.n_layers}{dense} leaves no MoE layer; "
              f"use model.moe_every=0 for a dense model")
        check(cfg.moe.router != "min_loss",
              "moe.router=min_loss needs per-expert losses, which the LM does not compute; "
              "choose another router (topk, switch, noisy_topk, expert_choice, hash, hierarchical)")
        cfg.check_moe()
    else:
        check(cfg.parallel.ep_size == 1, "parallel.ep_size > 1 needs MoE layers: set model.moe_every >= 1")


TASK = TaskDef(LMConfig, LMDataConfig, LMTask, check_config, build_model)
