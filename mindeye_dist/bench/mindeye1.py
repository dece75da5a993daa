"""The reference comparison at MindEye1 size: our step against the references' step, same shape and batch.

Shape (:class:`~mindeye_dist.bench.reference.MindEye1Shape`): MindEye1 subject 1, 15,724 voxels,
257x768 CLIP-L tokens, the backbone at a chosen hidden width (4096 in the paper; the largest that
fits the machine is used, see :func:`choose_hidden`), 4 blocks, projector 2048, the prior (dim 768,
depth 6, 12 heads x 64, a 515-token sequence), no low-level head. At hidden 1024 both sides have
286,031,232 trainable parameters (the reference 16 more: dalle2's frozen rotary frequencies).

Two sides, each in a process of its own (``python -m mindeye_dist.bench.mindeye1 --side ...``), so
each one's peak RSS is its own, alternated over ``rounds`` so load drifts hit both alike:

* ``ours``: :meth:`mindeye_dist.trainer.Trainer.step` as ``train.run`` takes it (DeepSpeed ZeRO-0,
  world of one, fp32, the fused update, ``train.host_memory=auto``) on synthetic in-memory batches;
* ``reference``: :class:`~mindeye_dist.bench.reference.MindEye1ReferenceStep` (MindEye1's
  BrainNetwork + dalle2-pytorch 1.14.2's prior, plain AdamW) with its frozen ViT-L/14 run on every
  batch's images; its training part alone is the reference "with cached targets".

Each worker also times every component on its own (forward + backward of the backbone, of its
output Linear alone, of the projector and of the prior; the optimizer step) and, in the first
round, profiles one step with torch.profiler.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Optional

import torch

from mindeye_dist.bench.common import REPO_ROOT, log, median, proc_kib_bytes, sync
from mindeye_dist.bench.reference import MindEye1Shape

HIDDEN_CHOICES = (4096, 2048, 1024, 512)


def _rss() -> int:
    return proc_kib_bytes("/proc/self/status", "VmRSS") or 0


def _hwm() -> int:
    return proc_kib_bytes("/proc/self/status", "VmHWM") or 0


def _time(fn: Callable[[], Any], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def _fwd_bwd(fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
    """Forward + backward of ``fn``'s output against a fixed random cotangent (a scalar: its own)."""
    def run() -> None:
        out = fn()
        if out.dim() == 0:
            out.backward()
        else:
            out.backward(torch.ones_like(out))
    return run


# ---------------------------------------------------------------------------------------------
# worker: ours


def run_ours(hidden: int, micro_batch: int, steps: int, warmup: int, shape: MindEye1Shape, profile: bool,
             components: bool) -> dict[str, Any]:
    from mindeye_dist import hostmem
    from mindeye_dist.bench.common import PresetSpec, count, experiment_config, synthetic_batch
    from mindeye_dist.bench.training import Stepper, make_trainer, profile_step
    from mindeye_dist.distributed import init_distributed

    _, _, device = init_distributed()
    host_memory = hostmem.apply("auto", device.type)  # as train.run does, before the model is built
    base = _rss()
    spec = PresetSpec.parse(shape.preset_spec(hidden))
    cfg = experiment_config(spec, micro_batch)
    est = count(spec, cfg, world_size=1, micro_batch=micro_batch, precision="fp32")
    trainer = make_trainer(spec, cfg, device)
    stepper = Stepper(trainer)
    batch = synthetic_batch(trainer.model.config, micro_batch, device)
    out: dict[str, Any] = {"side": "ours", "params": trainer.n_params, "host_memory": host_memory,
                           "engine": f"DeepSpeed ZeRO-{trainer.engine.zero_stage}, {trainer.engine.optimizer_name}, "
                                     f"update: {trainer.engine.fused_path or 'DeepSpeeds'}",
                           "flops_per_sample": float(est["flops"]["total"]), "flops_by_component": est["flops"],
                           "estimate_peak_bytes": est["memory"]["stages"]["0"]["peak_bytes"],
                           "estimate_states_bytes": est["memory"]["stages"]["0"]["model_states_bytes"]}
    out["warmup_s"] = [_time(lambda: stepper(batch), device) for _ in range(warmup)]
    times, phases = [], []
    for _ in range(steps):
        times.append(_time(lambda: stepper(batch, phases), device))
        log(f"ours mb {micro_batch}: {times[-1]:.1f} s")
    out.update(step_times_s=times, phases_s=[list(p) for p in phases], peak_rss_bytes=_hwm() - base,
               rss_after_bytes=_rss() - base, skipped_steps=stepper.skipped)
    if components:
        model, s = trainer.model, shape
        v, subj, tgt = batch.voxels, batch.subject, batch.targets
        hid = model.backbone.hidden(v, subj).detach().requires_grad_()
        tok = model.backbone.tokens(hid).detach().requires_grad_()
        parts = {
            "backbone (voxels -> tokens)": _fwd_bwd(lambda: model.backbone(v, subj)),
            "  of which the output Linear": _fwd_bwd(lambda: model.backbone.tokens(hid)),
            "projector": _fwd_bwd(lambda: model.projector(tok)),
            f"prior ({2 * s.n_tokens + 1} tokens)": _fwd_bwd(lambda: model.prior(tok, tgt)[0]),
        }
        out["components_s"] = {k: _time(fn, device) for k, fn in parts.items()}
        out["components_s"]["optimizer step"] = median([p[2] for p in phases])
        trainer.engine.engine.zero_grad()
    if profile:
        out["profile"] = profile_step(stepper, batch, device)
    return out


# ---------------------------------------------------------------------------------------------
# worker: the reference


def run_reference(hidden: int, micro_batch: int, steps: int, warmup: int, shape: MindEye1Shape, encoder: str,
                  profile: bool, components: bool, encoder_config: Optional[str] = None) -> dict[str, Any]:
    from mindeye_dist.bench.reference import MindEye1ReferenceStep, TokenEncoder, fit_tokens
    from mindeye_dist.bench.training import profile_step

    device = torch.device("cpu")
    if encoder_config:  # an open_clip model config file (tests: a tiny ViT)
        import open_clip

        open_clip.add_model_config(encoder_config)
    base = _rss()
    enc = TokenEncoder(encoder, device)
    ref = MindEye1ReferenceStep(hidden, device, enc, shape)
    g = torch.Generator().manual_seed(0)
    voxels = torch.randn(micro_batch, shape.n_voxels, generator=g)
    images = torch.randint(0, 256, (micro_batch, enc.image_size, enc.image_size, 3), dtype=torch.uint8, generator=g)
    cached = fit_tokens(torch.randn(micro_batch, shape.n_tokens, shape.token_dim, generator=g), shape.n_tokens,
                        shape.token_dim)
    out: dict[str, Any] = {"side": "reference", "params": ref.params, "encoder_params": enc.params,
                           "encoder": {"name": encoder, "image_size": enc.image_size, "params": enc.params}}
    out["warmup_s"] = [_time(lambda: ref(voxels, cached, images), device) for _ in range(warmup)]
    parts: list = []
    for _ in range(steps):
        ref(voxels, cached, images, parts)
        log(f"reference mb {micro_batch}: encoder {parts[-1][0]:.1f} s + train {parts[-1][1]:.1f} s")
    out.update(encoder_s=[p[0] for p in parts], train_step_s=[p[1] for p in parts],
               step_times_s=[p[0] + p[1] for p in parts], peak_rss_bytes=_hwm() - base, rss_after_bytes=_rss() - base,
               encoder_weight_bytes=enc.params * 4)
    if components:
        s, v2c, prior = shape, ref.voxel2clip, ref.prior
        hid = _me1_hidden(v2c, voxels).detach().requires_grad_()
        tok = v2c.lin1(hid).view(micro_batch, -1, s.token_dim).detach().requires_grad_()
        comp = {
            "backbone (voxels -> tokens)": _fwd_bwd(lambda: v2c.lin1(_me1_hidden(v2c, voxels))),
            "  of which the output Linear": _fwd_bwd(lambda: v2c.lin1(hid)),
            "projector": _fwd_bwd(lambda: v2c.projector(tok)),
            f"prior ({2 * s.n_tokens + 1} tokens)": _fwd_bwd(lambda: prior(text_embed=tok, image_embed=cached.clone())),
            "optimizer step": ref.opt.step,
        }
        out["components_s"] = {k: _time(fn, device) for k, fn in comp.items()}
        ref.opt.zero_grad()
    if profile:
        out["profile"] = profile_step(lambda _batch: ref(voxels, cached), None, device)
    return out


def _me1_hidden(v2c, x: torch.Tensor) -> torch.Tensor:
    """MindEye1 BrainNetwork's residual MLP (``forward`` up to ``lin1``)."""
    x = v2c.lin0(x)
    residual = x
    for block in v2c.mlp:
        x = block(x) + residual
        residual = x
    return x


# ---------------------------------------------------------------------------------------------
# the orchestrator


def choose_hidden(micro_batch: int, shape: MindEye1Shape, mem_available: Optional[int],
                  candidates: tuple[int, ...] = HIDDEN_CHOICES) -> tuple[int, dict[str, Any]]:
    """The widest backbone whose step fits: the estimated fp32 ZeRO-0 peak of ours (``estimate``)
    x 1.4 (the reference keeps every attention matrix twice and holds its encoder) + 2 GiB for
    the process and its neighbours, against MemAvailable. Returns (hidden, the arithmetic)."""
    from mindeye_dist.bench.common import PresetSpec, count, experiment_config

    tried = {}
    for hidden in candidates:
        spec = PresetSpec.parse(shape.preset_spec(hidden))
        est = count(spec, experiment_config(spec, micro_batch), micro_batch=micro_batch, flops=False)
        need = int(1.4 * est["memory"]["stages"]["0"]["peak_bytes"]) + 2 * 2**30
        tried[hidden] = need
        if mem_available is None or need <= mem_available:
            return hidden, {"needed_bytes": tried, "mem_available_bytes": mem_available}
    return candidates[-1], {"needed_bytes": tried, "mem_available_bytes": mem_available, "forced": True}


def _spawn(side: str, args: list[str], timeout_s: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="mindeye_me1_") as tmp:
        out = os.path.join(tmp, "result.json")
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
        env.setdefault("DS_ACCELERATOR", "cpu")
        cmd = [sys.executable, "-m", "mindeye_dist.bench.mindeye1", "--side", side, "--out", out, *args]
        proc = subprocess.run(cmd, cwd=str(REPO_ROOT), env=env, capture_output=True, text=True, timeout=timeout_s)
        if proc.returncode != 0:
            raise RuntimeError(f"MindEye1-size {side} worker failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        return json.loads(open(out).read())


def measure_mindeye1(hidden: Optional[int] = None, micro_batch: int = 32, rounds: int = 2, steps: int = 2,
                     warmup: int = 1, encoder: str = "ViT-L-14", profile: bool = True, components: bool = True,
                     shape: MindEye1Shape = MindEye1Shape(), timeout_s: float = 7200.0,
                     encoder_config: Optional[str] = None) -> dict[str, Any]:
    """Both sides, alternated ``rounds`` times; medians over every timed step of a side."""
    from mindeye_dist.bench.common import mem_available_bytes

    choice: dict[str, Any] = {"given": hidden}
    if hidden is None:
        hidden, choice = choose_hidden(micro_batch, shape, mem_available_bytes())
    args = ["--hidden", str(hidden), "--micro-batch", str(micro_batch), "--steps", str(steps), "--warmup", str(warmup),
            "--encoder", encoder, "--shape", json.dumps(dataclasses.asdict(shape))]
    if encoder_config:
        args += ["--encoder-config", encoder_config]
    runs: dict[str, list] = {"ours": [], "reference": []}
    load = [os.getloadavg()[0]] if hasattr(os, "getloadavg") else []
    for r in range(rounds):
        extra = (["--profile"] if profile and r == 0 else []) + (["--components"] if components and r == 0 else [])
        for side in ("ours", "reference"):
            log(f"MindEye1 size, hidden {hidden}, micro-batch {micro_batch}: {side}, round {r + 1}/{rounds}")
            runs[side].append(_spawn(side, args + extra, timeout_s))
            load += [os.getloadavg()[0]] if hasattr(os, "getloadavg") else []
    return summarize(runs, hidden, micro_batch, shape, choice, load)


def summarize(runs: dict[str, list], hidden: int, micro_batch: int, shape: MindEye1Shape, choice: dict[str, Any],
              load: list[float]) -> dict[str, Any]:
    ours, ref = runs["ours"], runs["reference"]
    ours_step = median([t for r in ours for t in r["step_times_s"]])
    ref_step = median([t for r in ref for t in r["step_times_s"]])
    ref_train = median([t for r in ref for t in r["train_step_s"]])
    ref_enc = median([t for r in ref for t in r["encoder_s"]])
    sps = {"ours": micro_batch / ours_step, "reference_with_encoder": micro_batch / ref_step,
           "reference_cached_targets": micro_batch / ref_train}
    first = lambda rs, key: next((r[key] for r in rs if key in r), None)  # noqa: E731  (first round only)
    peak_ref = max(r["peak_rss_bytes"] for r in ref)
    return {
        "shape": dataclasses.asdict(shape), "hidden": hidden, "hidden_choice": choice, "micro_batch": micro_batch,
        "params": {"ours": ours[0]["params"], "reference": ref[0]["params"]}, "engine": ours[0]["engine"],
        "flops_per_sample": ours[0]["flops_per_sample"], "flops_by_component": ours[0]["flops_by_component"],
        "rounds": len(ours), "load_avg_1m": load,
        "step_s": {"ours": ours_step, "reference_with_encoder": ref_step, "reference_cached_targets": ref_train,
                   "reference_encoder": ref_enc},
        "step_times_s": {"ours": [t for r in ours for t in r["step_times_s"]],
                         "reference_encoder": [t for r in ref for t in r["encoder_s"]],
                         "reference_train": [t for r in ref for t in r["train_step_s"]]},
        "samples_per_s": sps, "flops_per_s_ours": ours[0]["flops_per_sample"] * sps["ours"],
        "ratio_vs_reference_with_encoder": sps["ours"] / sps["reference_with_encoder"],
        "ratio_vs_reference_cached_targets": sps["ours"] / sps["reference_cached_targets"],
        "phases_s": {k: median([p[i] for r in ours for p in r["phases_s"]])
                     for i, k in enumerate(("forward_loss", "backward", "optimizer_step"))},
        "memory": {"ours_peak_rss_bytes": max(r["peak_rss_bytes"] for r in ours),
                   "ours_estimate_peak_bytes": ours[0]["estimate_peak_bytes"],
                   "ours_estimate_states_bytes": ours[0]["estimate_states_bytes"],
                   "reference_peak_rss_bytes": peak_ref,
                   "reference_peak_rss_without_encoder_weights_bytes": peak_ref - ref[0]["encoder_weight_bytes"],
                   "host_memory": ours[0]["host_memory"]},
        "components_s": {"ours": first(ours, "components_s"), "reference": first(ref, "components_s")},
        "profile": {"ours": first(ours, "profile"), "reference_cached_targets": first(ref, "profile")},
        "encoder": ref[0]["encoder"],
    }


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description="one side of the MindEye1-size comparison (a worker process)")
    p.add_argument("--side", choices=("ours", "reference"), required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--hidden", type=int, required=True)
    p.add_argument("--micro-batch", type=int, required=True)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--encoder", default="ViT-L-14")
    p.add_argument("--encoder-config", default=None, help="open_clip model config JSON to register first")
    p.add_argument("--shape", default="{}", help="MindEye1Shape fields as JSON")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--components", action="store_true")
    a = p.parse_args(argv)
    import mindeye_dist  # noqa: F401  (torchvision shim before open_clip / diffusers)

    shape = MindEye1Shape(**json.loads(a.shape))
    if a.side == "ours":
        result = run_ours(a.hidden, a.micro_batch, a.steps, a.warmup, shape, a.profile, a.components)
    else:
        result = run_reference(a.hidden, a.micro_batch, a.steps, a.warmup, shape, a.encoder, a.profile, a.components,
                               a.encoder_config)
    with open(a.out, "w") as f:
        json.dump(result, f, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
