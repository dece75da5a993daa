"""Ridge inside the decoder: closed-form ridge stacked with the trained MLP, blended on validation.

On a family member whose maps are close to linear, closed-form ridge regression from the
repetition-averaged voxels is the right model and the residual MLP overfits before it gets there
(README "The recipe for a new dataset", ``heldout-h``: 0.33 against ridge's 0.52); on a nonlinear
member the MLP is far better than ridge. With ``model.ridge_skip_rank: k`` the model holds both:

* ``ridge_k``: the ridge map voxels -> flattened targets, fitted in closed form on the training
  split before the first step (α chosen on the validation split by retrieval, as
  ``evaluate.py --baseline ridge`` chooses it) and truncated to rank ``k``;
* ``blend``: β in [0, 1]. In eval mode the retrieval output is
  ``β · ridge(x)/|ridge(x)| + (1 − β) · mlp(x)/|mlp(x)|`` (per sample, flattened); β is chosen on
  the validation split at every validation (:func:`choose_blend`), so each checkpoint carries the
  β its validation score was measured with.

Training is untouched: in train mode the output is the MLP's alone, so the contrastive losses train
exactly the network they train without the skip. (Training the MLP *on top of* the fixed ridge map
was tried first and failed on ``tune-a``: ridge's in-sample fit of the training stimuli left the MLP
little to learn, and validation stayed at ridge's 0.25 against the plain MLP's 0.46; docs/recipe.md.)
This is stacking: both members are fitted on the training split, only β (and α) on validation.
β = 1 at step 0 is ridge itself, a candidate for the best checkpoint, so a run never selects a
checkpoint below ridge's validation score.

Everything is in buffers, not parameters: the optimizer never changes them, checkpoints and
exports carry them, and evaluation computes the same blend.

Rank truncation: with ``Xc = U S Vᵀ`` (centred training voxels) the ridge predictions on the
training rows are ``U M`` with ``M = diag(s·f) Uᵀ Yc`` and ``f = s / (s² + α)``; ``U`` is
orthonormal, so the best rank-k approximation of those predictions comes from the top k singular
directions of ``M``: ``down = V diag(1/s) P_k`` (voxels x k) and ``up = Σ_k Q_kᵀ`` (k x targets).
:func:`ridge_skip_factors` reports the share of the training predictions' energy that rank k keeps.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import numpy as np
import torch
from torch import nn


BLEND_GRID = tuple(i / 10 for i in range(11))
"""β candidates :func:`choose_blend` tries (0 = the MLP alone, 1 = ridge alone)."""


class RidgeSkip(nn.Module):
    """``x -> ((x - in_mean) @ down) @ up + out_mean``, reshaped to (B, n_tokens, token_dim), and
    the blend weight β (a 0-d buffer, 1.0 until a validation chooses it).

    Zeros until :func:`fit_ridge_skip` fills it (a checkpoint load fills it too)."""

    def __init__(self, n_voxels: int, n_tokens: int, token_dim: int, rank: int):
        super().__init__()
        self.n_tokens, self.token_dim = n_tokens, token_dim
        out = n_tokens * token_dim
        self.register_buffer("in_mean", torch.zeros(n_voxels))
        self.register_buffer("down", torch.zeros(n_voxels, rank))
        self.register_buffer("up", torch.zeros(rank, out))
        self.register_buffer("out_mean", torch.zeros(out))
        self.register_buffer("blend", torch.tensor(1.0))

    def forward(self, voxels: torch.Tensor) -> torch.Tensor:
        x = voxels[:, : self.in_mean.shape[0]].to(self.down.dtype)
        y = (x - self.in_mean) @ self.down @ self.up + self.out_mean
        return y.reshape(x.shape[0], self.n_tokens, self.token_dim)

    @torch.no_grad()
    def fingerprint(self) -> tuple[float, ...]:
        """Changes when a fit or a checkpoint load changes the map (not with β): a cache key for
        outputs that depend only on the map."""
        return tuple(float(b.double().sum()) for b in (self.in_mean, self.down, self.up, self.out_mean))


def combine(mlp: torch.Tensor, ridge: torch.Tensor, beta: float | torch.Tensor) -> torch.Tensor:
    """``β · ridge/|ridge| + (1 − β) · mlp/|mlp|``, norms over each sample's flattened output."""
    def unit(t: torch.Tensor) -> torch.Tensor:
        flat = t.reshape(t.shape[0], -1)
        return (flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)).reshape(t.shape)

    beta = torch.as_tensor(beta, dtype=mlp.dtype, device=mlp.device)
    return beta * unit(ridge.to(mlp.dtype)) + (1 - beta) * unit(mlp)


def choose_blend(mlp: torch.Tensor, ridge: torch.Tensor, targets: torch.Tensor, way: int, loops: int, seed: int,
                 grid: tuple[float, ...] = BLEND_GRID) -> tuple[float, dict[str, float], list[dict[str, float]]]:
    """β of ``grid`` with the best mean validation top-1 (ties: the smaller β, the MLP's side) ->
    (β, its retrieval_accuracy dict, every β's scores)."""
    from mindeye_dist.evaluate import retrieval_accuracy

    scores, best = [], None
    for beta in grid:
        res = retrieval_accuracy(combine(mlp, ridge, beta), targets, way=way, loops=loops, seed=seed)
        mean = 0.5 * (res["image_top1"] + res["brain_top1"])
        scores.append({"beta": beta, "image_top1": res["image_top1"], "brain_top1": res["brain_top1"]})
        if best is None or mean > best[0] + 1e-12:
            best = (mean, beta, res)
    return best[1], best[2], scores


class BlendChoice(NamedTuple):
    """What :func:`validate_blend` chose and the predictions behind it."""

    beta: float
    metrics: dict[str, float]  # retrieval_accuracy of the blend at β
    preds: torch.Tensor  # the blended validation predictions (what the checkpoint's eval mode outputs)
    targets: torch.Tensor
    ridge: torch.Tensor  # ridge's own validation predictions: fixed once fitted, pass back next time


def validate_blend(skip: RidgeSkip, embed: Callable[[], tuple[torch.Tensor, torch.Tensor]], way: int, loops: int,
                   seed: int, ridge: Optional[torch.Tensor] = None) -> BlendChoice:
    """Choose β on a validation split and leave it in ``skip.blend``.

    ``embed()`` returns (predictions, targets) of the model in eval mode under its current blend.
    It runs once with β = 0 (the MLP alone) and, unless ``ridge`` already holds ridge's predictions
    on the same rows (they cannot change after the fit), once more with β = 1."""
    skip.blend.fill_(0.0)
    mlp, targets = embed()
    if ridge is None:
        skip.blend.fill_(1.0)
        ridge, _ = embed()
    way = min(way, len(mlp))
    beta, metrics, _ = choose_blend(mlp, ridge, targets, way=way, loops=loops, seed=seed)
    skip.blend.fill_(beta)
    return BlendChoice(beta, metrics, combine(mlp, ridge, beta), targets, ridge)


def _top_singular(m: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Singular values of ``m`` (descending, all of them) and its top-``k`` left and right singular
    vectors ``P_k`` (r, k), ``Q_k`` (d, k) through the Gram matrix of its short side (``m`` is
    r x d with r, the ridge rank, up to n_train and d up to tokens x dim: never the full SVD).
    ``k = min(rank, numerical rank)``."""
    short_is_rows = m.shape[0] <= m.shape[1]
    lam, vec = np.linalg.eigh(m @ m.T if short_is_rows else m.T @ m)
    lam, vec = lam[::-1], vec[:, ::-1]
    sig = np.sqrt(np.clip(lam, 0.0, None))
    k = int(min(rank, int(np.sum(sig > sig[0] * 1e-7)) if sig.size else 0))
    # the k kept singular values are all > sig[0] * 1e-7 > 0, so dividing by them is safe
    if short_is_rows:  # vec = P;  Q_k = Mᵀ P_k Σ_k⁻¹
        p = vec[:, :k]
        q = (m.T @ p) / sig[:k]
    else:  # vec = Q;  P_k = M Q_k Σ_k⁻¹
        q = vec[:, :k]
        p = (m @ q) / sig[:k]
    return sig, p, q, k


def ridge_skip_factors(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, rank: int,
                       way: int = 300, loops: int = 10, seed: int = 0) -> dict[str, Any]:
    """Fit ridge (α on the validation rows by retrieval) and factor it to ``rank``.

    Returns ``in_mean`` (V,), ``down`` (V, k), ``up`` (k, d), ``out_mean`` (d,) as float32 arrays
    (k = min(rank, ridge's rank), padded with zeros to ``rank``), and ``info``: alpha, the ridge
    validation top-1 in both directions, the rank used and the energy share it keeps."""
    from mindeye_dist.evaluate import ridge_baseline

    fit = ridge_baseline(train_x, train_y, val_x, val_y, way=min(way, len(val_x)), loops=loops, seed=seed)
    s = fit.singular_values
    m = (s * fit.shrinkage())[:, None] * fit.projected_targets.astype(np.float64)  # (r, d)
    sig, p, q, k = _top_singular(m, rank)
    down = fit.components.T @ (p / s[:, None])  # (V, k) = V diag(1/s) P_k
    up = sig[:k, None] * q.T  # (k, d) = Σ_k Q_kᵀ
    energy = float(np.sum(sig[:k] ** 2) / max(np.sum(sig ** 2), 1e-300))
    n_vox, d = fit.x_mean.shape[0], fit.y_mean.shape[0]
    down_full = np.zeros((n_vox, rank), dtype=np.float32)
    up_full = np.zeros((rank, d), dtype=np.float32)
    down_full[:, :k] = down
    up_full[:k] = up
    info = {"alpha": float(fit.alpha), "rank": k, "energy_kept": energy,
            "val_image_top1": float(fit.val_metrics["image_top1"]),
            "val_brain_top1": float(fit.val_metrics["brain_top1"])}
    return {"in_mean": fit.x_mean.astype(np.float32), "down": down_full, "up": up_full,
            "out_mean": fit.y_mean.astype(np.float32), "info": info}


def load_factors(module: RidgeSkip, factors: dict[str, Any]) -> None:
    """Copy :func:`ridge_skip_factors`' arrays into the module's buffers (in their dtype)."""
    for name in ("in_mean", "down", "up", "out_mean"):
        buf = getattr(module, name)
        value = torch.as_tensor(np.asarray(factors[name]))
        if tuple(value.shape) != tuple(buf.shape):
            raise ValueError(f"ridge skip {name}: fitted shape {tuple(value.shape)} != buffer {tuple(buf.shape)}")
        with torch.no_grad():
            buf.copy_(value.to(buf.dtype))


def broadcast_buffers(module: RidgeSkip, src: int = 0) -> None:
    """Rank ``src``'s fitted buffers on every rank (no-op without an initialised process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for buf in (module.in_mean, module.down, module.up, module.out_mean, module.blend):
        # gloo broadcasts CPU tensors; NCCL needs them on the rank's device
        dist.broadcast(buf.data, src=src)


def fit_ridge_skip(module: RidgeSkip, arrays: Optional[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
                   rank: int = 0, way: int = 300, loops: int = 10, seed: int = 0) -> Optional[dict[str, Any]]:
    """Fit on the process-group rank that has ``arrays`` (train_x, train_y, val_x, val_y; rank 0)
    and broadcast; every rank must call it. ``way``/``loops``/``seed``: the validation retrieval
    protocol α is chosen by. Returns the fit's info on the fitting rank."""
    info = None
    if rank == 0:
        if arrays is None:
            raise ValueError("rank 0 needs the training and validation arrays to fit the ridge skip")
        factors = ridge_skip_factors(*arrays, rank=module.down.shape[1], way=way, loops=loops, seed=seed)
        load_factors(module, factors)
        info = factors["info"]
    broadcast_buffers(module)
    return info
