"""Every collective of a run meets a device its backend serves (NCCL: CUDA tensors only).

The simulation. NCCL rejects a CPU tensor; gloo, the only backend a CPU box has, accepts any,
so a plain CPU run cannot show a host tensor slipping into a collective (the evaluation's
float64 loss sum did, and `build_mesh`'s int64 config check). Here the ranks run the trainer
under gloo with every `torch.distributed` collective wrapped by a checker that declares the
run's device (`Runtime.device`) the one the "NCCL" backend owns, and fails a collective when

1. a tensor handed to it is on another device, or
2. it is called directly by moe_scale code other than the token exchange (`comm.py`,
   `a2a.py`) and `moe_scale/distributed/collectives.py`, the helper that moves the tensors
   moe_scale makes itself (flags, counts, metrics) to the run's device first.

On this box the run's device and the host are both `cpu`, so rule 1 alone could never fail on
a tensor built on the host; rule 2 is what catches it: the evaluation's `dist.all_reduce` of a
CPU float64 tensor was a direct call from `trainer.py` and fails here. That the helper really
moves tensors to the run's device is checked with `meta` standing in for the GPU
(`test_the_helper_hands_the_collective_the_run_device`). Collectives that torch makes itself
(DDP, DCP, object collectives, device meshes) take their device from the module or from the
backend; they are held to rule 1 and recorded.

The run covers mesh building (EP=2), training (gradient sync, the finite-step check, the
norm), metrics (the logging all-reduce), evaluation, checkpointing (save, then a resume).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d

from moe_scale.distributed import collectives
from moe_scale.distributed.launch import RankFailure, run_local
from moe_scale.train.runtime import process_group_backend

TENSOR_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "all_to_all_single",
                      "all_to_all", "reduce_scatter", "reduce_scatter_tensor", "reduce", "gather", "scatter",
                      "send", "recv", "isend", "irecv", "all_gather_single", "reduce_scatter_single")
OBJECT_COLLECTIVES = ("all_gather_object", "broadcast_object_list", "gather_object", "scatter_object_list")
PACKAGE = Path(collectives.__file__).resolve().parents[1]  # moe_scale/
TORCH = Path(torch.__file__).resolve().parent
ALLOWED_CALLERS = {PACKAGE / "distributed" / name for name in ("collectives.py", "comm.py", "a2a.py")}


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


def _origin(frame) -> str:
    """The first caller outside torch and the helper: who asked for this collective."""
    while frame is not None:
        path = Path(frame.f_code.co_filename).resolve()
        if not path.is_relative_to(TORCH) and path != PACKAGE / "distributed" / "collectives.py":
            where = path.relative_to(PACKAGE.parent) if path.is_relative_to(PACKAGE.parent) else path.name
            return f"{where}:{frame.f_code.co_name}"
        frame = frame.f_back
    return "?"


def install_checker(run_device: torch.device) -> list[str]:
    """Wrap the collectives of this process; returns the list of origins it fills."""
    seen: list[str] = []

    def wrap(name, native, is_object):
        def checked(*args, **kwargs):
            caller = sys._getframe(1)
            seen.append(f"{name} <- {_origin(caller)}")
            path = Path(caller.f_code.co_filename).resolve()
            if not is_object and path.is_relative_to(PACKAGE) and path not in ALLOWED_CALLERS:
                raise RuntimeError(f"{path.relative_to(PACKAGE.parent)}:{caller.f_lineno} ({caller.f_code.co_name}) "
                                   f"calls torch.distributed.{name} directly; tensors moe_scale makes must go "
                                   f"through moe_scale.distributed.collectives (moved to the run's device)")
            for t in _tensors([*args, *kwargs.values()]):
                if t.device != run_device:
                    raise RuntimeError(f"{name} from {_origin(caller)} got a tensor on {t.device}; the run's "
                                       f"NCCL device is {run_device}")
            return native(*args, **kwargs)

        return checked

    for name in (*TENSOR_COLLECTIVES, *OBJECT_COLLECTIVES):
        native = getattr(distributed_c10d, name, None)
        if native is None:  # the single-tensor names of newer torch
            continue
        checked = wrap(name, native, name in OBJECT_COLLECTIVES)
        setattr(distributed_c10d, name, checked)
        setattr(dist, name, checked)
    return seen


def _train_eval_checkpoint_resume(rank: int, world: int, run_dir: str, backend: str) -> list[str]:
    from moe_scale.train.config import load_config
    from moe_scale.train.runtime import Runtime
    from moe_scale.train.trainer import Trainer
    from tests.trainer_utils import CONFIGS, tiny

    rt = Runtime(rank, world, rank, torch.device("cpu"))
    seen = install_checker(rt.device)
    extra = ("parallel.ep_size=2", f"parallel.backend={backend}", "parallel.timeout_s=60", "train.eval_every=2", "checkpoint.every=2",
             "logging.every=1", "train.grad_accum=2", "optim.warmup_steps=1")
    config = str(CONFIGS / "lm_cpu_multirank.yaml")
    Trainer(load_config(config, tiny(run_dir, *extra, "train.max_steps=2")), runtime=rt).fit()
    resumed = Trainer(load_config(config, tiny(run_dir, *extra, "train.max_steps=3")), runtime=rt)
    assert resumed.step == 2
    resumed.fit()
    return seen


@pytest.mark.parametrize("backend", ["torch", "fsdp"])
def test_every_collective_of_a_run_is_on_the_run_device(tmp_path, backend):
    seen = run_local(_train_eval_checkpoint_resume, 2, str(tmp_path / "run"), backend, timeout=300)
    origins = {entry.split(" <- ")[1] for entry in seen[0]}
    expected = {
        "moe_scale/distributed/mesh.py:_agree",  # mesh building
        "moe_scale/train/trainer.py:evaluate",  # evaluation
        "moe_scale/train/trainer.py:_log",  # metrics
        "moe_scale/train/trainer.py:train_step",  # the finite-step check
        "moe_scale/train/checkpoint.py:save",  # checkpointing
        "moe_scale/train/checkpoint.py:_verify",  # resume
    }
    if backend == "torch":  # training: the expert gradient buckets and the norm
        expected |= {"moe_scale/distributed/grad_sync.py:_launch", "moe_scale/train/backends.py:_grad_norm"}
    else:  # FSDP reduces gradients itself; the norm is one all-reduce
        expected |= {"moe_scale/train/backends.py:finish_grads"}
    assert expected <= origins, sorted(origins)


def _direct_host_collective(rank: int, world: int) -> None:
    install_checker(torch.device("cpu"))
    old_evaluation = "total = torch.zeros(2, dtype=torch.float64)\ndist.all_reduce(total)\n"
    exec(compile(old_evaluation, str(PACKAGE / "train" / "trainer.py"), "exec"), {"torch": torch, "dist": dist})


def test_a_direct_collective_from_moe_scale_code_is_caught():
    """The checker's own test: the evaluation's old lines, run as code of trainer.py, fail under it."""
    with pytest.raises(RankFailure, match="calls torch.distributed.all_reduce directly"):
        run_local(_direct_host_collective, 2, timeout=60)


def test_the_helper_hands_the_collective_the_run_device(monkeypatch):
    """`meta` stands in for the GPU: a host tensor reaches the collective on the run's device."""
    got = []
    monkeypatch.setattr(dist, "all_reduce", lambda t, **kw: got.append(t.device))
    monkeypatch.setattr(dist, "all_gather_into_tensor", lambda out, t, **kw: got.extend([out.device, t.device]))
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    run = torch.device("meta")
    assert collectives.all_reduce(torch.ones(2, dtype=torch.float64), run).device == run
    assert collectives.all_gather(torch.tensor([1, 2]), run).shape == (2, 2)
    assert got == [run, run, run]


def test_gpu_runs_map_cpu_tensors_to_gloo_and_cuda_ones_to_nccl():
    assert process_group_backend("auto", torch.device("cuda", 0)) == "cpu:gloo,cuda:nccl"
    assert process_group_backend("nccl", torch.device("cuda", 3)) == "cpu:gloo,cuda:nccl"
    assert process_group_backend("auto", torch.device("cpu")) == "gloo"
    assert process_group_backend("gloo", torch.device("cuda", 0)) == "gloo"
