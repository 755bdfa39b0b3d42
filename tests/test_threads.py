"""The CPU thread count of a run (nlora.threads): `threads` when given; unset, half the cores on a CPU run unless
OMP_NUM_THREADS says otherwise; set for the run only."""

import pytest
import torch

from nlora import threads
from nlora.cli import main
from nlora.threads import run_threads

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_the_count_a_run_uses(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    for cores, expected in ((1, 1), (2, 1), (3, 1), (8, 4), (16, 8)):
        monkeypatch.setattr(threads, "available_cores", lambda: cores)
        assert run_threads(None, CPU) == expected
    assert run_threads(3, CPU) == 3 and run_threads(3, CUDA) == 3
    assert run_threads(None, CUDA) is None  # torch's own: the CPU only feeds the device
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert run_threads(None, CPU) is None  # the user's (torch reads it)


@pytest.mark.parametrize("given,cores,inside", [("1", 2, 1), (None, 6, 3)])
def test_a_run_trains_with_its_count_and_gives_the_callers_back(tmp_path, synthetic_dir, monkeypatch, given,
                                                                 cores, inside):
    from nlora.train import loop

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "available_cores", lambda: cores)
    seen = []
    monkeypatch.setattr(loop, "fault_point", lambda event: seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert main(["run", "--model", "tiny-bert", "--tasks", "harbor", "--data-dir", str(synthetic_dir),
                     "--output-dir", str(tmp_path / "run"), "--max-train-samples", "8", "--max-eval-samples", "2",
                     "--batch-size", "4", "--device", "cpu", "--quiet", *(["--threads", given] if given else [])]) == 0
        assert seen == [inside, inside] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_a_count_below_one_is_refused(capsys):
    assert main(["run", "--tasks", "harbor", "--threads", "0", "--dry-run"]) == 2
    assert capsys.readouterr().err.strip() == "nlora: error: option 'threads': must be >= 1 when set, got 0"
