"""Training telemetry: loggers, throughput / data-wait / MFU, FLOP counting, peaks, memory, progress.

Everything here has a no-op path so the loop never branches on "is logging on" (STYLE #11):
non-zero ranks get the base :class:`Logger` and a silent :class:`ProgressBar`.

A typical loop (host syncs only on log steps, STYLE #12)::

    logger = build_loggers(cfg.run.dir, rank)
    flops = measure_flops(train_step_on_meta_device) / batch_size    # once, FLOPs per sample
    peak = device_peak_flops(device, torch.bfloat16) or None         # None on CPU: use
                                                                     # measure_matmul_peak()
    meter = ThroughputMeter(world_size, flops_per_sample=flops, peak_flops=peak)
    bar = ProgressBar(max_steps, initial=step, rank=rank)
    meter.start()
    for step in ...:
        with meter.data_wait():
            batch = next(loader)
        loss = engine.step(batch)                # no .item() here
        meter.step(batch_size)
        bar.update(1)
        if step % log_every == 0:
            stats = meter.report(sync_device=device)   # the one host sync
            logger.log({"loss": loss.item(), **stats, **memory_stats(device)}, step)
"""

from __future__ import annotations

import contextlib
import json
import numbers
import os
import re
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

# --------------------------------------------------------------------------------------------
# Loggers
# --------------------------------------------------------------------------------------------


class Logger:
    """The no-op logger: every call is accepted and ignored (non-zero ranks, logging off)."""

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Record ``metrics`` at training step ``step``."""

    def log_text(self, key: str, text: str, step: int) -> None:
        """Record a piece of text (config dump, notes) at ``step``."""

    def log_image(self, key: str, image: Any, step: int) -> None:
        """Record an (H, W, 3) uint8 picture at ``step`` (loggers without pictures ignore it)."""

    def flush(self) -> None:
        """Push buffered records to storage."""

    def close(self) -> None:
        """Flush and release files; further calls are not allowed."""

    def __enter__(self) -> Logger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _json_value(value: Any) -> Any:
    """Tensors and numpy values -> plain Python so json can write them."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return value.item() if value.numel() == 1 else value.tolist()
    if hasattr(value, "item") and hasattr(value, "dtype"):  # numpy scalar or array
        return value.item() if getattr(value, "size", 1) == 1 else value.tolist()
    if isinstance(value, Mapping):
        return {str(k): _json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    return value


class JsonlLogger(Logger):
    """Appends one JSON object per call to ``path``: ``{"step", "time", **metrics}``.

    ``time`` is wall-clock Unix seconds. The file is opened in append mode and flushed after
    every record, so a resumed run continues the same file and a crash loses nothing written.
    ``step`` and ``time`` are set by the logger and win over same-named metric keys. Nested
    mappings are kept nested. Non-finite floats are written as the ``NaN``/``Infinity`` tokens
    Python's json reads back (a NaN loss must stay visible).
    """

    def __init__(self, path: str | os.PathLike, clock: Callable[[], float] = time.time):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._clock = clock
        self._file = open(self.path, "a", encoding="utf-8")

    def _write(self, record: dict) -> None:
        self._file.write(json.dumps(record, default=str) + "\n")
        self._file.flush()

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        record = {"step": int(step), "time": self._clock()}
        record.update({str(k): _json_value(v) for k, v in metrics.items() if k not in ("step", "time")})
        self._write(record)

    def log_text(self, key: str, text: str, step: int) -> None:
        self._write({"step": int(step), "time": self._clock(), str(key): str(text)})

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


def truncate_jsonl(path: str | os.PathLike, last_step: int) -> int:
    """Drop the records of ``path`` logged after ``last_step`` (a resumed run redoes those steps,
    so readers see one value per step). Atomic; returns the number of records dropped."""
    from mindeye_dist.fsutil import atomic_write_bytes

    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        try:
            step = json.loads(line).get("step")
        except (json.JSONDecodeError, AttributeError):
            dropped += 1  # a torn last line from a killed write
            continue
        if isinstance(step, int) and step > last_step:
            dropped += 1
        else:
            kept.append(line if line.endswith("\n") else line + "\n")
    if dropped:
        atomic_write_bytes(path, "".join(kept).encode("utf-8"))
    return dropped


def _scalar(value: Any) -> float | None:
    """A float for a scalar number (Python, numpy, one-element tensor); None for anything else."""
    if isinstance(value, torch.Tensor):
        return float(value.detach().cpu().item()) if value.numel() == 1 and not value.is_complex() else None
    if isinstance(value, numbers.Real):  # int, float, bool, numpy real scalars
        return float(value)
    if hasattr(value, "dtype") and getattr(value, "size", 0) == 1 and getattr(value.dtype, "kind", None) in tuple("biuf"):
        return float(value.item())  # one-element numpy array
    return None


def _flatten(metrics: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from _flatten(value, f"{name}/")
        else:
            yield name, value


class TensorBoardLogger(Logger):
    """Scalars to TensorBoard event files in ``log_dir`` (``torch.utils.tensorboard``).

    Numeric values become scalars; nested mappings become ``outer/inner`` tags; everything
    else (None, strings, lists) is skipped. Each call flushes: log steps are rare, and an event
    file that lags a crash by two minutes is the usual TensorBoard complaint.
    """

    def __init__(self, log_dir: str | os.PathLike, purge_step: int | None = None):
        """``purge_step``: a resumed run's first step; TensorBoard then drops the events a crashed
        run wrote at or after it, so every step shows one value."""
        from mindeye_dist.compat import require

        require("tensorboard", purpose="TensorBoard logging")  # names the right package if absent
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        self._writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=purge_step)

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        for tag, value in _flatten(metrics):
            number = _scalar(value)
            if number is not None:
                self._writer.add_scalar(tag, number, global_step=int(step))
        self._writer.flush()

    def log_text(self, key: str, text: str, step: int) -> None:
        self._writer.add_text(key, text, global_step=int(step))
        self._writer.flush()

    def log_image(self, key: str, image: Any, step: int) -> None:
        self._writer.add_image(key, image, global_step=int(step), dataformats="HWC")
        self._writer.flush()

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class MultiLogger(Logger):
    """Forwards every call to each of ``loggers`` in order."""

    def __init__(self, loggers: Sequence[Logger]):
        self.loggers = list(loggers)

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        for logger in self.loggers:
            logger.log(metrics, step)

    def log_text(self, key: str, text: str, step: int) -> None:
        for logger in self.loggers:
            logger.log_text(key, text, step)

    def log_image(self, key: str, image: Any, step: int) -> None:
        for logger in self.loggers:
            logger.log_image(key, image, step)

    def flush(self) -> None:
        for logger in self.loggers:
            logger.flush()

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()


def _env_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def build_loggers(
    run_dir: str | os.PathLike,
    rank: int | None = None,
    tensorboard: bool = True,
    jsonl: bool = True,
    jsonl_name: str = "metrics.jsonl",
    tensorboard_dir: str = "tb",
    purge_step: int | None = None,
) -> Logger:
    """The loggers of a run: ``RUN_DIR/metrics.jsonl`` and ``RUN_DIR/tb/`` on rank 0.

    ``purge_step`` (a resumed run's first step) goes to TensorBoard (see
    :class:`TensorBoardLogger`); :func:`truncate_jsonl` does the same for the jsonl file.

    Every other rank (``rank`` defaults to ``$RANK``, else 0) gets the no-op :class:`Logger`,
    so the loop calls ``logger.log`` everywhere without checking.
    """
    rank = _env_rank() if rank is None else rank
    if rank != 0:
        return Logger()
    run_dir = Path(run_dir)
    loggers: list[Logger] = []
    if jsonl:
        loggers.append(JsonlLogger(run_dir / jsonl_name))
    if tensorboard:
        loggers.append(TensorBoardLogger(run_dir / tensorboard_dir, purge_step=purge_step))
    if not loggers:
        return Logger()
    return loggers[0] if len(loggers) == 1 else MultiLogger(loggers)


# --------------------------------------------------------------------------------------------
# Throughput, data-wait share, MFU
# --------------------------------------------------------------------------------------------


def synchronize(device: torch.device | str | None) -> None:
    """Wait for queued device work (CUDA); a no-op on CPU and for ``None``."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class ThroughputMeter:
    """Windowed step timer: data wait vs. compute, samples/s, achieved FLOP/s and MFU.

    The meter only reads a host clock; it never touches the device. On GPU the host runs ahead
    of the kernels, so per-step host timestamps are not GPU times, but the *window* is exact
    as long as its end is read after a synchronize: :meth:`report` takes ``sync_device`` for
    that, and the loop calls it only on log steps. Window totals (time, samples, data wait)
    are then exact and per-step figures are window averages. Data wait is host time blocked
    in the loader (``with meter.data_wait(): batch = next(it)``); everything else in the
    window, except what runs under :meth:`excluded` (eval, checkpoints), counts as compute.

    ``samples`` passed to :meth:`step` are this rank's samples; global figures multiply by
    ``world_size`` (every data-parallel rank runs the same micro-batch size).
    ``flops_per_sample``: training FLOPs (forward + backward) of one sample, e.g.
    ``measure_flops(step_fn) / batch``. ``peak_flops``: the peak FLOP/s of *one* device for the
    training dtype (:func:`device_peak_flops`, or :func:`measure_matmul_peak` on CPU); when
    either is unknown, MFU is ``None``, never a guess.
    """

    def __init__(
        self,
        world_size: int = 1,
        flops_per_sample: float | None = None,
        peak_flops: float | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ):
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.world_size = world_size
        self.flops_per_sample = flops_per_sample
        self.peak_flops = peak_flops
        self._clock = clock
        self.start()

    def start(self) -> None:
        """Open a new window now (call right before the loop; :meth:`report` also does it)."""
        self._open_window(self._clock())

    def _open_window(self, now: float) -> None:
        self._window_start = now
        self._steps = 0
        self._samples = 0
        self._data_time = 0.0
        self._excluded_time = 0.0

    @contextlib.contextmanager
    def data_wait(self) -> Iterator[None]:
        """Time spent inside counts as waiting on data."""
        t0 = self._clock()
        try:
            yield
        finally:
            self._data_time += self._clock() - t0

    @contextlib.contextmanager
    def excluded(self) -> Iterator[None]:
        """Time spent inside is left out of the window (evaluation, checkpointing)."""
        t0 = self._clock()
        try:
            yield
        finally:
            self._excluded_time += self._clock() - t0

    def step(self, samples: int) -> None:
        """One optimizer (or micro-) step finished on this rank with ``samples`` samples."""
        self._steps += 1
        self._samples += int(samples)

    def report(self, sync_device: torch.device | str | None = None) -> dict[str, float | int | None]:
        """Figures for the window since the last report, then start a new window.

        Returns ``{}`` when no step was recorded; otherwise:
        ``steps``, ``samples`` (global), ``elapsed_s``, ``step_time_s`` (mean), ``data_wait_s``
        and ``compute_s`` (mean per step), ``data_wait_share`` (data / total time),
        ``samples_per_s`` (global), ``samples_per_s_per_device``, ``flops_per_s`` (global) and
        ``flops_per_s_per_device`` (achieved; None without ``flops_per_sample``), ``mfu``
        (achieved per device / peak per device, in [0, 1]; None without a peak).
        """
        synchronize(sync_device)
        now = self._clock()
        elapsed = now - self._window_start - self._excluded_time
        steps, samples, data_time = self._steps, self._samples, self._data_time
        self._open_window(now)
        if steps == 0:
            return {}
        elapsed = max(elapsed, 1e-12)
        per_device = samples / elapsed
        flops_dev = self.flops_per_sample * per_device if self.flops_per_sample is not None else None
        return {
            "steps": steps,
            "samples": samples * self.world_size,
            "elapsed_s": elapsed,
            "step_time_s": elapsed / steps,
            "data_wait_s": data_time / steps,
            "compute_s": (elapsed - data_time) / steps,
            "data_wait_share": data_time / elapsed,
            "samples_per_s": per_device * self.world_size,
            "samples_per_s_per_device": per_device,
            "flops_per_s": flops_dev * self.world_size if flops_dev is not None else None,
            "flops_per_s_per_device": flops_dev,
            "mfu": flops_dev / self.peak_flops if flops_dev is not None and self.peak_flops else None,
        }


def measure_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """Total FLOPs that ``fn(*args, **kwargs)`` executes, counted by ``FlopCounterMode``.

    Pass a function that runs forward *and* ``loss.backward()`` to count a training step
    (matmuls only, as FlopCounterMode counts: a Linear costs 2·B·in·out forward and the same
    again for each of dX and dW). FLOPs per sample = total / batch size. Run it once, ideally
    on a ``torch.device("meta")`` copy of the model so nothing is computed or allocated.
    """
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    return int(counter.get_total_flops())


# Dense (no 2:4 sparsity) datasheet peaks in FLOP/s, per GPU. "tf32" is the fp32 matmul peak with
# TF32 tensor cores allowed, "fp32" the plain CUDA-core rate. A device or precision not listed
# returns None: MFU is then reported as unknown rather than against a guessed peak. The A10G
# (AWS) is absent on purpose: NVIDIA publishes no datasheet for it.
# Sources: NVIDIA A100, H100, H200, L4, L40/L40S, A10, A30, T4, V100 and B200 datasheets; the
# torchtitan and nanochat peak tables for A100/H100/H200/B200 bf16.
_PEAK_TABLE: list[tuple[str, dict[str, float]]] = [
    (r"GH200", {"bf16": 989e12, "fp16": 989e12, "tf32": 494e12, "fp32": 67e12}),
    (r"H200.*NVL", {"bf16": 835e12, "fp16": 835e12, "tf32": 418e12, "fp32": 60e12}),
    (r"H200", {"bf16": 989e12, "fp16": 989e12, "tf32": 494e12, "fp32": 67e12}),
    (r"H100.*NVL", {"bf16": 835e12, "fp16": 835e12, "tf32": 418e12, "fp32": 60e12}),
    (r"H100.*PCIe", {"bf16": 756e12, "fp16": 756e12, "tf32": 378e12, "fp32": 51e12}),
    # Every other H100 name ("NVIDIA H100 80GB HBM3") is the SXM5 part.
    (r"H100", {"bf16": 989e12, "fp16": 989e12, "tf32": 494e12, "fp32": 67e12}),
    (r"\bB200\b", {"bf16": 2250e12, "fp16": 2250e12}),
    (r"A100", {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
    (r"\bA30\b", {"bf16": 165e12, "fp16": 165e12, "tf32": 82e12, "fp32": 10.3e12}),
    (r"\bA10\b", {"bf16": 125e12, "fp16": 125e12, "tf32": 62.5e12, "fp32": 31.2e12}),
    (r"L40S", {"bf16": 362e12, "fp16": 362e12, "tf32": 183e12, "fp32": 91.6e12}),
    (r"\bL40\b", {"bf16": 181e12, "fp16": 181e12, "tf32": 90.5e12, "fp32": 90.5e12}),
    (r"\bL4\b", {"bf16": 121e12, "fp16": 121e12, "tf32": 60e12, "fp32": 30.3e12}),
    (r"RTX 4090", {"bf16": 165.2e12, "fp16": 165.2e12, "fp32": 82.6e12}),  # fp32-accumulate rate
    (r"V100.*PCIE", {"fp16": 112e12, "fp32": 14e12}),  # no bf16 on Volta
    (r"V100", {"fp16": 125e12, "fp32": 15.7e12}),
    (r"\bT4\b", {"fp16": 65e12, "fp32": 8.1e12}),
]


def _precision_key(dtype: torch.dtype) -> str | None:
    if dtype == torch.bfloat16:
        return "bf16"
    if dtype == torch.float16:
        return "fp16"
    if dtype == torch.float32:
        # fp32 matmuls run on TF32 tensor cores unless the precision is "highest".
        return "fp32" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    return None


def peak_flops_from_name(device_name: str, dtype: torch.dtype = torch.bfloat16) -> float | None:
    """Datasheet dense peak FLOP/s for a GPU name (as ``torch.cuda.get_device_name`` gives it)."""
    key = _precision_key(dtype)
    if key is None:
        return None
    for pattern, peaks in _PEAK_TABLE:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return peaks.get(key)
    return None


def device_peak_flops(device: torch.device | str, dtype: torch.dtype = torch.bfloat16) -> float | None:
    """Peak FLOP/s of one ``device`` for matmuls in ``dtype``; None when unknown.

    CUDA devices are looked up by name in a datasheet table. CPUs return None: their peak is
    measured with :func:`measure_matmul_peak`, not read from a table.
    """
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return peak_flops_from_name(torch.cuda.get_device_name(device), dtype)


def measure_matmul_peak(
    dtype: torch.dtype = torch.float32,
    n: int = 2048,
    device: torch.device | str = "cpu",
    repeats: int = 5,
    warmup: int = 2,
) -> float:
    """Measured matmul FLOP/s of ``device``: median over ``repeats`` of an n×n @ n×n product.

    This is the "machine's measured peak" against which CPU achieved FLOP/s is reported (on
    the 2-core dev box: ≈186 GFLOP/s fp32, ≈396 GFLOP/s bf16 at n=4096). It uses the threads
    torch is set to use, so call it under the same ``torch.set_num_threads`` as training.
    """
    device = torch.device(device)
    if device.type == "cpu" and dtype == torch.float16:
        raise ValueError(
            "fp16 matmul on this CPU takes minutes (no fp16 kernels); measure bfloat16 or float32 instead"
        )
    if repeats < 1 or n < 1:
        raise ValueError(f"repeats and n must be positive, got repeats={repeats}, n={n}")
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    for _ in range(warmup):
        torch.mm(a, b, out=out)
    times = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return 2.0 * n**3 / max(statistics.median(times), 1e-12)


# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------


def _current_rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            resident_pages = int(f.read().split()[1])
    except (OSError, IndexError, ValueError):
        return None  # no procfs (macOS)
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def memory_stats(device: torch.device | str | None = None) -> dict[str, int | None]:
    """Host memory of this process, plus the CUDA allocator's figures for a CUDA ``device``.

    Keys: ``rss_bytes`` (current resident set, from /proc/self/statm; None without procfs),
    ``peak_rss_bytes`` (``getrusage`` ru_maxrss, KiB on Linux, converted to bytes); on CUDA
    also ``cuda_allocated_bytes``, ``cuda_peak_allocated_bytes``, ``cuda_reserved_bytes``,
    ``cuda_peak_reserved_bytes`` (peaks since start or :func:`reset_peak_memory`).
    Reading them does not synchronize the device.
    """
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    stats: dict[str, int | None] = {
        "rss_bytes": _current_rss_bytes(),
        "peak_rss_bytes": int(max_rss if sys.platform == "darwin" else max_rss * 1024),
    }
    if device is not None and torch.device(device).type == "cuda":
        stats.update(
            cuda_allocated_bytes=torch.cuda.memory_allocated(device),
            cuda_peak_allocated_bytes=torch.cuda.max_memory_allocated(device),
            cuda_reserved_bytes=torch.cuda.memory_reserved(device),
            cuda_peak_reserved_bytes=torch.cuda.max_memory_reserved(device),
        )
    return stats


def reset_peak_memory(device: torch.device | str | None = None) -> None:
    """Restart the CUDA peak counters (per log window); host peak RSS cannot be reset."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


# --------------------------------------------------------------------------------------------
# Progress bar
# --------------------------------------------------------------------------------------------


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


class ProgressBar:
    """A tqdm bar for rank 0 (steps, samples/s, loss, ETA) and compact log lines.

    ``enabled``: ``"on"`` always draws the bar, ``"off"`` never, ``"auto"`` only when ``file``
    (default stderr, where tqdm draws) is a terminal — in batch jobs the bar's carriage-return
    redraws only bloat the log, and :meth:`print_line` at log steps says the same. Non-zero
    ranks (``rank`` defaults to ``$RANK``) get neither bar nor lines.
    """

    def __init__(
        self,
        total: int,
        enabled: str | bool = "auto",
        initial: int = 0,
        rank: int | None = None,
        file: Any = None,
        line_file: Any = None,
        desc: str = "train",
        clock: Callable[[], float] = time.monotonic,
    ):
        if isinstance(enabled, bool):
            enabled = "on" if enabled else "off"
        if enabled not in ("auto", "on", "off"):
            raise ValueError(f"enabled must be 'auto', 'on' or 'off', got {enabled!r}")
        rank = _env_rank() if rank is None else rank
        self.total, self.n = total, initial
        self._initial = initial
        self._clock = clock
        self._start = clock()
        self._lines = rank == 0
        self._file = file if file is not None else sys.stderr
        self._line_file = line_file
        draw = rank == 0 and (enabled == "on" or (enabled == "auto" and _isatty(self._file)))
        self._bar = None
        if draw:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total, initial=initial, file=self._file, desc=desc, unit="step", dynamic_ncols=True
            )

    @property
    def drawing(self) -> bool:
        """True when a tqdm bar is on screen."""
        return self._bar is not None

    def update(self, n: int = 1, **postfix: Any) -> None:
        """Advance ``n`` steps; keyword values (``loss=``, ``samples_per_s=``) show after the bar."""
        self.n += n
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix({k: _format_value(v) for k, v in postfix.items()}, refresh=False)
            self._bar.update(n)

    def eta_seconds(self) -> float | None:
        """Remaining time at the average rate since the bar was created (None before any step)."""
        done = self.n - self._initial
        if done <= 0:
            return None
        return (self._clock() - self._start) / done * max(self.total - self.n, 0)

    def format_line(self, step: int, metrics: Mapping[str, Any]) -> str:
        """``step 120/1000 | loss 0.4321 | samples_per_s 512.3 | eta 0:02:11``."""
        parts = [f"step {step}/{self.total}"]
        parts += [f"{k} {_format_value(v)}" for k, v in metrics.items() if v is not None]
        eta = self.eta_seconds()
        if eta is not None:
            parts.append(f"eta {_format_duration(eta)}")
        return " | ".join(parts)

    def print_line(self, step: int, metrics: Mapping[str, Any]) -> str | None:
        """Print a compact line (rank 0 only; to stdout unless ``line_file`` was given).

        Goes through ``tqdm.write`` while a bar is drawn so the bar is not torn. Returns the line
        (None on other ranks).
        """
        if not self._lines:
            return None
        line = self.format_line(step, metrics)
        out = self._line_file if self._line_file is not None else sys.stdout
        if self._bar is not None:
            from tqdm import tqdm

            tqdm.write(line, file=out)
        else:
            print(line, file=out, flush=True)
        return line

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


__all__ = [
    "Logger",
    "JsonlLogger",
    "TensorBoardLogger",
    "MultiLogger",
    "build_loggers",
    "ThroughputMeter",
    "synchronize",
    "measure_flops",
    "peak_flops_from_name",
    "device_peak_flops",
    "measure_matmul_peak",
    "memory_stats",
    "reset_peak_memory",
    "ProgressBar",
]
