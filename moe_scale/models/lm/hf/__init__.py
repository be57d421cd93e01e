"""The LM client in Hugging Face's formats: transformers checkpoints in and out, upcycling.

    config.py   config.json <-> the run's model / moe sections; what is refused and why
    weights.py  tensor names and layouts per family <-> the MoELM state dict
    files.py    reading safetensors (sharded or not), writing config.json + model.safetensors
    start.py    `model.init_from` and `model.upcycle_from`: a run's weights at step 0

`moe_scale/convert.py` (`moe-scale convert`) writes run directories with them. Needs the `hf`
extra (safetensors; transformers only for the tests that compare against it). Nothing here
imports either at module level, so the core package never loads them.
"""
