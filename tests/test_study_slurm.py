"""The SLURM executor of studies (nlora.studies.slurm) against a real one-node cluster that the tests start
(tests/slurm_cluster.py): cells as jobs and as job arrays, seen queued and running; jobs warned of their time limit
or preempted, requeued, and their cells resumed; a failing or cancelled cell reported without touching the others;
fail-fast; a cell already in the queue not submitted twice; the options refused before anything is submitted; and
the cluster itself: its skip reasons, a failed start, and a stop that leaves no process."""

import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

import slurm_cluster as support
from nlora.errors import NloraError
from nlora.studies.slurm import SlurmOptions, executor_parameters, queued_jobs, read_jobs, slurm_executor, \
    submit_cells, wait_for_jobs
from slurm_work import STEPS_AFTER_RESTART, count_to_end, fail_if_bad, write_done

TESTS = Path(__file__).resolve().parent
POLL_S = 0.1
WAIT_S = 120  # no test waits for ever on a stuck job


@pytest.fixture
def cluster(slurm_cluster, monkeypatch):
    """The cluster, with this process's clients (submitit's sbatch, squeue) pointed at it and the jobs able to
    import the work functions of tests/slurm_work.py."""
    monkeypatch.setenv("SLURM_CONF", slurm_cluster.env["SLURM_CONF"])
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH",
                                                                                                        "")]))
    return slurm_cluster


class Tracker:
    """What run_study gives an executor: told of each cell as it ends; `stopped` after a failure under
    fail_fast."""

    def __init__(self, fail_fast=False):
        self.fail_fast, self.errors = fail_fast, {}

    def ended(self, cell_id, error=None):
        self.errors[cell_id] = error

    @property
    def stopped(self):
        return self.fail_fast and any(e is not None for e in self.errors.values())


def _wait_until(condition, timeout_s=20.0):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(POLL_S)


@pytest.mark.parametrize("use_array", [False, True], ids=["jobs", "array"])
def test_cells_run_as_jobs_and_are_seen_queued(cluster, tmp_path, use_array):
    options = SlurmOptions(time_min=5, use_array=use_array, extra={"hold": True})  # held: seen queued first
    cells = ["test/seq-ft/order1/seed1", "test/seq-ft/order1/seed2"]
    ids = submit_cells(tmp_path, cells, options, write_done)
    assert len(set(ids)) == 2
    if use_array:
        assert ids[0].split("_")[0] == ids[1].split("_")[0] and [i.split("_")[1] for i in ids] == ["0", "1"]
    assert queued_jobs(tmp_path) == {c: "PENDING" for c in cells}
    for job_id in {i.split("_")[0] for i in ids}:
        cluster.run("scontrol", "release", job_id)
    tracker = Tracker()
    jobs = dict(zip(ids, cells))
    assert wait_for_jobs(options.folder(tmp_path), jobs, tracker.ended, poll_s=POLL_S, timeout_s=WAIT_S) == {}
    assert tracker.errors == {c: None for c in cells}
    assert [(tmp_path / f"{c}.done").read_text() for c in cells] == ids  # each cell ran in the job named for it
    assert queued_jobs(tmp_path) == {}


# USR2: what SLURM sends a job signal_delay_s before its time limit (submitit requeues it after the checkpoint
# call); `scontrol requeue`: what a preemption with PreemptMode=REQUEUE does (the job is killed and queued again)
INTERRUPTIONS = {"time-limit": ["scancel", "--signal=USR2"], "preemption": ["scontrol", "requeue"]}


def test_interrupted_jobs_are_requeued_and_their_cells_resume(cluster, tmp_path):
    """One cell per kind of interruption, at once (a requeue waits cred_expire seconds before it starts again)."""
    options = SlurmOptions(time_min=5)
    cells = list(INTERRUPTIONS)
    job_ids = submit_cells(tmp_path, cells, options, count_to_end)
    counts = [tmp_path / f"{cell}.count" for cell in cells]
    _wait_until(lambda: all(c.is_file() and int(c.read_text()) >= 3 for c in counts))
    assert queued_jobs(tmp_path) == {cell: "RUNNING" for cell in cells}
    for cell, job_id in zip(cells, job_ids):
        cluster.run(*INTERRUPTIONS[cell], job_id)
    jobs = dict(zip(job_ids, cells))
    assert wait_for_jobs(options.folder(tmp_path), jobs, poll_s=POLL_S, timeout_s=WAIT_S) == {}
    for cell in cells:
        starts = [line.split() for line in (tmp_path / f"{cell}.starts").read_text().splitlines()]
        assert len(starts) == 2 and starts[0] == ["0", "0"], cell
        resumed_from, restarts = int(starts[1][0]), starts[1][1]
        assert resumed_from >= 3 and restarts == "1", cell  # the same job, requeued, from the saved count
        assert (tmp_path / f"{cell}.done").read_text() == str(resumed_from + STEPS_AFTER_RESTART)


def test_a_failing_cell_is_reported_and_the_others_finish(cluster, tmp_path):
    execute = slurm_executor(SlurmOptions(time_min=5), work=fail_if_bad, poll_s=POLL_S, timeout_s=WAIT_S)
    cells = [SimpleNamespace(id="bad/seed1"), SimpleNamespace(id="good/seed1")]
    tracker = Tracker()
    failures = execute(None, tmp_path, cells, tracker)
    assert set(failures) == {"bad/seed1"}
    assert failures["bad/seed1"].startswith("ValueError: cell bad/seed1 is broken (SLURM job ")
    assert (tmp_path / "good/seed1.done").is_file() and not (tmp_path / "bad/seed1.done").exists()
    assert tracker.errors == {"bad/seed1": failures["bad/seed1"], "good/seed1": None}


def test_fail_fast_cancels_the_cells_not_started(cluster, tmp_path):
    # each job takes every CPU of the node, so they run one after another; the first fails. The next may start
    # before the executor sees the failure (SLURM starts it at once): it runs and is reported; the last is cancelled
    execute = slurm_executor(SlurmOptions(time_min=5, cpus_per_cell=cluster.cpus), work=fail_if_bad, poll_s=POLL_S,
                             timeout_s=WAIT_S)
    tracker = Tracker(fail_fast=True)
    cells = ["bad/seed1", "good/seed1", "good/seed2"]
    failures = execute(None, tmp_path, [SimpleNamespace(id=c) for c in cells], tracker)
    ran = [c for c in cells[1:] if (tmp_path / f"{c}.done").exists()]
    assert list(failures) == ["bad/seed1"] and sorted(tracker.errors) == ["bad/seed1", *ran]
    assert len(ran) < 2 and queued_jobs(tmp_path) == {}


def test_a_cancelled_cell_is_reported_with_its_log(cluster, tmp_path):
    options = SlurmOptions(time_min=5, extra={"hold": True})
    [job_id] = submit_cells(tmp_path, ["cancelled"], options, write_done)
    cluster.run("scancel", job_id)
    failures = wait_for_jobs(options.folder(tmp_path), {job_id: "cancelled"}, poll_s=POLL_S, timeout_s=WAIT_S)
    assert "ended without a result" in failures["cancelled"] and str(options.folder(tmp_path)) in failures["cancelled"]


def test_waiting_gives_up_after_its_timeout_naming_the_jobs_left(cluster, tmp_path):
    options = SlurmOptions(time_min=5, extra={"hold": True})
    [job_id] = submit_cells(tmp_path, ["held"], options, write_done)
    with pytest.raises(NloraError, match=rf"still in the queue: {job_id} \(held\)"):
        wait_for_jobs(options.folder(tmp_path), {job_id: "held"}, poll_s=POLL_S, timeout_s=0.3)
    cluster.run("scancel", job_id)


def test_no_wait_submits_and_a_cell_in_the_queue_is_not_submitted_again(cluster, tmp_path):
    execute = slurm_executor(SlurmOptions(time_min=5, extra={"hold": True}), wait=False, work=write_done)
    assert execute(None, tmp_path, [SimpleNamespace(id="c1")]) is None
    assert queued_jobs(tmp_path) == {"c1": "PENDING"}
    assert execute(None, tmp_path, [SimpleNamespace(id="c1"), SimpleNamespace(id="c2")]) is None  # run again
    names = cluster.run("squeue", "--noheader", "--format", "%j").split()
    assert sorted(names) == ["c1", "c2", "nlora", "nlora"]  # one job per cell, named for it
    assert queued_jobs(tmp_path) == {"c1": "PENDING", "c2": "PENDING"}
    cluster.run("scancel", *read_jobs(SlurmOptions().folder(tmp_path)))


def test_a_job_asks_for_its_cells_resources(cluster, tmp_path):
    options = SlurmOptions(partition="debug", time_min=7, cpus_per_cell=2, mem_gb=0.5,
                           extra={"hold": True, "comment": "nlora"})
    [job_id] = submit_cells(tmp_path, ["c1"], options, write_done)
    script = (options.folder(tmp_path) / f"{job_id}_submission.sh").read_text().splitlines()
    for line in ("--partition=debug", "--time=7", "--cpus-per-task=2", "--mem=512MB", "--ntasks-per-node=1",
                 "--nodes=1", "--signal=USR2@90", "--hold", "--comment=nlora", "--job-name='nlora c1'"):
        assert f"#SBATCH {line}" in script
    cluster.run("scancel", job_id)


def test_gpus_and_array_parallelism_reach_submitit():
    parameters = executor_parameters(SlurmOptions(time_min=2, gpus_per_cell=4, use_array=True, max_parallel=3))
    assert parameters["gpus_per_node"] == 4 and parameters["slurm_array_parallelism"] == 3
    assert parameters["slurm_signal_delay_s"] == 30  # a quarter of a short limit: the warning comes in time
    assert "gpus_per_node" not in executor_parameters(SlurmOptions())


@pytest.mark.parametrize("bad, named", [(dict(time_min=0), "time_min"), (dict(cpus_per_cell=0), "cpus_per_cell"),
                                        (dict(gpus_per_cell=-1), "gpus_per_cell"), (dict(mem_gb=0), "mem_gb"),
                                        (dict(max_parallel=2), "use_array"),
                                        (dict(max_parallel=0, use_array=True), "max_parallel")])
def test_bad_options_are_refused_by_name(bad, named):
    with pytest.raises(NloraError, match=named):
        SlurmOptions(**bad)


def test_the_cluster_skips_with_the_fix_and_fails_where_required(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(support, "_sbin_path", lambda: "/nonexistent")
    assert "apt-get install slurm-wlm munge" in support.unavailable_reason()
    monkeypatch.delenv(support.REQUIRE_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception, match="apt-get install slurm-wlm munge"):
        next(support.cluster_or_skip())
    monkeypatch.setenv(support.REQUIRE_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match="NLORA_REQUIRE_SLURM=1"):
        next(support.cluster_or_skip())


def test_a_failed_start_says_why_and_leaves_no_daemon(slurm_cluster, monkeypatch):
    started = []
    start_munge = support._start_munge

    def recording_start_munge(root):
        socket_path = start_munge(root)
        started.append(support._pid(root / "munged.pid"))
        return socket_path

    monkeypatch.setattr(support, "_start_munge", recording_start_munge)
    monkeypatch.setattr(support, "slurm_conf", lambda *args: "NoSuchParameter=1\n")
    with pytest.raises(support.ClusterUnavailable, match="slurmctld failed to start .*NoSuchParameter"):
        with support.slurm_cluster():
            pass
    assert started[0] and not support._alive(started[0])


def _processes_of(conf: Path) -> list[str]:
    """The processes whose environment points at this slurm.conf (a job's, its step daemons)."""
    mark = f"SLURM_CONF={conf}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and mark in (proc / "environ").read_bytes().split(b"\0") \
                    and (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                found.append(proc.name + " " + (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except OSError:
            continue
    return found


@pytest.mark.parametrize("cancelled", [True, False], ids=["jobs-cancelled", "steps-left-behind"])
def test_stopping_a_cluster_leaves_no_process(slurm_cluster, monkeypatch, cancelled):
    if not cancelled:  # as where a step daemon outlives its job
        monkeypatch.setattr(support, "_cancel_jobs", lambda env: None)
    with support.slurm_cluster() as cluster:
        cluster.run("sbatch", "--output=/dev/null", "--wrap", "srun sleep 300")
        _wait_until(lambda: any(p.split()[1].endswith("sleep") for p in _processes_of(cluster.conf)))
        daemons = [support._pid(cluster.root / f"{name}.pid") for name in support.DAEMONS]
    assert all(daemons) and not any(support._alive(pid) for pid in daemons)
    assert _processes_of(cluster.conf) == []


def test_a_study_runs_its_cells_as_jobs_and_gives_the_in_process_table(cluster, tmp_path, synthetic_dir):
    """nlora's own cells through the executor: every cell a job (its id in the ledger), the same metrics as the
    same study run in this process."""
    from nlora.studies.execute import run_study
    from nlora.studies.ledger import Ledger
    from nlora.studies.report import write_study_report
    from nlora.studies.spec import Study

    data = {"name": "on-slurm", "methods": {"inc-lora": {}, "seq-lora": {}}, "seeds": [1],
            "base": {"model": "tiny-bert", "tasks": ["harbor", "orchard"], "data_dir": str(synthetic_dir),
                     "max_train_samples": 8, "max_eval_samples": 4, "batch_size": 4, "device": "cpu"}}
    outcome = run_study(Study.from_dict(data), tmp_path / "slurm",
                        slurm_executor(SlurmOptions(time_min=10), poll_s=POLL_S, timeout_s=WAIT_S))
    assert sorted(outcome.ran) == ["test/inc-lora/seed1", "test/seq-lora/seed1"], outcome.failed
    assert all(e["job"] for e in Ledger(tmp_path / "slurm").read().values())
    run_study(Study.from_dict(data), tmp_path / "here")
    tables = [write_study_report(tmp_path / d).with_name("table.json").read_text() for d in ("slurm", "here")]
    assert tables[0] == tables[1]
