"""Retrieval protocol and ridge baseline (mindeye_dist.evaluate), all on tiny arrays."""

import numpy as np
import pytest
import torch

from mindeye_dist.evaluate import (
    cosine_similarity_matrix,
    retrieval_accuracy,
    retrieval_from_similarity,
    ridge_baseline,
)

# Image targets are one-hot rows, so cos(brain_i, image_j) = brain_i[j] for unit-norm brain rows:
# the similarity matrix is exactly BRAIN_4 below (rows brain, columns image).
BRAIN_4 = np.array(
    [
        [1.0, 0.0, 0.0, 0.0],  # own image 1.0 beats 0        -> image ok
        [0.8, 0.6, 0.0, 0.0],  # own image 0.6 loses to 0.8  -> image fails
        [0.0, 0.0, 0.6, 0.8],  # own image 0.6 loses to 0.8  -> image fails
        [0.0, 0.0, 0.0, 1.0],  # own image 1.0               -> image ok
    ]
)
# Columns: col0 [1, .8, 0, 0] own 1 wins; col1 [0, .6, 0, 0] own .6 wins; col2 [0, 0, .6, 0]
# own .6 wins; col3 [0, 0, .8, 1] own 1 wins -> brain retrieval is perfect.
IMAGE_4 = np.eye(4)


def test_similarity_matrix_is_cosine_and_chunk_independent():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(7, 2, 3)), rng.normal(size=(5, 6))
    sim = cosine_similarity_matrix(a, b, chunk_size=2)
    a2 = a.reshape(7, -1)
    expected = (a2 / np.linalg.norm(a2, axis=1, keepdims=True)) @ (b / np.linalg.norm(b, axis=1, keepdims=True)).T
    np.testing.assert_allclose(sim, expected, atol=1e-12)
    np.testing.assert_allclose(cosine_similarity_matrix(BRAIN_4 * 5.0, IMAGE_4), BRAIN_4, atol=1e-7)


def test_hand_computed_four_way_both_directions():
    res = retrieval_accuracy(BRAIN_4, IMAGE_4, way=4, loops=3, seed=0)
    assert res["image_top1"] == pytest.approx(0.5)
    assert res["brain_top1"] == pytest.approx(1.0)
    # every loop sees the same 4 samples, so the interval collapses onto the mean
    assert res["image_top1_ci"] == pytest.approx((0.5, 0.5))
    assert res["chance"] == pytest.approx(0.25)
    assert (res["way"], res["loops"], res["n"]) == (4, 3, 4)
    # top-2: rows 1 and 2 have exactly one better image, so they now succeed
    assert retrieval_accuracy(BRAIN_4, IMAGE_4, way=4, loops=1, top_k=2)["image_top2"] == pytest.approx(1.0)


@pytest.mark.parametrize("seed", range(8))
def test_two_way_subsets_follow_the_documented_sampling(seed):
    # One loop draws rng.choice(n, way, replace=False) with np.random.default_rng(seed).
    i, j = np.random.default_rng(seed).choice(4, size=2, replace=False)
    # In a 2-way subset a row fails only against the one image that beats it in BRAIN_4.
    image_fail = {frozenset((0, 1)): 1, frozenset((2, 3)): 1}.get(frozenset((int(i), int(j))), 0)
    res = retrieval_accuracy(BRAIN_4, IMAGE_4, way=2, loops=1, seed=seed)
    assert res["image_top1"] == pytest.approx(1 - image_fail / 2)
    assert res["brain_top1"] == pytest.approx(1.0)
    assert res["image_top1_ci"] is None  # one loop has no spread to estimate


def test_ties_count_as_failures():
    brain = np.array([[1.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])  # row 0 ties images 0 and 1
    res = retrieval_accuracy(brain, np.eye(3), way=3, loops=1)
    assert res["image_top1"] == pytest.approx(2 / 3)
    assert res["brain_top1"] == pytest.approx(1.0)
    # A collapsed model (every brain row equal) ties in every column: brain retrieval scores 0,
    # not 1/way as first-index argmax would. Image retrieval has no ties (the images differ), so
    # exactly one row (the one whose image is nearest the constant output) succeeds.
    collapsed = retrieval_accuracy(np.ones((5, 3)), np.random.default_rng(0).normal(size=(5, 3)), way=5, loops=1)
    assert collapsed["brain_top1"] == 0.0 and collapsed["image_top1"] == pytest.approx(1 / 5)


def test_nan_similarity_is_a_failure():
    sim = np.eye(3)
    sim[1, 1] = np.nan
    res = retrieval_from_similarity(sim, way=3, loops=1)
    assert res["image_top1"] == pytest.approx(2 / 3) and res["brain_top1"] == pytest.approx(2 / 3)


def test_perfect_embeddings_score_one():
    target = torch.randn(400, 4, 8)
    res = retrieval_accuracy(3.0 * target, target, loops=5)  # scale does not matter for cosine
    assert res["image_top1"] == 1.0 and res["brain_top1"] == 1.0
    assert res["way"] == 300 and res["chance"] == pytest.approx(1 / 300)


def test_random_embeddings_are_near_chance():
    rng = np.random.default_rng(1)
    res = retrieval_accuracy(rng.normal(size=(600, 32)), rng.normal(size=(600, 32)), way=300, loops=30)
    # chance is 1/300 = 0.0033; 30 loops × 300 rows make 0.02 a very loose bound
    assert res["image_top1"] < 0.02 and res["brain_top1"] < 0.02


def test_deterministic_under_seed_and_seed_matters():
    rng = np.random.default_rng(2)
    image = rng.normal(size=(50, 16))
    brain = image + 1.5 * rng.normal(size=(50, 16))  # mid-range accuracy, so subsets matter
    a = retrieval_accuracy(brain, image, way=10, loops=7, seed=3)
    assert a == retrieval_accuracy(brain, image, way=10, loops=7, seed=3)
    b = retrieval_accuracy(brain, image, way=10, loops=7, seed=4)
    assert (a["image_top1"], a["brain_top1"]) != (b["image_top1"], b["brain_top1"])
    low, high = a["image_top1_ci"]
    assert low < a["image_top1"] < high


def test_split_smaller_than_way_is_an_error_unless_asked():
    x = np.random.default_rng(0).normal(size=(100, 8))
    with pytest.raises(ValueError, match="fewer than way=300"):
        retrieval_accuracy(x, x)
    res = retrieval_accuracy(x, x, way=None, loops=2)
    assert res["way"] == 100 and res["image_top1"] == 1.0
    with pytest.raises(ValueError, match="same number of rows"):
        retrieval_accuracy(x, x[:50], way=None)


# --------------------------------------------------------------------------------------------
# Ridge baseline
# --------------------------------------------------------------------------------------------


def _linear_data(n, p, d, noise, seed):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(p, d))
    bias = rng.normal(size=d)
    x = rng.normal(size=(n, p))
    return x, x @ w + bias + noise * rng.normal(size=(n, d))


def test_ridge_recovers_noiseless_linear_map():
    x, y = _linear_data(260, 30, 4 * 8, noise=0.0, seed=0)
    y = y.reshape(-1, 4, 8)
    res = ridge_baseline(x[:200], y[:200], x[200:], y[200:], alphas=(1e-8, 1e-2, 1e2), way=50, loops=5)
    assert res.alpha == 1e-8  # all alphas retrieve perfectly; the MSE tie-break picks the smallest
    pred = res.predict(x[200:])
    assert pred.shape == (60, 4, 8)
    assert np.max(np.abs(pred - y[200:])) < 1e-4
    assert res.val_metrics["image_top1"] == 1.0 and res.val_metrics["val_mse"] < 1e-12


def test_ridge_matches_naive_closed_form_with_more_voxels_than_samples():
    rng = np.random.default_rng(3)
    x, xv = rng.normal(size=(30, 70)), rng.normal(size=(12, 70))
    y, yv = rng.normal(size=(30, 2, 5)).astype(np.float32), rng.normal(size=(12, 2, 5)).astype(np.float32)
    alpha = 7.0
    res = ridge_baseline(x, y, xv, yv, alphas=(alpha,), column_chunk=3, way=12, loops=4)
    # naive: centre, W = (XcᵀXc + αI)⁻¹ XcᵀYc (a p×p solve: fine at p = 70), intercept from the means
    xm, ym = x.mean(0), y.reshape(30, -1).mean(0)
    xc, yc = x - xm, y.reshape(30, -1) - ym
    w = np.linalg.solve(xc.T @ xc + alpha * np.eye(70), xc.T @ yc)
    naive = (xv - xm) @ w + ym
    pred = res.predict(xv).reshape(12, -1)
    np.testing.assert_allclose(pred, naive, atol=1e-5)
    # the validation scores computed without forming predictions agree with direct computation
    score = res.scores[0]
    assert score["val_mse"] == pytest.approx(np.mean((naive - yv.reshape(12, -1)) ** 2), rel=1e-6)
    direct = retrieval_accuracy(naive, yv, way=12, loops=4, seed=0)
    assert score["val_image_top1"] == pytest.approx(direct["image_top1"])
    assert score["val_brain_top1"] == pytest.approx(direct["brain_top1"])


def test_ridge_column_chunking_does_not_change_the_fit():
    x, y = _linear_data(80, 20, 12, noise=0.5, seed=4)
    kw = dict(alphas=(0.1, 10.0, 1000.0), way=20, loops=3)
    a = ridge_baseline(x[:60], y[:60], x[60:], y[60:], **kw)
    b = ridge_baseline(x[:60], y[:60], x[60:], y[60:], column_chunk=5, **kw)
    assert a.alpha == b.alpha
    np.testing.assert_allclose(a.predict(x[60:]), b.predict(x[60:]), rtol=1e-6, atol=1e-6)
    for sa, sb in zip(a.scores, b.scores):
        assert sa["val_mse"] == pytest.approx(sb["val_mse"])


@pytest.mark.parametrize("select_by", ["mse", "retrieval"])
def test_ridge_picks_stronger_regularisation_under_heavy_noise(select_by):
    alphas = tuple(10.0**k for k in range(-2, 6))
    chosen = {}
    for noise in (0.01, 30.0):
        x, y = _linear_data(160, 60, 40, noise=noise, seed=5)
        res = ridge_baseline(x[:80], y[:80], x[80:], y[80:], alphas=alphas, select_by=select_by, way=80, loops=5)
        chosen[noise] = res.alpha
    assert chosen[30.0] > chosen[0.01]


def test_ridge_default_grid_is_data_scaled():
    x, y = _linear_data(50, 10, 6, noise=0.1, seed=6)
    res = ridge_baseline(x[:40], y[:40], x[40:], y[40:], way=10, loops=2)
    assert len(res.alphas) == 13 and res.alpha in res.alphas
    mean_s2 = np.mean(res.singular_values**2)
    assert res.alphas[6] == pytest.approx(mean_s2)
