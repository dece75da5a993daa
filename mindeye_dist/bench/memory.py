"""Model-state memory per rank at ZeRO 0/1/2/3 with 2 ranks, fp32 and bf16, measured vs ``estimate_memory``.

For each (precision, stage) two rank processes are started (``python -m mindeye_dist.bench.memory``,
with ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_*`` set as the ``deepspeed`` launcher or
torchrun would, one torch thread each). Each rank:

1. ``init_distributed()`` (gloo), resolves the shipped ``ds_configs/zeroN.json`` as ``train.run``
   does, then the baseline: RSS after ``malloc_trim``.
2. Builds the :class:`mindeye_dist.trainer.Trainer` exactly as ``train.run`` does (the model
   under ``deepspeed.zero.Init`` at stage 3, then ``DeepSpeedEngine``) and one training step (it
   allocates the optimizer states). "After the step" RSS is recorded, then the peak-RSS counter is
   reset (``/proc/self/clear_refs``).
3. Forward + backward of a second step: parameters, gradients (as the stage keeps them after its
   reduction), optimizer states and DeepSpeed's persistent buffers are all alive, the activations
   freed ("states live"). Recorded there: the RSS; the bytes of every live CPU tensor storage
   (found through the garbage collector, deduplicated by storage); then the RSS after
   ``malloc_trim(0)``. **Measured model-state memory = that trimmed RSS - the baseline**: glibc keeps
   freed heap chunks resident until trimmed (0.05-0.16 GiB here, mostly at ZeRO-3, whose
   partition-sized temporaries land below the mmap threshold); they are the allocator's cache,
   not model states, and the untrimmed figure is reported next to it.
4. ``engine.step()``; the peak RSS since the reset - baseline is the step's peak (states + the
   transient buffers of forward, backward and the optimizer step + activations), compared with
   the estimate's ``peak_bytes``.

The workers keep glibc's default allocator settings. ``train.run`` applies
``train.host_memory=reuse`` (``mindeye_dist.hostmem``), which keeps every freed page in the
process: under it a training run's RSS sits at the step peak column, not at the model states.
The workers run on the CPU even on a GPU host (host RSS is what is measured).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Optional

from mindeye_dist.bench.common import REPO_ROOT, PresetSpec, experiment_config, log, proc_kib_bytes
from mindeye_dist.distributed import free_port

PRECISIONS = ("fp32", "bf16")


def _rss() -> int:
    from mindeye_dist.metrics import memory_stats

    return int(memory_stats()["rss_bytes"] or 0)


def _hwm() -> int:
    """VmHWM (this process's peak RSS since exec or the last :func:`_reset_hwm`). ``ru_maxrss`` is
    not used: Linux carries the parent's high-water mark across fork + exec, and it cannot be reset."""
    hwm = proc_kib_bytes("/proc/self/status", "VmHWM")
    if hwm is not None:
        return hwm
    from mindeye_dist.metrics import memory_stats

    return int(memory_stats()["peak_rss_bytes"] or 0)


def _reset_hwm() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: writing 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _malloc_trim() -> bool:
    """Hand glibc's free heap pages back to the kernel (no-op off glibc)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.malloc_trim(0))
    except (OSError, AttributeError):
        return False


def live_tensor_bytes() -> int:
    """Bytes of every distinct CPU tensor storage reachable from Python: tensors the garbage
    collector tracks, their ``.grad`` and DeepSpeed's ZeRO-3 partitions (``ds_tensor``). A
    storage shared by views counts once; unused capacity of a ``torch.empty`` buffer counts in
    full (its untouched pages are not resident)."""
    import torch

    seen: dict[int, int] = {}

    def add(t: Any) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type != "cpu" or t.is_meta:
            return
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return
        if storage.data_ptr():
            seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())

    gc.collect()
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor):
            add(obj)
            if obj.is_leaf:
                add(obj.grad)
            add(getattr(obj, "ds_tensor", None))
    return sum(seen.values())


def worker(preset: str, ds_config: str, micro_batch: int, precision: str, out_path: str) -> None:
    import mindeye_dist  # noqa: F401
    import torch

    from mindeye_dist.bench.common import synthetic_batch
    from mindeye_dist.bench.training import Stepper, make_trainer
    from mindeye_dist.distributed import init_distributed, teardown_distributed
    from mindeye_dist.ds_config import load_ds_config, resolve_ds_config

    rank, world, device = init_distributed()
    try:
        spec = PresetSpec.parse(preset)
        cfg = experiment_config(spec, micro_batch, precision=precision, ds_config=ds_config)
        ds = resolve_ds_config(load_ds_config(ds_config), cfg, world)
        gc.collect()
        _malloc_trim()
        base = _rss()
        trainer = make_trainer(spec, cfg, device, ds_config=ds, world_size=world, rank=rank)
        engine = trainer.engine
        gc.collect()
        after_init = _rss()
        stepper = Stepper(trainer)
        batch = synthetic_batch(trainer.model.config, micro_batch, device, seed=rank)
        stepper(batch)  # the first step allocates the optimizer states
        gc.collect()
        after_step = _rss()
        init_peak = _hwm()
        reset = _reset_hwm()
        # Second step up to the end of backward: every model state is alive, activations are freed.
        terms = trainer.forward_loss(batch)
        engine.backward(terms.total)
        del terms
        gc.collect()
        states_raw = _rss()
        live = live_tensor_bytes()
        trimmed = _malloc_trim()
        states = _rss()
        engine.step()
        step_peak = _hwm() if reset else None
        with open(out_path, "w") as f:
            json.dump({"rank": rank, "world_size": world, "ds_config": ds_config, "precision": precision,
                       "baseline_rss_bytes": base, "after_init_rss_bytes": after_init, "after_step_rss_bytes": after_step,
                       "states_live_rss_bytes": states, "states_live_untrimmed_rss_bytes": states_raw,
                       "malloc_trim": trimmed, "live_tensor_bytes": live,
                       "peak_rss_bytes": max(init_peak, step_peak or 0), "init_peak_rss_bytes": init_peak,
                       "step_peak_rss_bytes": step_peak,
                       "after_init_delta_bytes": after_init - base, "after_step_delta_bytes": after_step - base,
                       "model_state_bytes": states - base, "untrimmed_model_state_bytes": states_raw - base,
                       "step_peak_delta_bytes": None if step_peak is None else step_peak - base,
                       "threads": torch.get_num_threads()}, f)
    finally:
        teardown_distributed()


def _run_stage(preset: str, stage: int, ds_config: str, micro_batch: int, precision: str, timeout_s: float,
               tmp: str, tag: str = "") -> list[dict[str, Any]]:
    port = free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
                   CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
        name = f"{precision}_zero{stage}{tag}_rank{rank}"
        out = os.path.join(tmp, f"{name}.json")
        logf = open(os.path.join(tmp, f"{name}.log"), "w")
        cmd = [sys.executable, "-m", "mindeye_dist.bench.memory", "--preset", preset, "--ds-config", ds_config,
               "--micro-batch", str(micro_batch), "--precision", precision, "--out", out]
        procs.append((subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=logf, stderr=subprocess.STDOUT), out, logf))
    deadline = time.monotonic() + timeout_s
    results = []
    for proc, out, logf in procs:
        try:
            rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for p, _, _ in procs:
                p.kill()
            rc = "timeout"
        logf.close()
        if rc != 0 or not os.path.exists(out):
            with open(logf.name) as f:
                tail = f.read()[-2000:]
            raise RuntimeError(f"ZeRO-{stage} {precision} memory rank exited with {rc}:\n{tail}")
        with open(out) as f:
            results.append(json.load(f))
    return results


SMALL_BUCKETS = 5_000_000
"""Bucket size (elements) of the ``+small_buckets`` variant: how much the shipped configs' buckets
(5e7 reduce/all-gather at ZeRO-1/2; 2e7 reduce and prefetch at ZeRO-3) still cost."""


def small_bucket_config(stage: int, path: str) -> str:
    """The shipped ``ds_configs/zeroN.json`` with every bucket at :data:`SMALL_BUCKETS`, written to ``path``."""
    from mindeye_dist.ds_config import load_ds_config

    ds = load_ds_config(REPO_ROOT / "ds_configs" / f"zero{stage}.json")
    zo = ds.setdefault("zero_optimization", {})
    for key in ("reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size"):
        if key in zo:
            zo[key] = SMALL_BUCKETS
    with open(path, "w") as f:
        json.dump(ds, f, indent=2)
    return path


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def _estimates(preset: str, micro_batch: int, precision: str, runs: list[tuple[int, str, str]]) -> tuple[dict, dict]:
    """(model facts, {key: estimate_memory's row}) for each run's DeepSpeed config, on the meta device."""
    import torch

    from mindeye_dist.bench.common import build
    from mindeye_dist.ds_config import load_ds_config
    from mindeye_dist.estimate import estimate_memory

    spec = PresetSpec.parse(preset)
    cfg = experiment_config(spec, micro_batch, precision=precision)
    with torch.device("meta"):
        model = build(spec, cfg)
    rows, mem = {}, None
    for stage, path, key in runs:
        mem = estimate_memory(model, ds_config=load_ds_config(path), world_size=2,
                              micro_batch_size=micro_batch, precision=precision)
        rows[key] = mem["stages"][str(stage)]
    facts = {"params": mem["total_params"], "largest_layer": mem["largest_layer"],
             "largest_layer_params": mem["largest_layer_params"]} if mem else {}
    return facts, rows


def measure_zero_memory(preset: str, micro_batch: int, stages: tuple[int, ...] = (0, 1, 2, 3),
                        small_bucket_stages: tuple[int, ...] = (), timeout_s: float = 300.0,
                        precisions: tuple[str, ...] = PRECISIONS, headline_precision: Optional[str] = None) -> dict[str, Any]:
    """Measured vs estimated model-state memory per rank for each precision and stage (shipped ds
    configs), plus each stage of ``small_bucket_stages`` with :func:`small_bucket_config` (key
    ``"N+small_buckets"``). ``stages`` / ``zero3_vs_zero0`` at the top level are those of
    ``headline_precision`` (default: the first of ``precisions``); every precision is under
    ``by_precision``."""
    precisions = tuple(precisions)
    headline_precision = headline_precision or precisions[0]
    if headline_precision not in precisions:
        raise ValueError(f"headline precision {headline_precision!r} is not among the measured {precisions}")
    out: dict[str, Any] = {"preset": preset, "world_size": 2, "micro_batch": micro_batch, "precision": headline_precision,
                           "precisions": list(precisions), "by_precision": {}}
    with tempfile.TemporaryDirectory(prefix="mindeye_bench_mem_") as tmp:
        runs = [(s, f"ds_configs/zero{s}.json", str(s)) for s in stages]
        runs += [(s, small_bucket_config(s, os.path.join(tmp, f"zero{s}_small.json")), f"{s}+small_buckets")
                 for s in small_bucket_stages]
        for precision in precisions:
            facts, est = _estimates(preset, micro_batch, precision, runs)
            out.update(facts)
            rows: dict[str, Any] = {}
            for stage, ds_path, key in runs:
                t = time.perf_counter()
                ranks = _run_stage(preset, stage, ds_path, micro_batch, precision, timeout_s, tmp,
                                   tag=key.partition("+")[2])
                e = est[key]
                measured = max(r["model_state_bytes"] for r in ranks)
                peaks = [r["step_peak_delta_bytes"] for r in ranks if r["step_peak_delta_bytes"] is not None]
                step_peak = max(peaks) if len(peaks) == len(ranks) else None
                rows[key] = {
                    "stage": stage, "precision": precision,
                    "ds_config": ds_path if not os.path.isabs(ds_path) else f"zero{stage}.json, buckets {SMALL_BUCKETS:.0e}",
                    "measured_model_state_bytes_per_rank": measured,
                    "untrimmed_model_state_bytes_per_rank": max(r["untrimmed_model_state_bytes"] for r in ranks),
                    "live_tensor_bytes_per_rank": max(r["live_tensor_bytes"] for r in ranks),
                    "after_step_bytes_per_rank": max(r["after_step_delta_bytes"] for r in ranks),
                    "estimate_model_state_bytes_per_rank": e["model_states_bytes"],
                    "estimate_vs_measured": _ratio(e["model_states_bytes"], measured),
                    "estimate_terms": {k: e[k] for k in ("params_bytes", "grads_bytes", "optimizer_bytes", "master_bytes",
                                                         "buffers_bytes")},
                    "step_peak_bytes_per_rank": step_peak,
                    "estimate_peak_bytes_per_rank": e["peak_bytes"],
                    "estimate_peak_vs_measured": _ratio(e["peak_bytes"], step_peak),
                    "estimate_transient": e["transient"],
                    "deepspeed_estimate_bytes": e["deepspeed_estimate_bytes"],
                    "peak_rss_bytes_per_rank": max(r["peak_rss_bytes"] for r in ranks),
                    "ranks": ranks, "wall_s": time.perf_counter() - t,
                }
                log(f"ZeRO-{key} {precision}: measured {measured / 2**30:.2f} GiB/rank (untrimmed "
                    f"{rows[key]['untrimmed_model_state_bytes_per_rank'] / 2**30:.2f}, live tensors "
                    f"{rows[key]['live_tensor_bytes_per_rank'] / 2**30:.2f}), estimate {e['model_states_bytes'] / 2**30:.2f}; "
                    f"step peak {'-' if step_peak is None else f'{step_peak / 2**30:.2f}'}, estimate {e['peak_bytes'] / 2**30:.2f}")
            entry: dict[str, Any] = {"stages": rows}
            if "0" in rows and "3" in rows:
                z0, z3 = rows["0"], rows["3"]
                entry["zero3_vs_zero0"] = _ratio(z3["measured_model_state_bytes_per_rank"], z0["measured_model_state_bytes_per_rank"])
                entry["zero3_vs_zero0_untrimmed"] = _ratio(z3["untrimmed_model_state_bytes_per_rank"],
                                                           z0["untrimmed_model_state_bytes_per_rank"])
                entry["zero3_vs_zero0_live_tensors"] = _ratio(z3["live_tensor_bytes_per_rank"], z0["live_tensor_bytes_per_rank"])
                entry["zero3_vs_zero0_estimate"] = _ratio(z3["estimate_model_state_bytes_per_rank"],
                                                          z0["estimate_model_state_bytes_per_rank"])
                entry["zero3_vs_zero0_step_peak"] = _ratio(z3["step_peak_bytes_per_rank"], z0["step_peak_bytes_per_rank"])
                if "3+small_buckets" in rows:
                    entry["zero3_small_buckets_vs_zero0"] = _ratio(rows["3+small_buckets"]["measured_model_state_bytes_per_rank"],
                                                                   z0["measured_model_state_bytes_per_rank"])
            out["by_precision"][precision] = entry
    head = out["by_precision"][headline_precision]
    out["stages"] = head["stages"]
    for key in ("zero3_vs_zero0", "zero3_vs_zero0_estimate", "zero3_small_buckets_vs_zero0"):
        if key in head:
            out[key] = head[key]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="one rank of the ZeRO memory benchmark (started by measure_zero_memory)")
    p.add_argument("--preset", required=True)
    p.add_argument("--ds-config", required=True)
    p.add_argument("--micro-batch", type=int, required=True)
    p.add_argument("--precision", choices=PRECISIONS, default="fp32")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    worker(args.preset, args.ds_config, args.micro_batch, args.precision, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
