"""Loader throughput from local disk and from a loopback S3 server (moto), measured not guessed.

Builds the demo dataset (once), copies it into a moto S3 server it starts on 127.0.0.1, then
times full training epochs of the real loader from both places, interleaved, and reports medians
and the spread.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import tempfile
import time
from typing import Optional, Sequence

from mindeye_dist.config import DataConfig
from mindeye_dist.data.loader import build_train_loader
from mindeye_dist.data.meta import META_NAME, read_meta
from mindeye_dist.data.prepare import build_synthetic_dataset
from mindeye_dist.data.local_s3 import restore_env
from mindeye_dist.data.storage import Storage, s3_filesystem


def _cpu_s(who: int) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def _process_cpu_s(pid: Optional[int]) -> float:
    """CPU seconds of another live process (user + system, from /proc; 0 if unknown)."""
    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def _time_epoch(cfg: DataConfig, batch_size: int, epoch: int, server_pid: Optional[int]) -> dict:
    """One epoch: wall time, samples, and CPU seconds of this process, of the loader's workers
    (children, counted once they have exited at the end of the epoch) and of the S3 server."""
    loader = build_train_loader(cfg, batch_size, seed=0, rank=0, world_size=1)
    c_self, c_kids, c_srv = _cpu_s(resource.RUSAGE_SELF), _cpu_s(resource.RUSAGE_CHILDREN), _process_cpu_s(server_pid)
    t = time.perf_counter()
    n = sum(len(b) for b in loader.epoch_batches(epoch))
    wall = time.perf_counter() - t
    return {"wall_s": wall, "samples": n, "main_cpu_s": _cpu_s(resource.RUSAGE_SELF) - c_self,
            "workers_cpu_s": _cpu_s(resource.RUSAGE_CHILDREN) - c_kids, "server_cpu_s": _process_cpu_s(server_pid) - c_srv}


def _summary(runs: list[dict], bytes_per_sample: float) -> dict:
    rates = [r["samples"] / r["wall_s"] for r in runs]
    med = statistics.median(rates)
    gb = runs[0]["samples"] * bytes_per_sample / 1e9

    def per_gb(key: str) -> float:
        return statistics.median(r[key] for r in runs) / gb

    # The loader's own CPU (this process + its workers) and the server's, per GB delivered: on a
    # machine with few cores the loader is CPU-bound, so these explain the samples/s.
    client = [(r["main_cpu_s"] + r["workers_cpu_s"]) / gb for r in runs]
    return {"samples_per_s": med, "mb_per_s": med * bytes_per_sample / 1e6, "runs_samples_per_s": rates,
            "samples_per_s_min": min(rates), "samples_per_s_max": max(rates),
            "samples": runs[0]["samples"], "client_cpu_s_per_gb": per_gb("main_cpu_s") + per_gb("workers_cpu_s"),
            "client_cpu_s_per_gb_min": min(client), "client_cpu_s_per_gb_max": max(client),
            "server_cpu_s_per_gb": per_gb("server_cpu_s"), "runs": runs}


def _interleaved(variants: dict[str, tuple[DataConfig, dict, Optional[int]]], batch_size: int, repeats: int,
                 bytes_per_sample: float) -> dict[str, dict]:
    """Epoch ``rep`` of every variant, then epoch ``rep + 1`` of every variant, ...: on a shared,
    noisy machine a slow spell then hits all variants alike instead of one of them."""
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    for rep in range(repeats):
        for name, (cfg, env, server_pid) in variants.items():
            saved = {k: os.environ.get(k) for k in env}
            os.environ.update(env)  # read by the loader's workers, which start with each epoch
            try:
                runs[name].append(_time_epoch(cfg, batch_size, rep, server_pid))
            finally:
                restore_env(saved)
    return {name: _summary(r, bytes_per_sample) for name, r in runs.items()}


S3_READERS = ("botocore", "s3fs")
"""What ``MINDEYE_S3_READER`` can select (see s3.py); the first is the default."""


def _unverified_copy(data_dir: str, out_dir: str) -> str:
    """``data_dir``'s shards (symlinked) under a meta.json without checksums: the same bytes read
    unverified, to measure what verifying costs."""
    os.makedirs(out_dir, exist_ok=True)
    for name in os.listdir(data_dir):
        if name.endswith((".tar", ".npz")) and not os.path.exists(os.path.join(out_dir, name)):
            os.symlink(os.path.join(os.path.abspath(data_dir), name), os.path.join(out_dir, name))
    with open(os.path.join(data_dir, META_NAME)) as f:
        raw = json.load(f)
    for split in raw["splits"].values():
        for shard in split["shards"]:
            shard.pop("sha256", None)
    with open(os.path.join(out_dir, META_NAME), "w") as f:
        json.dump(raw, f)
    return out_dir


def run_benchmark(data_dir: Optional[str] = None, preset: str = "demo", num_workers: int = 2, batch_size: int = 32,
                  repeats: int = 3, shuffle_buffer: int = 500, separate_server: bool = True,
                  s3_readers: Sequence[str] = S3_READERS[:1], unverified: bool = False) -> dict:
    """Measure loader samples/s and MB/s (local vs loopback S3); returns a JSON-ready dict.

    Every source (local disk, S3 through each of ``s3_readers``, and with ``unverified`` local
    disk without checksum verification) reads one epoch per repeat, interleaved (see
    :func:`_interleaved`); ``result["s3"]`` is the first reader's.
    The S3 server runs in its own process by default (``separate_server``): in this process it
    would share the GIL with the loader's consumer thread, which a real object store does not."""
    unknown = [r for r in s3_readers if r not in S3_READERS]
    if unknown or not s3_readers:
        raise ValueError(f"s3_readers {list(s3_readers)}: choose from {S3_READERS}")
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
        "build_s": build_s, "cpu_count": os.cpu_count(), "s3_server": "moto, own process" if separate_server else "moto, in-process thread",
        "s3_reader": s3_readers[0], "s3_readers": list(s3_readers), "interleaved": True,
    }
    base = dict(num_workers=num_workers, shuffle_buffer=shuffle_buffer, train_reps="one")
    from mindeye_dist.data.local_s3 import SERVER_PIDS, local_s3_server

    tmp_plain = tempfile.TemporaryDirectory(prefix="mindeye_bench_plain_")
    try:
        with local_s3_server(separate_process=separate_server) as endpoint:
            fs = s3_filesystem(endpoint)
            fs.mkdir("bench")
            t = time.perf_counter()
            fs.put(data_dir.rstrip("/") + "/", "bench/data/", recursive=True)
            result["upload_s"] = time.perf_counter() - t
            variants = {"local": (DataConfig(url=data_dir, **base), {}, None)}
            if unverified:
                plain = _unverified_copy(data_dir, os.path.join(tmp_plain.name, "data"))
                variants["local:unverified"] = (DataConfig(url=plain, **base), {}, None)
            s3_cfg = DataConfig(url="s3://bench/data", s3_endpoint=endpoint, **base)
            for reader in s3_readers:
                variants[f"s3:{reader}"] = (s3_cfg, {"MINDEYE_S3_READER": reader}, SERVER_PIDS.get(endpoint))
            result["variants"] = _interleaved(variants, batch_size, repeats, bytes_per_sample)
    finally:
        tmp_plain.cleanup()
        if tmp is not None:
            tmp.cleanup()
    result["local"] = result["variants"]["local"]
    result["s3"] = result["variants"][f"s3:{s3_readers[0]}"]
    for name, v in result["variants"].items():
        print(f"{name}: {v['samples_per_s']:.0f} samples/s [{v['samples_per_s_min']:.0f}-{v['samples_per_s_max']:.0f}], "
              f"loader CPU {v['client_cpu_s_per_gb']:.2f} s/GB", file=sys.stderr, flush=True)
    result["s3_over_local"] = result["s3"]["samples_per_s"] / result["local"]["samples_per_s"]
    return result
