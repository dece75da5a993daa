"""Checkpoint bookkeeping without DeepSpeed: commit order, pruning, partial saves, RNG round trip."""

import random

import numpy as np
import pytest
import torch

from mindeye_dist import checkpoint as ckpt


def _fake_save(ckpt_dir, step, state=None):
    tag = ckpt.tag_for(step)
    ckpt.prepare_tag_dir(ckpt_dir, tag)
    (ckpt_dir / tag).mkdir()  # DeepSpeed's save creates it
    (ckpt_dir / tag / "mp_rank_00_model_states.pt").write_bytes(b"x")
    ckpt.write_rank_state(ckpt_dir, tag, 0, state or ckpt.TrainState(step=step), ckpt.rng_state())
    return tag


def test_latest_is_written_last_and_prunes_keep_last(tmp_path):
    d = tmp_path / "checkpoints"
    assert ckpt.read_latest(d) is None
    for step in (10, 20, 30):
        tag = _fake_save(d, step)
        assert ckpt.read_latest(d) == (ckpt.tag_for(step - 10) if step > 10 else None)  # not yet committed
        ckpt.commit(d, tag, keep_last=2)
        assert ckpt.read_latest(d) == tag
    assert ckpt.complete_tags(d) == ["step_0000020", "step_0000030"]


def test_partial_save_is_never_loaded_and_is_cleaned_up(tmp_path):
    d = tmp_path / "checkpoints"
    ckpt.commit(d, _fake_save(d, 5), keep_last=3)
    _fake_save(d, 6)  # killed before commit: no COMPLETE, latest unchanged
    assert ckpt.read_latest(d) == "step_0000005"
    assert ckpt.complete_tags(d) == ["step_0000005"]
    # resuming re-runs step 6 and saves it again over the partial directory
    tag = _fake_save(d, 6)
    ckpt.commit(d, tag, keep_last=1)
    assert ckpt.read_latest(d) == "step_0000006"
    assert sorted(p.name for p in d.glob("step_*")) == ["step_0000006"]


def test_latest_naming_an_incomplete_checkpoint_is_an_error(tmp_path):
    d = tmp_path / "checkpoints"
    d.mkdir()
    (d / "latest").write_text("step_0000009")
    with pytest.raises(ckpt.CheckpointError, match="not a complete checkpoint"):
        ckpt.read_latest(d)


def test_refuses_to_overwrite_what_latest_names(tmp_path):
    d = tmp_path / "checkpoints"
    ckpt.commit(d, _fake_save(d, 3), keep_last=2)
    with pytest.raises(RuntimeError, match="refusing to overwrite"):
        ckpt.prepare_tag_dir(d, "step_0000003")


def test_train_state_and_rng_round_trip(tmp_path):
    d = tmp_path / "checkpoints"
    gen = torch.Generator().manual_seed(7)
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    state = ckpt.TrainState(step=12, samples_seen=384, epoch=2, batch_in_epoch=5, skipped_steps=1, total_steps=100, world_size=2)
    tag = ckpt.tag_for(12)
    ckpt.write_rank_state(d, tag, 1, state, ckpt.rng_state({"loss": gen}))
    expected = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(3, generator=gen))
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    gen.manual_seed(99)
    loaded, rng = ckpt.read_rank_state(d, tag, 1)
    assert loaded == state
    ckpt.set_rng_state(rng, {"loss": gen})
    again = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(3, generator=gen))
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1])
    assert expected[2] == again[2] and torch.equal(expected[3], again[3])
    with pytest.raises(RuntimeError, match="no train state for rank 0"):
        ckpt.read_rank_state(d, tag, 0)


def test_commit_never_prunes_the_best_checkpoint(tmp_path):
    d = tmp_path / "checkpoints"
    ckpt.commit(d, _fake_save(d, 10), keep_last=1)
    (d / "best").write_text("step_0000010")  # as the trainer writes it when validation selects step 10
    for step in (20, 30):
        ckpt.commit(d, _fake_save(d, step), keep_last=1)
    assert ckpt.complete_tags(d) == ["step_0000010", "step_0000030"]
    assert ckpt.read_best(d) == "step_0000010" and ckpt.read_latest(d) == "step_0000030"


def test_resolve_tag_names_what_exists(tmp_path):
    d = tmp_path / "checkpoints"
    with pytest.raises(ckpt.CheckpointError, match="has no complete checkpoint"):
        ckpt.resolve_tag(d)
    ckpt.commit(d, _fake_save(d, 5), keep_last=3)
    _fake_save(d, 6)  # cut short: no COMPLETE
    assert ckpt.resolve_tag(d) == ckpt.resolve_tag(d, "latest") == ckpt.resolve_tag(d, "step_0000005") == "step_0000005"
    with pytest.raises(ckpt.CheckpointError, match=r"'step_0000007' does not exist .*step_0000005.*--checkpoint step_0000005"):
        ckpt.resolve_tag(d, "step_0000007")
    with pytest.raises(ckpt.CheckpointError, match=r"step_0000006 is incomplete .*besides step_0000006: step_0000005"):
        ckpt.resolve_tag(d, "step_0000006")


def test_an_empty_or_foreign_file_is_named(tmp_path):
    d = tmp_path / "checkpoints"
    tag = _fake_save(d, 3)  # its model-states file holds b"x": not a torch file at all
    with pytest.raises(ckpt.CheckpointError, match=r"mp_rank_00_model_states.pt is truncated or corrupt \(the file does not"):
        ckpt.verify_checkpoint_files(d, tag)
    (d / tag / "mp_rank_00_model_states.pt").write_bytes(b"")
    with pytest.raises(ckpt.CheckpointError, match=r"\(the file is empty\).*No other complete checkpoint"):
        ckpt.verify_checkpoint_files(d, tag)
