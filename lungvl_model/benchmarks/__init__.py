"""Benchmarks behind ``lungvl bench``: figures reported as ratios against a peer measured in the same run.

DESIGN.md section 6: speed and memory are never asserted in tests; they are measured here, each
model in a fresh process, and reported relative to a specialised peer (MONAI DynUNet for the local
training step).
"""

from lungvl_model.benchmarks.train_bench import (
    PEER_NAME,
    BenchResult,
    BenchRow,
    bench_train,
    device_name,
    synthetic_batch,
)

__all__ = ["PEER_NAME", "BenchResult", "BenchRow", "bench_train", "device_name", "synthetic_batch"]
