"""The synthetic subject's image model run both ways: the demo world's renderer, VAE and CLIP.

:class:`~mindeye_dist.data.synthetic.SyntheticSubject` makes every stimulus from a latent ``z``
(``L`` numbers) through fixed maps; this module inverts them, so the demo can reconstruct
pictures with the same code path MindEye uses on NSD:

=====================  =====================================================  ====================
role in reconstruct    map                                                    inverted by
=====================  =====================================================  ====================
renderer               ``z -> image``: 8x8 pattern ``sigmoid(q z / sqrt L)``,  (forward only)
                       upsampled (``SyntheticSubject.images``)
image encoder ("CLIP") ``image -> z -> targets(z)``                           cell means, logit,
                                                                              least squares on q
VAE decoder            ``latent -> z -> image`` with ``v = tanh(r z / sqrt L)``  ``atanh``, least
                                                                              squares on r
generator              ``tokens [+ init image] -> z -> image``                 damped Gauss-Newton
                                                                              on the target map
=====================  =====================================================  ====================

The target map ``t(z)`` is nonlinear (a product term) and every token is divided by token 0's
norm, so ``tokens -> z`` solves ``min_z ||t(z) - tokens||^2 + lam ||z||^2`` from a linear
warm start fitted on prior draws. The solution moves continuously with the tokens: a better
brain -> token prediction gives a closer latent and so a closer picture, which is what makes
the demo's reconstruction metrics rank decoders the way MindEye's do on real data.

All arrays here are torch tensors: images ``(N, 3, H, W)`` float in [0, 1], latents ``(N, L)``
float64 (the solves are tiny; float64 keeps the inversions exact to rounding).
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from mindeye_dist.data.errors import DataError
from mindeye_dist.data.synthetic import SyntheticSpec, SyntheticSubject

PATTERN = 8  # SyntheticSubject.images: an 8x8 colour pattern, upsampled
_EPS = 1.0 / 512  # keeps logit/atanh finite on saturated (uint8-rounded) inputs


class SyntheticRenderer:
    """The known image model of one synthetic subject, forwards and backwards (see module doc)."""

    def __init__(self, subject: SyntheticSubject, warm_start_samples: int = 4096, ridge: float = 1e-4):
        self.subject = subject
        s = subject.spec
        self.latent_dim, self.image_size = s.latent_dim, s.image_size
        root = math.sqrt(s.latent_dim)
        self.ridge = ridge
        # Each map is y = M z with M a (rows, L) matrix, rows >> L: least squares recovers z.
        self._image_map = torch.as_tensor(subject.q / root)  # (8*8*3, L), row (i*8 + j)*3 + c
        self._vae_map = torch.as_tensor(subject.r / root)  # (4*h*w, L)
        self._u = torch.as_tensor(subject.u / root)  # (T*D, L): linear term of the targets
        self._ua = torch.as_tensor(subject.ua / root)
        self._ub = torch.as_tensor(subject.ub / root)
        # Warm start for tokens -> z: a linear map fitted on prior draws (z ~ N(0, I)).
        z = torch.as_tensor(np.random.default_rng([subject.seed, 99]).standard_normal((warm_start_samples, s.latent_dim)))
        tokens = self.targets(z).reshape(warm_start_samples, -1)  # (M, T*D)
        self._warm = _ridge_solve(tokens, z, 1e-3)  # (T*D + 1, L), last row the intercept

    @classmethod
    def from_meta(cls, meta) -> "SyntheticRenderer":
        """The renderer of the subject a synthetic dataset was built from (meta.json ``source``)."""
        source = meta.raw.get("source", {}) if hasattr(meta, "raw") else dict(meta)
        if source.get("kind") != "synthetic" or "spec" not in source:
            raise DataError(f"{getattr(meta, 'url', 'the dataset')} is not a synthetic dataset (meta.json source.kind="
                            f"{source.get('kind')!r}); the synthetic renderer needs a dataset built by "
                            "`prepare_data.py synthetic`")
        return cls(SyntheticSubject(SyntheticSpec(**source["spec"]), int(source["seed"])))

    # ---------------------------------------------------------------- forward maps (torch)
    def targets(self, z: torch.Tensor) -> torch.Tensor:
        """(N, L) -> (N, T, D) tokens: ``SyntheticSubject.targets`` in torch (differentiable)."""
        s = self.subject.spec
        z = z.to(self._u.dtype)
        t = z @ self._u.T + s.target_nonlinearity * (z @ self._ua.T) * (z @ self._ub.T)
        t = t.reshape(z.shape[0], s.n_tokens, s.token_dim)
        return t / t[:, :1].norm(dim=-1, keepdim=True)

    def render(self, z: torch.Tensor) -> torch.Tensor:
        """(N, L) latents -> (N, 3, H, W) float images in [0, 1] (``SyntheticSubject.images``)."""
        images = self.subject.images(z.detach().cpu().double().numpy())  # (N, H, W, 3) uint8
        return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0

    # ---------------------------------------------------------------- inverse maps
    def image_latents(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) images in [0, 1] (any size) -> (N, L) latents by least squares."""
        x = images.detach().cpu().double()
        if x.shape[-2:] != (self.image_size, self.image_size):  # e.g. a resized reconstruction
            x = F.interpolate(x, (self.image_size, self.image_size), mode="bilinear", align_corners=False, antialias=True)
        cells = F.adaptive_avg_pool2d(x, PATTERN)  # (N, 3, 8, 8): mean of each upsampled cell
        y = torch.logit(cells.clamp(_EPS, 1 - _EPS)).permute(0, 2, 3, 1).reshape(x.shape[0], -1)  # (N, 192)
        return _least_squares(self._image_map, y)

    def vae_latents(self, vae: torch.Tensor) -> torch.Tensor:
        """(N, 4, h, w) VAE-like latents (e.g. the low-level head's prediction) -> (N, L)."""
        y = torch.atanh(vae.detach().cpu().double().reshape(vae.shape[0], -1).clamp(-1 + _EPS, 1 - _EPS))
        if y.shape[1] != self._vae_map.shape[0]:
            raise DataError(f"VAE latent has {y.shape[1]} values; this subject's latents have {self._vae_map.shape[0]}")
        return _least_squares(self._vae_map, y)

    def token_latents(self, tokens: torch.Tensor, iterations: int = 8, chunk: int = 512) -> torch.Tensor:
        """(N, T, D) tokens -> (N, L): argmin ||targets(z) - tokens||^2 + ridge ||z||^2.

        Linear warm start, then damped Gauss-Newton (Levenberg-Marquardt) per row: each row's
        damping shrinks after a step that lowers its objective and grows after one that does not
        (the step is then rejected), so every row's objective is non-increasing. Rows are solved
        ``chunk`` at a time (the Jacobians are (chunk, T*D, L)).
        """
        y = tokens.detach().cpu().double().reshape(tokens.shape[0], -1)  # (N, T*D)
        if y.shape[1] != self._u.shape[0]:
            raise DataError(f"tokens flatten to {y.shape[1]} values; this subject's targets have {self._u.shape[0]}")
        return torch.cat([self._solve_tokens(y[i:i + chunk], iterations) for i in range(0, len(y), chunk)])

    def _solve_tokens(self, y: torch.Tensor, iterations: int) -> torch.Tensor:
        z = torch.cat([y, torch.ones_like(y[:, :1])], 1) @ self._warm  # (N, L)
        damping = torch.full((y.shape[0],), 1e-2, dtype=y.dtype)
        loss = self._objective(z, y)
        eye = torch.eye(self.latent_dim, dtype=y.dtype)
        for _ in range(iterations):
            tokens, jac = self._targets_and_jacobian(z)  # (N, T*D), (N, T*D, L)
            resid = tokens - y
            jtj = jac.transpose(1, 2) @ jac + self.ridge * eye  # (N, L, L)
            grad = (jac.transpose(1, 2) @ resid[..., None]).squeeze(-1) + self.ridge * z  # (N, L)
            step = torch.linalg.solve(jtj + damping[:, None, None] * eye, -grad[..., None]).squeeze(-1)
            trial = z + step
            trial_loss = self._objective(trial, y)
            better = trial_loss < loss
            z = torch.where(better[:, None], trial, z)
            loss = torch.where(better, trial_loss, loss)
            damping = torch.where(better, damping / 3, damping * 4).clamp(1e-8, 1e8)
        return z

    def _targets_and_jacobian(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Flattened targets f = t / ||t_0|| (N, P) and df/dz (N, P, L), in closed form.

        t = U z + beta (A z) * (B z)  =>  dt/dz = U + beta (diag(A z) B + diag(B z) A);
        f = t / n with n = ||t_0||      =>  df/dz = dt/dz / n - t (t_0 . dt_0/dz) / n^3.
        """
        beta, dim = self.subject.spec.target_nonlinearity, self.subject.spec.token_dim
        a, b = z @ self._ua.T, z @ self._ub.T  # (N, P)
        t = z @ self._u.T + beta * a * b
        jac_t = self._u[None] + beta * (a[..., None] * self._ub[None] + b[..., None] * self._ua[None])  # (N, P, L)
        norm = t[:, :dim].norm(dim=1)  # (N,)
        grad_norm = (t[:, None, :dim] @ jac_t[:, :dim]).squeeze(1) / norm[:, None]  # (N, L)
        f = t / norm[:, None]
        jac = jac_t / norm[:, None, None] - f[..., None] * grad_norm[:, None, :] / norm[:, None, None]
        return f, jac

    def _objective(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ((self.targets(z).reshape(y.shape) - y) ** 2).sum(1) + self.ridge * (z**2).sum(1)

    # ---------------------------------------------------------------- the roles
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """The synthetic world's CLIP: (N, 3, H, W) images -> (N, T, D) target tokens (float32)."""
        return self.targets(self.image_latents(images)).float()

    def decode_vae(self, vae: torch.Tensor) -> torch.Tensor:
        """The synthetic world's VAE decoder: (N, 4, h, w) latents -> (N, 3, H, W) images."""
        return self.render(self.vae_latents(vae))

    def generate(self, tokens: torch.Tensor, init: Optional[torch.Tensor] = None, strength: float = 1.0,
                 sample_std: float = 0.0, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Tokens (N, T, D) [+ init images (N, 3, H, W)] -> (N, 3, H, W) images.

        The image-to-image analogue of diffusion's ``strength``: the latent is
        ``(1 - s) z(init) + s (z(tokens) + sample_std * eps)``, so ``s = 1`` ignores the init image
        and ``s = 0`` returns it; ``sample_std`` is the generator's own sampling noise (what makes
        best-of-k candidates differ beyond the prior's samples).
        """
        if init is not None and strength <= 0.0:
            return init.float().clone()
        z = self.token_latents(tokens)
        if sample_std > 0:
            z = z + sample_std * torch.randn(z.shape, generator=generator, dtype=torch.float64)
        if init is not None and strength < 1.0:
            z = (1.0 - strength) * self.image_latents(init) + strength * z
        return self.render(z)


def _least_squares(matrix: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Rows of y (N, rows) = M z -> z (N, L), M (rows, L) of full column rank."""
    return torch.linalg.lstsq(matrix.expand(1, *matrix.shape), y.T[None]).solution[0].T


def _ridge_solve(x: torch.Tensor, y: torch.Tensor, alpha: float) -> torch.Tensor:
    """[x | 1] W = y in the ridge sense; returns W (features + 1, outputs)."""
    xa = torch.cat([x, torch.ones_like(x[:, :1])], 1)
    gram = xa.T @ xa + alpha * torch.eye(xa.shape[1], dtype=x.dtype)
    return torch.linalg.solve(gram, xa.T @ y)
