"""Loader throughput from local disk and from a loopback S3 server (moto), measured not guessed.

Builds the demo dataset (once), copies it into a moto S3 server it starts on 127.0.0.1, then
times full training epochs of the real loader from both places and reports medians.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from typing import Optional

from mindeye_dist.config import DataConfig
from mindeye_dist.data.loader import build_train_loader
from mindeye_dist.data.meta import META_NAME, read_meta
from mindeye_dist.data.prepare import build_synthetic_dataset
from mindeye_dist.data.storage import Storage, s3_filesystem


def _time_epoch(cfg: DataConfig, batch_size: int, epoch: int) -> tuple[float, int]:
    loader = build_train_loader(cfg, batch_size, seed=0, rank=0, world_size=1)
    t = time.perf_counter()
    n = sum(len(b) for b in loader.epoch_batches(epoch))
    return time.perf_counter() - t, n


def _measure(cfg: DataConfig, batch_size: int, repeats: int, bytes_per_sample: float) -> dict:
    runs = [_time_epoch(cfg, batch_size, epoch) for epoch in range(repeats)]
    rates = [n / t for t, n in runs]
    med = statistics.median(rates)
    return {"samples_per_s": med, "mb_per_s": med * bytes_per_sample / 1e6, "runs_samples_per_s": rates, "samples": runs[0][1]}


def run_benchmark(data_dir: Optional[str] = None, preset: str = "demo", num_workers: int = 2, batch_size: int = 32,
                  repeats: int = 3, shuffle_buffer: int = 500) -> dict:
    """Measure loader samples/s and MB/s (local vs loopback S3); returns a JSON-ready dict."""
    tmp = None
    if data_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="mindeye_bench_")
        data_dir = os.path.join(tmp.name, "data")
    local = Storage(data_dir)
    t = time.perf_counter()
    if not local.exists(META_NAME):
        build_synthetic_dataset(preset, data_dir, seed=0, progress=False)
    build_s = time.perf_counter() - t
    meta = read_meta(data_dir)
    split = meta.splits["train"]
    bytes_per_sample = split.bytes / split.count
    result = {
        "preset": preset, "train_samples": split.count, "train_shards": len(split.shards), "bytes_per_sample": bytes_per_sample,
        "num_workers": num_workers, "batch_size": batch_size, "repeats": repeats, "shuffle_buffer": shuffle_buffer,
        "build_s": build_s, "cpu_count": os.cpu_count(),
    }
    base = dict(num_workers=num_workers, shuffle_buffer=shuffle_buffer, train_reps="one")
    result["local"] = _measure(DataConfig(url=data_dir, **base), batch_size, repeats, bytes_per_sample)
    print(f"local: {result['local']['samples_per_s']:.0f} samples/s, {result['local']['mb_per_s']:.1f} MB/s", file=sys.stderr, flush=True)

    from mindeye_dist.data.local_s3 import local_s3_server

    try:
        with local_s3_server() as endpoint:
            fs = s3_filesystem(endpoint)
            fs.mkdir("bench")
            t = time.perf_counter()
            fs.put(data_dir.rstrip("/") + "/", "bench/data/", recursive=True)
            result["upload_s"] = time.perf_counter() - t
            result["s3"] = _measure(DataConfig(url="s3://bench/data", s3_endpoint=endpoint, **base), batch_size, repeats, bytes_per_sample)
            print(f"s3: {result['s3']['samples_per_s']:.0f} samples/s, {result['s3']['mb_per_s']:.1f} MB/s", file=sys.stderr, flush=True)
    finally:
        if tmp is not None:
            tmp.cleanup()
    result["s3_over_local"] = result["s3"]["samples_per_s"] / result["local"]["samples_per_s"]
    return result
