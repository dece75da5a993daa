"""recipe: auto — settings derived from a dataset's meta.json, under the YAML and the overrides."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mindeye_dist import recipe
from mindeye_dist.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
DEFAULT = REPO / "launchers" / "configs" / "default.yaml"


def shape(n_train: int, n_val: int = 100) -> recipe.DataShape:
    return recipe.DataShape(n_train=n_train, n_voxels=3000, n_tokens=16, token_dim=32, reps=3, n_val=n_val)


@pytest.mark.parametrize("n", [60, 225, 1000, 5400, 10800, 200000])
def test_derived_schedule_fits_the_data_and_the_cap(n):
    for world in (1, 2, 8):
        s, why = recipe.derive(shape(n), world)
        micro, steps = s["train"]["micro_batch_size"], s["train"]["max_steps"]
        # every rank gets whole batches from an epoch (the loader drops a rank's remainder)
        assert (n // world) // micro >= 1
        assert micro * world <= max(recipe.TARGET_GLOBAL_BATCH, world)
        assert steps * micro * world <= recipe.MAX_SAMPLES + micro * world
        assert 0 < s["train"]["eval_every_steps"] <= steps
        assert 256 <= s["model"]["hidden_dim"] <= 1024
        assert set(why) >= {"model.hidden_dim", "train.micro_batch_size", "train.max_steps"}


def test_more_stimuli_never_shrink_the_model_or_the_epochs_seen_per_sample_grow():
    small, _ = recipe.derive(shape(500), 2)
    big, _ = recipe.derive(shape(20000), 2)
    assert big["model"]["hidden_dim"] >= small["model"]["hidden_dim"]
    epochs = lambda s, n: s["train"]["max_steps"] * s["train"]["micro_batch_size"] * 2 / n  # noqa: E731
    assert epochs(small, 500) > epochs(big, 20000)


def test_no_validation_split_means_last_checkpoint_and_no_validation():
    s, why = recipe.derive(shape(1000, n_val=0), 1)
    assert s["train"]["eval_every_steps"] == 0 and s["checkpoint"]["select"] == "last"
    assert "no validation split" in why["train.eval_every_steps"]


@pytest.fixture(scope="module")
def tiny(tiny_dataset) -> str:
    return tiny_dataset(1)


def test_default_yaml_derives_from_the_data_and_explicit_keys_win(tiny, tmp_path):
    from mindeye_dist.data import read_meta

    meta = read_meta(tiny)
    expected, _ = recipe.derive(recipe.DataShape.from_meta(meta), 2)
    cfg = load_config(DEFAULT, [f"data.url={tiny}"], world_size=2)
    assert cfg.recipe == "auto"
    assert cfg.model.hidden_dim == expected["model"]["hidden_dim"]
    assert cfg.train.max_steps == expected["train"]["max_steps"]
    assert cfg.train.micro_batch_size == expected["train"]["micro_batch_size"]
    assert cfg.checkpoint.select == "best"
    # an override beats the recipe, and the rest stays derived
    cfg2 = load_config(DEFAULT, [f"data.url={tiny}", "model.hidden_dim=48", "train.max_steps=7"], world_size=2)
    assert (cfg2.model.hidden_dim, cfg2.train.max_steps) == (48, 7)
    assert cfg2.train.micro_batch_size == cfg.train.micro_batch_size
    # the saved (resolved) config reloads to the same values whatever the world size
    from mindeye_dist.config import dump_config

    saved = tmp_path / "saved.yaml"
    dump_config(cfg, saved)
    assert load_config(saved, world_size=8) == cfg


def test_recipe_without_data_loads_and_a_bad_url_is_named(tmp_path):
    # without data the recipe has nothing to derive from: the YAML loads, training refuses data.url
    assert load_config(DEFAULT, []).recipe == "auto"
    with pytest.raises(ConfigError, match="could not read the dataset"):
        load_config(DEFAULT, [f"data.url={tmp_path / 'nothing'}"])
    with pytest.raises(ConfigError, match="recipe"):
        load_config(None, ["recipe=sometimes"])


def test_cli_prints_every_rule(tiny):
    res = subprocess.run([sys.executable, "-m", "mindeye_dist.recipe", tiny, "--json"], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["settings"]["model"]["hidden_dim"] >= 256 and "train.max_steps" in out["why"]
    bad = subprocess.run([sys.executable, "-m", "mindeye_dist.recipe", "/nonexistent/x"], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert bad.returncode == 2 and "error" in bad.stderr


def test_table_markdown_flags_members_below_ridge():
    spec = REPO / "launchers" / "recipe_table.py"
    import importlib.util

    mod_spec = importlib.util.spec_from_file_location("recipe_table", spec)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    row = {"member": "m", "voxels": 100, "informative": 0.5, "tokens": "4x16", "noise": 2.0, "voxel_nl": 0.0,
           "target_nl": 1.0, "sessions": 1, "clusters": 0, "ridge": [0.5, 0.4], "ours": [0.6, 0.3],
           "ceiling": [0.9, 0.8], "train_min": 1.0}
    text = mod.markdown([row, dict(row, member="n", ours=[0.7, 0.5])])
    assert "| m |" in text and "NO" in text and "| yes |" in text
    assert "on 1 of 2 members" in text


def test_train_py_without_config_uses_the_recipe(tiny, tmp_path):
    """The launcher's default config is default.yaml: a 2-step run records recipe: auto and the
    derived width in its resolved config."""
    import yaml

    from mindeye_dist.data import read_meta

    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(REPO / "launchers/train.py"), f"data.url={tiny}", f"run.dir={run}",
                           "train.max_steps=2", "model.prior=false", "model.lowlevel=false"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = yaml.safe_load((run / "config.yaml").read_text())
    expected, _ = recipe.derive(recipe.DataShape.from_meta(read_meta(tiny)), 1)
    assert saved["recipe"] == "auto" and saved["model"]["hidden_dim"] == expected["model"]["hidden_dim"]
    assert saved["checkpoint"]["select"] == "best" and saved["train"]["max_steps"] == 2


def test_knows_maps_reference_sees_what_the_data_allows():
    """The reference decoder (ridge to the true latents + the member's own target map) is near
    perfect on an easy small member, falls with noise, and never beats the Bayes ceiling."""
    from mindeye_dist.data.family import get_member
    from mindeye_dist.data.synthetic import SyntheticSubject
    from mindeye_dist.recipe_reference import latent_ridge_reference

    easy = get_member("random-3", n_train=1500, n_test=300, n_voxels=400, uninformative_frac=0.2, noise=0.5,
                      voxel_nonlinearity=0.0, latent_clusters=0)
    hard = get_member("random-3", n_train=1500, n_test=300, n_voxels=400, uninformative_frac=0.2, noise=6.0,
                      voxel_nonlinearity=0.0, latent_clusters=0)
    ref_easy, ref_hard = latent_ridge_reference(easy, loops=5), latent_ridge_reference(hard, loops=5)
    assert ref_easy["latent_r2"] > 0.8 and ref_easy["image_top1"] > 0.9
    assert ref_hard["latent_r2"] < ref_easy["latent_r2"] and ref_hard["image_top1"] < ref_easy["image_top1"]
    ceiling = SyntheticSubject(hard.spec, hard.seed).retrieval_ceiling("test", way=300, loops=5)
    assert ref_hard["image_top1"] <= ceiling["image_top1"] + 0.02
    row = {"member": "m", "voxels": 100, "informative": 0.5, "tokens": "4x16", "noise": 2.0, "voxel_nl": 0.0,
           "target_nl": 1.0, "sessions": 1, "clusters": 0, "ridge": [0.5, 0.4], "ours": [0.6, 0.3],
           "ceiling": [0.9, 0.8], "train_min": 1.0, "reference": [0.81, 0.79]}
    import importlib.util

    mod_spec = importlib.util.spec_from_file_location("recipe_table", REPO / "launchers" / "recipe_table.py")
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    assert "| 0.810 / 0.790 |" in mod.markdown([row])


def test_ridge_stacking_is_derived_where_rank_0_can_hold_the_fit():
    small, why = recipe.derive(shape(5400), 2)
    assert small["model"]["ridge_skip_rank"] == recipe.RIDGE_SKIP_RANK and "GiB" in why["model.ridge_skip_rank"]
    nsd = recipe.DataShape(n_train=9000, n_voxels=15724, n_tokens=257, token_dim=768, reps=3, n_val=300)
    assert recipe.ridge_fit_bytes(9000, 15724, 257 * 768) > recipe.RIDGE_SKIP_MAX_BYTES
    big, why = recipe.derive(nsd, 2)
    assert big["model"]["ridge_skip_rank"] == 0 and why["model.ridge_skip_rank"].startswith("off")
    no_val, why = recipe.derive(shape(5400, n_val=0), 2)
    assert no_val["model"]["ridge_skip_rank"] == 0 and "validation" in why["model.ridge_skip_rank"]
