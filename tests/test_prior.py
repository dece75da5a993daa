"""Diffusion prior: schedule, loss wiring, classifier-free-guidance dropout, deterministic sampling,
and the attention pieces (rotary, relative position buckets), against hand-derived values.
``tests/test_prior_dalle2.py`` compares the same pieces with DALLE2-pytorch itself."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mindeye_dist.models.prior import (DiffusionPrior, PriorNetwork, RelativePositionBias, dalle2_ddim_timesteps,
                                       rotate, schedule_tables)

T, D = 3, 16


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread avoids OpenMP spin-waits on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_prior(cond_drop_prob: float = 0.2, target_scale: float = 1.0, seed: int = 0) -> DiffusionPrior:
    torch.manual_seed(seed)
    net = PriorNetwork(n_tokens=T, dim=D, depth=1, heads=2, dim_head=8)
    return DiffusionPrior(net, timesteps=100, cond_drop_prob=cond_drop_prob, target_scale=target_scale)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_schedule_is_the_improved_ddpm_cosine():
    alpha_bar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    betas = [min(1 - alpha_bar((i + 1) / 100) / alpha_bar(i / 100), 0.999) for i in range(100)]
    tables = schedule_tables(100)
    torch.testing.assert_close(tables["betas"], torch.tensor(betas, dtype=torch.float64).float(), rtol=0, atol=0)
    # diffusers' name for it, same betas (diffusers keeps fp32 tables; ours are float64-built).
    from diffusers import DDPMScheduler
    torch.testing.assert_close(tables["betas"], DDPMScheduler(100, beta_schedule="squaredcos_cap_v2").betas)
    cumprod = 1.0
    for i, beta in enumerate(betas):
        cumprod *= 1 - beta
        assert tables["alphas_cumprod"][i].item() == pytest.approx(cumprod, rel=1e-6)
    assert betas[-1] == 0.999 and tables["alphas_cumprod_prev"][0] == 1.0


def test_ddim_timesteps_are_dalle2s_linspace():
    # int(linspace(-1, 100, 21)[:-1]) = -1, 4.05 -> 4, 9.1 -> 9, ..., 94.95 -> 94; reversed, paired.
    pairs = dalle2_ddim_timesteps(100, 20)
    assert pairs[0] == (94, 89) and pairs[-1] == (4, -1) and len(pairs) == 19
    assert all(t - n == 5 for t, n in pairs)
    assert dalle2_ddim_timesteps(100, 3) == [(66, 32), (32, -1)]  # -1, 32.67, 66.33


def test_loss_is_mse_on_scaled_targets_and_prediction_is_unscaled():
    scale = 768 ** 0.5
    prior = make_prior(target_scale=scale)
    brain, target = torch.randn(4, T, D), torch.randn(4, T, D)
    loss, prediction = prior.loss(brain, target, generator=gen(0))
    torch.testing.assert_close(loss, F.mse_loss(prediction * scale, target * scale))
    again, _ = prior.loss(brain, target, generator=gen(0))
    assert torch.equal(loss, again)


def test_cfg_dropout_with_p1_ignores_the_brain_and_p0_uses_it():
    dropped = make_prior(cond_drop_prob=1.0)
    target = torch.randn(4, T, D)
    a, _ = dropped.loss(torch.randn(4, T, D), target, generator=gen(5))
    b, _ = dropped.loss(torch.randn(4, T, D) * 3, target, generator=gen(5))
    assert torch.equal(a, b)
    # The null embeddings are what it sees: they receive the gradient.
    a.backward()
    assert dropped.net.null_brain_embeds.grad.abs().sum() > 0 and dropped.net.null_image_embed.grad.abs().sum() > 0
    kept = make_prior(cond_drop_prob=0.0)
    c, _ = kept.loss(torch.randn(4, T, D), target, generator=gen(5))
    d, _ = kept.loss(torch.randn(4, T, D) * 3, target, generator=gen(5))
    assert not torch.equal(c, d)
    c.backward()
    grad = kept.net.null_brain_embeds.grad
    assert grad is None or not grad.any()


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_sampling_is_deterministic_under_a_seed(sampler):
    prior = make_prior().eval()
    brain = torch.randn(2, T, D)
    first = prior.sample(brain, sampler=sampler, generator=gen(1))
    second = prior.sample(brain, sampler=sampler, generator=gen(1))
    other = prior.sample(brain, sampler=sampler, generator=gen(2))
    assert first.shape == (2, T, D) and torch.isfinite(first).all()
    assert torch.equal(first, second)
    assert not torch.allclose(first, other)


def test_sampling_steps_guidance_and_scale():
    prior = make_prior(target_scale=4.0).eval()
    brain = torch.randn(2, T, D)
    plain = prior.sample(brain, sampler="ddim", steps=5, generator=gen(1))
    guided = prior.sample(brain, sampler="ddim", steps=5, generator=gen(1), cond_scale=3.0)
    assert not torch.allclose(plain, guided)
    with pytest.raises(ValueError, match="sampler"):
        prior.sample(brain, sampler="euler")
    with pytest.raises(ValueError, match="sampler='ddim' for fewer"):
        prior.sample(brain, sampler="ddpm", steps=10)


def test_a_few_steps_fit_one_batch():
    prior = make_prior(cond_drop_prob=0.0)
    brain, target = torch.randn(8, T, D), torch.randn(8, T, D)
    opt = torch.optim.Adam(prior.parameters(), lr=3e-3)
    losses = []
    for step in range(60):
        loss, _ = prior.loss(brain, target, generator=gen(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < 0.6 * sum(losses[:10]) / 10


def test_rotary_depends_only_on_relative_position():
    q, k = torch.randn(1, 1, 16), torch.randn(1, 1, 16)
    def score(m: int, n: int) -> torch.Tensor:
        seq_q = torch.zeros(1, 12, 16); seq_q[0, m] = q[0, 0]  # noqa: E702
        seq_k = torch.zeros(1, 12, 16); seq_k[0, n] = k[0, 0]  # noqa: E702
        return (rotate(seq_q, 8)[0, m] * rotate(seq_k, 8)[0, n]).sum()
    torch.testing.assert_close(score(5, 2), score(9, 6))
    assert not torch.allclose(score(5, 2), score(2, 5))
    torch.testing.assert_close(rotate(q, 8).norm(), q.norm())
    torch.testing.assert_close(rotate(q, 8)[..., 8:], q[..., 8:])  # only the first rot_dim features turn


def test_relative_position_buckets_are_one_directional_with_the_null_key_first():
    bias = RelativePositionBias(heads=2, num_buckets=32, max_distance=128)
    # Below 16: one bucket each. Then 16 + floor(16 * log(d / 16) / log(8)): d=32 -> 16 + floor(5.33)
    # = 21, d=64 -> 26, d=127 -> 16 + floor(15.94) = 31; 128 and beyond clamp to 31.
    distance = torch.tensor([0, 1, 15, 16, 32, 64, 127, 128, 1000])
    assert bias._bucket(distance).tolist() == [0, 1, 15, 16, 21, 26, 31, 31, 31]
    with torch.no_grad():
        bias.embedding.weight.copy_(torch.arange(32.0)[:, None].expand(32, 2))  # bias value = bucket id
    table = bias(4, 5, torch.device("cpu"))[0]  # 4 queries, keys: null key, then tokens 0..3
    # Query i vs key j: max(i - j, 0). The null key (j=0) is at distance i; query i's own token
    # (j=i+1) and every later token at 0; token m < i at i - m - 1.
    expected = torch.tensor([[0, 0, 0, 0, 0],
                             [1, 0, 0, 0, 0],
                             [2, 1, 0, 0, 0],
                             [3, 2, 1, 0, 0]], dtype=torch.float32)
    assert torch.equal(table, expected)


def test_forward_is_the_loss():
    prior = make_prior()
    brain, target = torch.randn(2, T, D), torch.randn(2, T, D)
    via_forward, _ = prior(brain, target, generator=gen(4))
    via_loss, _ = prior.loss(brain, target, generator=gen(4))
    assert torch.equal(via_forward, via_loss)
