"""`moe-scale` command line."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moe-scale", description="Mixture-of-Experts training")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="one-process MoE layer smoke run on CPU")
    demo.add_argument("--steps", type=int, default=300)
    demo.add_argument("--experts", type=int, default=8)
    demo.add_argument("--router", default="topk")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from moe_scale.demo import run_demo

        losses = run_demo(steps=args.steps, num_experts=args.experts, router=args.router)
        print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
