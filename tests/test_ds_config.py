"""ds_config: "auto" filled from the experiment, explicit disagreements refused with both values."""

import json
from pathlib import Path

import pytest

from mindeye_dist.config import load_config
from mindeye_dist.ds_config import DSConfigError, load_ds_config, resolve_ds_config, write_ds_config

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "ds_configs").glob("*.json"))


def test_all_shipped_ds_configs_resolve():
    assert {p.name for p in SHIPPED} >= {"zero1.json", "zero2.json", "zero2_offload.json", "zero3.json", "zero3_offload.json"}
    cfg = load_config(None, ["train.micro_batch_size=8", "train.grad_accum_steps=3", "train.precision=bf16", "optim.grad_clip=0.5"])
    for path in SHIPPED:
        ds = resolve_ds_config(load_ds_config(path), cfg, world_size=4)
        assert ds["train_micro_batch_size_per_gpu"] == 8
        assert ds["gradient_accumulation_steps"] == 3
        assert ds["train_batch_size"] == 8 * 3 * 4
        assert ds["gradient_clipping"] == 0.5
        assert ds["bf16"]["enabled"] is True and "fp16" not in ds
        assert "auto" not in json.dumps(ds), path.name
        if "offload" in path.name:
            assert ds["zero_force_ds_cpu_optimizer"] is False


def test_explicit_value_that_disagrees_names_both(tmp_path):
    cfg = load_config(None, ["train.micro_batch_size=8"])
    ds = {"train_micro_batch_size_per_gpu": 16, "zero_optimization": {"stage": 2}}
    with pytest.raises(DSConfigError) as info:
        resolve_ds_config(ds, cfg, 2)
    msg = str(info.value)
    assert "train_micro_batch_size_per_gpu=16" in msg and "train.micro_batch_size=8" in msg


def test_explicit_value_that_agrees_is_kept():
    cfg = load_config(None, ["train.micro_batch_size=8", "optim.grad_clip=1.0"])
    ds = resolve_ds_config({"train_micro_batch_size_per_gpu": 8, "gradient_clipping": 1.0}, cfg, 2)
    assert ds["train_batch_size"] == 16


def test_batch_identity_is_checked():
    cfg = load_config(None, ["train.micro_batch_size=8", "train.grad_accum_steps=2"])
    with pytest.raises(DSConfigError, match=r"8 × 2 × 3 = 48"):
        resolve_ds_config({"train_batch_size": 32}, cfg, 3)


def test_precision_mismatch_and_owned_blocks():
    cfg = load_config(None, ["train.precision=fp32"])
    with pytest.raises(DSConfigError, match="bf16.enabled=True.*train.precision='fp32'"):
        resolve_ds_config({"bf16": {"enabled": True}}, cfg, 1)
    for block in ("optimizer", "scheduler"):
        with pytest.raises(DSConfigError, match=f"Remove the '{block}' block"):
            resolve_ds_config({block: {"type": "AdamW"}}, cfg, 1)


def test_unreadable_files(tmp_path):
    with pytest.raises(DSConfigError, match="does not exist.*zero2.json"):
        load_ds_config(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DSConfigError, match="not valid JSON"):
        load_ds_config(bad)


def test_write_round_trip(tmp_path):
    cfg = load_config(None)
    ds = resolve_ds_config(load_ds_config(REPO / "ds_configs" / "zero2.json"), cfg, 2)
    write_ds_config(ds, tmp_path / "run" / "ds_config.resolved.json")
    assert json.loads((tmp_path / "run" / "ds_config.resolved.json").read_text()) == ds
