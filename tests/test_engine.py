"""The engine's fused ZeRO-0 update (``EngineOptions.fused_update``) against DeepSpeed's own path.

In one process (a DeepSpeed world of one, the tiny preset): the fused update gives the weights
DeepSpeed's path gives (bit for bit when nothing is clipped; to float rounding when clipping,
whose factor the fused AdamW kernel divides by instead of multiplying every gradient), in fp32
and bf16; a non-finite gradient skips the step without touching weights, masters, optimizer
state or the schedule; the logged grad norm is the gradients' norm; and a run resumed from a
checkpoint continues bit for bit. Two ranks skipping together is covered through the real
launcher in ``tests/test_train_distributed.py`` and ``tests/test_engine_distributed.py``.
"""

from __future__ import annotations

import os

import pytest
import torch

from mindeye_dist.bench.common import PresetSpec, experiment_config, synthetic_batch
from mindeye_dist.trainer import ModelDims, Trainer

DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")


@pytest.fixture(scope="module", autouse=True)
def world_of_one():
    from mindeye_dist.distributed import init_distributed, teardown_distributed

    saved = {k: os.environ.pop(k, None) for k in DIST_ENV}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: no OpenMP spin-waits on a busy 2-core machine
    init_distributed()
    yield
    teardown_distributed()
    torch.set_num_threads(threads)
    for k, v in saved.items():
        if v is not None:
            os.environ[k] = v
        else:
            os.environ.pop(k, None)


def trainer(precision: str, fused: bool = True, clip: float = 1.0) -> Trainer:
    spec = PresetSpec.parse("tiny")
    cfg = experiment_config(spec, 4, precision=precision,
                            extra=(f"optim.grad_clip={clip}", "train.max_steps=40", "optim.max_lr=1e-2"))
    dims = spec.data_dims() or {}
    t = Trainer(cfg, ModelDims(**{k: tuple(v) if k == "lowlevel_shape" else v for k, v in dims.items()}, nominal=True))
    t.engine.options.fused_update = fused
    return t


def set_clip(t: Trainer, value: float) -> None:
    """The clip threshold everywhere it is read: ours, DeepSpeed's fp32 clip, its bf16 optimizer."""
    t.engine.clip = t.engine.engine._config.gradient_clipping = value
    if hasattr(t.engine.engine.optimizer, "clip_grad"):
        t.engine.engine.optimizer.clip_grad = value


def batches(t: Trainer, n: int, start: int = 0):
    return [synthetic_batch(t.model.config, 4, seed=100 + i) for i in range(start, start + n)]


def weights(t: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().clone() for k, v in t.engine.module.state_dict().items()}


def masters(t: Trainer) -> list[torch.Tensor]:
    """The fp32 tensors the optimizer updates (DeepSpeed's fp32 copies in bf16)."""
    return [p.detach().clone() for g in t.engine.basic_optimizer.param_groups for p in g["params"]]


def run(t: Trainer, data, seed: int | None = 0) -> list[float]:
    """Loss of each step; dropout draws from torch's global RNG, so it is seeded first."""
    if seed is not None:
        torch.manual_seed(seed)
    return [float(t.step([b]).terms.total.detach()) for b in data]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fused_update_equals_deepspeeds_path(precision):
    # Unclipped: the same floating-point operations, so the same bits.
    fused, plain = trainer(precision), trainer(precision, fused=False)
    set_clip(fused, 1e9), set_clip(plain, 1e9)
    assert fused.engine.fused_path and precision in fused.engine.fused_path
    data = batches(fused, 3)
    assert run(fused, data) == run(plain, data)
    assert all(torch.equal(a, b) for a, b in zip(masters(fused), masters(plain)))
    # Clipped at 1e-3 (every step clips): a division inside the kernel instead of a multiply.
    set_clip(fused, 1e-3), set_clip(plain, 1e-3)
    data = batches(fused, 3, start=3)
    run(fused, data), run(plain, data)
    for a, b in zip(masters(fused), masters(plain)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    norm_fused, norm_plain = fused.engine.grad_norm(), plain.engine.grad_norm()
    assert norm_fused > 1e-3
    if precision == "bf16":  # DeepSpeed keeps no norm at fp32 ZeRO-0 (test_fp32_grad_norm_is_logged)
        assert norm_fused == pytest.approx(norm_plain, rel=1e-4)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_non_finite_gradients_skip_the_step(precision):
    t = trainer(precision)
    run(t, batches(t, 2))
    before_w, before_m = weights(t), masters(t)
    opt_state = {k: v.clone() for s in t.engine.basic_optimizer.state.values() for k, v in s.items() if k == "step"}
    epoch = t.engine.scheduler.last_epoch
    bad = batches(t, 1, start=2)[0]
    bad.voxels[0, 0] = float("nan")
    result = t.step([bad])
    assert not result.applied and t.state.skipped_steps == 1
    assert all(torch.equal(before_w[k], v) for k, v in weights(t).items())
    assert all(torch.equal(a, b) for a, b in zip(before_m, masters(t)))
    assert t.engine.scheduler.last_epoch == epoch
    assert all(torch.equal(opt_state[k], v) for s in t.engine.basic_optimizer.state.values()
               for k, v in s.items() if k == "step")
    assert t.step(batches(t, 1, start=3)).applied  # the next finite step applies
    assert not all(torch.equal(before_w[k], v) for k, v in weights(t).items())


def test_fp32_grad_norm_is_logged():
    """DeepSpeed keeps no grad norm at fp32 ZeRO-0; the fused update logs the one it computed."""
    t = trainer("fp32", clip=1e9)
    t.engine.options.skip_one_rank_allreduce = True
    b = batches(t, 1)[0]
    terms = t.forward_loss(b)
    t.engine.backward(terms.total)
    expected = float(torch.nn.utils.get_total_norm([p.grad for p in t.engine.module.parameters() if p.grad is not None]))
    assert t.engine.step()
    assert t.engine.grad_norm() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_resume_is_bit_exact(tmp_path, precision):
    full = trainer(precision)
    data = batches(full, 6)
    run(full, data[:3])
    full.save(tmp_path, keep_last=2)
    expected = run(full, data[3:], seed=None)  # the RNG state the checkpoint holds
    resumed = trainer(precision)
    from mindeye_dist import checkpoint as ckpt

    rng = resumed.load(tmp_path, ckpt.read_latest(tmp_path))
    resumed.restore_rng(rng)
    assert run(resumed, data[3:], seed=None) == expected
    assert all(torch.equal(a, b) for a, b in zip(masters(full), masters(resumed)))
    assert all(torch.equal(v, weights(resumed)[k]) for k, v in weights(full).items())
