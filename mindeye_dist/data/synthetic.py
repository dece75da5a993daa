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

Three further knobs (all off in ``tiny`` and ``demo``, whose arrays are bit-identical to the
generator before they existed) make the family of :mod:`mindeye_dist.data.family`:

- ``voxel_nonlinearity`` ``nu``: an informative voxel responds ``(1 - nu) tanh(...)`` as above
  plus ``nu tanh(c_v ((w'_v.z / sqrt(L))^2 - 1))``, an even ("energy", complex-cell-like)
  function of the latent that no linear read-out of ``z`` sees; ``nu = 1`` leaves only that;
- ``latent_clusters`` ``K`` and ``cluster_spread`` ``s``: ``z = sqrt(1 - s^2) c_k + s eps`` with
  ``K`` seeded centres ``c_k ~ N(0, I)`` and ``k`` uniform (categories of similar stimuli;
  retrieval must tell apart near neighbours); ``K = 0`` is the spread ``N(0, I)`` latent;
- ``noise_block``: the measurement noise of rows ``[b B, (b + 1) B)`` comes from its own seed
  ``(seed, tag, b)``, so any rows can be generated alone (large members are written chunk by
  chunk with bounded memory, :meth:`SyntheticSubject.rows`); 0 draws a split's noise in one call.

Because the encoding model is known, :meth:`SyntheticSubject.retrieval_ceiling` computes the best
retrieval any decoder could reach: with voxels averaged over repetitions, the noise is Gaussian
with known per-voxel scale, so the most likely candidate is the one with the smallest
noise-scaled squared distance between measured and predicted (noise-free) informative voxels.
This holds for every knob above: retrieval chooses among given candidates with equal prior
weight, so the latent's distribution (clustered or not) drops out of the posterior over
candidates; the voxel map ``g`` may be any deterministic function of ``z`` (it is evaluated at
each candidate); and the target map never enters, because the candidates' targets are
one-to-one with their latents (a decoder sees the targets, the ceiling sees what they encode).

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
_TAGS = {"model": 0, "train_latents": 1, "test_latents": 2, "train_noise": 3, "test_noise": 4, "ceiling": 5,
         "family_model": 6, "clusters": 7}
# New random draws take new tags, so the streams of the presets (and their arrays) never move.


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
    voxel_nonlinearity: float = 0.0
    """Share ``nu`` in [0, 1] of each informative voxel's response that is an even (energy) function of z."""
    latent_clusters: int = 0
    """Clusters K of the stimulus latent (0 = one spread Gaussian; K >= 2 = a mixture of K)."""
    cluster_spread: float = 0.35
    """Within-cluster std ``s`` in (0, 1] of the clustered latent (marginal variance stays 1)."""
    noise_block: int = 0
    """Rows per independently seeded noise block (0 = a split's noise in one draw, as tiny/demo)."""

    def __post_init__(self) -> None:
        for name in ("n_train", "n_test", "n_voxels", "latent_dim", "n_tokens", "token_dim", "reps", "image_size", "vae_size"):
            if getattr(self, name) < 1:
                raise DataError(f"synthetic {name}={getattr(self, name)} must be >= 1")
        if not 0.0 <= self.uninformative_frac < 1.0:
            raise DataError(f"synthetic uninformative_frac={self.uninformative_frac} must be in [0, 1)")
        if self.noise <= 0:
            raise DataError(f"synthetic noise={self.noise} must be > 0")
        if not 0.0 <= self.voxel_nonlinearity <= 1.0:
            raise DataError(f"synthetic voxel_nonlinearity={self.voxel_nonlinearity} must be in [0, 1]")
        if self.target_nonlinearity < 0:
            raise DataError(f"synthetic target_nonlinearity={self.target_nonlinearity} must be >= 0")
        if self.latent_clusters < 0 or self.latent_clusters == 1:
            raise DataError(f"synthetic latent_clusters={self.latent_clusters} must be 0 (spread) or >= 2")
        if not 0.0 < self.cluster_spread <= 1.0:
            raise DataError(f"synthetic cluster_spread={self.cluster_spread} must be in (0, 1]")
        if self.noise_block < 0:
            raise DataError(f"synthetic noise_block={self.noise_block} must be >= 0 (0 = one draw per split)")

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


def _rng(seed: int, tag: str, *more: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), _TAGS[tag], *(int(m) for m in more)])


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
        # Family knobs draw from their own streams (the presets' draws above stay where they were).
        extra = _rng(seed, "family_model")
        self.w_energy = extra.standard_normal((n_inf, L)) if s.voxel_nonlinearity > 0 else None
        self.gain_energy = extra.uniform(0.5, 1.5, n_inf) if s.voxel_nonlinearity > 0 else None
        self.centres = _rng(seed, "clusters").standard_normal((s.latent_clusters, L)) if s.latent_clusters else None
        self._noise_cache: dict[tuple[str, int], np.ndarray] = {}

    # ---------------------------------------------------------------- fixed functions of z
    def split_size(self, split: str) -> int:
        n = {"train": self.spec.n_train, "test": self.spec.n_test}.get(split)
        if n is None:
            raise DataError(f"synthetic subjects have splits 'train' and 'test', not {split!r}")
        return n

    def latents(self, split: str) -> np.ndarray:
        """(n, L) latents of a split ('train' or 'test')."""
        n, rng = self.split_size(split), _rng(self.seed, f"{split}_latents")
        if self.centres is None:
            return rng.standard_normal((n, self.spec.latent_dim))
        k = rng.integers(len(self.centres), size=n)
        spread = self.spec.cluster_spread
        return np.sqrt(1.0 - spread**2) * self.centres[k] + spread * rng.standard_normal((n, self.spec.latent_dim))

    def signal(self, z: np.ndarray) -> np.ndarray:
        """(n, V) noise-free response g(z) in signal units (0 for uninformative voxels)."""
        g = np.zeros((z.shape[0], self.spec.n_voxels))
        root = np.sqrt(self.spec.latent_dim)
        odd = np.tanh(self.gain * (z @ self.w.T) / root + self.bias)
        nu = self.spec.voxel_nonlinearity
        if nu > 0:  # even "energy" part: ((w'.z)^2 - 1) has mean 0 for a unit-variance projection
            energy = np.tanh(self.gain_energy * (((z @ self.w_energy.T) / root) ** 2 - 1.0) / np.sqrt(2.0))
            odd = (1.0 - nu) * odd + nu * energy
        g[:, self.informative] = self.amplitude * odd
        return g

    def clean_voxels(self, z: np.ndarray) -> np.ndarray:
        """(n, V) predicted voxels without noise, in measurement units."""
        return self.baseline + self.scale * self.signal(z)

    def _noise(self, split: str, rows: Optional[np.ndarray]) -> np.ndarray:
        """(len(rows), reps, V) standard normal measurement noise of ``rows`` (all rows if None)."""
        s = self.spec
        n = self.split_size(split)
        if s.noise_block == 0:
            if rows is not None:
                raise DataError("rows of a split can be generated alone only with noise_block > 0")
            return _rng(self.seed, f"{split}_noise").standard_normal((n, s.reps, s.n_voxels))
        rows = np.arange(n) if rows is None else np.asarray(rows)
        out = np.empty((len(rows), s.reps, s.n_voxels))
        for block in np.unique(rows // s.noise_block):
            key = (split, int(block))
            if key not in self._noise_cache:  # keep the last two blocks: writer chunks straddle blocks
                if len(self._noise_cache) >= 2:
                    self._noise_cache.pop(next(iter(self._noise_cache)))
                size = min(s.noise_block, n - block * s.noise_block)
                self._noise_cache[key] = _rng(self.seed, f"{split}_noise", block).standard_normal((size, s.reps, s.n_voxels))
            sel = rows // s.noise_block == block
            out[sel] = self._noise_cache[key][rows[sel] - block * s.noise_block]
        return out

    def voxels(self, split: str, z: Optional[np.ndarray] = None, rows: Optional[np.ndarray] = None) -> np.ndarray:
        """(n, reps, V) measured voxels: clean response plus independent noise per repetition.

        ``rows`` (needs ``noise_block > 0``) selects rows of the split; ``z`` are then their latents."""
        if rows is not None and z is None:
            z = self.latents(split)[rows]
        z = self.latents(split) if z is None else z
        eps = self._noise(split, rows)
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

    def rows(self, split: str, field: str, rows: np.ndarray) -> np.ndarray:
        """One field (voxels, clip, images, vae) of some rows of a split, as split_arrays has it.

        Needs ``noise_block > 0`` for voxels; memory is that of the rows asked for."""
        rows = np.asarray(rows)
        z = self.latents(split)[rows]
        if field == "voxels":
            return self.voxels(split, z, rows).astype(np.float32)
        makers = {"clip": lambda: self.targets(z).astype(np.float32), "images": lambda: self.images(z),
                  "vae": lambda: self.vae(z).astype(np.float32)}
        if field not in makers:
            raise DataError(f"unknown synthetic field {field!r}; expected voxels, clip, images or vae")
        return makers[field]()

    # ---------------------------------------------------------------- the ceiling
    def _mean_signal(self, split: str, z: np.ndarray, rows: Optional[np.ndarray]) -> np.ndarray:
        """(n, V_inf) repetition-averaged measured voxels in signal units, informative voxels only."""
        m = self.informative
        if self.spec.noise_block == 0:
            if rows is not None:
                z_all = self.latents(split)
                return ((self.voxels(split, z_all).mean(axis=1) - self.baseline) / self.scale)[rows][:, m]
            return ((self.voxels(split, z).mean(axis=1) - self.baseline) / self.scale)[:, m]
        rows = np.arange(self.split_size(split)) if rows is None else np.asarray(rows)
        out = np.empty((len(rows), int(m.sum())))
        for lo in range(0, len(rows), 256):  # bounded memory at tens of thousands of voxels
            part = rows[lo:lo + 256]
            eps = self._noise(split, part).mean(axis=1)[:, m]
            out[lo:lo + 256] = self.signal(z[lo:lo + 256])[:, m] + self.spec.noise * eps
        return out

    def likelihood_distances(self, voxels: np.ndarray, z: np.ndarray) -> np.ndarray:
        """(n_brain, n_image) noise-scaled squared distances between repetition-averaged voxels
        and each candidate's predicted voxels, over informative voxels (the others do not depend
        on the stimulus). Smaller = more likely under the Gaussian noise model."""
        m = self.informative
        x = ((voxels.mean(axis=1) - self.baseline) / self.scale)[:, m]  # (n, V_inf), signal units
        return self._distances(x, z)

    def _distances(self, x: np.ndarray, z: np.ndarray) -> np.ndarray:
        g = self.signal(z)[:, self.informative]  # (n, V_inf)
        # ||x - g||^2 = ||x||^2 - 2 x.g + ||g||^2; equal noise variance per voxel in signal units
        return (x**2).sum(1)[:, None] - 2.0 * x @ g.T + (g**2).sum(1)[None, :]

    def retrieval_ceiling(self, split: str = "test", way: int = 300, loops: int = 30, seed: int = 0,
                          rows: Optional[np.ndarray] = None) -> dict:
        """Best possible top-1 retrieval on ``split`` (or on its ``rows``) under the evaluation protocol.

        Image retrieval: for each brain sample, the most likely of ``way`` candidate images;
        brain retrieval: for each image, the brain sample whose posterior over the candidate
        images puts the most weight on it. Averaged over ``loops`` random ``way``-subsets (``way`` is capped at the
        split size). Returns ``{"image_top1", "brain_top1", "image_top1_ci95", "brain_top1_ci95",
        "way", "loops", "chance", "n", "split"}``. ``rows`` (sorted indices into the split) gives
        the ceiling of a carved-out part, e.g. the validation rows of train.
        """
        z = self.latents(split) if rows is None else self.latents(split)[np.asarray(rows)]
        if self.spec.noise_block == 0 and rows is None:
            dist = self.likelihood_distances(self.voxels(split, z), z)  # the presets' path, unchanged
        else:
            dist = self._distances(self._mean_signal(split, z, rows), z)
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
