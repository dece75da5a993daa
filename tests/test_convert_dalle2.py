"""Converter on whole released layouts, priors included: dalle2-pytorch 1.14.2 builds the priors
(``DiffusionPrior`` with MindEye's network, its ``noise_scheduler`` buffers and rotary ``freqs``).

Needs the ``reference`` extra (see pyproject.toml) and ``pip install --no-deps dalle2-pytorch==1.14.2``.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("dalle2_pytorch", reason="install the reference extra + dalle2-pytorch==1.14.2 (--no-deps)")

from mindeye_dist.convert import ConversionError, convert_checkpoint, convert_mindeye1, convert_mindeye2  # noqa: E402
from mindeye_dist.export import load_exported  # noqa: E402
from mindeye_dist.models import build_model, component_parameters  # noqa: E402
from mindeye_dist.models.presets import NSD_VOXELS  # noqa: E402
from tests.reference_layouts import (ME1BrainNetwork, ME1Voxel2SD, ME2Module, dalle2_diffusion_prior,  # noqa: E402
                                     dalle2_prior_network, perturb_, save_like_reference)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread avoids OpenMP spin-waits on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def me1_release(seed=0):
    """MindEye1's BrainDiffusionPrior: dalle2 DiffusionPrior(net) with ``voxel2clip`` attached."""
    torch.manual_seed(seed)
    prior = dalle2_diffusion_prior(dalle2_prior_network(16, 3, 2, 8, 2))  # image_embed_scale None -> sqrt(16)
    prior.voxel2clip = ME1BrainNetwork(in_dim=20, h=32, n_blocks=2, clip_size=16, n_tokens=3, proj_h=24)
    return perturb_(prior, seed=seed).eval()


def me2_release(seed=0):
    torch.manual_seed(seed)
    module = ME2Module([20], h=32, n_blocks=2, clip_size=16, n_tokens=3, blurry_recon=False)
    module.diffusion_prior = dalle2_diffusion_prior(dalle2_prior_network(16, 3, 2, 8, 2))
    return perturb_(module, seed=seed).eval()


def test_mindeye1_prior_checkpoint(tmp_path):
    ref = me1_release()
    state = ref.state_dict()
    assert sum(k.endswith("rotary_emb.freqs") for k in state) == 2 and "noise_scheduler.betas" in state
    save_like_reference(state, tmp_path / "last.pth")
    summary = convert_checkpoint("mindeye1", tmp_path / "last.pth", tmp_path / "me1.safetensors", subjects=["s1"])
    assert summary["verified_and_dropped"] == 2 + 13  # rotary freqs per layer + dalle2's schedule buffers
    model = load_exported(tmp_path / "me1.safetensors")
    assert model.prior.target_scale == ref.image_embed_scale == 4.0
    x, target = torch.randn(6, 20), torch.randn(6, 3, 16)
    brain = model(x).backbone
    torch.testing.assert_close(brain.flatten(1), ref.voxel2clip(x)[0])
    noisy, t = torch.randn(6, 3, 16), torch.tensor([0, 9, 30, 50, 77, 99])
    torch.testing.assert_close(model.prior.net(noisy, t, brain), ref.net(noisy, t, text_embed=brain),
                               rtol=1e-5, atol=1e-5)
    # MindEye1's training loss: BrainDiffusionPrior scales the target by sqrt(dim) and calls p_losses.
    torch.manual_seed(3)
    expected = ref(text_embed=brain, image_embed=target.clone())
    got, _ = model.prior.loss(brain, target, generator=gen(3))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_mindeye2_prior_checkpoint_samples_like_mindeye2(tmp_path):
    ref = me2_release()
    save_like_reference(ref.state_dict(), tmp_path / "last.pth")
    convert_checkpoint("mindeye2", tmp_path / "last.pth", tmp_path / "me2.safetensors", subjects=["s1"])
    model = load_exported(tmp_path / "me2.safetensors")
    assert model.prior.target_scale == 1.0
    x = torch.randn(2, 20)
    backbone = model(x).backbone
    torch.testing.assert_close(backbone, ref.backbone(ref.ridge(x[:, None], 0))[0])
    # MindEye2's p_sample_loop(timesteps=20) is dalle2's without the final division by
    # image_embed_scale (its override comments it out), so undo dalle2's division here.
    torch.manual_seed(4)
    expected = ref.diffusion_prior.p_sample_loop(backbone.shape, text_cond=dict(text_embed=backbone), cond_scale=1.,
                                                 timesteps=20) * ref.diffusion_prior.image_embed_scale
    got = model.prior.sample(backbone, sampler="ddim", steps=20, generator=gen(4))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4 * float(expected.abs().max()))


def test_tampered_rotary_or_schedule_buffers_are_refused():
    state = dict(me1_release().state_dict())
    freqs = "net.causal_transformer.layers.1.0.rotary_emb.freqs"
    with pytest.raises(ConversionError, match=r"rotary_emb\.freqs holds rotary frequencies"):
        convert_mindeye1({**state, freqs: state[freqs] * 2}, subject="s1")
    betas = torch.linspace(1e-4, 0.02, 100)
    with pytest.raises(ConversionError, match=r"noise_scheduler\.betas differs from the cosine schedule"):
        convert_mindeye1({**state, "noise_scheduler.betas": betas}, subject="s1")


def test_full_size_releases_map_onto_our_presets():
    """Both releases at full size (meta device): every key maps, parameter counts match the digest."""
    voxels = NSD_VOXELS["subj01"]
    with torch.device("meta"):
        me1 = dalle2_diffusion_prior(dalle2_prior_network(768, 257, 6, 64, 12))
        me1.voxel2clip = ME1BrainNetwork(in_dim=voxels, h=4096, n_blocks=4, clip_size=768, n_tokens=257)
        low = ME1Voxel2SD(in_dim=voxels, h=4096, n_blocks=4, side=16, channels=[64, 128, 256])
        me2 = ME2Module([voxels], h=4096, n_blocks=4, clip_size=1664, n_tokens=256)
        me2.diffusion_prior = dalle2_diffusion_prior(dalle2_prior_network(1664, 256, 6, 52, 32))
    trainable = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
    assert trainable(me1) == 1_003_635_072  # digest: voxel2clip + prior, trainable
    assert sum(p.numel() for p in me2.parameters()) == 2_227_294_844  # digest: MindEye2 subject 1, all
    one = convert_mindeye1(me1.state_dict(), low.state_dict())
    two = convert_mindeye2(me2.state_dict())
    assert one.model.prior_timesteps == 100 and one.model.prior_heads == 12 and one.model.prior_dim_head == 64
    assert two.model.prior_heads == 32 and two.model.prior_dim_head == 52 and two.model.backbone_blocks == "released"
    with torch.device("meta"):
        ours1, ours2 = (build_model(c.model, **c.dims) for c in (one, two))
    counts1 = component_parameters(ours1)
    assert counts1["backbone"] + counts1["projector"] + counts1["prior"] == trainable(me1)
    assert counts1["lowlevel"] == sum(p.numel() for p in low.parameters())
    assert component_parameters(ours2)["total"] == 2_227_294_844 - 16  # less the rotary freqs we compute
    assert math.isclose(ours1.prior.target_scale, math.sqrt(768))
