"""Models: shapes for every preset (shrunk), exact parameter counts of the real presets on the
meta device, gradients, multi-subject grouping, adding a subject, config resolution."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from mindeye_dist.config import ConfigError, ExperimentConfig, from_dict
from mindeye_dist.models import (PRESETS, MindEye, ModelConfig, build_model, component_parameters,
                                 load_with_new_subjects, no_weight_decay_names)

# Shrinks any preset to a few thousand parameters; data dims are given explicitly so presets
# that fix them (mindeye1/2) are overridden consistently.
SHRINK = dict(hidden_dim=32, n_blocks=2, projector_hidden_dim=24, prior_depth=1, prior_heads=2, prior_dim_head=8,
              lowlevel_hidden_dim=16, lowlevel_n_blocks=1, lowlevel_channels=[8, 16], lowlevel_map_channels=8,
              lowlevel_feature_dim=8)
DIMS = dict(n_tokens=3, token_dim=16, lowlevel_shape=[4, 8, 8])


def shrunk(preset: str, **extra) -> ModelConfig:
    table = PRESETS[preset].fields.get("subjects")
    subjects = {name: 20 + 3 * i for i, name in enumerate(table)} if table else {"subj01": 20}
    return ModelConfig(preset=preset, **{"subjects": subjects, **SHRINK, **DIMS, **extra})


def meta_model(preset: str, **overrides) -> MindEye:
    with torch.device("meta"):
        return build_model(ModelConfig(preset=preset, **overrides), nominal=True)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_builds_and_runs_shrunk(preset):
    torch.manual_seed(0)
    cfg = shrunk(preset, prior=True, lowlevel=True)
    model = build_model(cfg)
    subjects = model.config.subject_table()
    b = 5
    voxels = torch.randn(b, max(subjects.values()))
    ids = torch.arange(b) % len(subjects)
    out = model(voxels, ids)
    assert out.backbone.shape == (b, 3, 16)
    assert out.projector.shape == (b, 3, 16)
    assert out.lowlevel.shape == (b, 4, 8, 8)
    h, w = model.config.lowlevel_map_size()
    assert out.lowlevel_features.shape == (b, h * w, 8)
    loss, prediction = model.prior.loss(out.backbone, torch.randn(b, 3, 16))
    assert loss.ndim == 0 and torch.isfinite(loss) and prediction.shape == (b, 3, 16)
    sample = model.prior.sample(out.backbone.detach(), sampler="ddim", steps=2, generator=torch.Generator().manual_seed(0))
    assert sample.shape == (b, 3, 16)


def test_block_layouts_follow_the_references():
    me1 = build_model(shrunk("mindeye1"))
    me2 = build_model(shrunk("mindeye2"))
    kinds = lambda block: [type(m).__name__ for m in block]  # noqa: E731
    assert kinds(me1.backbone.blocks[0]) == ["Linear", "LayerNorm", "GELU", "Dropout"]
    assert kinds(me2.backbone.blocks[0]) == ["LayerNorm", "Linear", "GELU", "Dropout", "Linear"]
    assert kinds(me1.backbone.stem) == ["LayerNorm", "GELU", "Dropout"] and me1.backbone.stem[2].p == 0.5
    assert kinds(me1.projector) == ["LayerNorm", "GELU", "Linear"] * 3
    assert me1.lowlevel.from_voxels and not me2.lowlevel.from_voxels
    assert me1.prior.target_scale == pytest.approx(768 ** 0.5) and me2.prior.target_scale == 1.0


def test_mindeye1_parameter_counts_exact():
    model = meta_model("mindeye1")
    counts = component_parameters(model)
    assert counts["backbone"] == 940_225_280
    assert counts["backbone"] + counts["projector"] == 947_579_904
    assert sum(p.numel() for p in model.backbone.to_tokens.parameters()) == 808_649_472  # in 8 tiles
    # Reference 56,055,184 = ours + the 16 rotary frequencies it stores as a frozen Parameter.
    assert counts["prior"] == 56_055_168
    assert abs(counts["prior"] - 56_055_184) / 56_055_184 < 0.02


def test_mindeye2_parameter_counts_match_digest():
    model = meta_model("mindeye2")
    counts = component_parameters(model)
    ridge = sum(p.numel() for p in model.backbone.adapters.parameters())
    # The reference's "backbone (incl. submodules)": MLP + output Linear + clip_proj + low-level
    # submodule; the working blocks leave out its 24-parameter token-mixing half over seq_len=1.
    backbone_incl = counts["backbone"] - ridge + counts["projector"] + counts["lowlevel"]
    assert ridge == 64_409_600
    assert backbone_incl == 1_903_020_028 - 24
    assert counts["prior"] == 259_865_216 - 16  # the reference stores 16 rotary frequencies
    assert sum(p.numel() for p in model.backbone.to_tokens.parameters()) == 1_745_256_448  # in 16 tiles
    # backbone_blocks=released has the release's parameters exactly (all but the rotary 16).
    released = component_parameters(meta_model("mindeye2", backbone_blocks="released"))
    assert released["backbone"] - ridge + released["projector"] + released["lowlevel"] == 1_903_020_028
    assert released["total"] == 2_227_294_844 - 16
    # The digest's h=1024, no-low-level configuration: 729,327,896 (less the same 24 + 16).
    small = component_parameters(meta_model("mindeye2", hidden_dim=1024, lowlevel=False))
    assert small["total"] == 729_327_896 - 40
    multi = meta_model("mindeye2-multisubject")
    assert len(multi.backbone.adapters.linears) == 7 and multi.config.subject_names()[0] == "subj02"
    assert abs(component_parameters(multi)["total"] - 2.58e9) / 2.58e9 < 0.01


def released_mindeye2(seed: int = 0) -> MindEye:
    torch.manual_seed(seed)
    # output_tiles=1: the release's single output Linear (the preset tiles it; same computation)
    model = build_model(shrunk("mindeye2", backbone_blocks="released", lowlevel=False, prior=False, output_tiles=1))
    with torch.no_grad():  # move LayerNorm gains/biases off their init so a misplaced one shows
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def test_released_mindeye2_backbone_is_affine_by_hand():
    """MindEye2's released blocks: LayerNorm over a length-1 axis outputs its bias, so each token
    mixer adds a constant c_k = w2 * gelu(w1 * beta_k + b1) + b2 and the MLP blocks drop out."""
    model = released_mindeye2()
    bb = model.backbone
    voxels = torch.randn(4, 20)
    adapter = bb.adapters.linears["subj01"]
    hidden = voxels @ adapter.weight.T + adapter.bias
    for mixer in bb.token_mixers:
        beta, w1, b1, w2, b2 = (t.item() for t in (mixer[0].bias, mixer[1].weight, mixer[1].bias, mixer[4].weight,
                                                    mixer[4].bias))
        hidden = hidden + (w2 * (0.5 * (w1 * beta + b1) * (1 + math.erf((w1 * beta + b1) / math.sqrt(2)))) + b2)
    tokens = (hidden @ bb.to_tokens.weight.T + bb.to_tokens.bias).reshape(4, 3, 16)
    torch.testing.assert_close(model(voxels).backbone, tokens)
    a, b = torch.randn(2, 20), torch.randn(2, 20)
    f = lambda v: model(v).backbone  # noqa: E731
    torch.testing.assert_close(f(0.3 * a + 0.7 * b), 0.3 * f(a) + 0.7 * f(b), rtol=1e-5, atol=1e-5)


def test_released_blocks_do_not_matter_and_get_zero_gradients():
    model = released_mindeye2()
    voxels = torch.randn(4, 20)
    before = model(voxels).backbone
    with torch.no_grad():
        for block in model.backbone.blocks:
            for p in block.parameters():
                p.normal_()
    assert torch.equal(model(voxels).backbone, before)
    model.train()
    model(voxels).backbone.square().sum().backward()
    # Mathematically zero; numerically LayerNorm's backward over one element leaves rounding
    # (times 1/sqrt(eps)), as in the reference. The blocks get gradients, not None (ZeRO/DDP-safe).
    scale = float(model.backbone.to_tokens.weight.grad.abs().max())
    assert scale > 0
    for name, p in model.backbone.blocks.named_parameters():
        assert p.grad is not None and float(p.grad.abs().max()) < 1e-4 * scale, name
    # The working default uses its blocks.
    working = build_model(shrunk("mindeye2", lowlevel=False, prior=False)).eval()
    out = working(voxels).backbone
    with torch.no_grad():
        working.backbone.blocks[0][1].weight.mul_(2)
    assert not torch.allclose(working(voxels).backbone, out)


def test_released_parameter_names_and_shapes():
    model = released_mindeye2()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if ".token_mixers." in k or ".blocks." in k}
    h = 32
    for k in range(2):
        assert shapes[f"backbone.token_mixers.{k}.0.weight"] == (1,) == shapes[f"backbone.token_mixers.{k}.0.bias"]
        for i in (1, 4):
            assert shapes[f"backbone.token_mixers.{k}.{i}.weight"] == (1, 1)
            assert shapes[f"backbone.token_mixers.{k}.{i}.bias"] == (1,)
        assert shapes[f"backbone.blocks.{k}.0.weight"] == (h,)  # LN(h), then Linear, GELU, Dropout, Linear
        assert shapes[f"backbone.blocks.{k}.1.weight"] == (h, h) == shapes[f"backbone.blocks.{k}.4.weight"]
    assert len(shapes) == 2 * (6 + 6)  # per block: 3 x (weight, bias) in each half


def test_backbone_blocks_option_is_checked():
    with pytest.raises(ConfigError, match="backbone_blocks"):
        ModelConfig(preset="mindeye2", backbone_blocks="paper")
    with pytest.raises(ConfigError, match="backbone_blocks.*arch=mindeye1"):
        build_model(shrunk("mindeye1", backbone_blocks="released"))
    assert build_model(shrunk("mindeye2")).config.backbone_blocks == "working"


def test_scale_family_spans_10m_to_5b():
    totals = {name: component_parameters(meta_model(name))["total"] for name in PRESETS if name.startswith("scale-")}
    assert min(totals.values()) < 12e6 and max(totals.values()) >= 5e9
    assert list(totals.values()) == sorted(totals.values())


@pytest.mark.parametrize("preset", ["mindeye1", "mindeye2"])
def test_gradients_reach_every_trainable_parameter(preset):
    torch.manual_seed(0)
    model = build_model(shrunk(preset, prior_cond_drop_prob=0.5, subjects={"a": 20, "b": 17}))
    model.train()
    b = 8
    voxels, ids = torch.randn(b, 20), torch.tensor([0, 1] * 4)
    out = model(voxels, ids)
    generator = torch.Generator().manual_seed(3)  # drops some, keeps some of both prior inputs
    loss, _ = model.prior.loss(out.backbone, torch.randn(b, 3, 16), generator=generator)
    total = loss + out.backbone.sum() + out.projector.sum() + out.lowlevel.sum() + out.lowlevel_features.sum()
    total.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert missing == []


def test_mixed_subject_batch_equals_per_subject_forwards():
    torch.manual_seed(0)
    subjects = {"a": 12, "b": 20, "c": 7}
    model = build_model(shrunk("mindeye1", subjects=subjects)).eval()  # low-level head has its own adapters
    ids = torch.tensor([2, 0, 1, 0, 2, 1, 1])
    voxels = torch.randn(len(ids), 20)
    for row, s in enumerate(ids.tolist()):
        voxels[row, list(subjects.values())[s]:] = 0  # zero padding past the subject's count
    mixed = model(voxels, ids)
    for s, n in enumerate(subjects.values()):
        rows = (ids == s).nonzero(as_tuple=True)[0]
        alone = model(voxels[rows, :n], s)
        for field in ("backbone", "projector", "lowlevel", "lowlevel_features"):
            torch.testing.assert_close(getattr(mixed, field)[rows], getattr(alone, field))
    with pytest.raises(IndexError):
        model(voxels, torch.full((len(ids),), 3))


def test_add_subject_keeps_old_weights_and_starts_a_fresh_adapter():
    torch.manual_seed(0)
    cfg = shrunk("mindeye2", subjects={"subj02": 20, "subj03": 23})
    old = build_model(cfg)
    state = {k: v.clone() for k, v in old.state_dict().items()}
    new = load_with_new_subjects(state, {"subj01": 17, "subj02": 20}, cfg)
    assert new.config.subject_names() == ["subj01", "subj02"]
    new_state = new.state_dict()
    for key, value in state.items():
        if ".adapters.linears." not in key:
            assert torch.equal(new_state[key], value), key
    assert torch.equal(new_state["backbone.adapters.linears.subj02.weight"], state["backbone.adapters.linears.subj02.weight"])
    assert new_state["backbone.adapters.linears.subj01.weight"].shape == (32, 17)
    assert not any("subj03" in k for k in new_state)
    out = new(torch.randn(2, 20), torch.tensor([0, 1]))
    assert out.backbone.shape == (2, 3, 16)
    broken = dict(state)
    broken.pop("projector.2.weight")
    with pytest.raises(KeyError, match="projector.2.weight"):
        load_with_new_subjects(broken, {"subj01": 17}, cfg)


def test_no_weight_decay_names():
    model = build_model(shrunk("mindeye2"))
    names = no_weight_decay_names(model)
    params = dict(model.named_parameters())
    assert {n for n in params if n.endswith(".bias")} <= names
    assert {"prior.net.learned_queries", "prior.net.null_brain_embeds", "prior.net.null_image_embed",
            "prior.net.transformer.layers.0.0.null_kv", "prior.net.transformer.rel_pos_bias.embedding.weight",
            "prior.net.transformer.norm_out.weight", "backbone.blocks.0.0.weight", "projector.0.weight",
            "lowlevel.map_norm.weight"} <= names
    decayed = set(params) - names
    assert {"backbone.adapters.linears.subj01.weight", "prior.net.transformer.layers.0.0.to_q.weight",
            "lowlevel.decoder.conv_in.weight"} <= decayed
    out_weights = {n for n in params if n.startswith("backbone.to_tokens.") and n != "backbone.to_tokens.bias"}
    assert out_weights and out_weights <= decayed  # the output Linear's weight (in the preset's tiles)
    assert all(params[n].ndim >= 2 for n in decayed)


# ---- configuration --------------------------------------------------------------------------


def test_preset_that_disagrees_with_data_names_both():
    with pytest.raises(ConfigError, match=r"preset 'mindeye1' fixes.*15724.*dataset.*2000"):
        build_model(ModelConfig(preset="mindeye1"), n_voxels=2000, n_tokens=257, token_dim=768)
    with pytest.raises(ConfigError, match=r"model.token_dim=32.*dataset.*token_dim=16"):
        build_model(ModelConfig(preset="tiny", token_dim=32), n_voxels=10, n_tokens=2, token_dim=16)
    with pytest.raises(ConfigError, match="n_tokens"):
        build_model(ModelConfig(preset="mindeye2"), n_voxels=15724, n_tokens=257, token_dim=1664)


def test_dims_from_data_and_lowlevel_auto():
    with_latents = build_model(ModelConfig(preset="tiny"), n_voxels=10, n_tokens=2, token_dim=16, lowlevel_shape=[4, 8, 8])
    without = build_model(ModelConfig(preset="tiny"), n_voxels=10, n_tokens=2, token_dim=16)
    assert with_latents.lowlevel is not None and without.lowlevel is None
    assert with_latents.config.lowlevel is True and with_latents.config.subject_table() == {"subj01": 10}
    with pytest.raises(ConfigError, match="model.lowlevel=false"):
        build_model(ModelConfig(preset="tiny", lowlevel=True), n_voxels=10, n_tokens=2, token_dim=16)
    with pytest.raises(ConfigError, match="n_voxels is unknown"):
        build_model(ModelConfig(preset="tiny"), n_tokens=2, token_dim=16)
    with pytest.raises(ConfigError, match="lowlevel_shape"):  # 6 is not divisible by 2**1 * ... with 3 blocks
        build_model(ModelConfig(preset="tiny", lowlevel_channels=[8, 8, 8]), n_voxels=10, n_tokens=2, token_dim=16,
                    lowlevel_shape=[4, 6, 6])
    # An explicit voxel count replaces the preset's single-subject table.
    model = build_model(ModelConfig(preset="mindeye1", **SHRINK, n_voxels=30, n_tokens=2, token_dim=16,
                                    lowlevel_shape=[4, 8, 8]), n_voxels=30)
    assert model.config.subject_table() == {"subj01": 30}


def test_model_section_of_experiment_config_validates_and_names_keys():
    cfg = from_dict(ExperimentConfig, {"model": {"preset": "demo", "hidden_dim": 1024, "subjects": {"s1": 100, "s2": 90},
                                                 "lowlevel": "auto", "lowlevel_shape": [4, 16, 16]}})
    assert cfg.model.subjects == {"s1": 100, "s2": 90} and cfg.model.lowlevel == "auto"
    for bad, key in [({"preset": "huge"}, "model.preset"), ({"hidden_dim": 0}, "model.hidden_dim"),
                     ({"dropout": 1.5}, "model.dropout"), ({"subjects": {"a.b": 3}}, "model.subjects"),
                     ({"lowlevel_shape": [4, 8]}, "model.lowlevel_shape")]:
        with pytest.raises(ConfigError, match=key):
            from_dict(ExperimentConfig, {"model": bad})


def test_resolved_config_is_stable_and_derived_values_are_methods():
    model = build_model(ModelConfig(preset="demo"), nominal=True)
    resolved = model.config
    again = build_model(dataclasses.replace(resolved), n_voxels=2000, n_tokens=16, token_dim=64, lowlevel_shape=[4, 16, 16])
    assert again.config == resolved
    assert resolved.out_dim() == 16 * 64 and resolved.lowlevel_map_size() == (8, 8)
    assert isinstance(model.backbone.to_tokens, nn.Linear) and model.backbone.to_tokens.out_features == resolved.out_dim()


def test_single_subject_model_ignores_dataset_subject_numbers():
    model = build_model(shrunk("tiny")).eval()
    voxels = torch.randn(3, 20)
    nsd_numbers = torch.tensor([1, 1, 1])  # what a dataset's meta.json tags samples with
    torch.testing.assert_close(model(voxels, nsd_numbers).backbone, model(voxels).backbone)
    multi = build_model(shrunk("mindeye2-multisubject")).eval()
    with pytest.raises(ValueError, match="subject ids"):
        multi(torch.randn(2, 40))
