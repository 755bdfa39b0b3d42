"""Atomic file output: every file of a run directory is written to a temporary name and renamed into place,
so a crash never leaves a partial file that a later read (or a resumed run) could take for a valid one."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

from .faults import fault_point


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        fault_point("file_write")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
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


def replace_dir_atomic(tmp_dir: Path, final_dir: Path) -> None:
    """Move a fully written folder into place. An existing folder is first renamed aside, then removed, so at
    every instant either the old or the new complete folder is at `final_dir` (or, after a crash between the two
    renames, the old one sits at a `.old` name that readers ignore and a resumed run puts back)."""
    final_dir = Path(final_dir)
    old = final_dir.with_name(f".{final_dir.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if final_dir.exists():
        os.replace(final_dir, old)
        fault_point("dir_swap")
    os.replace(tmp_dir, final_dir)
    if old.exists():
        shutil.rmtree(old)


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
    return Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.", suffix=".tmp", dir=final_dir.parent))
