"""Many subjects in one run: routing by subject name, equal per-subject batches with exact resume,
a 2-rank multi-subject run through the real launcher, and a fine-tune of a new subject."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mindeye_dist.config import DataConfig, load_config
from mindeye_dist.data import build_synthetic_dataset, build_train_loader, read_meta
from mindeye_dist.data.multi import MultiSubjectLoader, subject_name, subject_table
from mindeye_dist.distributed import free_port
from mindeye_dist.errors import ConfigError
from mindeye_dist.trainer import ModelDims, subject_lookup

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def subjects(tmp_path_factory) -> dict[int, str]:
    root = tmp_path_factory.mktemp("subjects")
    out = {}
    for subject, voxels in ((2, 80), (5, 96), (7, 72)):
        url = str(root / f"s{subject}")
        build_synthetic_dataset("tiny", url, subject, progress=False, subject=subject, n_voxels=voxels)
        out[subject] = url
    return out


def test_datasets_are_routed_to_their_adapters_by_name(subjects):
    from mindeye_dist.models import build_model

    metas = [read_meta(subjects[7]), read_meta(subjects[2])]
    assert [subject_name(m) for m in metas] == ["subj07", "subj02"]
    dims = ModelDims.from_metas(metas)
    # The model's table has its own order (as a pretrained multi-subject model would).
    cfg = load_config(None, ["model.subjects={subj02: 80, subj05: 96, subj07: 72}"]).model
    model = build_model(cfg, **{k: v for k, v in dims.kwargs().items() if k != "nominal"})
    lookup = subject_lookup(model, dims)
    assert lookup[2] == model.subject_index("subj02") == 0 and lookup[7] == model.subject_index("subj07") == 2
    assert lookup[5] == -1  # subject 5's adapter exists, but no dataset of this run holds subject 5

    other = load_config(None, ["model.subjects={subj02: 80, subj05: 96}"]).model
    with pytest.raises(ConfigError, match=r"not in the model: \['subj07'\]"):
        build_model(other, **{k: v for k, v in dims.kwargs().items() if k != "nominal"})
    with pytest.raises(Exception, match="two datasets"):
        subject_table([metas[0], metas[0]])


def test_every_micro_batch_holds_an_equal_share_of_each_subject_and_resumes_exactly(subjects):
    cfg = DataConfig(url=subjects[2], num_workers=0)
    metas = [read_meta(subjects[s]) for s in (2, 7)]

    def loader(positions):
        return MultiSubjectLoader([build_train_loader(cfg, 4, seed=1, rank=0, world_size=1, start_epoch=p[0],
                                                      start_batch=p[1], meta=m) for m, p in zip(metas, positions)],
                                  width=80)

    full = loader([(0, 0), (0, 0)])
    it = iter(full)
    batches = [next(it) for _ in range(40)]  # past an epoch of each (36 and 36 rows / 4)
    for b in batches:
        assert b.voxels.shape == (8, 80) and b.subject.tolist() == [2] * 4 + [7] * 4
        assert torch.all(b.voxels[4:, 72:] == 0)  # subject 7's 72 voxels, zero-padded to the widest
    interrupted = loader([(0, 0), (0, 0)])
    it2 = iter(interrupted)
    for _ in range(13):
        next(it2)
    positions = interrupted.position  # what a checkpoint after 13 batches records
    resumed = iter(loader(positions))
    for i in range(13, 40):
        b = next(resumed)
        assert torch.equal(b.voxels, batches[i].voxels) and torch.equal(b.index, batches[i].index)
    assert len(positions) == 2


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    return dict(env, PYTHONUNBUFFERED="1")


@pytest.mark.distributed
@pytest.mark.slow  # two launcher runs, about 70 s; routing and per-subject batches stay in the default tier
def test_multi_subject_run_then_fine_tune_a_new_subject_on_two_ranks(tmp_path, subjects):
    ds = str(REPO / "ds_configs/zero2.json")
    tiny = str(REPO / "launchers/configs/tiny.yaml")
    run = tmp_path / "pretrain"
    cmd = [str(BIN / "deepspeed"), "--num_accelerators", "2", "--master_port", str(free_port()),
           str(REPO / "launchers/train.py"), "--ds_config", ds, "--config", tiny, f"data.url={subjects[2]}",
           f"data.datasets=[{subjects[5]}]", f"run.dir={run}", "train.max_steps=6", "train.micro_batch_size=4",
           "train.eval_every_steps=6"]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = load_config(run / "config.yaml")
    assert saved.model.subjects == {"subj02": 80, "subj05": 96}  # the table goes with the run
    val = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "val/loss" in line][-1]
    assert {"val/subj02/image_top1", "val/subj05/image_top1", "val/image_top1"} <= val.keys()
    assert val["val/image_top1"] == pytest.approx((val["val/subj02/image_top1"] + val["val/subj05/image_top1"]) / 2)

    # Each subject is evaluated through its own adapter (by name), on its own dataset.
    from mindeye_dist.evaluate import adapter_index, load_run_model

    for subject, expect in ((2, "subj02"), (5, "subj05")):
        model, _, meta, _ = load_run_model(str(run), data_url=subjects[subject])
        assert model.config.subject_names()[adapter_index(model, meta)] == expect
        proc = subprocess.run([sys.executable, str(REPO / "launchers/evaluate.py"), "--run", str(run), "--data",
                               subjects[subject], "--split", "val", "--way", "8", "--loops", "3"], cwd=REPO, env=_env(),
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
    model, _, meta, _ = load_run_model(str(run), data_url=subjects[2])
    with pytest.raises(ValueError, match="holds subject subj07"):
        adapter_index(model, read_meta(subjects[7]))

    ft = tmp_path / "finetune"
    cmd = [str(BIN / "deepspeed"), "--num_accelerators", "2", "--master_port", str(free_port()),
           str(REPO / "launchers/finetune.py"), "--ds_config", ds, "--from", str(run), "--subject", "7",
           "--data", subjects[7], "--config", tiny, f"run.dir={ft}", "train.max_steps=4", "train.eval_every_steps=4"]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fresh adapters for subj07" in (ft / "logs" / "rank0.log").read_text()
    assert load_config(ft / "config.yaml").model.subjects == {"subj07": 72}

    # Every weight but the adapters started from the pretrained run.
    from mindeye_dist.checkpoint import consolidated_state_dict

    before = consolidated_state_dict(run / "checkpoints")
    after_first = _state_at_step0(ft)
    shared = [k for k in before if ".adapters." not in k]
    assert shared and all(torch.equal(before[k], after_first[k]) for k in shared)

    bad = [sys.executable, str(REPO / "launchers/finetune.py"), "--from", str(run), "--subject", "3", "--data",
           subjects[7], "--config", tiny, f"run.dir={tmp_path / 'bad'}"]
    proc = subprocess.run(bad, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "holds subject subj07" in proc.stderr


def _state_at_step0(run_dir: Path) -> dict:
    """The fine-tune's initial weights, rebuilt as train.py builds them (init_from applied)."""
    from mindeye_dist.models import build_model
    from mindeye_dist.trainer import init_weights

    cfg = load_config(run_dir / "config.yaml")
    meta = read_meta(cfg.data.url)
    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg.model, **{k: v for k, v in ModelDims.from_meta(meta).kwargs().items() if k != "nominal"})
    init_weights(model, cfg.train.init_from)
    return {f"model.{k}": v for k, v in model.state_dict().items()}
