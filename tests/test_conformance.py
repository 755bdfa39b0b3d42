"""The conformance kit (nlora.testing) on every method nlora ships, the example method from outside the package
(examples/methods/l2_anchor.py, through option method_module) and a core option that changes how any method trains
(VARIANTS: grad_mask migu). Methods an installed package registers are not among them: they run the kit in their
own repository. The same 2-process launch runs the engine's other configurations on free text (LAUNCHED): FSDP2,
and a seq2seq base with sampled decoding under DDP and FSDP2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nlora.testing import builtin_methods, conformance_tests
from nlora.testing.same_run import assert_same_run

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = str(ROOT / "examples" / "methods" / "l2_anchor.py")
# MIGU on seq-lora: a new adapter's B after its first Adam step holds ±lr entries, rows tie, and the float noise that
# orders tied rows differs with the batch split, so a stacked method matches 1 = 2 processes only up to them
VARIANTS = {"seq-lora+migu": ("seq-lora", ["--grad-mask", "migu", "--migu-q", "0.5"])}
# runs of the 2-process launch only, each against the 1-process run of the same name without "+fsdp2" (one process
# does not shard): n-lora with the base sharded (FSDP2), and on a seq2seq base under DDP and FSDP2 (a tiny T5 saved
# without dropout, so that 1 and 2 processes compute the same run), with sampled decoding, whose draws must not
# depend on the process count
SEQ2SEQ = ["--decoding", "sample", "--temperature", "1.0"]
LAUNCHED = {"n-lora+fsdp2": ("n-lora", ["--sharding", "fsdp2"]),
            "n-lora+seq2seq": ("n-lora", SEQ2SEQ),
            "n-lora+seq2seq+fsdp2": ("n-lora", [*SEQ2SEQ, "--sharding", "fsdp2"])}

globals().update(conformance_tests([*builtin_methods(), "l2-anchor"], method_module=EXAMPLE, variants=VARIANTS,
                                   launched=LAUNCHED))


@pytest.mark.distributed
@pytest.mark.parametrize("method", sorted(LAUNCHED))
def test_sharded_and_seq2seq_runs_give_the_one_process_run(kit_runs, kit_two_process_runs, method):
    """FSDP2 (sharded generation included: a seq2seq model's encoder runs outside the root's forward), and a
    seq2seq base with sampled decoding under DDP and FSDP2."""
    assert_same_run(kit_runs[method.removesuffix("+fsdp2")], kit_two_process_runs[method], exact=False)
    if "seq2seq" in method:
        path = kit_two_process_runs[method] / "predictions" / "1-reverse" / "reverse.jsonl"
        assert all(json.loads(line)["prediction"] for line in path.open())  # sampled text, not an EOS at once
