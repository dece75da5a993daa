"""A synthetic subject with a known encoding model: the embedded default dataset.

Every stimulus has a latent ``z`` (``latent_dim`` standard normal numbers). Everything else is a
fixed, seeded function of ``z``:

- targets ``(T, D)``: ``t = U z / sqrt(L) + beta (A z / sqrt(L)) * (B z / sqrt(L))``, all tokens
  divided by the L2 norm of token 0 (MindEye1's ``norm_embs`` convention). The product term
  (``beta = target_nonlinearity``) makes the brain-to-target map nonlinear, as the real
  voxel-to-CLIP map is: a linear decoder (ridge) captures only the first term, while an MLP can
  learn both, which is the gap MindEye exploits on NSD (ridge ~20% vs MindEye ~90% retrieval);
- voxels ``(reps, V)``: ``x = mu + s * (g(z) + noise * eps)`` with ``g_v(z) = tanh(a_v w_v.z /
  sqrt(L) + b_v)`` for informative voxels and ``g_v = 0`` for the ``uninformative_frac`` share of
  pure-noise voxels (like voxels inside an nsdgeneral mask that do not respond); ``mu``/``s`` are
  per-voxel baselines and scales, so z-scoring matters; ``eps`` is fresh per repetition;
- images ``(H, W, 3)`` uint8: a sigmoid of a random projection at 8x8, upsampled;
- VAE-like latents ``(4, h, w)``: ``tanh`` of another random projection.

Because the encoding model is known, :meth:`SyntheticSubject.retrieval_ceiling` computes the best
retrieval any decoder could reach: with voxels averaged over repetitions, the noise is Gaussian
with known per-voxel scale, so the most likely candidate is the one with the smallest
noise-scaled squared distance between measured and predicted (noise-free) informative voxels.

Presets: ``tiny`` (tests, seconds) and ``demo`` (the CPU demo). The demo's noise and target
nonlinearity were set by measuring, on generator seeds 0, 1 and 2, the ceiling (~1.0), ridge
(~0.56-0.60 image, ~0.85-0.88 brain top-1) and a small MindEye MLP (~0.96-0.98 of the ceiling),
so the demo shows what a nonlinear decoder buys over a linear one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import numpy as np

from mindeye_dist.data.errors import DataError

AMPLITUDE_SPREAD = 0.5  # lognormal sigma; at 1.0 single voxels carried half the signal on some seeds
_TAGS = {"model": 0, "train_latents": 1, "test_latents": 2, "train_noise": 3, "test_noise": 4, "ceiling": 5}


@dataclass(frozen=True)
class SyntheticSpec:
    n_train: int
    """Train stimuli (a validation split is carved out of these when shards are written)."""
    n_test: int
    """Test stimuli."""
    n_voxels: int
    """Voxels per repetition, informative and pure-noise together."""
    uninformative_frac: float
    """Share of voxels that are pure noise."""
    latent_dim: int
    """Dimension of the stimulus latent."""
    n_tokens: int
    """Target tokens."""
    token_dim: int
    """Target token dimension."""
    noise: float
    """Noise std per repetition, in units of the informative signal's scale."""
    target_nonlinearity: float = 0.5
    """Weight ``beta`` of the product term in the targets (0 = targets linear in the latent)."""
    reps: int = 3
    """Repetitions per stimulus (NSD: 3)."""
    image_size: int = 32
    """Stimulus image side (pixels)."""
    vae_size: int = 8
    """VAE latent side; latents are (4, vae_size, vae_size)."""
    shard_size_mb: float = 4.0
    """Default shard size for this preset."""
    subject: int = 1
    """Subject id stored in every sample."""

    def __post_init__(self) -> None:
        for name in ("n_train", "n_test", "n_voxels", "latent_dim", "n_tokens", "token_dim", "reps", "image_size", "vae_size"):
            if getattr(self, name) < 1:
                raise DataError(f"synthetic {name}={getattr(self, name)} must be >= 1")
        if not 0.0 <= self.uninformative_frac < 1.0:
            raise DataError(f"synthetic uninformative_frac={self.uninformative_frac} must be in [0, 1)")
        if self.noise <= 0:
            raise DataError(f"synthetic noise={self.noise} must be > 0")

    @property
    def n_informative(self) -> int:
        return self.n_voxels - int(round(self.uninformative_frac * self.n_voxels))


PRESETS: dict[str, SyntheticSpec] = {
    "tiny": SyntheticSpec(
        n_train=160, n_test=48, n_voxels=96, uninformative_frac=0.25, latent_dim=8,
        n_tokens=4, token_dim=16, noise=1.0, target_nonlinearity=1.0, vae_size=8, shard_size_mb=0.05,
    ),
    "demo": SyntheticSpec(
        n_train=6000, n_test=600, n_voxels=2000, uninformative_frac=0.2, latent_dim=16,
        n_tokens=16, token_dim=64, noise=3.5, target_nonlinearity=2.5, vae_size=16, shard_size_mb=4.0,
    ),
}


def get_spec(preset: str, **overrides) -> SyntheticSpec:
    """A preset's spec with optional field overrides (e.g. ``n_train=64``)."""
    if preset not in PRESETS:
        raise DataError(f"unknown synthetic preset {preset!r}; choose one of {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[preset], **overrides)


def _logsumexp(a: np.ndarray, axis: int) -> np.ndarray:
    m = a.max(axis=axis, keepdims=True)
    return m + np.log(np.exp(a - m).sum(axis=axis, keepdims=True))


def _rng(seed: int, tag: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), _TAGS[tag]])


class SyntheticSubject:
    """A seeded synthetic subject; same (spec, seed) gives the same arrays on every machine."""

    def __init__(self, spec: SyntheticSpec | str = "tiny", seed: int = 0) -> None:
        self.spec = get_spec(spec) if isinstance(spec, str) else spec
        self.seed = int(seed)
        s, rng = self.spec, _rng(seed, "model")
        L, V, n_inf = s.latent_dim, s.n_voxels, s.n_informative
        self.informative = np.zeros(V, dtype=bool)
        self.informative[rng.permutation(V)[:n_inf]] = True
        self.w = rng.standard_normal((n_inf, L))  # voxel tuning directions
        self.gain = rng.uniform(0.3, 1.0, n_inf)
        self.bias = rng.normal(0.0, 0.3, n_inf)
        # Heavy-tailed response amplitudes, as in cortex: a few strong voxels carry most of the
        # information, so a decoder can find them from a few thousand samples.
        amp = np.exp(rng.normal(0.0, AMPLITUDE_SPREAD, n_inf))
        self.amplitude = amp / np.sqrt(np.mean(amp**2))
        self.baseline = rng.normal(0.0, 2.0, V)  # per-voxel offset (z-scoring removes it)
        self.scale = np.exp(rng.normal(0.0, 0.5, V))  # per-voxel scale
        self.u = rng.standard_normal((s.n_tokens * s.token_dim, L))
        self.q = rng.standard_normal((8 * 8 * 3, L)) * 1.5
        self.r = rng.standard_normal((4 * s.vae_size * s.vae_size, L))
        self.ua = rng.standard_normal((s.n_tokens * s.token_dim, L))  # product-term projections
        self.ub = rng.standard_normal((s.n_tokens * s.token_dim, L))

    # ---------------------------------------------------------------- fixed functions of z
    def latents(self, split: str) -> np.ndarray:
        """(n, L) latents of a split ('train' or 'test')."""
        n = {"train": self.spec.n_train, "test": self.spec.n_test}.get(split)
        if n is None:
            raise DataError(f"synthetic subjects have splits 'train' and 'test', not {split!r}")
        return _rng(self.seed, f"{split}_latents").standard_normal((n, self.spec.latent_dim))

    def signal(self, z: np.ndarray) -> np.ndarray:
        """(n, V) noise-free response g(z) in signal units (0 for uninformative voxels)."""
        g = np.zeros((z.shape[0], self.spec.n_voxels))
        g[:, self.informative] = self.amplitude * np.tanh(self.gain * (z @ self.w.T) / np.sqrt(self.spec.latent_dim) + self.bias)
        return g

    def clean_voxels(self, z: np.ndarray) -> np.ndarray:
        """(n, V) predicted voxels without noise, in measurement units."""
        return self.baseline + self.scale * self.signal(z)

    def voxels(self, split: str, z: Optional[np.ndarray] = None) -> np.ndarray:
        """(n, reps, V) measured voxels: clean response plus independent noise per repetition."""
        z = self.latents(split) if z is None else z
        eps = _rng(self.seed, f"{split}_noise").standard_normal((z.shape[0], self.spec.reps, self.spec.n_voxels))
        g = self.signal(z)[:, None, :]  # (n, 1, V)
        return self.baseline + self.scale * (g + self.spec.noise * eps)

    def targets(self, z: np.ndarray) -> np.ndarray:
        """(n, T, D) CLIP-like tokens, all divided by the L2 norm of token 0 (MindEye1 norm_embs)."""
        root = np.sqrt(self.spec.latent_dim)
        t = z @ self.u.T / root + self.spec.target_nonlinearity * (z @ self.ua.T / root) * (z @ self.ub.T / root)
        t = t.reshape(z.shape[0], self.spec.n_tokens, self.spec.token_dim)
        return t / np.linalg.norm(t[:, :1], axis=-1, keepdims=True)

    def images(self, z: np.ndarray) -> np.ndarray:
        """(n, H, W, 3) uint8 images: an 8x8 colour pattern of z, upsampled."""
        p = 1.0 / (1.0 + np.exp(-(z @ self.q.T) / np.sqrt(self.spec.latent_dim)))
        p = p.reshape(z.shape[0], 8, 8, 3)
        k = -(-self.spec.image_size // 8)
        img = p.repeat(k, axis=1).repeat(k, axis=2)[:, : self.spec.image_size, : self.spec.image_size]
        return np.round(img * 255).astype(np.uint8)

    def vae(self, z: np.ndarray) -> np.ndarray:
        """(n, 4, h, w) VAE-like latents."""
        v = np.tanh(z @ self.r.T / np.sqrt(self.spec.latent_dim))
        return v.reshape(z.shape[0], 4, self.spec.vae_size, self.spec.vae_size)

    def split_arrays(self, split: str) -> dict[str, np.ndarray]:
        """All arrays of a split in the arrays-importer contract (row i = stimulus i)."""
        z = self.latents(split)
        return {
            "voxels": self.voxels(split, z).astype(np.float32),
            "clip": self.targets(z).astype(np.float32),
            "images": self.images(z),
            "vae": self.vae(z).astype(np.float32),
        }

    # ---------------------------------------------------------------- the ceiling
    def likelihood_distances(self, voxels: np.ndarray, z: np.ndarray) -> np.ndarray:
        """(n_brain, n_image) noise-scaled squared distances between repetition-averaged voxels
        and each candidate's predicted voxels, over informative voxels (the others do not depend
        on the stimulus). Smaller = more likely under the Gaussian noise model."""
        m = self.informative
        x = ((voxels.mean(axis=1) - self.baseline) / self.scale)[:, m]  # (n, V_inf), signal units
        g = self.signal(z)[:, m]  # (n, V_inf)
        # ||x - g||^2 = ||x||^2 - 2 x.g + ||g||^2; equal noise variance per voxel in signal units
        return (x**2).sum(1)[:, None] - 2.0 * x @ g.T + (g**2).sum(1)[None, :]

    def retrieval_ceiling(self, split: str = "test", way: int = 300, loops: int = 30, seed: int = 0) -> dict:
        """Best possible top-1 retrieval on ``split`` under the evaluation protocol.

        Image retrieval: for each brain sample, the most likely of ``way`` candidate images;
        brain retrieval: for each image, the brain sample whose posterior over the candidate
        images puts the most weight on it. Averaged over ``loops`` random ``way``-subsets (``way`` is capped at the
        split size). Returns ``{"image_top1", "brain_top1", "image_top1_ci95", "brain_top1_ci95",
        "way", "loops", "chance", "n", "split"}``.
        """
        z = self.latents(split)
        dist = self.likelihood_distances(self.voxels(split, z), z)
        n = dist.shape[0]
        way = min(way, n)
        noise_var = self.spec.noise**2 / self.spec.reps  # per informative voxel, signal units
        rng = _rng(seed, "ceiling")
        img, brain = [], []
        for _ in range(loops):
            idx = rng.choice(n, way, replace=False)
            d = dist[np.ix_(idx, idx)]
            truth = np.arange(way)
            img.append(float(np.mean(d.argmin(axis=1) == truth)))
            # Brain direction: for image c pick the brain sample i with the highest posterior
            # P(c | x_i) among the candidates. The raw likelihood p(x_i | z_c) would compare
            # different x_i and be dominated by each sample's own noise energy ||x_i||^2.
            log_lik = -d / (2.0 * noise_var)
            log_post = log_lik - _logsumexp(log_lik, axis=1)
            brain.append(float(np.mean(log_post.argmax(axis=0) == truth)))
        ci = lambda a: float(1.96 * np.std(a) / np.sqrt(len(a)))  # noqa: E731 - normal CI over loops
        return {
            "image_top1": float(np.mean(img)), "brain_top1": float(np.mean(brain)),
            "image_top1_ci95": ci(img), "brain_top1_ci95": ci(brain),
            "way": way, "loops": loops, "chance": 1.0 / way, "n": n, "split": split,
            "method": "Gaussian likelihood of repetition-averaged voxels under the known encoding model",
        }
