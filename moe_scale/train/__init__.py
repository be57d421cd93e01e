"""The trainer: configs, loop, backends (torch DDP + EDP, DeepSpeed), DCP checkpoints, metrics, plan."""
