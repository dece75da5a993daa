"""Diffusion prior: schedule, loss wiring, classifier-free-guidance dropout, deterministic sampling,
and the attention pieces (rotary, relative position buckets)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mindeye_dist.models.prior import DiffusionPrior, PriorNetwork, RelativePositionBias, rotate

T, D = 3, 16


def make_prior(cond_drop_prob: float = 0.2, target_scale: float = 1.0, seed: int = 0) -> DiffusionPrior:
    torch.manual_seed(seed)
    net = PriorNetwork(n_tokens=T, dim=D, depth=1, heads=2, dim_head=8)
    return DiffusionPrior(net, timesteps=100, cond_drop_prob=cond_drop_prob, target_scale=target_scale)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_schedule_is_the_improved_ddpm_cosine():
    prior = make_prior()
    alpha_bar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    betas = torch.tensor([min(1 - alpha_bar((i + 1) / 100) / alpha_bar(i / 100), 0.999) for i in range(100)])
    torch.testing.assert_close(prior.scheduler.betas, betas.float())
    assert prior.scheduler.config.prediction_type == "sample" and prior.scheduler.config.num_train_timesteps == 100


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


def test_relative_position_buckets_are_bidirectional_and_saturate():
    bias = RelativePositionBias(heads=2, num_buckets=32, max_distance=128)
    rel = torch.tensor([-1000, -128, -5, -1, 0, 1, 5, 128, 1000])
    buckets = bias._bucket(rel)
    assert buckets.min() >= 0 and buckets.max() < 32
    assert buckets[4] == 0 and buckets[5] != buckets[3]  # +1 and -1 differ
    assert buckets[0] == buckets[1] and buckets[-1] == buckets[-2]  # saturate past max distance
    assert bias(5, 6, torch.device("cpu")).shape == (2, 5, 6)


def test_forward_is_the_loss():
    prior = make_prior()
    brain, target = torch.randn(2, T, D), torch.randn(2, T, D)
    via_forward, _ = prior(brain, target, generator=gen(4))
    via_loss, _ = prior.loss(brain, target, generator=gen(4))
    assert torch.equal(via_forward, via_loss)
