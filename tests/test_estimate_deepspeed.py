"""``estimate_memory``'s model states against what a real DeepSpeed engine allocates.

A world of one (gloo), every ZeRO stage in fp32 and bf16: build the model as ``train.run`` does
(``build_model_for_engine``: zero.Init at stage 3), one training step, then the forward and
backward of a second step; at that point the bytes of every live CPU tensor storage that appeared
since before the model was built must equal the estimate's ``model_states_bytes`` (parameters,
gradients as the stage keeps them, the fp32 master, Adam moments, ZeRO-3's ipg bucket).

The engines run in one subprocess (this file's ``__main__``): DeepSpeed caches its process groups
across ``destroy_process_group`` and ZeRO-3 swaps ``torch.nn.functional.linear`` process-wide, so
running them inside pytest would leak into later tests. The 2-rank version of this check, with
RSS, is ``python launchers/benchmark.py --sections memory``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PRESET = "tiny:hidden_dim=256"
"""~0.24M parameters (4 MB of fp32 states): Linears above the persistence threshold set below."""
CASES = [(stage, precision) for stage in (0, 1, 2, 3) for precision in ("fp32", "bf16")]
ZERO_OVERRIDES = {
    # a reduce bucket smaller than the model, so all of its torch.empty capacity is used (the census
    # counts capacity, the estimate the elements the bucket can hold)
    3: {"reduce_bucket_size": 20_000, "stage3_param_persistence_threshold": 1_000, "stage3_prefetch_bucket_size": 20_000},
}


def _measure(stage: int, precision: str, device, tmp: Path) -> dict:
    import torch

    from mindeye_dist.bench.common import PresetSpec, build, experiment_config, synthetic_batch
    from mindeye_dist.bench.memory import live_tensor_bytes
    from mindeye_dist.bench.training import Stepper, make_trainer
    from mindeye_dist.ds_config import load_ds_config, resolve_ds_config
    from mindeye_dist.estimate import estimate_memory

    raw = load_ds_config(ROOT / "ds_configs" / f"zero{stage}.json")
    raw.setdefault("zero_optimization", {}).update(ZERO_OVERRIDES.get(stage, {}))
    path = tmp / f"zero{stage}_{precision}.json"
    path.write_text(json.dumps(raw))
    spec = PresetSpec.parse(PRESET)
    cfg = experiment_config(spec, 2, precision=precision, ds_config=str(path))
    ds = resolve_ds_config(raw, cfg, 1)

    before = live_tensor_bytes()
    trainer = make_trainer(spec, cfg, device, ds_config=ds)
    engine = trainer.engine
    stepper = Stepper(trainer)
    batch = synthetic_batch(trainer.model.config, 2, device)
    stepper(batch)
    terms = trainer.forward_loss(batch)
    engine.backward(terms.total)
    del terms
    live = live_tensor_bytes() - before
    engine.step()
    engine.engine.destroy()
    with torch.device("meta"):
        meta = build(spec, cfg)
    est = estimate_memory(meta, ds_config=raw, world_size=1, micro_batch_size=2, precision=precision)["stages"][str(stage)]
    return {"live": live, "estimate": est["model_states_bytes"], "master": est["master_bytes"]}


def _main(out: str, tmp: str) -> None:
    from mindeye_dist.distributed import init_distributed, teardown_distributed

    _, world, device = init_distributed()
    assert world == 1
    try:
        results = {f"{s}-{p}": _measure(s, p, device, Path(tmp)) for s, p in CASES}
    finally:
        teardown_distributed()
    Path(out).write_text(json.dumps(results))


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("engines")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env["DS_ACCELERATOR"] = "cpu"
    out = tmp / "results.json"
    proc = subprocess.run([sys.executable, __file__, str(out), str(tmp)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("stage,precision", CASES)
def test_model_states_equal_live_tensor_bytes(measured, stage, precision):
    got = measured[f"{stage}-{precision}"]
    assert got["estimate"] > 1_000_000
    # left over besides the states: the batch, the loss's small tensors, DeepSpeed's scalars (KiB);
    # a missing term would be off by >= 4 bytes per parameter (~1 MB), e.g. the fp32 master
    assert got["live"] == pytest.approx(got["estimate"], rel=0.01, abs=64 * 1024), got
    if stage or precision == "bf16":
        assert got["master"] > 0  # DeepSpeed's fp32 master copy: at ZeRO >= 1 also in fp32


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    _main(sys.argv[1], sys.argv[2])
