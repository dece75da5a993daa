"""The ridge skip (model.ridge_skip_rank): ridge inside the decoder, fitted before step 0."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mindeye_dist.config import ConfigError
from mindeye_dist.evaluate import ridge_baseline
from mindeye_dist.models import build_model
from mindeye_dist.models.config import ModelConfig
from mindeye_dist.models.ridge_skip import RidgeSkip, load_factors, ridge_skip_factors

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tiny_dataset) -> str:
    return tiny_dataset(3)


def _linear_world(n, v, d, seed=0, noise=2.0):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(v, d))
    x, xv = rng.normal(size=(n, v)), rng.normal(size=(80, v))
    return x, x @ w + noise * rng.normal(size=(n, d)), xv, xv @ w


@pytest.mark.parametrize("n,v,d", [(300, 50, 40), (100, 400, 60)])  # tall and wide voxel matrices
def test_full_rank_skip_is_the_ridge_baseline(n, v, d):
    x, y, xv, yv = _linear_world(n, v, d)
    factors = ridge_skip_factors(x, y.reshape(n, 2, -1), xv, yv.reshape(80, 2, -1), rank=512)
    fit = ridge_baseline(x, y, xv, yv, way=80, loops=10)
    assert factors["info"]["alpha"] == pytest.approx(fit.alpha)
    assert factors["info"]["rank"] == min(n - 1, v, d) and factors["info"]["energy_kept"] == pytest.approx(1.0)
    skip = RidgeSkip(v, 2, d // 2, 512)
    load_factors(skip, factors)
    got = skip(torch.tensor(xv, dtype=torch.float32)).reshape(80, -1).numpy()
    want = fit.predict(xv)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_truncated_skip_is_the_best_low_rank_fit_of_ridges_training_predictions():
    x, y, xv, yv = _linear_world(300, 60, 50, seed=1)
    k = 5
    factors = ridge_skip_factors(x, y, xv, yv, rank=k)
    fit = ridge_baseline(x, y, xv, yv, way=80, loops=10)
    full = fit.predict(x) - fit.y_mean  # ridge's centred predictions on the training rows
    sv = np.linalg.svd(full, compute_uv=False)
    skip = RidgeSkip(60, 1, 50, k)
    load_factors(skip, factors)
    low = skip(torch.tensor(x, dtype=torch.float32)).reshape(300, -1).numpy() - fit.y_mean
    # Eckart-Young: the residual of the best rank-k approximation is the tail of the singular values
    assert np.linalg.norm(full - low) == pytest.approx(np.sqrt(np.sum(sv[k:] ** 2)), rel=1e-3)
    assert factors["info"]["energy_kept"] == pytest.approx(np.sum(sv[:k] ** 2) / np.sum(sv ** 2), rel=1e-6)
    assert factors["info"]["rank"] == k and factors["info"]["energy_kept"] < 1.0


def test_model_trains_the_mlp_alone_and_evaluates_the_blend_it_carries():
    cfg = ModelConfig(preset="tiny", ridge_skip_rank=8, prior=False, lowlevel=False)
    torch.manual_seed(0)
    model = build_model(cfg, n_voxels=30, n_tokens=2, token_dim=8)
    torch.manual_seed(0)
    plain = build_model(ModelConfig(preset="tiny", prior=False, lowlevel=False), n_voxels=30, n_tokens=2, token_dim=8)
    assert {"ridge_skip.down", "ridge_skip.up", "ridge_skip.in_mean", "ridge_skip.out_mean",
            "ridge_skip.blend"} <= set(model.state_dict())
    assert not any(name.startswith("ridge_skip") for name, _ in model.named_parameters())  # never trained
    x, y, xv, yv = _linear_world(200, 30, 16, seed=2)
    load_factors(model.ridge_skip, ridge_skip_factors(x, y.reshape(200, 2, 8), xv, yv.reshape(80, 2, 8), rank=8))
    v = torch.tensor(xv, dtype=torch.float32)
    with torch.no_grad():
        model.train(), plain.train()
        torch.manual_seed(1)
        trained = model(v, 0).projector
        torch.manual_seed(1)
        assert torch.equal(trained, plain(v, 0).projector)  # training sees exactly the plain network
        model.eval(), plain.eval()
        mlp, ridge = plain(v, 0).projector, model.ridge_skip(v)
        for beta in (0.0, 0.3, 1.0):
            model.ridge_skip.blend.fill_(beta)
            got = model(v, 0).projector
            want = beta * ridge / ridge.flatten(1).norm(dim=1)[:, None, None] \
                + (1 - beta) * mlp / mlp.flatten(1).norm(dim=1)[:, None, None]
            torch.testing.assert_close(got, want)
    again = build_model(cfg, n_voxels=30, n_tokens=2, token_dim=8)
    again.load_state_dict(model.state_dict())
    assert torch.equal(again.ridge_skip.up, model.ridge_skip.up) and float(again.ridge_skip.blend) == 1.0


def test_choose_blend_picks_the_side_that_retrieves():
    from mindeye_dist.models.ridge_skip import choose_blend

    gen = torch.Generator().manual_seed(0)
    targets = torch.randn(60, 2, 8, generator=gen)
    noise = torch.randn(60, 2, 8, generator=gen)
    good, bad = targets + 0.1 * noise, torch.randn(60, 2, 8, generator=gen)
    beta, res, scores = choose_blend(bad, good, targets, way=60, loops=5, seed=0)  # ridge retrieves, the MLP not
    assert beta >= 0.5 and res["image_top1"] == 1.0 and len(scores) == 11
    beta, res, _ = choose_blend(good, bad, targets, way=60, loops=5, seed=0)  # the other way round
    assert beta <= 0.5 and res["image_top1"] == 1.0
    # two predictors with independent errors: the blend beats both
    a, b = targets + 1.5 * noise, targets + 1.5 * torch.randn(60, 2, 8, generator=gen)
    beta, res, scores = choose_blend(a, b, targets, way=60, loops=5, seed=0)
    ends = max(0.5 * (s["image_top1"] + s["brain_top1"]) for s in scores if s["beta"] in (0.0, 1.0))
    assert 0.0 < beta < 1.0 and 0.5 * (res["image_top1"] + res["brain_top1"]) > ends


def test_validate_blend_embeds_ridge_once_and_leaves_the_chosen_beta():
    from mindeye_dist.models.ridge_skip import combine, validate_blend

    x, y, xv, yv = _linear_world(200, 30, 16, seed=4)
    cfg = ModelConfig(preset="tiny", hidden_dim=16, ridge_skip_rank=4, prior=False, lowlevel=False)
    model = build_model(cfg, n_voxels=30, n_tokens=2, token_dim=8).eval()
    before = model.ridge_skip.fingerprint()
    load_factors(model.ridge_skip, ridge_skip_factors(x, y, xv, yv, rank=4))
    assert model.ridge_skip.fingerprint() != before  # a fit changes the cache key ...
    fitted = model.ridge_skip.fingerprint()
    model.ridge_skip.blend.fill_(0.3)
    assert model.ridge_skip.fingerprint() == fitted  # ... choosing β does not
    xv_t, yv_t = torch.from_numpy(xv).float(), torch.from_numpy(yv).float().reshape(-1, 2, 8)
    blends = []

    def embed():
        blends.append(float(model.ridge_skip.blend))
        with torch.no_grad():
            return model(xv_t, 0).projector.float(), yv_t

    first = validate_blend(model.ridge_skip, embed, way=80, loops=3, seed=0)
    assert blends == [0.0, 1.0] and float(model.ridge_skip.blend) == first.beta
    # ridge's rows are what the model outputs at β = 1, and the blend is the model's eval output at β
    assert torch.allclose(first.preds, combine(embed()[0], first.ridge, first.beta), atol=1e-5)
    blends.clear()
    again = validate_blend(model.ridge_skip, embed, way=80, loops=3, seed=0, ridge=first.ridge)
    assert blends == [0.0] and again.beta == first.beta and torch.allclose(again.preds, first.preds)


def test_ridge_skip_refuses_a_multi_subject_model():
    with pytest.raises(ConfigError, match="ridge_skip_rank"):
        build_model(ModelConfig(preset="tiny", ridge_skip_rank=4, subjects={"s1": 20, "s2": 30}, prior=False,
                                lowlevel=False), n_tokens=2, token_dim=8)
    with pytest.raises(ConfigError, match="ridge_skip_rank"):
        ModelConfig(preset="tiny", ridge_skip_rank=-1)


def test_training_with_a_ridge_skip_validates_ridge_at_step_0_and_never_ends_below_it(tiny, tmp_path):
    """Through launchers/train.py: the skip is fitted before step 0, step 0's validation (ridge
    blended with an untrained MLP) is at least ridge's own score on the validation split, every
    validation logs its blend, and the best checkpoint (what evaluate.py and export.py use) is the
    best validation, step 0 included, carrying that validation's blend."""
    from mindeye_dist.checkpoint import model_states_file, read_best, safe_torch_load, tag_for
    from mindeye_dist.config import load_config
    from mindeye_dist.evaluate import ridge_for_data

    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(REPO / "launchers/train.py"), f"data.url={tiny}", f"run.dir={run}",
                           "train.max_steps=4", "train.eval_every_steps=2", "model.prior=false",
                           "model.lowlevel=false", "model.ridge_skip_rank=64", "log.jsonl=true"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ridge skip fitted on" in proc.stderr + proc.stdout
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    vals = {r["step"]: r for r in rows if "val/image_top1" in r}
    assert sorted(vals) == [0, 2, 4]
    cfg = load_config(str(run / "config.yaml"), [])
    ridge = ridge_for_data(cfg.data, cfg.data.val_split, way=int(vals[0]["val/way"]), loops=cfg.eval.retrieval_loops,
                           seed=cfg.run.seed)
    ridge_mean = 0.5 * (ridge["image_top1"] + ridge["brain_top1"])
    assert vals[0]["val/retrieval_top1"] >= ridge_mean - 0.02  # beta = 1 (ridge itself) was a candidate
    assert all(0.0 <= v["val/ridge_blend"] <= 1.0 for v in vals.values())
    best_step = max(sorted(vals), key=lambda s: (vals[s]["val/retrieval_top1"], -s))
    assert read_best(run / "checkpoints") == tag_for(best_step)
    states = safe_torch_load(model_states_file(run / "checkpoints" / tag_for(best_step)))["module"]
    assert float(states["model.ridge_skip.blend"]) == pytest.approx(vals[best_step]["val/ridge_blend"])


def test_ridge_skip_survives_a_resume_on_another_number_of_ranks(tiny, tmp_path):
    """DeepSpeed's universal load restores parameters only; the engine restores buffers itself, so a
    2-rank ZeRO-2 run resumed on 1 rank validates exactly as it did when it stopped."""
    from mindeye_dist.distributed import deepspeed_cmd, free_port

    run = tmp_path / "run"
    args = [f"data.url={tiny}", f"run.dir={run}", "train.max_steps=4", "train.eval_every_steps=4", "model.prior=false",
            "model.lowlevel=false", "model.ridge_skip_rank=32", "run.ds_config=zero2.json", "log.jsonl=true"]
    first = subprocess.run([*deepspeed_cmd(), "--num_accelerators", "2", "--master_port", str(free_port()),
                            str(REPO / "launchers/train.py"), *args], cwd=REPO, capture_output=True, text=True,
                           timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    stopped = next(r["val/loss"] for r in rows if r["step"] == 4 and "val/loss" in r)
    again = subprocess.run([sys.executable, str(REPO / "launchers/train.py"), *args], cwd=REPO, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    line = next(l for l in (again.stderr + again.stdout).splitlines() if "restored model on 1 rank(s) at step 4" in l)
    assert float(line.rsplit("val/loss", 1)[1]) == pytest.approx(stopped, rel=1e-5)
