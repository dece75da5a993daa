"""Shared pieces of the benchmark: preset specs, configs, models, synthetic batches, step timing.

A *preset spec* is a model preset name, optionally with model overrides after a colon
(``mindeye1:prior=false,lowlevel=false``), or one of the :data:`ALIASES`. Presets whose dims come
from data (``tiny``, ``demo``) get the dims of the synthetic dataset of the same name (what
``make demo`` trains on); the others their fixed or nominal dims (as ``launchers/estimate.py``).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]

ALIASES: dict[str, str] = {
    "mindeye1-bp": "mindeye1:prior=false,lowlevel=false",
}
"""``mindeye1-bp``: the MindEye1 backbone + retrieval projector (948M params at NSD subject-1 dims,
257x768 CLIP-L tokens), prior and low-level head off: the largest MindEye-shaped model whose fp32
AdamW states (16 B/param, 14 GiB) fit a 24 GiB machine."""


def log(msg: str) -> None:
    """Progress on stderr (the JSON and markdown go to files / stdout)."""
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class PresetSpec:
    name: str
    """As given on the command line (the row label)."""
    preset: str
    """The model preset."""
    overrides: tuple[str, ...]
    """``model.key=value`` overrides."""

    @classmethod
    def parse(cls, text: str) -> "PresetSpec":
        full = ALIASES.get(text, text)
        preset, _, rest = full.partition(":")
        overrides = tuple(f"model.{kv.strip().removeprefix('model.')}" for kv in rest.split(",") if kv.strip())
        from mindeye_dist.models.presets import PRESETS

        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r} in {text!r}; choose one of {', '.join(PRESETS)} "
                             f"or an alias ({', '.join(ALIASES)}), optionally with ':key=value,...' model overrides")
        return cls(text, preset, overrides)

    def data_dims(self) -> dict[str, Any]:
        """Dims of the synthetic dataset named like the preset (tiny, demo); {} for the others."""
        from mindeye_dist.data.synthetic import PRESETS as SYNTHETIC, get_spec

        if self.preset not in SYNTHETIC:
            return {}
        s = get_spec(self.preset)
        return {"n_voxels": s.n_voxels, "n_tokens": s.n_tokens, "token_dim": s.token_dim,
                "lowlevel_shape": [4, s.vae_size, s.vae_size]}


def experiment_config(spec: PresetSpec, micro_batch: int, precision: str = "fp32",
                      ds_config: str = "ds_configs/zero0.json", extra: tuple[str, ...] = ()):
    """The ExperimentConfig a user would run for this preset (defaults otherwise)."""
    from mindeye_dist.config import load_config

    return load_config(None, [f"model.preset={spec.preset}", *spec.overrides, f"train.micro_batch_size={micro_batch}",
                              f"train.precision={precision}", "train.max_steps=1000000", f"run.ds_config={ds_config}",
                              "log.progress='off'", *extra])


def build(spec: PresetSpec, cfg):
    """The model for ``cfg`` at the spec's dims (build under ``torch.device('meta')`` to count only)."""
    from mindeye_dist.models import build_model

    return build_model(cfg.model, nominal=True, **spec.data_dims())


def count(spec: PresetSpec, cfg, world_size: int = 1, micro_batch: Optional[int] = None,
          precision: str = "fp32", flops: bool = True) -> dict[str, Any]:
    """estimate(): params, training FLOPs per sample and memory per rank, on the meta device."""
    from mindeye_dist.estimate import estimate

    return estimate(cfg.model, flops=flops, world_size=world_size, micro_batch_size=micro_batch,
                    precision=precision, **spec.data_dims())


def synthetic_batch(model_cfg, batch_size: int, device: torch.device | str = "cpu", seed: int = 0):
    """A Batch shaped like the model's data (voxels, token targets, VAE latents when the model has
    a low-level head), random, in memory: the data cost is measured separately."""
    from mindeye_dist.data.batch import Batch

    g = torch.Generator().manual_seed(seed)
    n_vox = max(model_cfg.subject_table().values())
    targets = torch.randn(batch_size, model_cfg.n_tokens, model_cfg.token_dim, generator=g)
    targets = targets / targets[:, :1].norm(dim=-1, keepdim=True)  # MindEye1 norm_embs convention
    vae = torch.randn(batch_size, *model_cfg.lowlevel_shape, generator=g) if model_cfg.lowlevel else None
    batch = Batch(voxels=torch.randn(batch_size, n_vox, generator=g), targets=targets, vae=vae, images=None,
                  subject=torch.zeros(batch_size, dtype=torch.long), index=torch.arange(batch_size))
    return batch.to(device)


def sync(device: torch.device | str) -> None:
    from mindeye_dist.metrics import synchronize

    synchronize(device)


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def time_calls(fn: Callable[[], Any], repeats: int, warmup: int = 1, device: torch.device | str = "cpu") -> list[float]:
    """Wall seconds of each of ``repeats`` calls after ``warmup`` untimed ones (device synced)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def measure_copy_bandwidth(device: torch.device | str = "cpu", mib: int = 512, repeats: int = 5) -> float:
    """Memory bandwidth in bytes/s (read + write) of a ``mib`` MiB fp32 ``copy_``, median of ``repeats``:
    the roofline's other axis (AdamW, gradient copies and the big Linear's dW at small batch live here)."""
    n = mib * 2**20 // 4
    a = torch.ones(n, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    times = time_calls(lambda: b.copy_(a), repeats, warmup=1, device=device)
    return 2.0 * n * 4 / median(times)


def proc_kib_bytes(path: str, key: str) -> Optional[int]:
    """Bytes of a ``Key:   N kB`` line of a procfs file (/proc/meminfo, /proc/self/status);
    None where there is no procfs or no such key."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def mem_available_bytes() -> Optional[int]:
    """MemAvailable from /proc/meminfo (None where there is no procfs)."""
    return proc_kib_bytes("/proc/meminfo", "MemAvailable")


def host_info() -> dict[str, Any]:
    info: dict[str, Any] = {"cpu_count": os.cpu_count(), "torch": torch.__version__,
                            "torch_threads": torch.get_num_threads()}
    try:
        import deepspeed

        info["deepspeed"] = deepspeed.__version__
    except Exception:  # pragma: no cover - optional here
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
        info["load_avg_at_start"] = list(os.getloadavg())
    except OSError:
        pass
    info["mem_total_bytes"] = proc_kib_bytes("/proc/meminfo", "MemTotal")
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    info = host_info()
    return f"cpu: {info.get('cpu_model', 'unknown')} ({info['cpu_count']} cores, {torch.get_num_threads()} torch threads)"
