"""A family of synthetic subjects: named, seeded members that span what a lab's data can look like.

Every member is a :class:`~mindeye_dist.data.synthetic.SyntheticSpec` plus a generator seed, so it
knows its Bayes-optimal retrieval ceiling (:meth:`SyntheticSubject.retrieval_ceiling`). Build one::

    python launchers/prepare_data.py synthetic --member tune-a --out /tmp/data/tune-a
    python launchers/prepare_data.py synthetic --member random-7 --out /tmp/data/r7      # a random draw
    python launchers/prepare_data.py synthetic --member tune-a --spec noise=8 --out ... # a variant
    python launchers/prepare_data.py synthetic --list-members

The family's axes (:data:`RANGES`): voxel counts from a few hundred to tens of thousands, targets
from 1x64 to MindEye-sized 257x768 tokens, per-repetition noise from easy to hopeless, linear to
strongly nonlinear voxel maps (``voxel_nonlinearity``) and target maps (``target_nonlinearity``),
training sets from one session to 40, few to most voxels informative, spread or clustered latents.

**Sessions.** An NSD session is 750 trials and every image is shown 3 times, so one session's
worth of data is 250 distinct stimuli x 3 repetitions; a member's ``n_train`` is
``250 x sessions`` (the validation split is carved out of it when shards are written, 10 % by
default). Every member has 1,000 test stimuli (NSD's shared1000) and 3 repetitions.

**Held-out discipline.** :data:`TUNING` members are where training recipes are studied and
tuned (:mod:`mindeye_dist.recipe_study`). :data:`HELD_OUT` members (settings chosen
to span the axes, generator seeds 9000+ that nothing else uses) were written into this file and
committed *before* any tuning run, and were not trained on, evaluated, or even had their ridge
baseline or ceiling printed until the recipe was frozen; they are what a recipe is finally reported on.
``heldout-a`` and ``heldout-b`` are shaped like the two fresh subjects of issue #10 (A: other
voxel count, token shape, noise, nonlinearity and informative share than the demo, 6,000
stimuli x 3; B: more voxels, fewer informative, half the stimuli, smaller tokens).

**What a 2-core CPU can train in 20 minutes.** Members flagged ``cpu=True`` fit (up to ~12k
voxels, targets up to 64x128, up to 40 sessions). The rest of the family (``nsd-scale``:
15,724 voxels x 257x768 targets x 40 sessions; ``wide-30k``: 30,000 voxels) is covered by the
generator (built chunk by chunk in bounded memory) and by the recipe's derivation rules, not by
a measured 20-minute CPU run: the output layer alone of a 257x768 decoder is ~100M weights.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from mindeye_dist.data.errors import DataError
from mindeye_dist.data.synthetic import SyntheticSpec, SyntheticSubject

TRIALS_PER_SESSION = 750
"""NSD: 750 trials per scan session."""
REPS = 3
"""NSD: every image is shown 3 times."""
STIMULI_PER_SESSION = TRIALS_PER_SESSION // REPS
"""Distinct training stimuli per session's worth of trials (250)."""
N_TEST = 1000
"""Test stimuli of every member (NSD's shared1000)."""

RANGES: dict[str, tuple[Any, Any]] = {
    "n_voxels": (300, 30000),
    "informative_share": (0.05, 0.95),
    "latent_dim": (8, 64),
    "n_tokens": (1, 257),
    "token_dim": (16, 768),
    "noise": (1.0, 12.0),
    "voxel_nonlinearity": (0.0, 1.0),
    "target_nonlinearity": (0.0, 4.0),
    "sessions": (1, 40),
    "latent_clusters": (0, 100),
}
"""The family's axes: (low, high). ``latent_clusters`` 0 = spread latents."""

CPU_RANGES: dict[str, tuple[Any, Any]] = {**RANGES, "n_voxels": (300, 12000), "n_tokens": (1, 64), "token_dim": (16, 128)}
"""The part of :data:`RANGES` a 2-core CPU trains within 20 minutes (random ``cpu`` draws)."""


@dataclass(frozen=True)
class Member:
    name: str
    """Name used on the command line (``--member NAME``)."""
    role: str
    """``tuning`` (recipe studied here), ``held-out`` (final measurement only) or ``range`` (generator only)."""
    seed: int
    """Generator seed of the subject (and of the validation carve-out)."""
    spec: SyntheticSpec
    """The generative settings."""
    cpu: bool
    """Trainable on a 2-core CPU within 20 minutes (else covered by the generator and the rules only)."""
    doc: str
    """What this member tests."""

    @property
    def sessions(self) -> float:
        return self.spec.n_train / STIMULI_PER_SESSION

    def settings(self) -> dict[str, Any]:
        """The member's world settings in a table's units."""
        s = self.spec
        return {"voxels": s.n_voxels, "informative": round(1.0 - s.uninformative_frac, 3), "tokens": f"{s.n_tokens}x{s.token_dim}",
                "latent_dim": s.latent_dim, "noise": s.noise, "voxel_nl": s.voxel_nonlinearity,
                "target_nl": s.target_nonlinearity, "sessions": round(self.sessions, 2), "n_train": s.n_train,
                "clusters": s.latent_clusters}


def family_spec(*, sessions: float, n_voxels: int, informative: float, tokens: tuple[int, int], noise: float,
                latent_dim: int = 16, voxel_nl: float = 0.0, target_nl: float = 1.0, clusters: int = 0,
                cluster_spread: float = 0.35) -> SyntheticSpec:
    """A family spec in the axes' units (sessions, informative share, (tokens, dim))."""
    n_tokens, token_dim = tokens
    out_mb = n_tokens * token_dim * 2 / 1e6  # float16 targets dominate large samples
    return SyntheticSpec(
        n_train=int(round(sessions * STIMULI_PER_SESSION)), n_test=N_TEST, n_voxels=n_voxels,
        uninformative_frac=round(1.0 - informative, 6), latent_dim=latent_dim, n_tokens=n_tokens, token_dim=token_dim,
        noise=noise, target_nonlinearity=target_nl, reps=REPS, image_size=32, vae_size=8,
        shard_size_mb=float(min(256.0, max(16.0, 64 * out_mb))), voxel_nonlinearity=voxel_nl,
        latent_clusters=clusters, cluster_spread=cluster_spread, noise_block=256,
    )


def _m(name: str, role: str, seed: int, doc: str, cpu: bool = True, **axes: Any) -> Member:
    return Member(name, role, seed, family_spec(**axes), cpu, doc)


_MEMBERS = [
    # ---- tuning: the recipe was studied on these (seeds 100-199) ----------------------------
    _m("tune-a", "tuning", 101, "subject-A-like: mid voxels, half informative, mild voxel nonlinearity",
       sessions=24, n_voxels=4000, informative=0.5, tokens=(16, 32), noise=5.5, voxel_nl=0.2, target_nl=2.0),
    _m("tune-b", "tuning", 102, "subject-B-like: many voxels, 12% informative, 12 sessions, small tokens",
       sessions=12, n_voxels=10000, informative=0.12, tokens=(4, 48), noise=4.0, target_nl=1.5),
    _m("tune-c", "tuning", 103, "few voxels, 4 sessions, clustered latents",
       sessions=4, n_voxels=800, informative=0.75, tokens=(8, 32), noise=2.0, latent_dim=8, target_nl=1.5, clusters=15),
    _m("tune-d", "tuning", 104, "large targets (32x128), strongly nonlinear target map",
       sessions=20, n_voxels=2500, informative=0.7, tokens=(32, 128), noise=5.0, latent_dim=20, target_nl=2.5),
    _m("tune-e", "tuning", 105, "mostly even (energy) voxel responses",
       sessions=16, n_voxels=3000, informative=0.6, tokens=(8, 64), noise=3.5, latent_dim=12, voxel_nl=0.8, target_nl=1.0),
    _m("tune-f", "tuning", 106, "low ceiling: 7% informative, high noise, 32 sessions",
       sessions=32, n_voxels=6000, informative=0.07, tokens=(16, 32), noise=7.0, target_nl=1.5),
    _m("tune-g", "tuning", 107, "one session (250 stimuli)",
       sessions=1, n_voxels=1000, informative=0.6, tokens=(4, 64), noise=1.5, latent_dim=8, target_nl=1.0),
    _m("tune-h", "tuning", 108, "linear maps, clustered latents, 40 sessions",
       sessions=40, n_voxels=3000, informative=0.5, tokens=(8, 32), noise=5.0, latent_dim=24, target_nl=0.0, clusters=40),
    # ---- held-out: final measurement only (seeds 9000+); written before any tuning run -------
    _m("heldout-a", "held-out", 9101, "issue #10 subject A: 5k voxels, 32x32 tokens, 40% informative, 24 sessions",
       sessions=24, n_voxels=5000, informative=0.4, tokens=(32, 32), noise=6.0, voxel_nl=0.3, target_nl=1.5),
    _m("heldout-b", "held-out", 9102, "issue #10 subject B: 12k voxels, 10% informative, 12 sessions, 8x32 tokens",
       sessions=12, n_voxels=12000, informative=0.1, tokens=(8, 32), noise=4.5, target_nl=2.0),
    _m("heldout-c", "held-out", 9103, "600 voxels, 3 sessions, clustered latents",
       sessions=3, n_voxels=600, informative=0.7, tokens=(4, 64), noise=2.0, latent_dim=8, target_nl=1.0, clusters=20),
    _m("heldout-d", "held-out", 9104, "large targets (64x128), strongly nonlinear target map",
       sessions=18, n_voxels=3000, informative=0.6, tokens=(64, 128), noise=6.0, latent_dim=24, target_nl=3.0),
    _m("heldout-e", "held-out", 9105, "almost purely even (energy) voxel responses",
       sessions=20, n_voxels=2500, informative=0.7, tokens=(16, 48), noise=4.0, latent_dim=12, voxel_nl=0.9, target_nl=0.5),
    _m("heldout-f", "held-out", 9106, "near-hopeless: 400 informative of 8k voxels, high noise",
       sessions=30, n_voxels=8000, informative=0.05, tokens=(16, 64), noise=6.5, target_nl=2.0),
    _m("heldout-g", "held-out", 9107, "one session (250 stimuli)",
       sessions=1, n_voxels=1500, informative=0.5, tokens=(8, 64), noise=2.0, latent_dim=8, target_nl=1.0),
    _m("heldout-h", "held-out", 9108, "linear maps, 50 clusters, 40 sessions, 32-d latent",
       sessions=40, n_voxels=4000, informative=0.5, tokens=(16, 32), noise=6.0, latent_dim=32, target_nl=0.0, clusters=50),
    # ---- range: generator and rules only (outside a 2-core CPU's 20 minutes) ------------------
    _m("nsd-scale", "range", 9001, "NSD subject 1 shape: 15,724 voxels, 257x768 CLIP-L tokens, 40 sessions", cpu=False,
       sessions=40, n_voxels=15724, informative=0.3, tokens=(257, 768), noise=5.0, latent_dim=64, voxel_nl=0.3,
       target_nl=2.0, clusters=80),
    _m("wide-30k", "range", 9002, "30,000 voxels, 5% informative, 257x768 tokens, 10 sessions", cpu=False,
       sessions=10, n_voxels=30000, informative=0.05, tokens=(257, 768), noise=3.0, latent_dim=32, target_nl=2.0),
]
MEMBERS: dict[str, Member] = {m.name: m for m in _MEMBERS}
TUNING: tuple[str, ...] = tuple(m.name for m in _MEMBERS if m.role == "tuning")
HELD_OUT: tuple[str, ...] = tuple(m.name for m in _MEMBERS if m.role == "held-out")


def sample_member(seed: int, cpu: bool = True) -> Member:
    """A random member ``random-<seed>``: every axis drawn from :data:`CPU_RANGES` (or :data:`RANGES`).

    Counts are drawn log-uniformly, shares and nonlinearities uniformly; the noise is drawn so
    that ``noise^2 / informative voxels`` (what sets the ceiling) is log-uniform, from easy to
    hopeless, whatever the voxel count.
    """
    ranges = CPU_RANGES if cpu else RANGES
    rng = np.random.default_rng([int(seed), 4242])

    def log_int(key: str) -> int:
        lo, hi = ranges[key]
        return int(round(np.exp(rng.uniform(np.log(lo), np.log(hi)))))

    n_voxels, informative = log_int("n_voxels"), float(rng.uniform(*ranges["informative_share"]))
    n_informative = max(1.0, n_voxels * informative)
    noise_per_root_voxel = np.exp(rng.uniform(np.log(0.05), np.log(0.5)))  # noise / sqrt(informative voxels)
    noise = float(np.clip(noise_per_root_voxel * np.sqrt(n_informative), *ranges["noise"]))
    clusters = int(rng.integers(10, ranges["latent_clusters"][1] + 1)) if rng.random() < 0.4 else 0
    spec = family_spec(
        sessions=log_int("sessions"), n_voxels=n_voxels, informative=round(informative, 3),
        tokens=(log_int("n_tokens"), log_int("token_dim")), noise=round(noise, 2), latent_dim=log_int("latent_dim"),
        voxel_nl=round(float(rng.uniform(*ranges["voxel_nonlinearity"])), 2),
        target_nl=round(float(rng.uniform(*ranges["target_nonlinearity"])), 2), clusters=clusters,
    )
    return Member(f"random-{seed}", "random", int(seed), spec, cpu, "random draw from the family's ranges")


def get_member(name: str, **spec_overrides: Any) -> Member:
    """A named member, or ``random-<seed>`` (``random-full-<seed>`` draws from the whole range)."""
    if name.startswith("random-"):
        tail = name[len("random-"):]
        cpu = not tail.startswith("full-")
        try:
            member = sample_member(int(tail.removeprefix("full-")), cpu=cpu)
        except ValueError:
            raise DataError(f"family member {name!r}: expected random-<seed> or random-full-<seed>") from None
    elif name in MEMBERS:
        member = MEMBERS[name]
    else:
        raise DataError(f"unknown family member {name!r}; choose one of {', '.join(MEMBERS)} or random-<seed>")
    if spec_overrides:
        try:
            member = dataclasses.replace(member, spec=dataclasses.replace(member.spec, **spec_overrides))
        except TypeError as err:
            raise DataError(f"--spec for member {name!r}: {err}") from None
    return member


# --------------------------------------------------------------------------------------------
# Writing a member as shards, chunk by chunk


class _LazyField:
    """Rows of one field of a split, generated when the shard writer indexes them."""

    def __init__(self, subject: SyntheticSubject, split: str, field: str) -> None:
        self.subject, self.split, self.field = subject, split, field
        first = subject.rows(split, field, np.arange(1))
        self.shape = (subject.split_size(split), *first.shape[1:])
        self.ndim, self.dtype = first.ndim, first.dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows) -> np.ndarray:
        return self.subject.rows(self.split, self.field, np.atleast_1d(np.arange(self.shape[0])[rows]))


def build_family_dataset(member: Member | str, out_url: str, *, val_fraction: float = 0.1,
                         shard_size_mb: Optional[float] = None, max_samples_per_shard: Optional[int] = None,
                         s3_endpoint: Optional[str] = None, overwrite: bool = False, command: str = "",
                         progress: bool = True, **spec_overrides: Any):
    """Write family member ``member`` as shards at ``out_url``; returns the dataset's meta.

    meta.json gets ``retrieval_ceiling`` (test, 300-way, 30 loops), ``retrieval_ceiling_val``
    (the same on the validation rows, capped at their count) and ``source`` = the member's name,
    role, seed and spec. Arrays are generated 256 rows at a time (bounded memory at any size).
    """
    from mindeye_dist.data.writer import SplitSource, carve_validation, write_dataset

    member = get_member(member, **spec_overrides) if isinstance(member, str) else member
    subject = SyntheticSubject(member.spec, member.seed)
    fields = {split: {f: _LazyField(subject, split, f) for f in ("voxels", "clip", "images", "vae")} for split in ("train", "test")}
    train_rows, val_rows = carve_validation(member.spec.n_train, val_fraction, member.seed)

    def source(name: str, split: str, rows: np.ndarray) -> SplitSource:
        f = fields[split]
        return SplitSource(name, f["voxels"], f["clip"], f["images"], f["vae"], rows, split)

    sources = [source("train", "train", train_rows)]
    if len(val_rows):
        sources.append(source("val", "train", val_rows))
    sources.append(source("test", "test", np.arange(member.spec.n_test)))
    extra = {"val": {"fraction": val_fraction, "seed": member.seed, "from_split": "train"},
             "retrieval_ceiling": subject.retrieval_ceiling("test", way=300, loops=30)}
    if len(val_rows) >= 2:
        extra["retrieval_ceiling_val"] = dict(subject.retrieval_ceiling("train", way=300, loops=30, rows=val_rows), split="val")
    info = {"kind": "synthetic", "family_member": member.name, "role": member.role, "seed": member.seed,
            "cpu": member.cpu, "spec": dataclasses.asdict(member.spec)}
    return write_dataset(out_url, sources, subject=member.spec.subject, command=command, source_info=info, extra_meta=extra,
                         shard_size_mb=member.spec.shard_size_mb if shard_size_mb is None else shard_size_mb,
                         max_samples_per_shard=max_samples_per_shard, s3_endpoint=s3_endpoint, overwrite=overwrite,
                         progress=progress)
