"""What the command line needs to know of the methods (their names, descriptions and options as flags) without
importing them: they import torch, which takes seconds, so `nlora methods` and a mistyped option would wait for it.
Every time the methods are loaded for the command line, their catalog is written to a cache (the folder
$NLORA_CACHE_DIR, else $XDG_CACHE_HOME/nlora or ~/.cache/nlora) under a key of the package's method sources; a
later command reads it instead. Methods of --method-module files and of installed entry points are not in that key:
with either, the methods are loaded."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from .errors import NloraError, did_you_mean
from .options import base_type, default_of, option_fields, public_name

ENTRY_POINT_GROUP = "nlora.methods"
PACKAGE = Path(__file__).resolve().parent


def unknown_method(name: str, names: list[str]) -> NloraError:
    return NloraError(f"option 'method': unknown method {name!r}{did_you_mean(name, names)}; available: "
                      f"{', '.join(sorted(names))}. A method of your own is loaded with --method-module FILE.py "
                      "(or a module name), or from an installed package's 'nlora.methods' entry point")


def option_spec(cls, f) -> dict[str, Any]:
    """One option as the command line shows it: name, help, default, choices and how its flag is given (kind
    'on': a boolean on by default, --no-NAME turns it off; 'flag': a boolean off by default; 'value')."""
    kind = "value"
    if base_type(cls, f) is bool:
        kind = "on" if default_of(f) is True else "flag"
    choices = f.metadata.get("choices")
    return {"name": public_name(f.name), "help": f.metadata["help"], "default": _plain(default_of(f)),
            "choices": list(choices) if choices else None, "kind": kind}


def describe(methods: dict[str, type]) -> dict[str, dict[str, Any]]:
    """{name: {"description", "options": [option_spec, ...]}} of registered method classes."""
    return {name: {"description": cls.description,
                   "options": [option_spec(cls.Options, f) for f in option_fields(cls.Options)]}
            for name, cls in sorted(methods.items())}


def method_catalog(modules: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """The catalog of every method: the package's, `modules`' and the entry points' (read from the cache when
    it can be)."""
    cache = None if modules or _has_entry_points() else _cache_file()
    catalog = _read(cache) if cache is not None else None
    if catalog is None:
        from .methods import load_methods  # torch

        load_methods(modules)
        if cache is not None:  # the package's methods only: others this process registered are not in its key
            _write(cache, describe(_registered(package_only=True)))
    return {**(catalog or {}), **describe(_registered())}


def _registered(package_only: bool = False) -> dict[str, type]:
    """The methods registered in this process so far (none while the methods are not imported)."""
    if "nlora.methods.registry" not in sys.modules:
        return {}
    from .methods import METHODS

    return {name: cls for name, cls in METHODS.items()
            if not package_only or cls.__module__.startswith(f"{__package__}.methods.")}


def _has_entry_points() -> bool:
    return bool(entry_points(group=ENTRY_POINT_GROUP))


def _source_key() -> str:
    """A digest of what defines the package's methods: their files, and the options machinery."""
    digest = hashlib.sha256()
    for path in sorted((PACKAGE / "methods").glob("*.py")) + [PACKAGE / "options.py", PACKAGE / "config.py"]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:20]


def _cache_file() -> Path | None:
    """Where the catalog of the package's methods is kept; None where no folder can be named (no home)."""
    folder = os.environ.get("NLORA_CACHE_DIR")
    if not folder:
        try:
            folder = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nlora"
        except RuntimeError:  # Path.home() without HOME or a user entry
            return None
    return Path(folder) / f"methods-{_source_key()}.json"


def _read(path: Path) -> dict | None:
    try:
        catalog = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return catalog if isinstance(catalog, dict) else None


def _write(path: Path, catalog: dict) -> None:
    """Written atomically; a cache that cannot be written (a read-only home) is simply not kept."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError:
        return
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(catalog, f)
        os.replace(tmp, path)
    except (OSError, TypeError, ValueError):  # TypeError: a default JSON cannot hold
        Path(tmp).unlink(missing_ok=True)


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
