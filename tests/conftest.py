import atexit
import json
import os
import shutil
import tempfile
from pathlib import Path

import peft  # noqa: F401
import pytest
import torch  # noqa: F401
import transformers  # noqa: F401

from nlora.tasks.synthetic import write_synthetic_benchmark

import frozen_heap  # noqa: E402,F401  (last: after the libraries' imports)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the methods' catalog the CLI caches (nlora.method_catalog): in a folder of the test session, not the user's
os.environ["NLORA_CACHE_DIR"] = tempfile.mkdtemp(prefix="nlora-test-cache-")
atexit.register(shutil.rmtree, os.environ["NLORA_CACHE_DIR"], ignore_errors=True)

# The benchmark data beside the repository (absent on a fresh clone: the tests that read it skip). NLORA_TEST_DATA
# points elsewhere, e.g. at a missing folder to check that those tests skip cleanly.
SHARED_DATA = Path(os.environ.get("NLORA_TEST_DATA",
                                  Path(__file__).resolve().parents[1].parent / "shared" / "data" / "CL_Benchmark"))


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> Path:
    """The demo's generated tasks, small."""
    return write_synthetic_benchmark(tmp_path_factory.mktemp("synthetic"), n_train=40, n_test=12, seed=0)


def write_task(root: Path, group: str, name: str, labels, train, test=None) -> Path:
    folder = root / group / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "labels.json").write_text(json.dumps(labels))
    (folder / "train.json").write_text(json.dumps(train))
    (folder / "test.json").write_text(json.dumps(test if test is not None else train))
    return folder


@pytest.fixture
def make_task():
    return write_task


@pytest.fixture(scope="session")
def single_run(tmp_path_factory, synthetic_dir) -> Path:
    """test_distributed's RUN in this process: what the launched runs of test_distributed.py and test_fsdp.py must
    give (here to be built once for both). Built before a launch, not while it runs: on 2 cores the two slow each
    other down more than running them in turn costs."""
    from nlora.cli import main
    from launch_support import RUN

    out = tmp_path_factory.mktemp("single") / "run"
    assert main([*RUN, "--data-dir", str(synthetic_dir), "--output-dir", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def slurm_cluster():
    """A private one-node SLURM cluster (tests/slurm_cluster.py), started once for the session; skipped with the
    fix where it cannot start (a failure where NLORA_REQUIRE_SLURM=1, as in CI)."""
    from slurm_cluster import cluster_or_skip

    yield from cluster_or_skip()
