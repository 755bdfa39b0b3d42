"""What the multi-process tests share: the repository's paths, the tiny run launched with 1 and 2 processes
(test_distributed.py, test_fsdp.py, conftest's single_run), and a stand-in accelerator for engine checks."""

from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "accelerate"
# 9 training examples in batches of 4 with 2 accumulation steps: groups of 2 batches and a last group of one
# batch of one example, so one of the 2 processes has nothing of it (the weight-0 stand-in path). 7 test
# examples in batches of 2 split unevenly across processes. Answers of 4 to 6 tokens: averaging each process's
# own token mean (instead of normalising by the step's token count) moves the adapters by ~4e-3, far above the
# tolerance. Dropout 0: each process draws its own dropout masks, so with dropout the runs agree only in
# distribution.
RUN = ["run", "--model", "tiny-llama", "--method", "n-lora", "--lambda", "0.01", "--tasks", "harbor,orchard",
       "--max-train-samples", "9", "--max-eval-samples", "7", "--batch-size", "4",
       "--gradient-accumulation-steps", "2", "--eval-batch-size", "2", "--epochs", "2", "--lora-dropout", "0",
       "--max-target-length", "8", "--device", "cpu", "--quiet"]


def fake_accelerator(engine, zero_stage=2, processes=2, **ds_config):
    plugin = SimpleNamespace(zero_stage=zero_stage, deepspeed_config=dict(ds_config))
    return SimpleNamespace(distributed_type=engine, num_processes=processes,
                           state=SimpleNamespace(deepspeed_plugin=plugin))


