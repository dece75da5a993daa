"""Loader throughput at NSD sizes, local disk vs a loopback moto S3 server.

Builds a synthetic dataset with MindEye1's per-sample sizes (15,724 voxels x 3 repetitions and
257x768 targets, both float16 as the shard writer stores them, plus the synthetic subject's
small image and VAE latents), then runs :func:`mindeye_dist.data.benchmark.run_benchmark` on it
(full epochs of the real train loader, local and S3 interleaved, median of repeats).
"""

from __future__ import annotations

import os
import time
from typing import Any, Optional

from mindeye_dist.bench.common import log

NSD_DIMS = {"n_voxels": 15724, "n_tokens": 257, "token_dim": 768}


def build_nsd_sized_dataset(path: str, n_train: int, n_test: int = 32,
                            dims: Optional[dict[str, int]] = None) -> tuple[float, bool]:
    """Write the dataset at ``path`` unless it is there; (seconds, built)."""
    from mindeye_dist.data import build_synthetic_dataset
    from mindeye_dist.data.meta import META_NAME

    if os.path.exists(os.path.join(path, META_NAME)):
        return 0.0, False
    t = time.perf_counter()
    build_synthetic_dataset("demo", path, seed=0, progress=False, n_train=n_train, n_test=n_test, **(dims or NSD_DIMS))
    return time.perf_counter() - t, True


def measure_data(work_dir: str, n_train: int, repeats: int, num_workers: int = 2, batch_size: int = 32,
                 dims: Optional[dict[str, int]] = None) -> dict[str, Any]:
    from mindeye_dist.data.benchmark import run_benchmark

    dims = dict(dims or NSD_DIMS)
    path = os.path.join(work_dir, "data_" + "x".join(str(dims[k]) for k in sorted(dims)) + f"_{n_train}")
    build_s, built = build_nsd_sized_dataset(path, n_train, dims=dims)
    log(f"data: dataset {dims} {'built in %.1f s' % build_s if built else 'reused'} at {path}")
    r = run_benchmark(data_dir=path, preset="demo", num_workers=num_workers, batch_size=batch_size, repeats=repeats)
    r.update({"dims": dict(dims, reps=3, dtype="float16"), "dataset_build_s": build_s,
              "target_bytes_per_sample": dims["n_tokens"] * dims["token_dim"] * 2})
    return r
