"""Synthetic subject: determinism, conventions, and a retrieval ceiling that means something."""

import numpy as np
import pytest

from mindeye_dist.data import DataError, SyntheticSubject, get_spec


def test_same_seed_same_data_other_seed_differs():
    a, b, c = SyntheticSubject("tiny", 3), SyntheticSubject("tiny", 3), SyntheticSubject("tiny", 4)
    xa, xb, xc = (s.split_arrays("train") for s in (a, b, c))
    for key in xa:
        np.testing.assert_array_equal(xa[key], xb[key])
    assert not np.allclose(xa["voxels"], xc["voxels"])


def test_shapes_and_clip_convention():
    s = SyntheticSubject("tiny", 0)
    spec = s.spec
    arr = s.split_arrays("test")
    assert arr["voxels"].shape == (spec.n_test, 3, spec.n_voxels)
    assert arr["clip"].shape == (spec.n_test, spec.n_tokens, spec.token_dim)
    assert arr["images"].shape == (spec.n_test, 32, 32, 3) and arr["images"].dtype == np.uint8
    assert arr["vae"].shape == (spec.n_test, 4, 8, 8)
    # MindEye1 norm_embs: all tokens divided by the L2 norm of token 0 -> token 0 has unit norm
    np.testing.assert_allclose(np.linalg.norm(arr["clip"][:, 0], axis=-1), 1.0, rtol=1e-5)
    assert get_spec("demo").vae_size == 16 and get_spec("demo").n_test >= 600


def test_uninformative_voxels_are_pure_noise():
    s = SyntheticSubject("tiny", 0)
    z = s.latents("train")
    g = s.signal(z)
    assert np.all(g[:, ~s.informative] == 0) and np.all(g[:, s.informative].std(0) > 0)
    assert (~s.informative).sum() == round(s.spec.uninformative_frac * s.spec.n_voxels)
    # repetitions differ only by noise
    v = s.voxels("train", z)
    assert not np.allclose(v[:, 0], v[:, 1])


def test_ceiling_falls_with_noise_and_stays_above_chance():
    low = SyntheticSubject(get_spec("tiny", noise=0.3), 0).retrieval_ceiling(way=40, loops=5)
    high = SyntheticSubject(get_spec("tiny", noise=3.0), 0).retrieval_ceiling(way=40, loops=5)
    assert low["image_top1"] > 0.95 and low["brain_top1"] > 0.95
    assert high["image_top1"] < low["image_top1"] - 0.2
    assert high["image_top1"] > 3 * high["chance"]
    assert low["way"] == 40 and low["loops"] == 5


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_demo_ceiling_is_high_on_every_seed(seed):
    # The demo is calibrated so that the latent is identifiable from the voxels (ceiling ~1) and
    # what separates decoders is learning the nonlinear voxel-to-target map (see the docstring).
    c = SyntheticSubject("demo", seed).retrieval_ceiling()  # 300-way, 30 loops, test split only
    assert c["way"] == 300 and c["n"] >= 600
    assert c["image_top1"] > 0.98 and c["brain_top1"] > 0.98, c


def test_product_term_makes_targets_nonlinear_in_the_latent():
    def linear_r2(beta):
        s = SyntheticSubject(get_spec("demo", n_train=2000, target_nonlinearity=beta), 0)
        z = s.latents("train")
        t = s.targets(z).reshape(len(z), -1)
        zz = np.hstack([z, np.ones((len(z), 1))])
        coef, *_ = np.linalg.lstsq(zz, t, rcond=None)
        return 1 - ((t - zz @ coef) ** 2).sum() / ((t - t.mean(0)) ** 2).sum()

    assert linear_r2(0.0) > 0.9  # only token-0 normalisation bends it
    assert linear_r2(2.5) < 0.4


def test_bad_spec_is_refused():
    with pytest.raises(DataError, match="unknown synthetic preset"):
        get_spec("huge")
    with pytest.raises(DataError, match="uninformative_frac"):
        get_spec("tiny", uninformative_frac=1.0)


# ---------------------------------------------------------------------------------------------
# The family (mindeye_dist.data.family) and the generator knobs it uses


def _spec(**kw):
    from mindeye_dist.data.synthetic import SyntheticSpec

    base = dict(n_train=64, n_test=40, n_voxels=120, uninformative_frac=0.5, latent_dim=8, n_tokens=2, token_dim=8,
                noise=1.0, noise_block=16)
    return SyntheticSpec(**{**base, **kw})


def test_presets_are_unchanged_by_the_family_knobs():
    # Digests of the tiny arrays and the demo ceiling as they were before the family existed:
    # the demo's numbers in the README rely on them.
    import hashlib

    s = SyntheticSubject("tiny", 0)
    h = hashlib.sha256()
    for split in ("train", "test"):
        arrays = s.split_arrays(split)
        for key in sorted(arrays):
            h.update(arrays[key].tobytes())
    assert h.hexdigest()[:16] == "d4bf7a769697f427"
    assert get_spec("demo").noise_block == 0 and get_spec("demo").voxel_nonlinearity == 0
    assert SyntheticSubject("tiny", 3).retrieval_ceiling()["image_top1"] == pytest.approx(0.9791666666666669, abs=1e-12)


def test_rows_generated_alone_equal_the_whole_split():
    s = SyntheticSubject(_spec(latent_clusters=4, voxel_nonlinearity=0.5), 1)
    whole = s.voxels("train")
    rows = np.array([3, 17, 18, 40, 63])  # straddles noise blocks of 16
    np.testing.assert_array_equal(s.rows("train", "voxels", rows), whole[rows].astype(np.float32))
    np.testing.assert_array_equal(s.rows("train", "clip", rows), s.targets(s.latents("train")[rows]).astype(np.float32))
    with pytest.raises(DataError, match="noise_block"):
        SyntheticSubject("tiny", 0).rows("train", "voxels", rows)


def test_clustered_latents_have_unit_marginal_variance_and_near_neighbours():
    s = SyntheticSubject(_spec(n_train=4000, latent_clusters=10, cluster_spread=0.3), 0)
    z = s.latents("train")
    assert z.shape == (4000, 8)
    assert 0.7 < z.var(axis=0).mean() < 1.3
    # nearest-neighbour distances are much smaller than for a spread latent of the same variance
    spread = SyntheticSubject(_spec(n_train=4000), 0).latents("train")
    nn = lambda a: np.sort(((a[:200, None] - a[None, :]) ** 2).sum(-1), axis=1)[:, 1].mean()  # noqa: E731
    assert nn(z) < 0.5 * nn(spread)


def test_energy_voxels_are_invisible_to_a_linear_readout():
    def held_out_linear_r2(nu):  # least squares z <- noise-free voxels, fit on 2000, scored on 1000
        s = SyntheticSubject(_spec(n_train=3000, uninformative_frac=0.0, voxel_nonlinearity=nu), 0)
        z = s.latents("train")
        g = s.signal(z)
        coef, *_ = np.linalg.lstsq(g[:2000], z[:2000], rcond=None)
        return 1 - ((z[2000:] - g[2000:] @ coef) ** 2).sum() / ((z[2000:] - z[2000:].mean(0)) ** 2).sum(), g

    r2_linear, _ = held_out_linear_r2(0.0)
    r2_energy, g = held_out_linear_r2(1.0)
    assert r2_linear > 0.95 and r2_energy < 0.05
    assert g.std(axis=0).min() > 0.05  # but the voxels do respond


def test_family_ceiling_falls_with_noise_and_beats_a_linear_decoder():
    from mindeye_dist.evaluate import retrieval_accuracy, ridge_baseline

    spec = _spec(n_train=600, n_test=120, n_voxels=200, noise=2.0, target_nonlinearity=2.0, voxel_nonlinearity=0.3)
    s = SyntheticSubject(spec, 5)
    ceiling = s.retrieval_ceiling(way=100, loops=10)
    x_tr = s.voxels("train").mean(1)
    x_te = s.voxels("test").mean(1)
    t_tr, t_te = s.targets(s.latents("train")), s.targets(s.latents("test"))
    fit = ridge_baseline(x_tr[:500], t_tr[:500], x_tr[500:], t_tr[500:], way=100, loops=5)
    ridge = retrieval_accuracy(fit.predict(x_te), t_te, way=100, loops=10)
    assert ceiling["image_top1"] >= ridge["image_top1"] and ceiling["brain_top1"] >= ridge["brain_top1"]
    noisier = SyntheticSubject(_spec(**{**spec.__dict__, "noise": 6.0}), 5).retrieval_ceiling(way=100, loops=10)
    assert noisier["image_top1"] < ceiling["image_top1"] - 0.2


def test_val_rows_ceiling_and_lazy_build(tmp_path):
    import json

    from mindeye_dist.data import read_meta
    from mindeye_dist.data.family import Member, build_family_dataset

    member = Member("t", "tuning", 3, _spec(latent_clusters=3), True, "test member")
    meta = build_family_dataset(member, str(tmp_path / "d"), progress=False)
    raw = json.loads((tmp_path / "d" / "meta.json").read_text())
    assert raw["source"]["family_member"] == "t" and raw["source"]["spec"]["latent_clusters"] == 3
    assert raw["retrieval_ceiling_val"]["n"] == meta.split("val").count == 6
    assert meta.split("test").count == 40 and meta.n_voxels == 120
    assert read_meta(str(tmp_path / "d")).split("train").reps == 3


def test_members_are_well_formed_and_reproducible():
    from mindeye_dist.data.family import CPU_RANGES, HELD_OUT, MEMBERS, RANGES, STIMULI_PER_SESSION, TUNING, get_member

    assert len(TUNING) >= 6 and len(HELD_OUT) >= 6 and not set(TUNING) & set(HELD_OUT)
    assert {MEMBERS[n].seed for n in TUNING}.isdisjoint(MEMBERS[n].seed for n in HELD_OUT)
    for m in MEMBERS.values():
        lo, hi = (CPU_RANGES if m.cpu else RANGES)["n_voxels"]
        assert lo <= m.spec.n_voxels <= hi and m.spec.n_test == 1000 and m.spec.noise_block > 0
        assert 1 <= m.spec.n_train / STIMULI_PER_SESSION <= 40
    assert MEMBERS["nsd-scale"].spec.n_tokens == 257 and MEMBERS["nsd-scale"].spec.token_dim == 768
    a, b = get_member("random-5"), get_member("random-5")
    assert a == b and a.spec != get_member("random-6").spec and a.cpu
    assert get_member("tune-a", noise=9.0).spec.noise == 9.0
    with pytest.raises(DataError, match="unknown family member"):
        get_member("nope")
