"""`moe-scale` command line: parses arguments and hands over; the work lives in the packages."""

from __future__ import annotations

import argparse
import errno
import gc
import sys
import traceback


def _train(args: argparse.Namespace) -> int:
    from moe_scale.train.checkpoint import CheckpointError
    from moe_scale.train.config import load_config
    from moe_scale.validation import ConfigError
    from moe_scale.train.runtime import close_runtime
    from moe_scale.train.trainer import Trainer

    cfg = load_config(args.config, args.overrides)
    trainer = None
    try:
        trainer = Trainer(cfg)
        result = trainer.fit()
    except (ConfigError, CheckpointError, OSError):  # the user's to fix: one line in main()
        raise
    except Exception:
        rank = trainer.rt.rank if trainer is not None else _env_rank()
        sys.stderr.write(f"[rank {rank}] training failed:\n{traceback.format_exc()}")
        sys.stderr.flush()
        return 1
    if trainer.rt.is_main:
        summary = "  ".join(f"{k} {v:.4f}" for k, v in result.items())
        print(f"done: step {trainer.step}  {summary}  run dir {cfg.train.run_dir}", flush=True)
    # Free the DDP-wrapped model (its reducer holds the process group) before destroying the group:
    # freed after it, ~ProcessGroupGloo runs holding the GIL that gloo's thread waits for, and hangs.
    del trainer
    gc.collect()
    close_runtime()
    return 0


def _env_rank() -> str:
    from moe_scale.train.runtime import launcher_ranks

    ranks = launcher_ranks()
    return str(ranks[0]) if ranks else "0"


def _plan(args: argparse.Namespace) -> int:
    from moe_scale.train.config import load_config
    from moe_scale.train.plan import format_plan, plan

    cfg = load_config(args.config, args.overrides)
    print(format_plan(plan(cfg, nodes=args.nodes, gpus_per_node=args.gpus_per_node)))
    return 0


def _report(args: argparse.Namespace) -> int:
    from moe_scale.train.metrics import render_report

    for path in render_report(args.run_dir, args.out):
        print(path)
    return 0


def _generate(args: argparse.Namespace) -> int:
    import torch

    from moe_scale.models.lm.generate import generate
    from moe_scale.train.runs import load_run

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer, _ = load_run(args.run_dir, device)
    ids = tokenizer.encode(args.prompt)
    if not ids:
        ids = [tokenizer.eos_id]  # an empty prompt starts a new document
    generator = torch.Generator(device=device).manual_seed(args.seed)
    try:
        out = generate(model, torch.tensor([ids], device=device), args.max_new_tokens, temperature=args.temperature,
                       top_p=args.top_p, eos_id=tokenizer.eos_id, generator=generator)
    except ValueError as err:
        print(f"moe-scale generate: {err}", file=sys.stderr)
        return 2
    new = out[0, len(ids):].tolist()
    if tokenizer.eos_id in new:  # the document ended
        new = new[: new.index(tokenizer.eos_id)]
    print(args.prompt + tokenizer.decode(new), flush=True)
    return 0


def _convert(args: argparse.Namespace) -> int:
    from moe_scale.convert import from_hf, to_hf

    out = from_hf(args.from_hf, args.out) if args.from_hf else to_hf(args.to_hf, args.out)
    print(out)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moe-scale", description="Mixture-of-Experts training")
    # The deepspeed launcher passes --local_rank=N; the rank is read from the environment anyway.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--debug", action="store_true", help="print the traceback of a refused config or run")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="one-process MoE layer smoke run on CPU")
    demo.add_argument("--steps", type=int, default=300)
    demo.add_argument("--experts", type=int, default=8)
    demo.add_argument("--router", default="topk")

    train = sub.add_parser("train", parents=[common], help="train a model from a YAML config (any launcher, or none)")
    train.add_argument("config", help="YAML config, e.g. configs/lm_debug.yaml")
    train.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. moe.num_experts=64")

    plan = sub.add_parser("plan", parents=[common], help="parameters, memory per rank and all-to-all bytes of a config")
    plan.add_argument("config")
    plan.add_argument("overrides", nargs="*", metavar="section.key=value")
    plan.add_argument("--nodes", type=int, default=1)
    plan.add_argument("--gpus-per-node", type=int, default=8)

    report = sub.add_parser("report", parents=[common], help="render PNG plots of a run from its JSONL metrics")
    report.add_argument("run_dir")
    report.add_argument("--out", default=None, help="output directory (default RUN_DIR/report)")

    gen = sub.add_parser("generate", help="sample text from the newest checkpoint of an lm run (KV cache)")
    gen.add_argument("run_dir")
    gen.add_argument("--prompt", default="")
    gen.add_argument("--max-new-tokens", type=int, default=200)
    gen.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    gen.add_argument("--top-p", type=float, default=0.95)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])

    conv = sub.add_parser("convert", parents=[common], help="Hugging Face checkpoint <-> moe_scale run directory "
                                                             "(needs the hf extra)")
    source = conv.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-hf", metavar="DIR", help="a transformers checkpoint directory (config.json + safetensors)")
    source.add_argument("--to-hf", metavar="RUN_DIR", help="a moe_scale run directory (its newest checkpoint)")
    conv.add_argument("--out", required=True, help="the run directory (--from-hf) or HF directory (--to-hf) to write")

    args = parser.parse_args(argv)
    if args.command == "demo":
        from moe_scale.demo import run_demo

        losses = run_demo(steps=args.steps, num_experts=args.experts, router=args.router)
        print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}")
        return 0
    from moe_scale.train.checkpoint import CheckpointError
    from moe_scale.validation import ConfigError

    try:
        commands = {"train": _train, "plan": _plan, "report": _report, "generate": _generate, "convert": _convert}
        return commands[args.command](args)
    except (ConfigError, CheckpointError) as err:
        if _env_rank() == "0":  # every rank meets the same error; one message is enough
            _refuse(args, str(err))
        return 2
    except OSError as err:  # may be one rank's own (its disk, its data cache): each says so
        _refuse(args, _os_error(err), rank=_env_rank() if _launched() else None)
        return 2


def _refuse(args: argparse.Namespace, message: str, rank: str | None = None) -> None:
    if args.debug:
        traceback.print_exc()
    where = f"[rank {rank}] " if rank is not None else ""
    print(f"moe-scale {args.command}: {where}{message}", file=sys.stderr, flush=True)


_OS_FIXES = {
    errno.ENOSPC: "free space there, or set train.run_dir to a disk with room; a rerun resumes from the last checkpoint",
    errno.EDQUOT: "free space within the quota, or set train.run_dir elsewhere; a rerun resumes from the last checkpoint",
    errno.EACCES: "fix its permissions or choose another path",
    errno.EPERM: "fix its permissions or choose another path",
    errno.EROFS: "the file system is read-only: set train.run_dir to a writable one",
    errno.ENOENT: "check the path",
}


def _os_error(err: OSError) -> str:
    """One sentence: what failed, on which path, and what to do."""
    what = err.strerror or str(err) or type(err).__name__
    path = f" ({err.filename})" if err.filename else ""
    fix = _OS_FIXES.get(err.errno or 0)
    return f"{what}{path}; {fix}" if fix else f"{what}{path}"


def _launched() -> bool:
    from moe_scale.train.runtime import launcher_ranks

    return launcher_ranks() is not None


if __name__ == "__main__":
    sys.exit(main())
