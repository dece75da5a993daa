"""The output Linear in tiles and activation checkpointing: same numbers as without, and on ZeRO-3.

Unit tier (seconds): ``TiledLinear`` == ``nn.Linear`` (outputs, gradients, initial values, state-dict
layout both ways), a whole model tiled == untiled, export and conversion round trips, activation
checkpointing == off (loss and every gradient, dropout on).

Distributed tier (two gloo ranks): the largest set of parameters ZeRO-3 holds gathered at once,
counted through DeepSpeed's own parameter status from module hooks, drops from the whole output
Linear to one tile (``python tests/test_tiling.py --gathered ...`` is the rank worker); and the real
launcher trains a tiny model on ZeRO-3 with parameter and optimizer offload, tiles and
checkpointing, then exports it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from mindeye_dist.models import ModelConfig, build_model
from mindeye_dist.models.layers import TiledLinear, output_linear, tile_sizes, untile_state_dict

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DIMS = dict(n_voxels=40, n_tokens=4, token_dim=16, lowlevel_shape=[4, 8, 8])


def _grads(module: nn.Module) -> dict[str, torch.Tensor]:
    """Gradients in the untiled layout (a tiled weight's tile gradients concatenated)."""
    grads = {}
    for name, p in module.named_parameters():
        grads[name] = torch.zeros_like(p) if p.grad is None else p.grad.clone()
    for prefix, m in module.named_modules():
        if isinstance(m, TiledLinear):
            dot = f"{prefix}." if prefix else ""
            grads[f"{dot}weight"] = torch.cat([grads.pop(f"{dot}tiles.{i}.weight") for i in range(len(m.sizes))])
    return grads


def test_tile_sizes():
    assert tile_sizes(10, 3) == [4, 3, 3] and tile_sizes(9, 3) == [3, 3, 3] and tile_sizes(5, 5) == [1] * 5
    for bad in (0, 6):
        with pytest.raises(ValueError, match="tiles"):
            tile_sizes(5, bad)


@pytest.mark.parametrize("tiles", [2, 3, 7])
def test_tiled_linear_equals_linear(tiles):
    torch.manual_seed(0)
    plain = nn.Linear(33, 100)
    torch.manual_seed(0)
    tiled = TiledLinear(33, 100, tiles)
    # same seed, same initial values: tile weights are drawn in row order, then the bias
    assert torch.equal(tiled.state_dict()["weight"], plain.weight) and torch.equal(tiled.bias, plain.bias)
    assert sum(p.numel() for p in tiled.parameters()) == sum(p.numel() for p in plain.parameters())
    x1 = torch.randn(5, 2, 33, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    y1, y2 = plain(x1), tiled(x2)
    # every output element is the same dot product + bias; BLAS may block odd widths differently
    torch.testing.assert_close(y2, y1, rtol=1e-6, atol=1e-6)
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-6, atol=1e-6)
    grads = _grads(tiled)
    torch.testing.assert_close(grads["weight"], plain.weight.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grads["bias"], plain.bias.grad, rtol=1e-6, atol=1e-6)


def test_state_dict_is_nn_linear_layout_and_loads_both_ways():
    plain, tiled = nn.Linear(8, 10), TiledLinear(8, 10, 3)
    sd = tiled.state_dict()
    assert list(sd) == ["weight", "bias"] and sd["weight"].shape == (10, 8)
    plain.load_state_dict(sd)  # tiled -> untiled
    fresh = TiledLinear(8, 10, 4)
    fresh.load_state_dict(plain.state_dict())  # untiled -> tiled, other tile count
    x = torch.randn(3, 8)
    torch.testing.assert_close(fresh(x), tiled(x), rtol=1e-6, atol=1e-6)
    # the per-tile layout (what DeepSpeed's zero_to_fp32 names) loads too
    per_tile = {f"tiles.{i}.weight": t.weight.detach().clone() for i, t in enumerate(tiled.tiles)} | {"bias": tiled.bias}
    other = TiledLinear(8, 10, 3)
    other.load_state_dict(per_tile)
    torch.testing.assert_close(other(x), tiled(x), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match=r"size mismatch for weight.*\(10, 8\)"):
        fresh.load_state_dict({"weight": torch.zeros(9, 8), "bias": torch.zeros(10)})
    # the untiled output Linear loads the per-tile layout as well
    untiled = output_linear(8, 10, 1)
    untiled.load_state_dict(per_tile)
    torch.testing.assert_close(untiled(x), tiled(x), rtol=1e-6, atol=1e-6)
    # and untile_state_dict turns per-tile keys (DeepSpeed's zero_to_fp32 names) into nn.Linear's
    named = {"a.w": torch.ones(1), **{f"m.to_tokens.{k}": v for k, v in per_tile.items()}, "z.w": torch.ones(1)}
    merged = untile_state_dict(named)
    assert list(merged) == ["a.w", "m.to_tokens.weight", "m.to_tokens.bias", "z.w"]
    assert torch.equal(merged["m.to_tokens.weight"], sd["weight"])


def _model(tiles: int, checkpointing: bool = False, **extra):
    torch.manual_seed(0)
    return build_model(ModelConfig(preset="tiny", output_tiles=tiles, activation_checkpointing=checkpointing, **extra),
                       **DIMS)


def _loss(model, seed: int = 1) -> torch.Tensor:
    """Every head and the prior's loss, dropout and CFG dropout on (training mode)."""
    model.train()
    g = torch.Generator().manual_seed(seed)
    voxels, targets = torch.randn(6, 40, generator=g), torch.randn(6, 4, 16, generator=g)
    torch.manual_seed(seed)  # dropout masks
    out = model(voxels, 0)
    prior, _ = model.prior.loss(out.backbone, targets, generator=torch.Generator().manual_seed(seed))
    return (out.projector.square().mean() + prior + out.lowlevel.square().mean() + out.backbone.square().mean()
            + out.lowlevel_features.square().mean())


def test_tiled_model_equals_untiled_model():
    plain, tiled = _model(1), _model(5)
    assert isinstance(tiled.backbone.to_tokens, TiledLinear) and isinstance(plain.backbone.to_tokens, nn.Linear)
    sd_plain, sd_tiled = plain.state_dict(), tiled.state_dict()
    assert list(sd_tiled) == list(sd_plain)  # same keys in the same order
    assert all(torch.equal(sd_tiled[k], sd_plain[k]) for k in sd_plain)  # same seed: same initial weights
    assert sum(p.numel() for p in tiled.parameters()) == sum(p.numel() for p in plain.parameters())
    l1, l2 = _loss(plain), _loss(tiled)
    torch.testing.assert_close(l2, l1, rtol=1e-6, atol=1e-6)
    l1.backward()
    l2.backward()
    g1, g2 = _grads(plain), _grads(tiled)
    assert g1.keys() == g2.keys()
    for k in g1:
        torch.testing.assert_close(g2[k], g1[k], rtol=1e-5, atol=1e-6, msg=k)


def test_export_round_trip_between_tiled_and_untiled(tmp_path):
    """Weights exported from a tiled model load into an untiled one and back (the export format)."""
    from safetensors.torch import save_file

    from mindeye_dist.config import to_dict
    from mindeye_dist.export import load_exported

    tiled = _model(3)
    for tiles, source in ((1, tiled), (3, _model(1))):
        cfg = dataclasses.replace(source.config, output_tiles=tiles)
        header = {"model": json.dumps(to_dict(cfg)), "dims": json.dumps(DIMS), "checkpoint": "test",
                  "format": "mindeye_dist/1"}
        path = tmp_path / f"to_{tiles}.safetensors"
        save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path), metadata=header)
        loaded = load_exported(path).eval()
        assert loaded.config.output_tiles == tiles
        source.eval()
        x = torch.randn(3, 40)
        torch.testing.assert_close(loaded(x).projector, source(x).projector, rtol=1e-5, atol=1e-6)


def test_released_checkpoint_conversion_builds_a_tiled_model(tmp_path):
    """convert.py fills our model's state_dict() keys; with the preset's tiles (mindeye1: 8) the
    keys are still nn.Linear's, and the written file loads into the tiled model."""
    from mindeye_dist.convert import convert_mindeye1, write_export
    from mindeye_dist.export import load_exported
    from tests.reference_layouts import ME1BrainNetwork

    torch.manual_seed(0)
    ref = ME1BrainNetwork(in_dim=20, h=32, n_blocks=2, clip_size=16, n_tokens=3, proj_h=24).eval()
    conversion = convert_mindeye1({f"voxel2clip.{k}": v for k, v in ref.state_dict().items()}, subject="s1")
    assert "backbone.to_tokens.weight" in conversion.state_dict
    write_export(conversion, tmp_path / "me1.safetensors")
    model = load_exported(tmp_path / "me1.safetensors")
    assert model.config.output_tiles == 8 and isinstance(model.backbone.to_tokens, TiledLinear)
    x = torch.randn(4, 20)
    flat, _ = ref(x)
    torch.testing.assert_close(model(x).backbone, flat.reshape(4, 3, 16), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("released", [False, True])
def test_activation_checkpointing_same_loss_and_gradients(released):
    extra = dict(arch="mindeye2", backbone_blocks="released") if released else {}
    plain, ckpt = _model(2, **extra), _model(2, checkpointing=True, **extra)
    l1, l2 = _loss(plain), _loss(ckpt)
    assert torch.equal(l1, l2)
    l1.backward()
    l2.backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
        assert (a.grad is None) == (b.grad is None) and (a.grad is None or torch.equal(a.grad, b.grad)), name
    # and the recompute really ran: the checkpointed units saved no activations of their own
    assert ckpt.backbone.checkpointing and ckpt.prior.net.transformer.checkpointing


def test_checkpointing_is_plain_without_grad():
    model = _model(1, checkpointing=True).eval()
    x = torch.randn(2, 40)
    with torch.no_grad():
        a = model(x).projector
    torch.testing.assert_close(a, _model(1).eval()(x).projector.detach(), rtol=0, atol=0)


def test_config_keys():
    from mindeye_dist.config import ConfigError

    with torch.device("meta"):
        me1 = build_model(ModelConfig(preset="mindeye1"))
        me1_plain = build_model(ModelConfig(preset="mindeye1", output_tiles=1))
    assert me1.config.output_tiles == 8 and me1.config.activation_checkpointing is False
    assert isinstance(me1_plain.backbone.to_tokens, nn.Linear)
    # a preset's tiles shrink to the output width on small dims; an explicit value must fit
    assert build_model(ModelConfig(preset="mindeye1", n_tokens=1, token_dim=4, subjects={"s": 8}, hidden_dim=8,
                                   n_blocks=1, prior=False, lowlevel=False)).config.output_tiles == 4
    with pytest.raises(ConfigError, match="model.output_tiles"):
        build_model(ModelConfig(preset="tiny", output_tiles=65), **DIMS)
    for bad in ({"output_tiles": 0}, {"activation_checkpointing": "yes"}):
        with pytest.raises(ConfigError, match="model." + next(iter(bad))):
            ModelConfig(preset="tiny", **bad)


# ---- ZeRO-3, two ranks ----------------------------------------------------------------------

GATHER_PRESET = "scale-10m:hidden_dim=64,n_blocks=1,n_voxels=40,n_tokens=8,token_dim=64"
"""to_tokens 64 -> 512: 33,280 parameters, the largest layer by far (the adapter has 2,624, the
other Linears 4,160 each); no prior or low-level head."""
RELEASE_AT_ONCE = {"stage3_param_persistence_threshold": 0, "stage3_max_live_parameters": 0,
                   "stage3_prefetch_bucket_size": 0, "stage3_max_reuse_distance": 0, "reduce_bucket_size": 4096}
"""ZeRO-3 knobs under which nothing stays gathered beyond the module that runs (no persistent
small parameters, no prefetch, no reuse window): the gathered set is what the model's structure forces."""


def _gathered_worker(out: str, tiles: int, tmp: str) -> None:
    """One rank: train two steps on ZeRO-3 and record the most parameter elements that were
    gathered (``ds_status == AVAILABLE``) at once, sampled in every module's forward hooks and every
    leaf module's backward hooks (registered after DeepSpeed's own, so a module's parameters are
    gathered when they run)."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    from mindeye_dist.bench.common import PresetSpec, experiment_config, synthetic_batch
    from mindeye_dist.bench.training import Stepper, make_trainer
    from mindeye_dist.distributed import init_distributed, teardown_distributed
    from mindeye_dist.ds_config import load_ds_config, resolve_ds_config

    rank, world, device = init_distributed()
    try:
        raw = load_ds_config(REPO / "ds_configs" / "zero3.json")
        raw["zero_optimization"].update(RELEASE_AT_ONCE)
        path = Path(tmp) / f"zero3_release_{rank}.json"
        path.write_text(json.dumps(raw))
        spec = PresetSpec.parse(f"{GATHER_PRESET},output_tiles={tiles}")
        cfg = experiment_config(spec, 4, precision="fp32", ds_config=str(path))
        trainer = make_trainer(spec, cfg, device, ds_config=resolve_ds_config(raw, cfg, world), world_size=world,
                               rank=rank)
        params = list(trainer.engine.module.parameters())
        peak = [0]

        def sample(*_args) -> None:
            peak[0] = max(peak[0], sum(p.ds_numel for p in params if p.ds_status == ZeroParamStatus.AVAILABLE))

        for m in trainer.engine.module.modules():
            m.register_forward_pre_hook(sample)
            m.register_forward_hook(sample)
            if next(m.children(), None) is None and m.__class__.__name__ != "Dropout":
                m.register_full_backward_pre_hook(sample)
                m.register_full_backward_hook(sample)
        stepper = Stepper(trainer)
        losses = []
        for step in range(2):
            stepper(synthetic_batch(trainer.model.config, 4, device, seed=rank))
            losses.append(float(trainer.state.step))
        layer = trainer.model.backbone.to_tokens
        result = {"peak_gathered": peak[0], "to_tokens": sum(p.ds_numel for p in layer.parameters()),
                  "largest_param": max(p.ds_numel for p in layer.parameters()),
                  "others_max": max(p.ds_numel for n, p in trainer.model.named_parameters() if "to_tokens" not in n),
                  "steps": int(trainer.state.step)}
        Path(f"{out}.rank{rank}").write_text(json.dumps(result))
    finally:
        teardown_distributed()


def _two_ranks(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    from mindeye_dist.distributed import free_port

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    cmd = [str(BIN / "deepspeed"), "--num_accelerators", "2", "--master_port", str(free_port()), *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.distributed
@pytest.mark.slow
def test_zero3_gathers_one_tile_at_a_time(tmp_path):
    """Untiled, ZeRO-3 holds the whole output Linear gathered at some point of the step; in 4
    tiles, at most one tile (with the bias and the smaller modules' parameters) ever is."""
    found = {}
    for tiles in (1, 4):
        out = tmp_path / f"gathered_{tiles}.json"
        proc = _two_ranks([str(Path(__file__)), "--gathered", str(out), str(tiles), str(tmp_path)])
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        found[tiles] = [json.loads(Path(f"{out}.rank{r}").read_text()) for r in (0, 1)]
    for untiled, tiled in zip(found[1], found[4]):
        assert untiled["steps"] == tiled["steps"] == 2
        whole = untiled["to_tokens"]
        assert tiled["to_tokens"] == whole == 64 * 512 + 512
        assert untiled["peak_gathered"] >= whole
        # one tile (8,192) + the bias (512), plus at most the next-largest module around it
        assert tiled["peak_gathered"] <= tiled["largest_param"] + 512 + tiled["others_max"] < whole / 2, (untiled, tiled)


@pytest.fixture(scope="module")
def tiny_data(tiny_dataset) -> str:
    return tiny_dataset(3)


def _metrics(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss/total"] for r in rows if "loss/total" in r}


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("ds_config", ["zero3_offload.json"])
def test_zero3_offload_trains_with_tiles_and_checkpointing(tmp_path, tiny_data, ds_config):
    """The real launcher, 2 ranks, ZeRO-3 with parameters and optimizer on the host, the output
    Linear in 4 tiles, activation checkpointing on: the loss falls, and the export (untiled
    layout after :func:`untile_state_dict`) loads into an untiled model with the same outputs."""
    from safetensors.torch import load_file

    from mindeye_dist.checkpoint import consolidated_state_dict
    from mindeye_dist.export import load_exported

    run = tmp_path / "run"
    proc = _two_ranks([str(REPO / "launchers/train.py"), "--ds_config", str(REPO / "ds_configs" / ds_config),
                       "--config", str(REPO / "launchers/configs/tiny.yaml"), f"data.url={tiny_data}",
                       f"run.dir={run}", "train.max_steps=16", "train.log_every_steps=1", "train.eval_every_steps=0",
                       "checkpoint.every_steps=16", "train.precision=bf16", "model.output_tiles=4",
                       "model.activation_checkpointing=true"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = _metrics(run)
    assert sorted(steps) == list(range(1, 17))
    assert sum(steps[s] for s in (14, 15, 16)) < sum(steps[s] for s in (1, 2, 3)), steps
    state = consolidated_state_dict(run / "checkpoints")
    assert any(".to_tokens.tiles.3.weight" in k for k in state)  # DeepSpeed names parameters as they are
    out = tmp_path / "w.safetensors"
    proc = subprocess.run([sys.executable, str(REPO / "launchers/export.py"), "--run", str(run), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tiled = load_exported(out).eval()
    assert tiled.config.output_tiles == 4 and tiled.config.activation_checkpointing
    untiled = build_model(dataclasses.replace(tiled.config, output_tiles=1)).eval()
    untiled.load_state_dict(untile_state_dict(load_file(str(out))))
    x = torch.randn(3, tiled.config.input_voxels())
    torch.testing.assert_close(untiled(x).projector, tiled(x).projector, rtol=1e-5, atol=1e-6)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the deepspeed launcher adds it
    if argv[0] == "--gathered":
        _gathered_worker(argv[1], int(argv[2]), argv[3])
