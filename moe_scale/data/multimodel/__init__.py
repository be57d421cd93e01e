"""MultiModel tasks: offline stand-ins, real-corpus loaders, joint sampler, metrics (see README.md)."""
