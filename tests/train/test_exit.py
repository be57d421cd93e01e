"""A clean multi-rank run exits: the DDP model is freed before the process group is destroyed.

Freed after it, the DDP reducer holds the last reference to the gloo process group, and its
destructor joins gloo's threads while holding the GIL that one of them may be waiting for: the
rank never exits (`benchmarks/exit_loop.py` runs many real torchrun jobs to count such hangs).
This test checks the order itself, which fails every time it is wrong, not one run in three.
"""

from __future__ import annotations

import gc
import os

from moe_scale.distributed.launch import run_local
from tests.trainer_utils import CONFIGS, tiny


def _train_and_look_at_teardown(rank: int, world: int, run_dir: str) -> tuple[int, list[int]]:
    from torch.nn.parallel import DistributedDataParallel

    from moe_scale import cli
    from moe_scale.train import runtime

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    alive: list[int] = []

    def close_runtime() -> None:  # run_local destroys the group itself, after the function returns
        alive.append(sum(isinstance(o, DistributedDataParallel) for o in gc.get_objects()))

    runtime.close_runtime = close_runtime
    rc = cli.main(["train", str(CONFIGS / "lm_cpu_multirank.yaml"),
                   *tiny(run_dir, "optim.warmup_steps=0", "train.max_steps=2", "checkpoint.save_final=false")])
    return rc, alive


def test_the_ddp_model_is_freed_before_the_process_group(tmp_path):
    # Two interpreters build a model, load data and train two steps on a CPU shared with other work.
    results = run_local(_train_and_look_at_teardown, 2, str(tmp_path / "run"), timeout=240)
    assert results == [(0, [0]), (0, [0])]
