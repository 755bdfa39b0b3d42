"""Names given by the user that become parts of paths, and why a folder given by the user cannot be used."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from .errors import NloraError


def check_plain_name(name: str, what: str = "task name") -> str:
    """`name` if it is one plain file name (a dataset name: it names a folder and becomes part of file names of
    the run directory); an NloraError naming it otherwise. A separator, '..' or an absolute path would lead
    outside the folders it is joined to."""
    problem = None
    if not isinstance(name, str) or not name:
        problem = "it is empty"
    elif "/" in name or "\\" in name or (os.altsep and os.altsep in name):
        problem = "it holds a path separator"
    elif name.startswith("."):
        problem = "it starts with '.'"
    elif any(ord(c) < 32 or c == "\x7f" for c in name):
        problem = "it holds a control character"
    if problem:
        raise NloraError(f"{what} {name!r} is not a plain dataset name ({problem}); give the name of a dataset "
                         "folder, without any path")
    return name


def folder_problem(path: str | os.PathLike) -> str | None:
    """Why `path` cannot be read as a folder (None when it can): missing, a file, or a symbolic link loop."""
    path = Path(path)
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return f"{path} is a symbolic link loop"
        if path.is_symlink():
            return f"{path} is a symbolic link to {os.readlink(path)}, which does not exist"
        return f"folder {path} does not exist"
    return None if path.is_dir() else f"{path} is a file, not a folder"


def check_holds_no_run(folder: str | os.PathLike, runs, option: str) -> None:
    """An output folder that is replaced as a whole must not be, nor hold, one of the run directories read."""
    folder = Path(folder).resolve()
    for run in runs:
        if folder == Path(run).resolve() or folder in Path(run).resolve().parents:
            raise NloraError(f"{option} {folder} holds the run directory {run}, which replacing it would delete; "
                             "choose another folder")
