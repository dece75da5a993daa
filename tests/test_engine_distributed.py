"""The fused bf16 ZeRO-0 update on two gloo ranks through the real ``deepspeed`` launcher: a NaN
injected on one rank makes both skip the step together, and training goes on.

Slow tier (about a minute on 2 cores): ``pytest -m slow tests/test_engine_distributed.py``.
The in-process checks of the same path are in ``tests/test_engine.py``.
"""

from __future__ import annotations

import json

import pytest

from tests.test_train_distributed import _ok, launch

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


@pytest.fixture(scope="module")
def data_url(tiny_dataset) -> str:
    return tiny_dataset(5)


def test_bf16_zero0_nan_on_one_rank_is_skipped_by_both(tmp_path, data_url):
    run = tmp_path / "run"
    _ok(launch(run, data_url, "train.precision=bf16", "train.max_steps=8", faults="nan_loss@5@1", stage=0))
    rows = {json.loads(line)["step"]: json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()}
    assert rows[4]["skipped_steps"] == 0 and rows[5]["skipped_steps"] == 1 and rows[8]["skipped_steps"] == 1
    assert all(rows[s]["loss/total"] == rows[s]["loss/total"] for s in (6, 7, 8))  # finite after the skip
    assert 0 < rows[8]["grad_norm"] < float("inf")
    for rank in (0, 1):
        log = (run / "logs" / f"rank{rank}.log").read_text()
        assert "step 5 skipped" in log and "bf16 ZeRO-0" in log  # the fused update ran on both ranks
