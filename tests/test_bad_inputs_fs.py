"""Output places (run.dir, --out) that cannot be written, and file modes that follow the umask."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from mindeye_dist.errors import ConfigError
from mindeye_dist.fsutil import atomic_output, atomic_write_bytes, check_output_file, check_writable_dir, default_file_mode


@pytest.fixture
def unwritable_dir(tmp_path):
    """A directory this process cannot create files in. Permission bits do not stop root, so as
    root the directory is made immutable (chattr +i); where that is impossible, sysfs serves."""
    target = tmp_path / "locked"
    target.mkdir()
    if os.geteuid() != 0:
        target.chmod(0o555)
        yield target
        target.chmod(0o755)
        return
    if shutil.which("chattr") and subprocess.run(["chattr", "+i", str(target)], capture_output=True).returncode == 0:
        try:
            yield target
        finally:
            subprocess.run(["chattr", "-i", str(target)], capture_output=True)
        return
    sysfs = Path("/sys/kernel")
    try:
        (sysfs / "mindeye_probe").mkdir()
    except OSError:
        yield sysfs
        return
    pytest.skip("no directory here refuses writes to root (no chattr, writable /sys)")


def test_run_dir_that_is_a_file(tmp_path):
    f = tmp_path / "runs"
    f.write_text("not a directory")
    with pytest.raises(ConfigError, match=r"run.dir='.*runs' is a file, not a directory: point run.dir at a directory"):
        check_writable_dir(f)
    with pytest.raises(ConfigError, match=r"run.dir='.*runs/demo' is inside .*runs, which is a file"):
        check_writable_dir(f / "demo")


def test_run_dir_that_is_not_writable(unwritable_dir):
    with pytest.raises(ConfigError, match=r"run.dir='.*' (is not writable|cannot be created) \(.+\): point run.dir at"):
        check_writable_dir(unwritable_dir / "run")
    with pytest.raises(ConfigError, match="is not writable"):
        check_writable_dir(unwritable_dir, key="log.dir")  # the key is the caller's


def test_run_dir_is_created_and_left_clean(tmp_path):
    run = tmp_path / "a" / "b"
    assert check_writable_dir(run) == run and run.is_dir()
    assert list(run.iterdir()) == []  # the write probe is removed
    with pytest.raises(ConfigError, match="does not exist"):
        check_writable_dir(tmp_path / "missing", create=False)


def test_output_file_checks(tmp_path, unwritable_dir):
    with pytest.raises(ConfigError, match=r"--out '.*' is a directory; give a file path"):
        check_output_file(tmp_path, "--out")
    with pytest.raises(ConfigError, match=r"--out '.*m.json' cannot be written: its directory '.*' is not writable"):
        check_output_file(unwritable_dir / "m.json", "--out")
    assert check_output_file(tmp_path / "new" / "m.json", "--out").parent.is_dir()


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077, 0o002])
def test_atomic_writes_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        assert default_file_mode() == 0o666 & ~umask
        atomic_write_bytes(tmp_path / "a.txt", b"x")
        with atomic_output(tmp_path / "b.bin") as tmp:
            fd = os.open(tmp, os.O_WRONLY | os.O_TRUNC, 0o600)  # a writer that creates 0600 (as safetensors)
            os.write(fd, b"y")
            os.close(fd)
    finally:
        os.umask(old)
    for name in ("a.txt", "b.bin"):
        assert oct((tmp_path / name).stat().st_mode & 0o777) == oct(0o666 & ~umask)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.bin"]


def test_atomic_output_keeps_the_old_file_on_error(tmp_path):
    target = tmp_path / "m.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_output(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("writer failed")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["m.json"]
