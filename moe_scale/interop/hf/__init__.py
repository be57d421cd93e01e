"""Hugging Face interop: convert transformers checkpoints to moe_scale runs and back.

    config.py   config.json <-> the run's model / moe sections; what is refused and why
    weights.py  tensor names and layouts per family <-> the MoELM state dict
    files.py    reading safetensors (sharded or not), writing config.json + model.safetensors
    convert.py  `moe-scale convert --from-hf DIR --out RUN_DIR` and `--to-hf RUN_DIR --out DIR`
    start.py    `model.init_from` and `model.upcycle_from`: a run's weights at step 0

Needs the `hf` extra (safetensors; transformers only for the tests that compare against it).
Nothing here imports either at module level, so the core package never loads them.
"""
