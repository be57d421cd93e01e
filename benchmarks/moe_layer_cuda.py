"""The GPU mode of benchmarks/moe_layer.py, kept under its old name:

    python benchmarks/moe_layer_cuda.py [options]  ==  python benchmarks/moe_layer.py --device cuda [options]

The moe_scale layer (core path, bf16, dropless, SwiGLU) against the floor (the router GEMM and
three bare `torch._grouped_mm` calls on the same counts) and torchtitan-style dropless routing,
with host syncs per step and peak memory; see moe_layer.py's docstring.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from moe_layer import main  # noqa: E402

if __name__ == "__main__":
    sys.argv[1:1] = ["--device", "cuda"]
    sys.exit(main())
