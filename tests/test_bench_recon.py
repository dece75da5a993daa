"""The reconstruction benchmark (``launchers/benchmark_recon.py``) measures the real pipeline: each
case runs ``reconstruct_batch`` with tiny models and reports rates and the prior/generation split."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("key", ["synthetic-ddim20", "vd-tiny"])
def test_case_reports_rates_and_phase_shares(key):
    from mindeye_dist.bench.recon import CASES, run_case

    row = run_case(CASES[key], stimuli=2, batch_size=2)
    assert row["stimuli"] == 2 and row["candidates"] == 2 * CASES[key].best_of
    assert row["stimuli_per_s"] > 0 and row["seconds_per_stimulus"] == pytest.approx(row["seconds"] / 2)
    assert row["phases_s"] and all(v >= 0 for v in row["phases_s"].values())
    assert sum(row["phase_share"].values()) == pytest.approx(1.0)


def test_cli_writes_json_and_a_table(tmp_path):
    out = tmp_path / "rb.json"
    proc = subprocess.run([sys.executable, str(REPO / "launchers/benchmark_recon.py"), "--case", "synthetic-ddim20",
                           "--stimuli", "2", "--batch-size", "2", "--json", str(out)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    rows = rows["rows"] if isinstance(rows, dict) else rows
    assert [r["key"] for r in rows] == ["synthetic-ddim20"] and rows[0]["stimuli_per_s"] > 0
    assert proc.stdout.startswith("| case | stimuli/s |") and "| prior | generate |" in proc.stdout
