"""Model-state memory per rank at ZeRO 0/1/2/3 with 2 ranks, measured vs ``estimate_memory``.

For each stage two rank processes are started (``python -m mindeye_dist.bench.memory``, with
``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_*`` set as the ``deepspeed`` launcher or torchrun
would, one torch thread each). Each rank: ``init_distributed()`` (gloo) -> baseline RSS -> build
the model as ``train.run`` does (full model on every rank, no ``zero.Init``) -> ``DeepSpeedEngine``
with the shipped ``ds_configs/zeroN.json`` in fp32 -> one training step (allocates the optimizer
states) -> RSS ("after the step") -> forward + backward of a second step -> RSS ("states live").
Model-state memory = states-live RSS - baseline: parameters, gradients (as the stage keeps them
after its reduction), optimizer states and DeepSpeed's buffers, with the activations freed. The
after-the-step figure is reported too but undercounts: DeepSpeed's ZeRO-0 sets the gradients to
None after the optimizer step. Peak RSS (ru_maxrss,
which includes the full model built before partitioning) is reported next to it. The workers
run on the CPU even on a GPU host (host RSS is what is measured).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time

from mindeye_dist.distributed import free_port
from typing import Any

from mindeye_dist.bench.common import REPO_ROOT, PresetSpec, count, experiment_config, log




def _rss() -> int:
    from mindeye_dist.metrics import memory_stats

    return int(memory_stats()["rss_bytes"] or 0)


def _hwm() -> int:
    """VmHWM (this process's peak RSS since exec). ``ru_maxrss`` is not used: Linux carries the
    parent's high-water mark across fork + exec, so a child of a big process reports the parent's."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    from mindeye_dist.metrics import memory_stats

    return int(memory_stats()["peak_rss_bytes"] or 0)


def worker(preset: str, ds_config: str, micro_batch: int, out_path: str) -> None:
    import mindeye_dist  # noqa: F401
    import torch

    from mindeye_dist.bench.common import build, synthetic_batch
    from mindeye_dist.bench.training import Stepper, make_engine
    from mindeye_dist.distributed import init_distributed, teardown_distributed
    from mindeye_dist.train import _forward_loss

    rank, world, device = init_distributed()
    try:
        spec = PresetSpec.parse(preset)
        cfg = experiment_config(spec, micro_batch, precision="fp32", ds_config=ds_config)
        gc.collect()
        base = _rss()
        torch.manual_seed(0)
        engine = make_engine(cfg, build(spec, cfg), device)
        gc.collect()
        after_init = _rss()
        stepper = Stepper(engine, cfg, device)
        batch = synthetic_batch(engine.module.model.config, micro_batch, device, seed=rank)
        stepper(batch)  # the first step allocates the optimizer states
        gc.collect()
        after_step = _rss()
        # Second step up to the end of backward: parameters, gradients (reduced / partitioned as the
        # stage does it) and optimizer states are all alive, the activations are freed.
        terms = _forward_loss(engine, stepper.loss_fn, batch, 1, stepper.gen)
        engine.backward(terms.total)
        gc.collect()
        states_live = _rss()
        engine.step()
        with open(out_path, "w") as f:
            json.dump({"rank": rank, "world_size": world, "ds_config": ds_config, "baseline_rss_bytes": base,
                       "after_init_rss_bytes": after_init, "after_step_rss_bytes": after_step,
                       "states_live_rss_bytes": states_live, "peak_rss_bytes": _hwm(),
                       "after_init_delta_bytes": after_init - base, "after_step_delta_bytes": after_step - base,
                       "model_state_bytes": states_live - base, "threads": torch.get_num_threads()}, f)
    finally:
        teardown_distributed()


def _run_stage(preset: str, stage: int, ds_config: str, micro_batch: int, timeout_s: float, tmp: str,
               tag: str = "") -> list[dict[str, Any]]:
    port = free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
                   CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
        out = os.path.join(tmp, f"zero{stage}{tag}_rank{rank}.json")
        logf = open(os.path.join(tmp, f"zero{stage}{tag}_rank{rank}.log"), "w")
        cmd = [sys.executable, "-m", "mindeye_dist.bench.memory", "--preset", preset, "--ds-config", ds_config,
               "--micro-batch", str(micro_batch), "--out", out]
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
            raise RuntimeError(f"ZeRO-{stage} memory rank exited with {rc}:\n{tail}")
        with open(out) as f:
            results.append(json.load(f))
    return results


SMALL_BUCKETS = 50_000_000
"""Bucket size (elements) of the proposed ds-config variant: DeepSpeed's reduce / all-gather /
prefetch buckets of the shipped configs (5e8 elements) are bigger than every gradient of a
model under 500M parameters, so the bucket ends up as one more unpartitioned gradient copy."""


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


def measure_zero_memory(preset: str, micro_batch: int, stages: tuple[int, ...] = (0, 1, 2, 3),
                        small_bucket_stages: tuple[int, ...] = (), timeout_s: float = 300.0) -> dict[str, Any]:
    """Measured vs estimated model-state memory per rank for each stage (shipped ds configs),
    plus each stage of ``small_bucket_stages`` with :func:`small_bucket_config` (key ``"N+small_buckets"``)."""
    spec = PresetSpec.parse(preset)
    cfg = experiment_config(spec, micro_batch, precision="fp32")
    est = count(spec, cfg, world_size=2, micro_batch=micro_batch, precision="fp32", flops=False)
    mem = est["memory"]
    out: dict[str, Any] = {"preset": preset, "world_size": 2, "micro_batch": micro_batch, "precision": "fp32",
                           "params": mem["total_params"], "largest_layer": mem["largest_layer"],
                           "largest_layer_params": mem["largest_layer_params"], "stages": {}}
    runs = [(s, f"ds_configs/zero{s}.json", str(s)) for s in stages]
    with tempfile.TemporaryDirectory(prefix="mindeye_bench_mem_") as tmp:
        runs += [(s, small_bucket_config(s, os.path.join(tmp, f"zero{s}_small.json")), f"{s}+small_buckets")
                 for s in small_bucket_stages]
        for stage, ds_path, key in runs:
            t = time.perf_counter()
            ranks = _run_stage(preset, stage, ds_path, micro_batch, timeout_s, tmp, tag=key.partition("+")[2])
            measured = max(r["model_state_bytes"] for r in ranks)
            predicted = mem["stages"][str(stage)]["model_states_bytes"]
            out["stages"][key] = {
                "stage": stage, "ds_config": ds_path if not os.path.isabs(ds_path) else f"zero{stage}.json, buckets {SMALL_BUCKETS:.0e}",
                "measured_model_state_bytes_per_rank": measured,
                "after_step_bytes_per_rank": max(r["after_step_delta_bytes"] for r in ranks),
                "estimate_model_state_bytes_per_rank": predicted,
                "estimate_vs_measured": predicted / measured if measured > 0 else None,
                "deepspeed_estimate_bytes": mem["stages"][str(stage)]["deepspeed_estimate_bytes"],
                "peak_rss_bytes_per_rank": max(r["peak_rss_bytes"] for r in ranks),
                "ranks": ranks, "wall_s": time.perf_counter() - t,
            }
            log(f"ZeRO-{key}: measured {measured / 2**30:.2f} GiB/rank (after the step "
                f"{out['stages'][key]['after_step_bytes_per_rank'] / 2**30:.2f}), estimate {predicted / 2**30:.2f} GiB")
    s = out["stages"]
    if "0" in s and "3" in s:
        out["zero3_vs_zero0"] = s["3"]["measured_model_state_bytes_per_rank"] / s["0"]["measured_model_state_bytes_per_rank"]
        out["zero3_vs_zero0_estimate"] = s["3"]["estimate_model_state_bytes_per_rank"] / s["0"]["estimate_model_state_bytes_per_rank"]
        if "3+small_buckets" in s:
            out["zero3_small_buckets_vs_zero0"] = (s["3+small_buckets"]["measured_model_state_bytes_per_rank"]
                                                   / s["0"]["measured_model_state_bytes_per_rank"])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="one rank of the ZeRO memory benchmark (started by measure_zero_memory)")
    p.add_argument("--preset", required=True)
    p.add_argument("--ds-config", required=True)
    p.add_argument("--micro-batch", type=int, required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    worker(args.preset, args.ds_config, args.micro_batch, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
