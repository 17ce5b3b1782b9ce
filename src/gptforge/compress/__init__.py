"""Compression: quantize.py (int8/int4 weight-only, casts), prune.py (magnitude, Wanda, N:M, structured),
distill.py (an objective for the one training loop) and evaluate.py (the `gptforge eval` table)."""
