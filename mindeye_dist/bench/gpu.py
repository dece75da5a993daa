"""GPU readiness in one run: what a user with a GPU needs to know first, in under 8 minutes.

``launchers/gpu_check.sh`` (= ``python launchers/benchmark.py --gpu-check``) records, on one GPU:

1. ``environment``: torch / CUDA / NCCL / DeepSpeed versions, the device and its datasheet bf16 peak.
2. ``optimizer``: which fused AdamW :func:`mindeye_dist.optim.build_optimizer` picks (apex's
   FusedAdam, torch's fused AdamW, DeepSpeed's CPU Adam with optimizer offload), which of
   apex / DeepSpeed's FusedAdam / torch's fused kernel are usable here, and the wrapper DeepSpeed
   puts around it in bf16.
3. ``nccl``: ``init_distributed`` (the NCCL process group) and the first collectives, timed.
4. ``mfu``: the real step (``bench.training.measure_preset``: ``Trainer.step``, DeepSpeed ZeRO-0,
   bf16) at the mindeye1 preset at micro-batch 32 and 256; MFU against the datasheet peak (goal
   >= 0.50 at >= 256) and against a measured bf16 matmul.
5. ``zero3``: the same preset under ZeRO-3 (``deepspeed.zero.Init``, world of one), device memory
   after a step (states) and its peak, next to ``estimate``'s prediction.

On a CPU (``--device cpu``; ``--quick`` shrinks the presets) every part that does not need CUDA
runs the same code (MFU has no datasheet peak: the fraction of the measured matmul peak is given;
ZeRO-3 memory is the live tensor bytes and RSS) and the CUDA-only parts are skipped with the
reason, so the script is tested without a GPU. Each part records ``status`` (ok, skipped, failed)
and a failing part does not stop the others; parts that would start after ``budget_s`` are
skipped so the whole run stays under the limit.
"""

from __future__ import annotations

import gc
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from mindeye_dist.bench.common import PresetSpec, count, experiment_config, host_info, log, proc_kib_bytes

MFU_GOAL = 0.50
"""Issue #14: bf16 MFU >= 50% at the mindeye1 preset at micro-batch >= 256."""


@dataclass
class GpuCheckOptions:
    device: str = "auto"
    """``cuda`` when available (``auto``), or ``cpu`` to test everything but the CUDA parts."""
    quick: bool = False
    """Tiny presets and sizes (the CPU test): the code paths, not the numbers."""
    preset: str = "mindeye1"
    micro_batches: list[int] = field(default_factory=lambda: [32, 256])
    repeats: int = 5
    warmup: int = 2
    zero3_preset: str = "mindeye1"
    zero3_micro_batch: int = 32
    matmul_n: int = 8192
    budget_s: float = 420.0
    """No part starts after this many seconds (the shell script kills the run at 480 s)."""

    def resolved(self) -> "GpuCheckOptions":
        import dataclasses

        device = self.device if self.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        if not self.quick:
            return dataclasses.replace(self, device=device)
        return dataclasses.replace(self, device=device, preset="tiny", micro_batches=[2, 4], repeats=2, warmup=1,
                                   zero3_preset="tiny", zero3_micro_batch=2, matmul_n=256)


def _part(name: str, fn: Callable[[], dict[str, Any]], deadline: float) -> dict[str, Any]:
    if time.monotonic() > deadline:
        return {"status": "skipped", "reason": "time budget spent (the run must stay under 8 minutes)"}
    t0 = time.monotonic()
    try:
        out = fn()
    except Exception as e:  # a failing part is a finding; the others still run
        log(f"gpu check: {name} failed: {e}")
        out = {"status": "failed", "reason": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
    out.setdefault("status", "ok")
    out["seconds"] = time.monotonic() - t0
    log(f"gpu check: {name}: {out['status']}{' (' + out['reason'] + ')' if out.get('reason') else ''}")
    return out


def _skip_without_cuda(device: torch.device) -> Optional[dict[str, Any]]:
    if device.type != "cuda":
        why = "CUDA is not available on this machine" if not torch.cuda.is_available() else "--device cpu was asked for"
        return {"status": "skipped", "reason": f"needs a CUDA device: {why}"}
    return None


def environment(device: torch.device) -> dict[str, Any]:
    from mindeye_dist.metrics import device_peak_flops

    out: dict[str, Any] = {"torch": torch.__version__, "cuda_runtime": torch.version.cuda, "host": host_info(),
                           "device": str(device)}
    try:
        import deepspeed

        out["deepspeed"] = deepspeed.__version__
    except ImportError:  # pragma: no cover - a dependency
        out["deepspeed"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out.update(device_name=props.name, device_memory_bytes=props.total_memory, device_count=torch.cuda.device_count(),
                   capability=f"{props.major}.{props.minor}", bf16_supported=torch.cuda.is_bf16_supported(),
                   datasheet_bf16_flops=device_peak_flops(device, torch.bfloat16),
                   nccl=".".join(map(str, torch.cuda.nccl.version())) if hasattr(torch.cuda, "nccl") else None)
    return out


def optimizer(device: torch.device) -> dict[str, Any]:
    """What build_optimizer picks here (and with offload on a GPU), and what is usable."""
    from mindeye_dist.optim import build_optimizer

    cfg = experiment_config(PresetSpec.parse("tiny"), 2)
    model = torch.nn.Linear(8, 8).to(device)
    _, picked = build_optimizer(model, cfg.optim, device=device)
    out: dict[str, Any] = {"picked": picked, "usable": {}}
    try:
        from apex.optimizers import FusedAdam  # noqa: F401

        out["usable"]["apex.FusedAdam"] = True
    except ImportError as e:
        out["usable"]["apex.FusedAdam"] = f"no: {e}"
    try:
        from deepspeed.ops.op_builder import FusedAdamBuilder

        out["usable"]["deepspeed.FusedAdam"] = bool(FusedAdamBuilder().is_compatible(verbose=False)) and device.type == "cuda"
    except Exception as e:  # the builder probes the CUDA toolchain
        out["usable"]["deepspeed.FusedAdam"] = f"no: {type(e).__name__}: {e}"
    out["usable"]["torch.AdamW(fused)"] = device.type in ("cuda", "cpu")
    if device.type == "cuda":
        try:
            _, offloaded = build_optimizer(model.cpu(), cfg.optim, device=device, offload=True)
            out["picked_with_optimizer_offload"] = offloaded
        except Exception as e:  # DeepSpeedCPUAdam JIT-builds its C++ op
            out["picked_with_optimizer_offload"] = f"failed: {type(e).__name__}: {e}"
    else:
        out["picked_with_optimizer_offload"] = "n/a on CPU (the optimizer already runs on the host)"
    return out


def nccl(device: torch.device) -> dict[str, Any]:
    """The process group the run already initialised (NCCL on CUDA), its first collectives timed."""
    skip = _skip_without_cuda(device)
    if skip:
        return skip
    import torch.distributed as dist

    out: dict[str, Any] = {"backend": dist.get_backend(), "world_size": dist.get_world_size()}
    x = torch.ones(1 << 20, device=device)
    for name in ("first_all_reduce_s", "second_all_reduce_s"):
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        dist.all_reduce(x)
        torch.cuda.synchronize(device)
        out[name] = time.perf_counter() - t0
    t0 = time.perf_counter()
    dist.barrier()
    out["barrier_s"] = time.perf_counter() - t0
    out["ok"] = bool(x[0].item() == dist.get_world_size() ** 2)
    if not out["ok"]:
        out.update(status="failed", reason="all_reduce returned a wrong sum")
    return out


def mfu(opts: GpuCheckOptions, device: torch.device) -> dict[str, Any]:
    from mindeye_dist.bench.training import measure_preset
    from mindeye_dist.metrics import device_peak_flops, measure_matmul_peak

    peak = measure_matmul_peak(torch.bfloat16, n=opts.matmul_n, device=device, repeats=5)
    datasheet = device_peak_flops(device, torch.bfloat16)
    res = measure_preset(PresetSpec.parse(opts.preset), sorted(opts.micro_batches), repeats=opts.repeats,
                         warmup=opts.warmup, device=device, precision="bf16", ds_config="ds_configs/zero0.json",
                         peak=peak, datasheet_peak=datasheet, budget_s=60.0, profile=device.type == "cuda")
    rows = [{k: r[k] for k in ("micro_batch", "step_time_s", "samples_per_s", "flops_per_s", "fraction_of_peak",
                               "mfu_datasheet", "phase_s")} for r in res["rows"]]
    big = [r for r in rows if r["micro_batch"] >= 256 and r["mfu_datasheet"] is not None]
    out = {"preset": opts.preset, "params": res["params"], "flops_per_sample": res["flops_per_sample"],
           "engine": res["engine"], "measured_bf16_matmul_flops": peak, "datasheet_bf16_flops": datasheet, "rows": rows,
           "goal": f"mfu >= {MFU_GOAL} at micro-batch >= 256", "profile": res.get("profile")}
    if big:
        out["goal_met"] = max(r["mfu_datasheet"] for r in big) >= MFU_GOAL
    else:
        out["goal_met"] = None
        out["goal_note"] = ("no datasheet peak for this device (CPU or unknown GPU): MFU is not defined, "
                            "fraction_of_peak is against the measured bf16 matmul") if datasheet is None else \
            "no micro-batch >= 256 was measured"
    if device.type == "cuda":
        out["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    return out


def zero3(opts: GpuCheckOptions, device: torch.device) -> dict[str, Any]:
    """ZeRO-3 (world of one) device memory after a step and its peak, against ``estimate``."""
    from mindeye_dist.bench.common import synthetic_batch
    from mindeye_dist.bench.memory import _reset_hwm, live_tensor_bytes
    from mindeye_dist.bench.training import Stepper, make_trainer

    spec, mb = PresetSpec.parse(opts.zero3_preset), opts.zero3_micro_batch
    cfg = experiment_config(spec, mb, precision="bf16", ds_config="ds_configs/zero3.json")
    est = count(spec, cfg, world_size=1, micro_batch=mb, precision="bf16", flops=False)["memory"]["stages"]["3"]
    cuda = device.type == "cuda"
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = live_tensor_bytes()
        base_rss = proc_kib_bytes("/proc/self/status", "VmRSS") or 0
        reset = _reset_hwm()
    trainer = make_trainer(spec, cfg, device)
    stepper = Stepper(trainer)
    batch = synthetic_batch(trainer.model.config, mb, device)
    stepper(batch)
    stepper(batch)
    if cuda:
        torch.cuda.synchronize(device)
        states, peak = torch.cuda.memory_allocated(device) - base, torch.cuda.max_memory_allocated(device) - base
        how = "torch.cuda.memory_allocated after two steps / max_memory_allocated, minus before the build"
    else:
        states = live_tensor_bytes() - base
        peak = (proc_kib_bytes("/proc/self/status", "VmHWM") or 0) - base_rss
        how = ("live CPU tensor bytes after two steps; peak = VmHWM - RSS before the build"
               + ("" if reset else " (VmHWM could not be reset: the process's peak so far, an upper bound)"))
    del stepper, trainer, batch
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return {"preset": opts.zero3_preset, "micro_batch": mb, "precision": "bf16", "measured_states_bytes": states,
            "measured_peak_bytes": peak, "estimate_states_bytes": est["model_states_bytes"],
            "estimate_peak_bytes": est["peak_bytes"], "estimate_vs_measured_states": est["model_states_bytes"] / states
            if states > 0 else None, "estimate_vs_measured_peak": est["peak_bytes"] / peak if peak > 0 else None,
            "how": how}


def run_gpu_check(opts: Optional[GpuCheckOptions] = None) -> dict[str, Any]:
    """Every part, in order, under one time budget; returns the JSON-ready record."""
    import datetime as _dt

    from mindeye_dist.distributed import init_distributed, teardown_distributed

    opts = (opts or GpuCheckOptions()).resolved()
    t_start = time.monotonic()
    deadline = t_start + opts.budget_s
    device = torch.device(opts.device)
    result: dict[str, Any] = {"date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                              "options": {k: getattr(opts, k) for k in opts.__dataclass_fields__}}
    t0 = time.perf_counter()
    _, world, run_device = init_distributed()
    init_s = time.perf_counter() - t0
    if run_device.type != device.type:
        device = torch.device("cpu") if device.type == "cpu" else run_device
    try:
        result["environment"] = _part("environment", lambda: environment(device), deadline)
        result["optimizer"] = _part("optimizer", lambda: optimizer(device), deadline)
        result["nccl"] = _part("nccl", lambda: {**nccl(device), "init_distributed_s": init_s}, deadline)
        result["mfu"] = _part("mfu", lambda: mfu(opts, device), deadline)
        result["zero3"] = _part("zero3", lambda: zero3(opts, device), deadline)
    finally:
        teardown_distributed()
    result["duration_s"] = time.monotonic() - t_start
    return result


def format_markdown(r: dict[str, Any]) -> str:
    env, opt, nc, m, z = (r.get(k, {}) for k in ("environment", "optimizer", "nccl", "mfu", "zero3"))
    out = [f"## GPU check ({r['date']}, {env.get('device_name') or env.get('device')}, {r['duration_s']:.0f} s)", "",
           f"torch {env.get('torch')}, CUDA {env.get('cuda_runtime')}, NCCL {env.get('nccl')}, "
           f"DeepSpeed {env.get('deepspeed')}; datasheet bf16 peak {_tf(env.get('datasheet_bf16_flops'))}.", ""]
    for name, part in (("optimizer", opt), ("nccl", nc), ("mfu", m), ("zero3", z)):
        if part.get("status") != "ok":
            out.append(f"- **{name}: {part.get('status')}** - {part.get('reason')}")
    if opt.get("status") == "ok":
        out.append(f"- optimizer picked: `{opt['picked']}`; with optimizer offload: `{opt['picked_with_optimizer_offload']}`; "
                   f"usable: " + ", ".join(f"{k} {v}" for k, v in opt["usable"].items()))
    if nc.get("status") == "ok":
        out.append(f"- NCCL: init_distributed {nc['init_distributed_s']:.2f} s, first all-reduce {nc['first_all_reduce_s']:.2f} s, "
                   f"then {nc['second_all_reduce_s'] * 1e3:.2f} ms (backend {nc['backend']}, world {nc['world_size']})")
    if m.get("status") == "ok":
        out += ["", f"bf16 step, preset {m['preset']} ({m['params'] / 1e6:.0f}M params, {m['flops_per_sample'] / 1e9:.3g} "
                f"GFLOP/sample), {m['engine']}:", "",
                "| micro-batch | step ms | samples/s | TFLOP/s | MFU (datasheet) | of measured bf16 matmul |",
                "|---|---|---|---|---|---|"]
        out += [f"| {x['micro_batch']} | {x['step_time_s'] * 1e3:.1f} | {x['samples_per_s']:.1f} | {x['flops_per_s'] / 1e12:.2f} | "
                f"{_f(x['mfu_datasheet'])} | {_f(x['fraction_of_peak'])} |" for x in m["rows"]]
        out += ["", f"Goal {m['goal']}: {'met' if m['goal_met'] else 'missed' if m['goal_met'] is False else 'n/a'}"
                + (f" ({m['goal_note']})" if m.get("goal_note") else "") + "."]
    if z.get("status") == "ok":
        out += ["", f"ZeRO-3 ({z['preset']}, micro-batch {z['micro_batch']}, bf16, world of one): states "
                f"{z['measured_states_bytes'] / 2**30:.2f} GiB measured vs {z['estimate_states_bytes'] / 2**30:.2f} estimated "
                f"({_f(z['estimate_vs_measured_states'])}); peak {z['measured_peak_bytes'] / 2**30:.2f} vs "
                f"{z['estimate_peak_bytes'] / 2**30:.2f} ({_f(z['estimate_vs_measured_peak'])}). {z['how']}."]
    return "\n".join(out)


def _f(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.3f}"


def _tf(v: Optional[float]) -> str:
    return "-" if v is None else f"{v / 1e12:.0f} TFLOP/s"
