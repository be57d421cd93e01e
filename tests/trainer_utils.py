"""Shared helpers of the trainer tests: a tiny offline config, CLI subprocesses, checkpoint reading."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ["HF_DATASETS_OFFLINE"] = "1"  # before `datasets` is imported anywhere: tests never reach the hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["WANDB_MODE"] = "offline"

import torch  # noqa: E402

from moe_scale.distributed.launch import run_with_progress  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
HF_CACHE = Path(tempfile.gettempdir()) / "moe_scale_test_datasets_cache"
SECRET = "wandb-secret-0123456789abcdef0123456789abcdef01234567"  # a fake API key the runs must never write

# Small enough that a step takes milliseconds on one CPU thread; 40 stdlib documents.
TINY = [
    "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=32",
    "moe.num_experts=4", "moe.k=2", "moe.aux_loss.switch=0.01",
    "data.seq_len=32", "data.batch_size=4", "data.max_documents=40", f"data.cache_dir={HF_CACHE}",
    "optim.warmup_steps=2", "train.eval_every=0", "train.eval_batches=2", "train.device=cpu",
    "logging.every=5", "logging.load_every=5", "logging.progress=false", "checkpoint.every=0",
]


def tiny(run_dir, *extra: str) -> list[str]:
    return [*TINY, f"train.run_dir={run_dir}", *extra]


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    env.update(extra)
    return env


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    """The CLI in a fresh interpreter; `timeout` is how long it may go without progress (CPU time)."""
    return run_with_progress([sys.executable, "-m", "moe_scale.cli", *args], timeout, cwd=REPO, env=env or cli_env())


def popen_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "moe_scale.cli", *args], cwd=REPO, env=env or cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def checkpoint_tensors(path) -> dict[str, torch.Tensor]:
    """Every tensor of a DCP checkpoint (model and optimizer), flattened by key."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = Path(tempfile.mkdtemp()) / "flat.pt"
    dcp_to_torch_save(path, out)
    flat: dict[str, torch.Tensor] = {}

    def walk(prefix, value):
        if isinstance(value, torch.Tensor):
            flat[prefix] = value
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(f"{prefix}.{i}", v)

    walk("", torch.load(out, weights_only=False))
    return flat


torch.set_num_threads(1)  # the CI box has 2 cores shared by the subprocesses the tests start


def read_jsonl(path) -> list[dict]:
    import json

    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def read_wandb_history(run_file) -> list[dict]:
    """History rows of an offline wandb run file (`run-ID.wandb`).

    The file is wandb's LevelDB-style record log: a 7-byte header, then 32 KiB blocks of chunks
    (crc32 4 bytes, length 2, type 1: full / first / middle / last), each record a protobuf
    `Record`. Parsed here because wandb >= 0.19 no longer ships a Python reader for it.
    """
    import json
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(run_file).read_bytes()
    assert data[:4] == b":W&B", "not a wandb run file"
    block, pos, pending, rows = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0 and length == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows
