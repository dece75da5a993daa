"""No rank left hanging: one rank failing, a stalled peer, a busy port, and where ranks listen.

Every case goes through the real ``deepspeed`` launcher on two gloo ranks (or two processes that
call ``init_distributed`` as launched ranks do). The subprocess timeouts are guards against a
hang (which would last the 30-minute collective timeout), not measurements.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mindeye_dist.distributed import free_port

pytestmark = pytest.mark.distributed

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
GUARD_S = 240


@pytest.fixture(scope="module")
def data_url(tiny_dataset) -> str:
    return tiny_dataset(4)


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(PYTHONUNBUFFERED="1", **extra)
    return env


def launch(run_dir, data_url, *overrides, port=None, env=None, timeout=GUARD_S):
    cmd = [str(BIN / "deepspeed"), "--num_accelerators", "2", "--master_port", str(port or free_port()),
           str(REPO / "launchers/train.py"), "--ds_config", str(REPO / "ds_configs/zero2.json"),
           "--config", str(REPO / "launchers/configs/tiny.yaml"), f"data.url={data_url}", f"run.dir={run_dir}",
           "train.max_steps=12", "train.eval_every_steps=0", "checkpoint.every_steps=0", *overrides]
    return subprocess.run(cmd, cwd=REPO, env=env or _env(), capture_output=True, text=True, timeout=timeout)


def test_one_rank_failing_ends_the_job_with_its_error(tmp_path, data_url):
    # Rank 1 alone raises at step 3 while rank 0 is in the gradient all-reduce. Before the fix
    # rank 1 waited in the teardown barrier and rank 0 in the all-reduce, silent, for 30 minutes.
    proc = launch(tmp_path / "run", data_url, env=_env(MINDEYE_FAULTS="raise@3@1"))
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert "injected failure on rank 1 at step 3" in out
    assert "rank 1 failed" in (tmp_path / "run/logs/rank1.log").read_text()


@pytest.mark.slow  # waits out a real stall timeout (about a minute on 2 cores)
def test_stalled_peer_ends_the_job_after_the_timeout(tmp_path, data_url):
    # Rank 1 stops itself (SIGSTOP) at step 3; rank 0 must give up after MINDEYE_DIST_TIMEOUT_S.
    proc = launch(tmp_path / "run", data_url, env=_env(MINDEYE_FAULTS="stall@3@1", MINDEYE_DIST_TIMEOUT_S="15"))
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert "rank 0: no training progress for" in out and "MINDEYE_DIST_TIMEOUT_S=15" in out


@pytest.mark.slow  # the launcher and both ranks start before the port is found busy: about 45 s on 2 cores
def test_busy_master_port_names_the_fix(tmp_path, data_url):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        proc = launch(tmp_path / "run", data_url, port=port)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"MASTER_PORT {port} on 127.0.0.1 is already in use" in out and "--master_port" in out


RANK_SCRIPT = textwrap.dedent("""
    import json, sys, psutil
    from mindeye_dist.distributed import init_distributed, teardown_distributed
    import torch.distributed as dist
    rank, world, _ = init_distributed(timeout_s=60)
    dist.barrier()
    listening = sorted({c.laddr.ip for c in psutil.Process().net_connections(kind="inet") if c.status == "LISTEN"})
    dist.barrier()
    teardown_distributed()
    print(json.dumps({"rank": rank, "world": world, "listening": listening}))
""")


def _ranks(world: int, port: int) -> list[dict]:
    import json

    procs = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world),
                                                  LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                                                  MASTER_PORT=str(port)))
             for r in range(world)]
    outs = [p.communicate(timeout=GUARD_S) for p in procs]
    for p, (stdout, stderr) in zip(procs, outs):
        assert p.returncode == 0, stderr[-3000:]
    return [json.loads(stdout.strip().splitlines()[-1]) for stdout, _ in outs]


def test_ranks_listen_only_on_the_master_address():
    # The rendezvous store (rank 0) and gloo's connections bind 127.0.0.1, not every interface.
    results = _ranks(2, free_port())
    assert [r["world"] for r in results] == [2, 2]
    for r in results:
        assert r["listening"], r  # gloo listens for its peers on every rank
        assert all(ip in ("127.0.0.1", "::1") for ip in r["listening"]), r


def test_one_process_listens_only_on_loopback():
    # A world of one uses an in-memory store (no rendezvous port); gloo's device still listens,
    # on the loopback interface only.
    [result] = _ranks(1, 0)
    assert result["world"] == 1 and all(ip in ("127.0.0.1", "::1") for ip in result["listening"]), result


def _damaged_copy(data_url, tmp_path) -> tuple[Path, str]:
    """A copy of the dataset with one train shard cut in half."""
    import json
    import shutil

    copy = tmp_path / "data"
    shutil.copytree(data_url, copy)
    meta = json.loads((copy / "meta.json").read_text())
    shard = meta["splits"]["train"]["shards"][-1]["name"]
    path = copy / shard
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return copy, shard


def test_truncated_shard_fails_at_start_on_every_rank(tmp_path, data_url):
    # Before: found only when the loader reached it (a short run exited 0), and on one rank only.
    copy, shard = _damaged_copy(data_url, tmp_path)
    proc = launch(tmp_path / "run", str(copy))
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert shard in out and "bytes" in out
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_skipped_shards_are_counted_in_metrics_and_the_final_line(tmp_path, data_url):
    import json

    copy, shard = _damaged_copy(data_url, tmp_path)
    proc = launch(tmp_path / "run", str(copy), "data.on_corrupt=skip", "train.max_steps=4", "train.log_every_steps=2")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["data/skipped_shards"] == 1
    assert f"skipped 1 corrupt shard(s) ({shard})" in out
