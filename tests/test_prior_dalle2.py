"""Our prior against DALLE2-pytorch 1.14.2 itself, composed the way MindEye composes it.

Identical weights go into dalle2's network (``tests/reference_layouts.py``) and ours, through the
package's key mapping (``mindeye_dist.convert.prior_net_from_dalle2``); outputs, parameter
gradients, the training loss and both samplers are compared in fp32. DALLE2 draws from torch's
global RNG; ours from a ``torch.Generator`` seeded the same, which yields the same stream, so
timesteps, noise and classifier-free-guidance masks are the same draws.

Needs the ``reference`` extra (see pyproject.toml) and ``pip install --no-deps dalle2-pytorch==1.14.2``.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("dalle2_pytorch", reason="install the reference extra + dalle2-pytorch==1.14.2 (--no-deps)")

from dalle2_pytorch.dalle2_pytorch import LayerNorm as Dalle2LayerNorm  # noqa: E402
from dalle2_pytorch.dalle2_pytorch import RelPosBias  # noqa: E402

from mindeye_dist.convert import dalle2_prior_net_key, prior_net_from_dalle2  # noqa: E402
from mindeye_dist.models.prior import (DiffusionPrior, LayerNorm, PriorNetwork, RelativePositionBias,  # noqa: E402
                                       schedule_tables)
from tests.reference_layouts import dalle2_diffusion_prior, dalle2_prior_network, perturb_  # noqa: E402

# (dim, n_tokens, depth, dim_head, heads): 70 tokens -> 141-token sequence, so every bucket regime
# of the relative-position bias (exact < 16, log-spaced, saturated >= 128) occurs; dim_head 40 >
# 32 leaves features unrotated, as MindEye's 64 and 52 do.
SMALL = [(64, 70, 2, 16, 4), (64, 5, 2, 40, 2)]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread avoids OpenMP spin-waits on a busy 2-core machine (x30)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pair(dim, n_tokens, depth, dim_head, heads, seed=0):
    torch.manual_seed(seed)
    ref = perturb_(dalle2_prior_network(dim, n_tokens, depth, dim_head, heads), seed=seed)
    ours = PriorNetwork(n_tokens=n_tokens, dim=dim, depth=depth, heads=heads, dim_head=dim_head)
    ours.load_state_dict(prior_net_from_dalle2(ref.state_dict()), strict=True)
    return ref, ours


def gen(seed):
    return torch.Generator().manual_seed(seed)


def assert_same_grads(ref, ours):
    """Every trainable parameter's gradient equal to fp32 rounding (errors relative to the
    tensor's largest gradient: summed over a 141-token sequence, they reach ~5e-6 of it)."""
    grads = {n: p.grad for n, p in ours.named_parameters()}
    checked = 0
    for name, p in ref.named_parameters():
        if not p.requires_grad:
            continue  # rotary freqs
        scale = float(p.grad.abs().max())
        torch.testing.assert_close(grads[dalle2_prior_net_key(name)], p.grad, rtol=1e-4, atol=5e-5 * scale + 1e-9,
                                   msg=lambda m, name=name: f"{name}: {m}")
        checked += 1
    assert checked == len(grads)


def test_relative_position_bias_equals_dalle2():
    ref = RelPosBias(heads=3)
    ours = RelativePositionBias(heads=3)
    ours.embedding.weight.data.copy_(torch.randn(32, 3))
    ref.relative_attention_bias.weight.data.copy_(ours.embedding.weight.data)
    n = 515  # MindEye1: 257 + 1 + 257 tokens
    torch.testing.assert_close(ours(n, n + 1, torch.device("cpu")), ref(n, n + 1, device="cpu"), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("stable", [False, True])
def test_layer_norm_equals_dalle2_in_every_precision(dtype, stable):
    """Gain only, eps 1e-5 in fp32 and 1e-3 otherwise, the stable variant dividing by the row max.
    Rows of variance ~1e-3 make the two eps values give outputs ~1.4x apart."""
    ref, ours = Dalle2LayerNorm(64, stable=stable), LayerNorm(64, stable=stable)
    with torch.no_grad():
        ours.weight.copy_(1 + 0.1 * torch.randn(64))
        ref.g.copy_(ours.weight)
    x = torch.cat([torch.randn(3, 64) * 4, 0.03 * torch.randn(3, 64)])
    expected = ref.to(dtype)(x.to(dtype)).float()
    got = ours.to(dtype)(x.to(dtype)).float()
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("sizes", SMALL)
def test_network_outputs_and_gradients_equal_dalle2(sizes):
    dim, n_tokens = sizes[:2]
    ref, ours = pair(*sizes)
    noisy, brain = torch.randn(3, n_tokens, dim), torch.randn(3, n_tokens, dim)
    t = torch.tensor([0, 37, 99])
    expected = ref(noisy, t, text_embed=brain)
    got = ours(noisy, t, brain)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    weights = torch.randn_like(expected)
    (expected * weights).sum().backward()
    (got * weights).sum().backward()
    assert_same_grads(ref, ours)


def test_classifier_free_guidance_masks_equal_dalle2():
    dim, n_tokens = SMALL[1][:2]
    ref, ours = pair(*SMALL[1])
    noisy, brain, t = torch.randn(16, n_tokens, dim), torch.randn(16, n_tokens, dim), torch.arange(16) * 6
    torch.manual_seed(7)
    expected = ref(noisy, t, text_embed=brain, text_cond_drop_prob=0.5, image_cond_drop_prob=0.3)
    got = ours(noisy, t, brain, brain_drop_prob=0.5, image_drop_prob=0.3, generator=gen(7))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    plain = ours(noisy, t, brain)
    dropped = (got - plain).flatten(1).abs().amax(1) > 0
    assert 0 < int(dropped.sum()) < 16  # some samples dropped, some kept: the masks were exercised


@pytest.mark.parametrize("scale", [None, 1.0], ids=["mindeye1-sqrt-dim", "mindeye2-unscaled"])
def test_training_loss_and_gradients_equal_dalle2(scale):
    """dalle2's DiffusionPrior.forward (MindEye1 scales targets by sqrt(dim); MindEye2 removed it)."""
    dim, n_tokens = SMALL[1][:2]
    ref_net, ours_net = pair(*SMALL[1])
    ref = dalle2_diffusion_prior(ref_net, image_embed_scale=scale)
    ours = DiffusionPrior(ours_net, timesteps=100, cond_drop_prob=0.2, target_scale=scale or math.sqrt(dim))
    brain, target = torch.randn(12, n_tokens, dim), torch.randn(12, n_tokens, dim)
    torch.manual_seed(11)
    expected = ref(text_embed=brain, image_embed=target.clone())  # scales its input in place
    got, _ = ours.loss(brain, target, generator=gen(11))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    expected.backward()
    got.backward()
    assert_same_grads(ref_net, ours_net)


def count_calls(module):
    calls = []
    module.register_forward_hook(lambda *_: calls.append(1))
    return calls


class ReferenceNetForOurSampler(torch.nn.Module):
    """dalle2's network behind our PriorNetwork's call signature: isolates the samplers' arithmetic."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, noisy, t, brain, brain_drop_prob=0.0, image_drop_prob=0.0, generator=None):
        return self.net(noisy, t, text_embed=brain, text_cond_drop_prob=brain_drop_prob,
                        image_cond_drop_prob=image_drop_prob)


def close_to(got, expected, rel):
    """Equal to ``rel`` of the sample's largest value (sampling amplifies fp32 rounding: with these
    random networks a 1e-7 relative change of the initial noise moves the result by ~1e-5 of it)."""
    torch.testing.assert_close(got, expected, rtol=0, atol=rel * float(expected.abs().max()))


@pytest.mark.parametrize("steps,eta,cond_scale", [(20, 1.0, 1.0), (7, 0.5, 2.0)])
def test_ddim_sampling_equals_dalle2_p_sample_loop(steps, eta, cond_scale):
    """MindEye2's inference: p_sample_loop(shape, text_cond, cond_scale=1., timesteps=20)."""
    dim, n_tokens = SMALL[1][:2]
    ref_net, ours_net = pair(*SMALL[1])
    ref = dalle2_diffusion_prior(ref_net, image_embed_scale=1.0).eval()
    brain = torch.randn(2, n_tokens, dim)
    torch.manual_seed(5)
    expected = ref.p_sample_loop(brain.shape, text_cond=dict(text_embed=brain), cond_scale=cond_scale,
                                 timesteps=steps, eta=eta)
    # Our sampler around dalle2's own network: the DDIM arithmetic alone, bit for bit.
    shared = DiffusionPrior(ReferenceNetForOurSampler(ref_net), timesteps=100, target_scale=1.0).eval()
    torch.testing.assert_close(shared.sample(brain, sampler="ddim", steps=steps, generator=gen(5),
                                             cond_scale=cond_scale, eta=eta), expected, rtol=0, atol=0)
    ours = DiffusionPrior(ours_net, timesteps=100, target_scale=1.0).eval()
    calls = count_calls(ours_net)
    got = ours.sample(brain, sampler="ddim", steps=steps, generator=gen(5), cond_scale=cond_scale, eta=eta)
    close_to(got, expected, 1e-4)
    if steps == 20:
        assert len(calls) == 19  # 94, 89, ..., 4: the digest's "19 network calls"


def test_ddpm_sampling_equals_dalle2_p_sample_loop():
    """MindEye1's inference: 100-step DDPM, the sample divided by sqrt(dim)."""
    dim, n_tokens = SMALL[1][:2]
    ref_net, ours_net = pair(*SMALL[1])
    ref = dalle2_diffusion_prior(ref_net).eval()
    brain = torch.randn(2, n_tokens, dim)
    torch.manual_seed(9)
    expected = ref.p_sample_loop(brain.shape, text_cond=dict(text_embed=brain))
    shared = DiffusionPrior(ReferenceNetForOurSampler(ref_net), timesteps=100, target_scale=math.sqrt(dim)).eval()
    torch.testing.assert_close(shared.sample(brain, sampler="ddpm", generator=gen(9)), expected, rtol=0, atol=0)
    ours = DiffusionPrior(ours_net, timesteps=100, target_scale=math.sqrt(dim)).eval()
    close_to(ours.sample(brain, sampler="ddpm", generator=gen(9)), expected, 2e-4)


@pytest.mark.parametrize("name,sizes,reference_count", [
    ("mindeye1", (768, 257, 6, 64, 12), 56_055_184),
    ("mindeye2", (1664, 256, 6, 52, 32), 259_865_216),
])
def test_full_size_parameter_counts_and_key_mapping(name, sizes, reference_count):
    dim, n_tokens, depth, dim_head, heads = sizes
    with torch.device("meta"):
        ref = dalle2_prior_network(*sizes)
        ours = PriorNetwork(n_tokens=n_tokens, dim=dim, depth=depth, heads=heads, dim_head=dim_head)
    assert sum(p.numel() for p in ref.parameters()) == reference_count
    rotary = sum(p.numel() for p in ref.parameters() if not p.requires_grad)
    assert rotary == 16 and sum(p.numel() for p in ours.parameters()) == reference_count - 16
    mapped = prior_net_from_dalle2(ref.state_dict())
    assert {k: tuple(v.shape) for k, v in mapped.items()} == {k: tuple(v.shape) for k, v in ours.state_dict().items()}


def test_schedule_tables_equal_dalle2_noise_scheduler():
    """Every dalle2 NoiseScheduler buffer (what our samplers and the converter use), bit for bit."""
    from dalle2_pytorch.dalle2_pytorch import NoiseScheduler

    reference = NoiseScheduler(beta_schedule="cosine", timesteps=100, loss_type="l2")
    for name, table in schedule_tables(100).items():
        torch.testing.assert_close(table, getattr(reference, name), rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}")
