"""Checkpoints: exact resume after kill -9, atomic saves, damaged files, no code execution, EP resharding."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
import torch

from moe_scale.distributed.launch import join_with_progress
from moe_scale.train import checkpoint as ckpt_mod
from moe_scale.train.checkpoint import (
    Checkpointer,
    latest_checkpoint,
    list_checkpoints,
    verify_checkpoint,
)
from moe_scale.train.config import load_config
from moe_scale.validation import ConfigError
from moe_scale.train.trainer import Trainer
from tests.trainer_utils import CONFIGS, checkpoint_tensors, cli, popen_cli, read_jsonl, tiny

DEBUG = str(CONFIGS / "lm_debug.yaml")
STEPS = 60
# Noisy top-k and dropout draw random numbers every step: the resumed run must restore them too.
EXACT = ["train.deterministic=true", f"train.max_steps={STEPS}", "moe.router=noisy_topk",
         "moe.aux_loss.switch=0", "moe.aux_loss.importance=0.1", "moe.aux_loss.load=0.1", "model.dropout=0.1"]


def test_kill_9_then_resume_equals_the_uninterrupted_run_bitwise(tmp_path):
    straight = cli("train", DEBUG, *tiny(tmp_path / "straight", *EXACT))
    assert straight.returncode == 0, straight.stderr[-3000:]

    run = tmp_path / "killed"
    args = ("train", DEBUG, *tiny(run, *EXACT, "checkpoint.every=1", "checkpoint.keep_last=2"))
    proc = popen_cli(*args)
    ckpts = run / "checkpoints"
    deadline = time.monotonic() + 120
    while not (ckpts / "step_00000008").exists():  # every step saves: the kill lands in a step or a save
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    last = latest_checkpoint(ckpts)
    assert last is not None and int(last.name.split("_")[1]) < STEPS
    verify_checkpoint(last)  # whatever the kill interrupted, the visible checkpoint is complete

    resumed = cli(*args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {last}" in resumed.stdout
    assert not [p for p in ckpts.iterdir() if p.name.startswith(".tmp-")]
    a = checkpoint_tensors(tmp_path / "straight" / "checkpoints" / f"step_{STEPS:08d}")
    b = checkpoint_tensors(ckpts / f"step_{STEPS:08d}")
    assert a.keys() == b.keys() and any(k.startswith("optim.state.") for k in a)
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different

    def logged(path):  # per-step values (the logged loss is a mean over the interval, partial after a resume)
        rows = read_jsonl(path / "metrics.jsonl")
        return {r["step"]: r.get("grad_norm", r.get("val_loss")) for r in rows}

    assert logged(tmp_path / "straight") == logged(run)  # rows after the kill were redone, not duplicated
    steps = [r["step"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
    assert steps == sorted(set(steps))


def _trainer(tmp_path, *extra):
    return Trainer(load_config(DEBUG, tiny(tmp_path / "run", *extra)))


def test_kill_during_save_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    t = _trainer(tmp_path)
    t.train_step()
    good = t.save_checkpoint()
    saved = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    t.train_step()

    real_save = ckpt_mod.dcp.save

    def dying_save(state, storage_writer, **kw):
        Path(storage_writer.path, "__0_0.distcp").write_bytes(b"partial")
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(ckpt_mod.dcp, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        t.save_checkpoint()
    monkeypatch.setattr(ckpt_mod.dcp, "save", real_save)
    t.metrics.close()
    root = tmp_path / "run" / "checkpoints"
    assert list_checkpoints(root) == [good]
    assert (root / ".tmp-step_00000002").is_dir()  # the partial save is not a checkpoint

    again = _trainer(tmp_path)  # resume=auto: removes the partial save, loads the good one
    assert again.step == 1 and not (root / ".tmp-step_00000002").exists()
    for n, p in again.model.named_parameters():
        assert torch.equal(p, saved[n]), n
    again.metrics.close()


def test_keep_last_n(tmp_path):
    t = _trainer(tmp_path, "checkpoint.keep_last=2")
    for _ in range(4):
        t.train_step()
        t.save_checkpoint()
    t.metrics.close()
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == ["step_00000003", "step_00000004"]


@pytest.fixture
def saved(tmp_path):
    t = _trainer(tmp_path)
    t.train_step()
    path = t.save_checkpoint()
    t.metrics.close()
    return path


def test_resume_never_refuses_to_overwrite_a_run(saved, tmp_path):
    with pytest.raises(ConfigError, match="already holds checkpoints and checkpoint.resume=never"):
        _trainer(tmp_path, "checkpoint.resume=never")


# ---- expert parallelism: experts keyed by global index ---------------------------------------
# The EP runtime shards each expert stack over the EP ranks; here a rank keeps its
# block of the stack by slicing, which is all the checkpoint code sees of it.


def _ep_model_and_optimizer(rank: int = 0, ep: int = 1):
    from moe_scale.models.lm import MoELM
    from moe_scale.moe import GroupedExperts, MoEConfig

    torch.manual_seed(0)
    model = MoELM(d_model=16, n_layers=2, n_heads=2, max_seq_len=8, moe=MoEConfig(d_model=16, num_experts=4))
    for module in model.modules():
        if isinstance(module, GroupedExperts):
            n = module.num_experts // ep
            for name in ("w1", "w2"):
                block = getattr(module, name).data[rank * n : (rank + 1) * n].clone()
                setattr(module, name, torch.nn.Parameter(block))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    for p in model.parameters():
        p.grad = torch.sin(3 * p.detach())  # elementwise: an expert's grad does not depend on the sharding
    opt.step()
    return model, opt


def _ep_rank(rank, world, store_path, root, results):
    """Save this rank's expert blocks at EP=2 to ROOT/ep2, then load ROOT/ep1 (saved at EP=1)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from moe_scale.train.checkpoint import Checkpointer, ExpertSharding
    from moe_scale.distributed.parallelize import expert_param_names

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=("edp", "ep"))
        model, opt = _ep_model_and_optimizer(rank, world)
        sharding = ExpertSharding(mesh, expert_param_names(model))
        Checkpointer(Path(root) / "ep2", rank=rank, world_size=world, sharding=sharding).save(1, model, opt, {"step": 1})
        expected = {n: p.detach().clone() for n, p in model.named_parameters()}
        states = {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in model.named_parameters()}
        for p in model.parameters():
            p.data.zero_()
        opt.state.clear()
        ck = Checkpointer(Path(root) / "ep1", rank=rank, world_size=world, sharding=sharding)
        ck.load(Path(root) / "ep1" / "step_00000001", model, opt)
        ok = all(torch.equal(p, expected[n]) and torch.equal(opt.state[p]["exp_avg_sq"], states[n]["exp_avg_sq"])
                 for n, p in model.named_parameters())
        results.put((rank, ok))
    finally:
        dist.destroy_process_group()


def test_experts_are_keyed_by_global_index_across_ep_sizes(tmp_path):
    import torch.multiprocessing as mp

    full_model, full_opt = _ep_model_and_optimizer()  # EP=1 reference after one step
    Checkpointer(tmp_path / "ep1").save(1, full_model, full_opt, {"step": 1})

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_ep_rank, args=(r, 2, str(tmp_path / "store"), str(tmp_path), results))
             for r in range(2)]
    for p in procs:
        p.start()
    join_with_progress(procs, timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    assert sorted(results.get(timeout=5) for _ in range(2)) == [(0, True), (1, True)]  # EP=1 loaded at EP=2

    model, opt = _ep_model_and_optimizer()
    for p in model.parameters():
        p.data.zero_()
    opt.state.clear()
    Checkpointer(tmp_path / "ep2").load(tmp_path / "ep2" / "step_00000001", model, opt, restore_rng_state=False)
    for (name, p), q in zip(model.named_parameters(), full_model.parameters()):  # EP=2 loaded at EP=1
        assert torch.equal(p, q), name
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[p][key], full_opt.state[q][key]), (name, key)


def test_a_weights_only_checkpoint_resumes_with_a_fresh_optimizer(tmp_path):
    """`moe-scale convert` writes weights only at step 0: the run starts there, optimizer state empty."""
    source = _trainer(tmp_path / "a")
    source.train_step()
    source.metrics.close()
    weights = {n: p.detach().clone() for n, p in source.model.named_parameters()}
    Checkpointer(tmp_path / "run" / "checkpoints").save(0, source.model, None, {"step": 0, "weights_only": True})
    t = _trainer(tmp_path)
    assert t.step == 0 and not t.optimizer.state
    assert all(torch.equal(p, weights[n]) for n, p in t.model.named_parameters())
    t.train_step()
    t.metrics.close()
