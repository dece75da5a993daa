"""Converter: released MindEye1/MindEye2 state-dict layouts -> our models and export format.

State dicts come from the references' module layouts (``tests/reference_layouts.py``) at small
sizes, saved the way the references save them; the converted file is loaded with
``load_exported`` and its forward compared with the reference modules' and with forwards
computed by hand from the reference tensors. Full-size key lists are checked on the meta
device. Prior checkpoints (dalle2 layout) are in ``tests/test_convert_dalle2.py``.
"""

from __future__ import annotations

import importlib.util
import math
import os
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mindeye_dist.convert import (ConversionError, convert_checkpoint, convert_mindeye1, convert_mindeye2,
                                  load_reference_state_dict)
from mindeye_dist.export import load_exported
from mindeye_dist.models import build_model, component_parameters
from mindeye_dist.models.presets import NSD_VOXELS
from tests.reference_layouts import ME1BrainNetwork, ME1Voxel2SD, ME2Module, perturb_, save_like_reference


_spec = importlib.util.spec_from_file_location(
    "convert_checkpoint_cli", Path(__file__).resolve().parents[1] / "launchers" / "convert_checkpoint.py")
cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cli)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread avoids OpenMP spin-waits on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def me2_reference(voxels=(20, 17), seed=0, **kwargs):
    torch.manual_seed(seed)
    kwargs = {"blurry_recon": True, "side": 2, "channels": (32, 64), **kwargs}
    return perturb_(ME2Module(list(voxels), h=32, n_blocks=2, clip_size=16, n_tokens=3, **kwargs), seed=seed).eval()


def test_mindeye2_converts_and_computes_what_the_reference_computes(tmp_path):
    ref = me2_reference()
    src = save_like_reference(ref.state_dict(), tmp_path / "last.pth")
    summary = convert_checkpoint("mindeye2", src, tmp_path / "me2.safetensors", subjects=["a", "b"])
    model = load_exported(tmp_path / "me2.safetensors")
    assert summary["parameters"] == sum(p.numel() for p in model.parameters())
    assert model.config.backbone_blocks == "released" and model.config.subject_names() == ["a", "b"]
    voxels = torch.randn(5, 20)
    voxels[3:, 17:] = 0  # subject b has 17 voxels
    ids = torch.tensor([0, 0, 0, 1, 1])
    out = model(voxels, ids)
    for rows, index, n in ((slice(0, 3), 0, 20), (slice(3, 5), 1, 17)):
        backbone, clip, (blurry, features) = ref.backbone(ref.ridge(voxels[rows, None, :n], index))
        torch.testing.assert_close(out.backbone[rows], backbone)
        torch.testing.assert_close(out.projector[rows], clip)
        torch.testing.assert_close(out.lowlevel[rows], blurry, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out.lowlevel_features[rows], features, rtol=1e-4, atol=1e-5)
    # The released blocks do not reach the output (see test_models), so check where they land by name.
    ours, theirs = model.state_dict(), ref.state_dict()
    for k in range(2):
        for mine, reference in (("0", "0"), ("1", "1.0"), ("4", "1.3")):
            for part in ("weight", "bias"):
                assert torch.equal(ours[f"backbone.blocks.{k}.{mine}.{part}"],
                                   theirs[f"backbone.mixer_blocks1.{k}.{reference}.{part}"])


def test_mindeye2_backbone_path_by_hand_from_the_reference_tensors(tmp_path):
    """tokens = W_lin (W_ridge x + b_ridge + sum_k c_k) + b_lin, c_k = w2 * gelu(w1 * beta_k + b1) + b2:
    computed from the checkpoint's own tensors, not through any module."""
    ref = me2_reference(voxels=(20,), blurry_recon=False)
    sd = ref.state_dict()
    torch.save(sd, tmp_path / "bare.pth")  # a bare state dict loads too
    convert_checkpoint("mindeye2", tmp_path / "bare.pth", tmp_path / "me2.safetensors", subjects=["s1"])
    model = load_exported(tmp_path / "me2.safetensors")
    assert model.lowlevel is None and model.prior is None
    x = torch.randn(4, 20)
    hidden = x @ sd["ridge.linears.0.weight"].T + sd["ridge.linears.0.bias"]
    for k in range(2):
        pre = sd[f"backbone.mixer_blocks2.{k}.1.0.weight"] * sd[f"backbone.mixer_blocks2.{k}.0.bias"] \
            + sd[f"backbone.mixer_blocks2.{k}.1.0.bias"]
        gelu = 0.5 * pre * (1 + torch.erf(pre / math.sqrt(2)))
        hidden = hidden + (sd[f"backbone.mixer_blocks2.{k}.1.3.weight"] * gelu
                           + sd[f"backbone.mixer_blocks2.{k}.1.3.bias"])
    tokens = (hidden @ sd["backbone.backbone_linear.weight"].T + sd["backbone.backbone_linear.bias"]).reshape(4, 3, 16)
    torch.testing.assert_close(model(x).backbone, tokens)


def old_diffusers_attention_names(state: dict) -> dict:
    """diffusers 0.13 (MindEye1's) called the mid-block attention query/key/value/proj_attn."""
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {}
    for key, value in state.items():
        for new, before in old.items():
            key = key.replace(f".attentions.0.{new}.", f".attentions.0.{before}.")
        renamed[key] = value
    return renamed


def me1_reference(seed=0):
    torch.manual_seed(seed)
    voxel2clip = perturb_(ME1BrainNetwork(in_dim=20, h=32, n_blocks=2, clip_size=16, n_tokens=3, proj_h=24), seed=seed)
    lowlevel = perturb_(ME1Voxel2SD(in_dim=20, h=24, n_blocks=2, side=2, channels=[32, 64], feat=8), seed=seed + 1)
    return voxel2clip.eval(), lowlevel.eval()


def test_mindeye1_backbone_projector_and_lowlevel(tmp_path):
    voxel2clip, lowlevel = me1_reference()
    prior_sd = {f"voxel2clip.{k}": v for k, v in voxel2clip.state_dict().items()}  # BrainDiffusionPrior's layout
    low_sd = old_diffusers_attention_names(lowlevel.state_dict())
    assert any(".attentions.0.query." in k for k in low_sd)
    save_like_reference(prior_sd, tmp_path / "last.pth")
    save_like_reference(low_sd, tmp_path / "epoch120.pth")
    convert_checkpoint("mindeye1", tmp_path / "last.pth", tmp_path / "me1.safetensors", subjects=["s1"],
                       lowlevel_src=tmp_path / "epoch120.pth")
    model = load_exported(tmp_path / "me1.safetensors")
    x = torch.randn(4, 20)
    out = model(x)
    flat, projected = voxel2clip(x)
    torch.testing.assert_close(out.backbone, flat.reshape(4, 3, 16))
    torch.testing.assert_close(out.projector, projected)
    latent, features = lowlevel(x)
    torch.testing.assert_close(out.lowlevel, latent, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.lowlevel_features, features, rtol=1e-4, atol=1e-5)
    # The backbone path by hand from the checkpoint's tensors.
    sd = voxel2clip.state_dict()
    h = F.gelu(F.layer_norm(F.linear(x, sd["lin0.0.weight"], sd["lin0.0.bias"]), (32,), sd["lin0.1.weight"],
                            sd["lin0.1.bias"]))
    for k in range(2):
        h = h + F.gelu(F.layer_norm(F.linear(h, sd[f"mlp.{k}.0.weight"], sd[f"mlp.{k}.0.bias"]), (32,),
                                    sd[f"mlp.{k}.1.weight"], sd[f"mlp.{k}.1.bias"]))
    torch.testing.assert_close(out.backbone, F.linear(h, sd["lin1.weight"], sd["lin1.bias"]).reshape(4, 3, 16))


def test_missing_and_unexpected_keys_are_named():
    sd = dict(me2_reference(voxels=(20,), blurry_recon=False).state_dict())
    with pytest.raises(ConversionError, match=r"unexpected keys.*backbone\.extra_head\.weight"):
        convert_mindeye2({**sd, "backbone.extra_head.weight": torch.zeros(1)}, ["s1"])
    del sd["backbone.backbone_linear.bias"]
    with pytest.raises(ConversionError, match=r"no source for 1 of our parameters.*backbone\.to_tokens\.bias"):
        convert_mindeye2(sd, ["s1"])
    with pytest.raises(ConversionError, match="not a MindEye2 checkpoint"):
        convert_mindeye2({"lin0.0.weight": torch.zeros(2, 2)})
    voxel2clip, _ = me1_reference()
    with pytest.raises(ConversionError, match="use_cont=True"):
        convert_mindeye1(voxel2clip.state_dict(), {"lin0.0.weight": torch.zeros(24, 20)}, "s1")


def test_subjects_are_named_from_nsd_voxel_counts_or_given():
    sd = me2_reference(voxels=(NSD_VOXELS["subj05"], 20), blurry_recon=False).state_dict()
    with pytest.raises(ConversionError, match=r"\[20\] are not those of an NSD subject.*--subject"):
        convert_mindeye2(sd)
    assert list(convert_mindeye2(sd, ["subj05", "mine"]).model.subjects) == ["subj05", "mine"]
    with pytest.raises(ConversionError, match=r"'subj02' has 14278 voxels"):
        convert_mindeye2(sd, ["subj02", "mine"])
    with pytest.raises(ConversionError, match="2 subject input layers.*1 subject names"):
        convert_mindeye2(sd, ["subj05"])
    one = me2_reference(voxels=(NSD_VOXELS["subj05"],), blurry_recon=False).state_dict()
    assert convert_mindeye2(one).model.subjects == {"subj05": NSD_VOXELS["subj05"]}


class _Scheduler:
    """Stands for torch < 2.2's OneCycleLR, whose state dict holds a bound method (anneal_func)."""

    def anneal(self, pct):
        return pct


class _RunsCodeWhenUnpickled:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))  # unpickling the object would create the file


def test_training_checkpoints_load_without_running_code_from_them(tmp_path):
    sd = me2_reference(voxels=(20,), blurry_recon=False).state_dict()
    witness = tmp_path / "created_by_unpickling"
    src = tmp_path / "last.pth"
    torch.save({"model_state_dict": sd, "lr_scheduler": {"anneal_func": _Scheduler().anneal},
                "trap": _RunsCodeWhenUnpickled(str(witness))}, src)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(src, weights_only=True)  # what makes the inert fallback necessary
    loaded = load_reference_state_dict(src)
    assert not witness.exists()
    assert set(loaded) == set(sd) and all(torch.equal(loaded[k], sd[k]) for k in sd)
    with pytest.raises(ConversionError, match="holds no state dict"):
        torch.save({"epoch": 1}, tmp_path / "empty.pth")
        load_reference_state_dict(tmp_path / "empty.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ConversionError, match="garbage.pth"):
        load_reference_state_dict(tmp_path / "garbage.pth")


def test_cli(tmp_path, capsys):
    sd = me2_reference(voxels=(20,), blurry_recon=False).state_dict()
    save_like_reference(sd, tmp_path / "last.pth")
    out = tmp_path / "me2.safetensors"
    assert cli.main(["--format", "mindeye2", "--src", str(tmp_path / "last.pth"), "--out", str(out),
                     "--subject", "s1"]) == 0
    assert '"tensors"' in capsys.readouterr().out and out.is_file()
    assert not os.path.exists(str(out) + ".tmp")
    assert cli.main(["--format", "mindeye2", "--src", str(tmp_path / "nope.pth"), "--out", str(out)]) == 2
    assert "nope.pth does not exist" in capsys.readouterr().err
    assert cli.main(["--format", "mindeye1", "--src", str(tmp_path / "last.pth"), "--out", str(out)]) == 2
    assert "not a MindEye1 checkpoint" in capsys.readouterr().err


def test_full_size_key_layouts_without_the_prior():
    """Every released key at full size maps onto a parameter of the same shape (meta device)."""
    with torch.device("meta"):
        me2 = ME2Module([NSD_VOXELS["subj01"]], h=4096, n_blocks=4, clip_size=1664, n_tokens=256)
        voxel2clip = ME1BrainNetwork(in_dim=NSD_VOXELS["subj01"], h=4096, n_blocks=4, clip_size=768, n_tokens=257)
        lowlevel = ME1Voxel2SD(in_dim=NSD_VOXELS["subj01"], h=4096, n_blocks=4, side=16, channels=[64, 128, 256])
    conversion = convert_mindeye2(me2.state_dict())
    assert conversion.model.lowlevel_shape == [4, 28, 28] and conversion.model.subjects == {"subj01": 15724}
    assert sum(v.numel() for v in conversion.state_dict.values()) == sum(p.numel() for p in me2.parameters())
    me1 = convert_mindeye1({f"voxel2clip.{k}": v for k, v in voxel2clip.state_dict().items()},
                           old_diffusers_attention_names(lowlevel.state_dict()))
    assert me1.model.lowlevel_shape == [4, 64, 64] and me1.model.lowlevel_channels == [64, 128, 256]
    lowlevel_params = sum(p.numel() for p in lowlevel.parameters())
    assert sum(v.numel() for v in me1.state_dict.values()) == 947_579_904 + lowlevel_params
    with torch.device("meta"):
        model = build_model(me1.model, **me1.dims)
    assert component_parameters(model)["backbone"] + component_parameters(model)["projector"] == 947_579_904
