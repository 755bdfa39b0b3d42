"""FSDP2 (`--sharding fsdp2`): 2 CPU processes (gloo) with the base model sharded give the single-process run, with
the run killed mid-task and resumed; the in-forward regularisers, adapter saving (PEFT format) and
evaluation (generation) all go through the sharded model. The multi-process tests are marked `distributed`."""

import json
import os
import subprocess
import sys

import pytest
import torch

from nlora.config import RunConfig
from nlora.errors import NloraError
from nlora.models import load_backbone
from nlora.train.engine import _check_engine, transformer_blocks
from launch_support import EXAMPLES, ROOT, RUN, fake_accelerator
from same_run import assert_same_run


def _launch(args, env_extra=None):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               **(env_extra or {}))
    env.pop("WORLD_SIZE", None)
    return subprocess.Popen([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                             str(EXAMPLES / "fsdp2.yaml"), "--num_processes", "2", "-m", "nlora", *args],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.distributed
def test_fsdp2_gives_the_single_process_run_and_resumes(tmp_path, synthetic_dir, single_run):
    """One sharded run, killed at the 3rd optimizer step of the first task (a checkpoint after every step) and
    resumed: both launches run sharded, so the resumed run equal to the single-process one covers an uninterrupted
    sharded run too (training before and after the kill, saving, evaluation)."""
    single, resumed = single_run, tmp_path / "resumed"
    data = ["--data-dir", str(synthetic_dir)]
    killed = _launch([*RUN, *data, "--output-dir", str(resumed), "--sharding", "fsdp2", "--checkpoint-steps", "1"],
                     {"NLORA_FAULT": "train_step:3"})
    killed.communicate(timeout=600)
    assert killed.returncode != 0 and (resumed / "checkpoint").is_dir()
    assert "sharding: fsdp2" in (resumed / "config.yaml").read_text()
    again = _launch(["resume", str(resumed), "--quiet"])
    out, err = again.communicate(timeout=600)
    assert again.returncode == 0, err[-3000:]
    assert out.count("run directory:") == 1
    assert_same_run(single, resumed, exact=False)
    # the same run, though the sharded base folds the frozen adapters as a past path and the float32 one merges them
    forms = [json.loads((run / "metrics.json").read_text())["fold_form"] for run in (single, resumed)]
    assert forms == ["merge", "concat"]


def test_transformer_blocks_of_each_model_kind():
    for name, block, count in (("tiny-llama", "LlamaDecoderLayer", 2), ("tiny-t5", "T5Block", 4),
                               ("tiny-bert", "BertLayer", 2)):
        blocks = transformer_blocks(load_backbone(name).model)
        names = [type(b).__name__ for b in blocks]
        assert names.count(block) == count  # BERT also names its embeddings: one more unit


def test_sharding_options_are_checked():
    from accelerate.utils import DistributedType

    config = RunConfig(tasks=["x"], batch_size=8, sharding="fsdp2")
    _check_engine(fake_accelerator(DistributedType.MULTI_CPU), config)
    with pytest.raises(NloraError, match="mixed_precision no"):
        _check_engine(fake_accelerator(DistributedType.MULTI_GPU), config.replace(mixed_precision="bf16"))
    with pytest.raises(NloraError, match="plain multi-process launch"):
        _check_engine(fake_accelerator(DistributedType.DEEPSPEED), config)
    with pytest.raises(NloraError, match="option 'sharding'"):
        RunConfig(tasks=["x"], sharding="fsdp1").validate()
    assert torch.distributed.is_available()


@pytest.mark.distributed
def test_a_sharded_free_text_run_killed_mid_task_resumes_to_the_one_process_run(tmp_path):
    """The conformance kit's sequence (classification, free text scored by edit similarity, classification),
    sharded over 2 processes, killed at the kit's point (the free-text task's last step, after the checkpoint two
    steps into it), and resumed sharded: generation and scoring of the free-text task after the resume, and the
    task after it, give the one-process run."""
    from nlora.cli import main
    from nlora.testing.kit import FAULT, Kit, write_kit_data

    data = write_kit_data(tmp_path / "data")
    argv = Kit(["n-lora"], [], {}).argv
    single, resumed = tmp_path / "single", tmp_path / "resumed"
    assert main(argv("n-lora", data, single)) == 0
    killed = _launch([*argv("n-lora", data, resumed), "--sharding", "fsdp2"], {"NLORA_FAULT": FAULT})
    _, err = killed.communicate(timeout=600)
    assert killed.returncode != 0 and (resumed / "checkpoint").is_dir(), err[-3000:]
    assert (resumed / "adapters" / "0-harbor").is_dir() and not (resumed / "adapters" / "1-reverse").exists()
    again = _launch(["resume", str(resumed), "--quiet"])
    out, err = again.communicate(timeout=600)
    assert again.returncode == 0, err[-3000:]
    assert_same_run(single, resumed, exact=False)
    predictions = [json.loads(line) for line in
                   (resumed / "predictions" / "1-reverse" / "reverse.jsonl").read_text().splitlines()]
    assert len(predictions) == 4 and all("score" in p for p in predictions)
