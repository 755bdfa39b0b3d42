"""Atomic file output: every file of a run directory is written to a temporary name and renamed into place,
so a crash never leaves a partial file that a later read (or a resumed run) could take for a valid one. What is
moved into place has the permissions of the umask, as a plain write would give it."""

from __future__ import annotations

import errno
import glob
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from .faults import fault_point

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes it private (0600); a plain open would not
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        fault_point("file_write")
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None:  # a write to a full disk names no file of itself
            e.filename = str(path)
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_yaml_atomic(path: str | os.PathLike, obj: Any) -> Path:
    return write_text_atomic(path, yaml.safe_dump(obj, sort_keys=False, allow_unicode=True))


def write_jsonl_atomic(path: str | os.PathLike, rows: list[dict]) -> Path:
    return write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def is_disk_full(error: BaseException) -> bool:
    """Whether `error` says the disk (or the user's quota) is full: an OSError, or safetensors' own error,
    which carries the errno in its message only."""
    if isinstance(error, OSError):
        return error.errno in NO_SPACE
    return type(error).__name__ == "SafetensorError" and any(f"(os error {n})" in str(error) for n in NO_SPACE)


@contextmanager
def naming_the_file(path: str | os.PathLike) -> Iterator[None]:
    """A full disk met inside the block is reported as an OSError naming `path` (a failed write names no file of
    itself, and safetensors' error names none either)."""
    try:
        yield
    except Exception as e:
        if is_disk_full(e) and getattr(e, "filename", None) is None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from e
        raise


def replace_dir_atomic(tmp_dir: Path, final_dir: Path) -> None:
    """Move a fully written folder into place. An existing folder is first renamed aside, then removed, so at
    every instant either the old or the new complete folder is at `final_dir` (or, after a crash between the two
    renames, the old one sits at a `.old` name that readers ignore and a resumed run puts back)."""
    final_dir = Path(final_dir)
    _give_umask_permissions(Path(tmp_dir))
    old = final_dir.with_name(f".{final_dir.name}.old")
    _remove(old)
    if final_dir.exists():
        os.replace(final_dir, old)
        fault_point("dir_swap")
    os.replace(tmp_dir, final_dir)
    _remove(old)


def _give_umask_permissions(folder: Path) -> None:
    """The permissions a plain open/mkdir would give, on everything in `folder`: safetensors, like mkstemp,
    creates its files private (0600)."""
    mask = _umask()
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def recover_replaced_dirs(root: str | os.PathLike) -> None:
    """After a crash: a folder that `replace_dir_atomic` had renamed aside (`.NAME.old`) goes back into place if
    its replacement never arrived (it is complete), and is removed otherwise."""
    for old in sorted(Path(root).rglob(".*.old"), reverse=True):
        if not old.is_dir():
            continue
        final = old.with_name(old.name[1:-len(".old")])
        if final.exists():
            shutil.rmtree(old)
        else:
            os.replace(old, final)


def staging_dir(final_dir: str | os.PathLike) -> Path:
    """A fresh temporary folder beside `final_dir` (same file system, so the final rename is atomic)."""
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.", suffix=".tmp", dir=final_dir.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private (0700); a plain mkdir would not
    return tmp


@contextmanager
def staged_dir(final_dir: str | os.PathLike) -> Iterator[Path]:
    """A fresh folder to fill: moved into place at `final_dir` (replacing any folder there as a whole) when the
    block ends, removed if it raises. Staging folders of earlier calls that were killed are removed first."""
    final_dir = Path(final_dir)
    for stale in final_dir.parent.glob(f".{glob.escape(final_dir.name)}.*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = staging_dir(final_dir)
    try:
        yield tmp
        replace_dir_atomic(tmp, final_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    """The process's umask. Reading it means setting it: to the most private mask (a file another thread creates
    meanwhile is private, never more open), then straight back."""
    mask = os.umask(0o777)
    os.umask(mask)
    return mask
