"""Whole-file writes that a crash cannot leave half-done, and checks that an output place is
usable before any work is done (no torch import: config.py uses it).

Every file written here gets the mode an ordinary ``open(path, "w")`` would give it
(``0o666 & ~umask``), whatever library produced the bytes: safetensors, for one, creates its
files 0600.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from mindeye_dist.errors import ConfigError


def fsync_dir(path: str | os.PathLike) -> None:
    """Persist a directory's entries (a rename into it); a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def current_umask() -> int:
    """The process umask, read without changing it where the kernel reports it (Linux >= 4.7)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere the only way to read it is to set it (and put it back)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: 0o666 minus the umask (0644 under 022)."""
    return 0o666 & ~current_umask()


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without an error, give it the
    umask's mode, (``durable``) fsync it, and rename it over ``path``. Readers see the old file
    or the new one, never a part; on an error the temporary file is removed. Creates the parent
    directory. The temporary name is unique (several threads or ranks may write one path)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        # mkstemp creates 0600 and some writers (safetensors) do too; users expect the umask's mode.
        os.chmod(tmp, default_file_mode())
        if durable:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, durable: bool = True) -> None:
    """Write ``data`` to a temporary file beside ``path`` and rename it over ``path``: readers see
    the old file or the new one, never a part. ``durable`` also fsyncs the file and the directory,
    so the new file survives a power loss once this returns. Creates the parent directory; the
    file gets the umask's mode."""
    with atomic_output(path, durable=durable) as tmp:
        tmp.write_bytes(data)


# --------------------------------------------------------------------------------------------
# Output places checked before the work that fills them


def _reason(err: OSError) -> str:
    return os.strerror(err.errno) if err.errno else str(err)


def _dir_problem(path: Path, create: bool) -> str | None:
    """Why files cannot be created in directory ``path`` (None: they can; it exists afterwards
    when ``create``). Creating a file is the only proof: permission bits say nothing for root,
    read-only mounts or ACLs."""
    for parent in [path, *path.parents]:
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                return "is a file, not a directory" if parent == path else f"is inside {parent}, which is a file"
            break
    if create:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            return f"cannot be created ({_reason(err)})"
    elif not path.is_dir():
        return "does not exist"
    try:
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write_probe.")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        return f"is not writable ({_reason(err)})"
    return None


def check_writable_dir(path: str | os.PathLike, key: str = "run.dir", create: bool = True) -> Path:
    """Make sure ``path`` is (or, with ``create``, becomes) a directory this process can create
    files in; raises a ConfigError naming ``key``, the path, the problem and the fix."""
    path = Path(path)
    problem = _dir_problem(path, create)
    if problem is not None:
        raise ConfigError(f"{key}={str(path)!r} {problem}: point {key} at a directory you can write to "
                          "(a missing one is created), or fix the path's permissions")
    return path


def check_output_file(path: str | os.PathLike, key: str) -> Path:
    """Make sure a file can be written at ``path`` (atomically: a new file beside it, renamed).

    ``path`` must not be a directory; its parent is created if missing and must be writable.
    Call it before the work whose result goes there, so that no result is lost at the end.
    Raises a ConfigError naming ``key`` (e.g. ``--out``).
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{key} {str(path)!r} is a directory; give a file path, e.g. {str(path / 'out')!r}")
    problem = _dir_problem(path.parent, create=True)
    if problem is not None:
        raise ConfigError(f"{key} {str(path)!r} cannot be written: its directory {str(path.parent)!r} {problem}. "
                          f"Give {key} a path in a directory you can write to")
    return path
