"""What a run ran on, recorded in RUN_DIR/run.json: the versions of python and the libraries, nlora's version and
git commit (where its source is a git checkout), the devices, the sha256 of every data file read, and each task's
family and instruction (what its prompts were built with). A resumed
run appends its own record, so a run finished across several machines or installs says so."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

from .errors import NloraError
from .io import write_json_atomic

PACKAGES = ("torch", "transformers", "peft", "accelerate", "safetensors")
SOURCE_ROOT = Path(__file__).resolve().parents[1]


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def package_versions() -> dict[str, str | None]:
    from . import __version__

    versions: dict[str, str | None] = {"python": platform.python_version(), "nlora": __version__}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_state(root: Path = SOURCE_ROOT) -> dict | None:
    """The commit of nlora's source checkout and whether it had uncommitted changes; None outside a checkout."""
    if not (root / ".git").exists():
        return None
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(status.strip())}


def device_info(device, num_processes: int = 1) -> dict:
    info = {"device": str(device), "num_processes": num_processes, "platform": platform.platform(),
            "cpu": _cpu_name(), "cpu_count": os.cpu_count()}
    if torch.cuda.is_available():
        info["cuda"] = torch.version.cuda
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def data_files(tasks, instructions: str | None = None) -> list[Path]:
    """Every file a run reads its data from: each task's files (a classification task's labels, train and test
    splits), the instruction file."""
    files = [f for t in tasks for f in (t.files or [t.path / n for n in ("labels.json", "train.json", "test.json")])]
    return files + ([Path(instructions)] if instructions else [])


def collect(tasks, instructions: str | None, device, num_processes: int = 1) -> dict:
    return {
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "versions": package_versions(),
        "git": git_state(),
        "devices": device_info(device, num_processes),
        "data_files": {str(p.resolve()): sha256_of(p) for p in data_files(tasks, instructions)},
        # what each task's prompts were built with, so that `nlora predict --input` builds the same ones
        "tasks": {t.name: {"family": t.family, "instruction": t.instruction} for t in tasks},
    }


def recorded_tasks(path: Path) -> dict[str, dict]:
    """{task: {"family", "instruction"}} of the latest start of the run whose run.json is `path`; empty for a run
    written before nlora recorded them (or without a readable run.json)."""
    for session in reversed(_sessions(path)):
        tasks = session.get("tasks")
        if isinstance(tasks, dict):
            return tasks
    return {}


def record_run(path: Path, record: dict, resume: bool, config_digest: dict[str, str] | None = None) -> None:
    """Write run.json: one record per start of the run (the first, then each resumption), with the digest of the
    configuration it ran with."""
    sessions = _sessions(path) if resume else []
    if config_digest is not None:
        record = {**record, "config_digest": config_digest}
    write_json_atomic(path, {"sessions": [*sessions, record]})


def warn_other_release(run_json: Path) -> None:
    """On resume, say in one line when the run last started under another nlora or library version: the remaining
    tasks then follow this install's numerics (float rounding can change between releases), so the run may differ
    slightly from one done under a single install."""
    recorded = next((s["versions"] for s in reversed(_sessions(run_json)) if isinstance(s.get("versions"), dict)),
                    None)
    if recorded is None:
        return
    now = package_versions()
    changed = [f"{name} {recorded.get(name)} -> {now[name]}" for name in ("nlora", *PACKAGES)
               if recorded.get(name) != now[name]]
    if changed:
        print(f"nlora: warning: {run_json.parent} was last run with other versions ({', '.join(changed)}): the "
              "remaining tasks follow this install's numerics, so results may differ slightly from a run done under "
              "one install", file=sys.stderr)


def _sessions(path: Path) -> list[dict]:
    try:
        sessions = json.loads(path.read_text()).get("sessions", [])
    except (OSError, json.JSONDecodeError, AttributeError):
        return []
    return [s for s in sessions if isinstance(s, dict)] if isinstance(sessions, list) else []


def config_digest(config: dict, ignore: tuple[str, ...] = ()) -> dict[str, str]:
    """The sha256 of each key's value in `config` (config.yaml as read back), but the keys in `ignore` (those a
    resumption may change)."""
    return {key: hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()
            for key, value in config.items() if key not in ignore}


def check_config_digest(run_json: Path, config: dict, config_path: Path, ignore: tuple[str, ...] = ()) -> None:
    """Refuse to resume a run whose config.yaml no longer holds the configuration recorded in run.json when the
    run last started (an edit of config.yaml would train the remaining tasks with another method or options).
    A run recorded before digests were (no digest) passes; a key the record lacks may be added (a key a newer
    nlora has). A run without run.json is refused: deleting it must not let an edit through."""
    if not _sessions(run_json):
        raise NloraError(f"cannot resume {config_path.parent}: {run_json} is missing or unreadable; it records the "
                         f"configuration the run was started with, which {config_path.name} must still hold. Put "
                         "it back, or pass --overwrite to start over")
    recorded = next((s["config_digest"] for s in reversed(_sessions(run_json))
                     if isinstance(s.get("config_digest"), dict)), None)
    if recorded is None:
        return
    now = config_digest(config, ignore)
    changed = sorted(k for k, digest in recorded.items() if k not in ignore and now.get(k) != digest)
    if changed:
        raise NloraError(f"cannot resume {config_path.parent}: {config_path} was changed after the run started "
                         f"({', '.join(changed)} differ from the configuration recorded in {run_json.name}, which "
                         "its tasks were trained with). Put back the values it was started with, or pass "
                         "--overwrite to start over")
