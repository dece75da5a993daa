"""What a decoder that knows the world's target map gets from a family member's trials.

The Bayes ceiling of a synthetic member (:meth:`SyntheticSubject.retrieval_ceiling`) knows the
whole generative model; a learned decoder knows nothing and must learn voxels -> targets from a
few thousand noisy trials. This reference sits between them and says how much of the gap is the
data's and how much the learner's:

1. fit ridge regression from the repetition-averaged, z-scored training voxels to the stimuli's
   true latents ``z`` (supervision no real dataset has), its strength chosen on the validation
   rows by latent MSE;
2. decode the test stimuli's latents and put them through the member's own target map
   (:meth:`SyntheticSubject.targets`), which the reference is given;
3. score 300-way retrieval against the true test targets with the evaluation protocol.

It is a linear read-out of the voxels, so on members whose voxels respond evenly to the latent
(``voxel_nonlinearity`` near 1) it sees little, as ridge does; it is not a bound. Where it sits far
below the ceiling, a learner with far more knowledge than ours still cannot get near the ceiling
from this many trials: that part of the gap is the data's.
"""

from __future__ import annotations

import numpy as np

from mindeye_dist.data.family import Member
from mindeye_dist.data.synthetic import SyntheticSubject
from mindeye_dist.data.writer import carve_validation
from mindeye_dist.evaluate import retrieval_accuracy, ridge_baseline


def latent_ridge_reference(member: Member, val_fraction: float = 0.1, way: int = 300, loops: int = 30,
                           seed: int = 0) -> dict:
    """``{"image_top1", "brain_top1", "alpha", "latent_r2"}`` of the reference on the test split.

    The train/val rows are carved with the member's seed and ``val_fraction`` as its shards are
    (``prepare_data.py``'s default 0.1), so the reference fits on the rows a decoder trains on."""
    spec = member.spec
    subject = SyntheticSubject(spec, member.seed)
    rows = np.arange(spec.n_train)
    z = subject.latents("train")
    # (n, reps, V) -> (n, V): the mean over repetitions, as the ceiling and the evaluation see them.
    x = subject.voxels("train", z, rows if spec.noise_block else None).mean(axis=1)
    train, val = carve_validation(spec.n_train, val_fraction, member.seed)
    mu, sd = x[train].mean(0), x[train].std(0) + 1e-6
    x = (x - mu) / sd
    fit = ridge_baseline(x[train], z[train], x[val], z[val], select_by="mse", way=min(way, len(val)), loops=1,
                         seed=seed)
    del x
    zt = subject.latents("test")
    xt = subject.voxels("test", zt, np.arange(spec.n_test) if spec.noise_block else None).mean(axis=1)
    z_hat = fit.predict((xt - mu) / sd).astype(np.float64)
    r2 = 1.0 - float(np.sum((z_hat - zt) ** 2) / np.sum((zt - zt.mean(0)) ** 2))
    scores = retrieval_accuracy(subject.targets(z_hat), subject.targets(zt), way=way, loops=loops, seed=seed)
    return {"image_top1": float(scores["image_top1"]), "brain_top1": float(scores["brain_top1"]),
            "alpha": float(fit.alpha), "latent_r2": r2}
