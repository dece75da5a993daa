"""Losses against independent loop-based NumPy references, mixup, schedule, low-level and totals."""

import math

import numpy as np
import pytest
import torch

from mindeye_dist.config import LossConfig
from mindeye_dist.losses import (
    BIMIXCO,
    KNOWN_REFERENCE_BUGS,
    SOFTCLIP,
    ContrastiveLoss,
    LossSchedule,
    LowLevelTerms,
    MindEyeLoss,
    VoxelMixup,
    bimixco_loss,
    combine_losses,
    draw_mixup,
    info_nce_loss,
    lowlevel_loss,
    mix_voxels,
    sample_beta,
    soft_clip_loss,
    soft_cont_loss,
)

# ---------------------------------------------------------------------------------------------
# Loop-based references in plain Python/NumPy (float64), written from the digest's formulas.


def _unit_rows(x):
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _log_softmax(row):
    m = max(row)
    log_z = m + math.log(sum(math.exp(v - m) for v in row))
    return [v - log_z for v in row]


def _softmax(row):
    return [math.exp(v) for v in _log_softmax(row)]


def _soft_ce_rows(logits, labels):
    """mean over rows i of -sum_j labels[i][j] * log softmax(logits[i])[j]."""
    total = 0.0
    for row, lab in zip(logits, labels):
        total -= sum(y * lp for y, lp in zip(lab, _log_softmax(row)))
    return total / len(logits)


def _sim(a, b, tau):
    return [[float(np.dot(a[i], b[j])) / tau for j in range(len(b))] for i in range(len(a))]


def _transpose(m):
    return [list(col) for col in zip(*m)]


def ref_bimixco(preds, targets, tau, labels):
    p, t = _unit_rows(preds), _unit_rows(targets)
    s = _sim(p, t, tau)
    labels = np.asarray(labels, dtype=np.float64).tolist()
    return 0.5 * (_soft_ce_rows(s, labels) + _soft_ce_rows(_transpose(s), _transpose(labels)))


def ref_soft_clip(preds, targets, tau):
    p, t = _unit_rows(preds), _unit_rows(targets)
    s, q = _sim(p, t, tau), _sim(t, t, tau)
    labels = [_softmax(row) for row in q]
    return 0.5 * (_soft_ce_rows(s, labels) + _soft_ce_rows(_transpose(s), labels))


def ref_soft_cont(student, teacher, teacher_aug, tau):
    c = student.shape[-1]
    s, t, a = (_unit_rows(np.asarray(x).reshape(-1, c)) for x in (student, teacher, teacher_aug))
    fwd = _soft_ce_rows(_sim(s, a, tau), [_softmax(r) for r in _sim(t, a, tau)])
    bwd = _soft_ce_rows(_sim(a, s, tau), [_softmax(r) for r in _sim(a, t, tau)])
    return 0.5 * (fwd + bwd)


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# Contrastive losses


def test_info_nce_hand_derived():
    # Orthonormal pairs: S = I / tau, each direction is -log(e^{1/tau} / (e^{1/tau} + 1)).
    tau = 0.5
    x = torch.eye(2)
    expected = math.log1p(math.exp(-1 / tau))
    assert info_nce_loss(x, x, tau).item() == pytest.approx(expected, rel=1e-6)
    # Swapped targets: the right answer now has similarity 0: -log(1 / (1 + e^{1/tau})).
    assert info_nce_loss(x, x.flip(0), tau).item() == pytest.approx(math.log1p(math.exp(1 / tau)), rel=1e-6)


@pytest.mark.parametrize("tau", [0.006, 0.1])
def test_bimixco_matches_loop_reference(tau):
    preds, targets = _rand(6, 3, 5, seed=1), _rand(6, 3, 5, seed=2)  # flattened to 15-d
    mix = draw_mixup(6, prob=1.0, generator=torch.Generator().manual_seed(3))
    labels = mix.soft_labels()
    got = bimixco_loss(preds, targets, tau, labels).item()
    assert got == pytest.approx(ref_bimixco(preds.numpy(), targets.numpy(), tau, labels.numpy()), rel=1e-4)


@pytest.mark.parametrize("tau", [0.004, 0.0075, 0.2])
def test_soft_clip_matches_loop_reference(tau):
    preds, targets = _rand(5, 8, seed=4), _rand(5, 8, seed=5)
    assert soft_clip_loss(preds, targets, tau).item() == pytest.approx(
        ref_soft_clip(preds.numpy(), targets.numpy(), tau), rel=1e-4
    )


def test_soft_cont_matches_loop_reference_and_is_bidirectional():
    student, teacher, teacher_aug = _rand(2, 3, 4, seed=6), _rand(2, 3, 4, seed=7), _rand(2, 3, 4, seed=8)
    tau = 0.2
    got = soft_cont_loss(student, teacher, teacher_aug, tau).item()
    assert got == pytest.approx(ref_soft_cont(student.numpy(), teacher.numpy(), teacher_aug.numpy(), tau), rel=1e-4)
    # The backward direction uses the *transposed* label matrix (A is not symmetric): a
    # one-directional loss gives a different value.
    s, t, a = (torch.nn.functional.normalize(x.reshape(-1, 4), dim=-1) for x in (student, teacher, teacher_aug))
    one_way = -((s @ a.T / tau).log_softmax(-1) * (t @ a.T / tau).softmax(-1)).sum(-1).mean().item()
    assert abs(got - one_way) > 1e-4


def test_bimixco_at_lambda_one_is_info_nce():
    preds, targets = _rand(7, 10, seed=9), _rand(7, 10, seed=10)
    no_mix = draw_mixup(7, prob=0.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(no_mix.soft_labels(), torch.eye(7))
    nce = info_nce_loss(preds, targets, 0.006)
    assert torch.allclose(bimixco_loss(preds, targets, 0.006, no_mix.soft_labels()), nce)
    module = ContrastiveLoss()
    assert torch.allclose(module(preds, targets, 0.006, "bimixco", None), nce)
    assert torch.allclose(module(preds, targets, 0.006, "infonce"), nce)


def test_contrastive_module_matches_functional_forms_and_rejects_misuse():
    preds, targets = _rand(4, 6, seed=11), _rand(4, 6, seed=12)
    labels = draw_mixup(4, prob=1.0, generator=torch.Generator().manual_seed(1)).soft_labels()
    module = ContrastiveLoss()
    assert torch.allclose(module(preds, targets, 0.006, "bimixco", labels), bimixco_loss(preds, targets, 0.006, labels))
    assert torch.allclose(module(preds, targets, 0.004, "softclip"), soft_clip_loss(preds, targets, 0.004))
    with pytest.raises(ValueError, match="unknown contrastive mode"):
        module(preds, targets, 0.006, "mixco")
    with pytest.raises(ValueError, match="only used by mode='bimixco'"):
        module(preds, targets, 0.006, "softclip", labels)


def test_contrastive_loss_is_fp32_under_autocast():
    preds, targets = _rand(4, 32, seed=13), _rand(4, 32, seed=14)
    ref = ContrastiveLoss()(preds, targets, 0.004, "softclip")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ContrastiveLoss()(preds.bfloat16(), targets.bfloat16(), 0.004, "softclip")
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(ref.item(), rel=2e-2)  # only the bf16 inputs differ


def test_gather_without_process_group(monkeypatch):
    preds, targets = _rand(4, 6, seed=15), _rand(4, 6, seed=16)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    gathered = ContrastiveLoss(gather_negatives=True)(preds, targets, 0.006)
    assert torch.allclose(gathered, info_nce_loss(preds, targets, 0.006))  # world size 1: identical
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="not initialised"):
        ContrastiveLoss(gather_negatives=True)(preds, targets, 0.006)


@pytest.mark.parametrize("mode", ["infonce", "bimixco", "softclip"])
def test_gradients_flow_and_descend(mode):
    preds = _rand(6, 12, seed=17).requires_grad_(True)
    targets = _rand(6, 12, seed=18)
    labels = draw_mixup(6, prob=1.0, generator=torch.Generator().manual_seed(2)).soft_labels() if mode == "bimixco" else None
    module = ContrastiveLoss()
    loss = module(preds, targets, 0.05, mode, labels)
    loss.backward()
    assert torch.isfinite(preds.grad).all() and preds.grad.abs().sum() > 0
    with torch.no_grad():
        stepped = preds - 0.05 * preds.grad
    assert module(stepped, targets, 0.05, mode, labels) < loss


# ---------------------------------------------------------------------------------------------
# Mixup


def test_beta_sampler_moments_and_reproducibility():
    draws = sample_beta(0.15, 0.15, 100_000, torch.Generator().manual_seed(0))
    assert draws.min() >= 0 and draws.max() <= 1
    a = 0.15
    assert draws.mean().item() == pytest.approx(0.5, abs=0.01)
    assert draws.var().item() == pytest.approx(a * a / ((2 * a) ** 2 * (2 * a + 1)), abs=0.01)
    skewed = sample_beta(2.0, 5.0, 100_000, torch.Generator().manual_seed(1))
    assert skewed.mean().item() == pytest.approx(2 / 7, abs=0.01)
    again = sample_beta(0.15, 0.15, 100_000, torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)


def test_mix_voxels_formula_and_reproducibility():
    voxels = _rand(16, 20, seed=19)
    mixed, mix = mix_voxels(voxels, generator=torch.Generator().manual_seed(5))
    again, mix2 = mix_voxels(voxels, generator=torch.Generator().manual_seed(5))
    assert torch.equal(mixed, again) and torch.equal(mix.perm, mix2.perm)
    assert 0 < int(mix.mixed.sum()) < 16  # prob 0.5: some of each with this seed
    for i in range(16):
        lam, k = float(mix.lam[i]), int(mix.perm[i])
        if mix.mixed[i]:
            assert torch.allclose(mixed[i], lam * voxels[i] + (1 - lam) * voxels[k], atol=1e-6)
        else:
            assert lam == 1.0 and torch.equal(mixed[i], voxels[i])
    assert sorted(mix.perm.tolist()) == list(range(16))


@pytest.mark.parametrize("ids", [[0] * 4 + [1] * 5 + [2] * 3, [2, 0, 1, 0, 2, 1, 1, 0, 2, 0, 1, 2]])
def test_mixup_with_subject_ids_stays_within_subject_with_offsets(ids):
    subject_ids = torch.tensor(ids)
    voxels = subject_ids.float()[:, None].repeat(1, 7)  # every voxel equals its subject id
    offsets_seen = set()
    for seed in range(30):
        mixed, mix = mix_voxels(voxels, prob=1.0, generator=torch.Generator().manual_seed(seed), subject_ids=subject_ids)
        assert sorted(mix.perm.tolist()) == list(range(len(ids)))
        assert torch.equal(subject_ids[mix.perm], subject_ids)
        assert torch.allclose(mixed, voxels)  # mixing within a subject keeps the subject's value
        labels = mix.soft_labels()
        same_subject = subject_ids[:, None] == subject_ids[None, :]
        assert (labels[~same_subject] == 0).all()
        offsets_seen.update(int(k) for k, s in zip(mix.perm, subject_ids) if s != ids[0])
    # The MindEye2 bug would send later subjects' partners into 0..bs_s-1; here they cover
    # exactly their own (offset) positions.
    assert offsets_seen == {i for i, s in enumerate(ids) if s != ids[0]}
    assert "mindeye2_multisubject_mixup_offsets" in KNOWN_REFERENCE_BUGS


def test_mixup_applies_per_subject_when_voxel_counts_differ():
    subject_ids = torch.tensor([1, 0, 1, 0, 1, 0])
    widths = {0: 5, 1: 8}
    voxels = {s: _rand(3, widths[s], seed=30 + s) for s in widths}  # each subject's rows in batch order
    mix = draw_mixup(6, prob=1.0, generator=torch.Generator().manual_seed(9), subject_ids=subject_ids)
    for s in widths:
        rows = torch.nonzero(subject_ids == s).reshape(-1)
        mixed = mix.apply(voxels[s], rows=rows)
        for local, i in enumerate(rows.tolist()):
            partner = rows.tolist().index(int(mix.perm[i]))
            lam = float(mix.lam[i])
            assert torch.allclose(mixed[local], lam * voxels[s][local] + (1 - lam) * voxels[s][partner], atol=1e-6)
    crossing = draw_mixup(6, prob=1.0, generator=torch.Generator().manual_seed(9))  # no subject ids
    with pytest.raises(ValueError, match="subject_ids"):
        for s in widths:
            crossing.apply(voxels[s], rows=torch.nonzero(subject_ids == s).reshape(-1))


def test_soft_labels_sum_and_self_permutation():
    mix = draw_mixup(10, prob=1.0, generator=torch.Generator().manual_seed(7))
    labels = mix.soft_labels()
    assert torch.allclose(labels.sum(dim=1), torch.ones(10))
    assert labels.sum().item() == pytest.approx(10.0)
    for i in range(10):
        k = int(mix.perm[i])
        if k != i:
            assert labels[i, i].item() == pytest.approx(float(mix.lam[i]))
            assert labels[i, k].item() == pytest.approx(1 - float(mix.lam[i]))
    # k_i = i: x~_i = x_i, so Y_ii = 1 (the reference's overwrite would give 1 - lambda, or 0).
    lam = torch.tensor([0.3, 1.0, 0.8])
    fixed = VoxelMixup(lam=lam, perm=torch.tensor([0, 1, 2]), mixed=torch.tensor([True, False, True]))
    assert torch.equal(fixed.soft_labels(), torch.eye(3))
    assert "mixco_self_permutation_label" in KNOWN_REFERENCE_BUGS


# ---------------------------------------------------------------------------------------------
# Schedule


def test_schedule_phases_and_temperature_endpoints():
    cfg = LossConfig(mixup_pct=0.25)
    sched = LossSchedule(cfg, total_steps=100)
    assert [sched.phase(s) for s in (0, 24, 25, 99)] == [BIMIXCO, BIMIXCO, SOFTCLIP, SOFTCLIP]
    assert sched.temperature(0) == sched.temperature(24) == 0.006
    assert sched.temperature(25) == pytest.approx(0.004)
    assert sched.temperature(100) == pytest.approx(0.0075)
    assert sched.temperature(500) == pytest.approx(0.0075)  # clamped after the end
    mid = sched.temperature(25 + 75 // 2)
    assert 0.004 < mid < 0.0075
    temps = [sched.temperature(s) for s in range(25, 101)]
    assert all(b > a for a, b in zip(temps, temps[1:]))  # annealed upward
    assert sched.validation(10) == ("infonce", 0.006)
    assert sched.validation(50) == ("softclip", 0.006)
    with pytest.raises(ValueError):
        sched.phase(-1)


def test_schedule_default_mixup_share_and_edge_cases():
    sched = LossSchedule(LossConfig(), total_steps=300)  # mixup_pct 0.33
    assert sched.phase(98) == BIMIXCO and sched.phase(99) == SOFTCLIP
    assert LossSchedule(LossConfig(mixup_pct=0.0), 10).phase(0) == SOFTCLIP
    all_mix = LossSchedule(LossConfig(mixup_pct=1.0), 10)
    assert all_mix.phase(9) == BIMIXCO and all_mix.temperature(10) == pytest.approx(0.0075)


@pytest.mark.parametrize("scale", [2, 3, 7, 64])
def test_schedule_invariant_to_total_steps_scaling(scale):
    base = LossSchedule(LossConfig(), total_steps=120)
    scaled = LossSchedule(LossConfig(), total_steps=120 * scale)
    for step in range(0, 121):
        assert base.phase(step) == scaled.phase(step * scale)
        assert base.temperature(step) == scaled.temperature(step * scale)


def test_schedule_state_dict_round_trip():
    sched = LossSchedule(LossConfig(), total_steps=1000)
    state = sched.state_dict()
    LossSchedule(LossConfig(), total_steps=1000).load_state_dict(state)
    with pytest.raises(ValueError, match="train.max_steps"):
        LossSchedule(LossConfig(), total_steps=2000).load_state_dict(state)
    LossSchedule(LossConfig(), total_steps=2000).load_state_dict(state, strict=False)


# ---------------------------------------------------------------------------------------------
# Low-level loss and totals


def test_lowlevel_l1_scale_and_optional_cont():
    pred, target = torch.zeros(2, 4, 3, 3), torch.full((2, 4, 3, 3), 0.5)
    terms = lowlevel_loss(pred, target, l1_scale=0.18215)
    assert terms.l1.item() == pytest.approx(0.5)
    assert terms.total.item() == pytest.approx(0.5 / 0.18215)
    assert terms.cont is None
    student, teacher, aug = _rand(2, 3, 4, seed=20), _rand(2, 3, 4, seed=21), _rand(2, 3, 4, seed=22)
    with_cont = lowlevel_loss(pred, target, cont_weight=0.1, cont_temp=0.2, student=student, teacher=teacher, teacher_aug=aug)
    assert with_cont.cont.item() == pytest.approx(soft_cont_loss(student, teacher, aug, 0.2).item())
    assert with_cont.total.item() == pytest.approx(0.5 + 0.1 * with_cont.cont.item())
    with pytest.raises(ValueError, match="teacher and teacher_aug"):
        lowlevel_loss(pred, target, student=student, teacher=teacher)
    with pytest.raises(ValueError, match="no student"):
        lowlevel_loss(pred, target, teacher=teacher, teacher_aug=aug)


def test_lowlevel_target_is_mixed_like_the_voxels():
    latents = _rand(8, 4, 2, 2, seed=23)
    mix = draw_mixup(8, prob=1.0, generator=torch.Generator().manual_seed(4))
    # A head that predicts the latent of the *actual* (mixed) input has zero L1...
    assert lowlevel_loss(mix.apply(latents), latents, mix=mix).l1.item() == pytest.approx(0.0, abs=1e-7)
    # ...while the unmixed target (MindEye2's bug) would penalise it.
    assert lowlevel_loss(mix.apply(latents), latents).l1.item() > 0.01
    assert lowlevel_loss(latents, latents, mix=mix).l1.item() > 0.01
    assert "mindeye2_lowlevel_target_mixed_after_loss" in KNOWN_REFERENCE_BUGS


def test_combine_losses_weights():
    c, p, low = torch.tensor(2.0), torch.tensor(0.1), torch.tensor(4.0)
    me1 = combine_losses(LossConfig(), contrastive=c, prior=p)
    assert me1.total.item() == pytest.approx(2.0 + 30 * 0.1)
    me2 = combine_losses(LossConfig(), contrastive=c, prior=p, lowlevel=LowLevelTerms(total=low, l1=torch.tensor(3.0)))
    assert me2.total.item() == pytest.approx(30 * 0.1 + 2.0 + 0.5 * 4.0)
    assert me2.lowlevel_l1.item() == 3.0
    weights = LossConfig(clip_weight=0.5, prior_weight=0.0, lowlevel_weight=2.0)
    custom = combine_losses(weights, contrastive=c, prior=p, lowlevel=low)
    assert custom.total.item() == pytest.approx(0.5 * 2 + 2 * 4)
    assert set(me2.as_dict()) == {"loss/total", "loss/contrastive", "loss/prior", "loss/lowlevel", "loss/lowlevel_l1"}
    with pytest.raises(ValueError, match="no loss term"):
        combine_losses(LossConfig())


def test_mindeye_loss_end_to_end():
    cfg = LossConfig(mixup_pct=0.5, mixup_prob=1.0)
    loss_fn = MindEyeLoss(cfg, total_steps=10)
    voxels, targets, latents = _rand(6, 9, seed=24), _rand(6, 3, 4, seed=25), _rand(6, 2, 2, 2, seed=26)
    weight = torch.randn(9, 12, generator=torch.Generator().manual_seed(27), requires_grad=True)
    head = torch.randn(9, 8, generator=torch.Generator().manual_seed(28), requires_grad=True)

    mixed, mix = loss_fn.mix(1, voxels, torch.Generator().manual_seed(0))
    assert mix is not None and not torch.equal(mixed, voxels)
    prior = (mixed @ weight).pow(2).mean()
    low_pred = (mixed @ head).reshape(6, 2, 2, 2)
    terms = loss_fn(1, mixed @ weight, targets, mix=mix, prior=prior, lowlevel_pred=low_pred, lowlevel_target=latents)
    assert terms.phase == BIMIXCO and terms.temperature == 0.006
    expected_contrastive = bimixco_loss(mixed @ weight, targets, 0.006, mix.soft_labels())
    assert torch.allclose(terms.contrastive, expected_contrastive)
    expected_low = lowlevel_loss(low_pred, latents, mix=mix).total
    assert torch.allclose(terms.total, expected_contrastive + 30 * prior + 0.5 * expected_low)
    terms.total.backward()
    assert weight.grad.abs().sum() > 0 and head.grad.abs().sum() > 0

    same, none = loss_fn.mix(7, voxels)
    assert none is None and same is voxels
    preds = voxels @ weight
    late = loss_fn(7, preds, targets)
    assert late.phase == SOFTCLIP and torch.allclose(late.contrastive, soft_clip_loss(preds, targets, late.temperature))
    with pytest.raises(ValueError, match="softclip phase"):
        loss_fn(7, preds, targets, mix=mix)
    assert torch.allclose(loss_fn.validation_loss(1, preds, targets), info_nce_loss(preds, targets, 0.006))
    assert torch.allclose(loss_fn.validation_loss(7, preds, targets), soft_clip_loss(preds, targets, 0.006))
    prior_only = loss_fn(7, None, None, prior=prior)
    assert prior_only.contrastive is None and torch.allclose(prior_only.total, 30 * prior)


def test_config_gather_local_loss_is_validated():
    from mindeye_dist.config import ConfigError

    assert LossConfig(gather_local_loss=True).gather_local_loss is True
    with pytest.raises(ConfigError, match="loss.gather_local_loss"):
        LossConfig(gather_local_loss="yes")


def test_cosine_regression_term_uses_mixed_targets_and_adds_to_the_total():
    from mindeye_dist.losses import cosine_regression_loss

    preds, targets = _rand(5, 3, 4, seed=40), _rand(5, 3, 4, seed=41)
    p, t = preds.reshape(5, -1), targets.reshape(5, -1)
    loop = np.mean([1 - float(p[i] @ t[i] / (p[i].norm() * t[i].norm())) for i in range(5)])
    assert cosine_regression_loss(preds, targets).item() == pytest.approx(loop, rel=1e-5)
    assert cosine_regression_loss(targets * 3.0, targets).item() == pytest.approx(0.0, abs=1e-6)
    mix = draw_mixup(5, prob=1.0, generator=torch.Generator().manual_seed(3))
    assert cosine_regression_loss(mix.apply(targets), targets, mix).item() == pytest.approx(0.0, abs=1e-6)

    loss_fn = MindEyeLoss(LossConfig(mixup_pct=0.0, cosine_weight=2.0), total_steps=10)
    terms = loss_fn(4, preds, targets)
    assert torch.allclose(terms.total, terms.contrastive + 2.0 * cosine_regression_loss(preds, targets))
    assert "loss/cosine" in terms.as_dict()
    assert "loss/cosine" not in MindEyeLoss(LossConfig(mixup_pct=0.0), 10)(4, preds, targets).as_dict()


def test_voxel_noise_is_fresh_reproducible_and_off_by_default():
    voxels = torch.zeros(64, 50)
    quiet = MindEyeLoss(LossConfig(mixup_pct=0.0), total_steps=10)
    assert quiet.mix(5, voxels, torch.Generator().manual_seed(0))[0] is voxels
    noisy = MindEyeLoss(LossConfig(mixup_pct=0.0, voxel_noise=0.5), total_steps=10)
    a, mix = noisy.mix(5, voxels, torch.Generator().manual_seed(0))
    b, _ = noisy.mix(5, voxels, torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(0)
    c, _ = noisy.mix(5, voxels, gen)
    d, _ = noisy.mix(5, voxels, gen)
    assert mix is None and torch.equal(a, b) and not torch.equal(c, d)
    assert a.std().item() == pytest.approx(0.5, rel=0.05) and abs(a.mean().item()) < 0.02
    with pytest.raises(Exception, match="loss.voxel_noise"):
        LossConfig(voxel_noise=-1.0)
