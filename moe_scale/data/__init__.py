"""Task data pipelines on HF `datasets`. Each task keeps its own module (text.py: byte-level LM)."""
