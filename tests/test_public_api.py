"""The public API of a method author: the names `nlora` exports (and nothing internal beside them), each documented,
the example method using nothing else, and the gradient helpers against autograd through the model's own loss."""

import ast
import types
from pathlib import Path

import pytest
import torch

import nlora

ROOT = Path(__file__).resolve().parents[1]
PUBLIC = {
    "__version__", "run", "study", "RunConfig", "load_config", "NloraError",
    "Method", "MethodContext", "MethodOptions", "option", "register", "METHODS", "LossTerm", "LayerFactors",
    "Example", "TaskData", "StepOutputs", "Objective", "ContinualAdapters", "to_device",
    "loss_gradients", "task_loss_gradients", "per_example_squared_gradients", "auxiliary_outputs", "layer_inputs",
    "my_share", "sum_over_processes", "eval_mode",
}


def test_the_public_names_are_exactly_these():
    assert set(nlora.__all__) == PUBLIC
    assert len(nlora.__all__) == len(PUBLIC)
    assert dir(nlora) == sorted(PUBLIC)
    # nothing else at the top level but submodules (imported by then) and dunders
    leaked = {k for k, v in vars(nlora).items() if not k.startswith("_") and not isinstance(v, types.ModuleType)}
    assert leaked <= PUBLIC, leaked - PUBLIC


@pytest.mark.parametrize("name", sorted(PUBLIC - {"__version__", "METHODS"}))
def test_each_public_name_resolves_and_is_documented(name):
    value = getattr(nlora, name)
    assert (value.__doc__ or "").strip(), f"nlora.{name} has no docstring"


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'get_method'"):
        nlora.get_method


def test_one_layer_factors_type_for_loss_terms_and_adapters():
    from nlora.adapters import LayerFactors
    from nlora.train.regularization import LayerFactors as Seen

    assert nlora.LayerFactors is LayerFactors is Seen
    assert not hasattr(__import__("nlora.adapters", fromlist=["x"]), "LoraFactors")


def _nlora_names_used(path: Path) -> tuple[set[str], set[str]]:
    """The `nlora.X` attributes and `from nlora import X` names `path` uses, and the nlora submodules it imports."""
    tree = ast.parse(path.read_text())
    names, submodules = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "nlora":
            names.add(node.attr)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("nlora"):
            if node.module == "nlora":
                names |= {a.name for a in node.names}
            else:
                submodules.add(node.module)
        elif isinstance(node, ast.Import):
            submodules |= {a.name for a in node.names if a.name.startswith("nlora.")}
    return names, submodules


@pytest.mark.parametrize("path", sorted((ROOT / "examples" / "methods").glob("*.py")), ids=lambda p: p.name)
def test_the_example_methods_use_only_public_names(path):
    names, submodules = _nlora_names_used(path)
    assert names and names <= PUBLIC, names - PUBLIC
    assert not submodules, submodules


def test_the_checker_sees_an_internal_import(tmp_path):
    (tmp_path / "m.py").write_text("import nlora\nfrom nlora.train.regularization import LossTerm\nnlora.get_method\n")
    names, submodules = _nlora_names_used(tmp_path / "m.py")
    assert names == {"get_method"} and submodules == {"nlora.train.regularization"}


# ------------------------------------------------------------------------------------------- gradient helpers

def _context(model_name, synthetic_dir, examples=6, eval_batch_size=2):
    from types import SimpleNamespace

    from nlora.models import default_target_modules, load_backbone
    from nlora.objectives import make_objective
    from nlora.tasks.data import load_task

    bb = load_backbone(model_name)
    adapters = nlora.ContinualAdapters(bb.model, bb.kind, r=2, alpha=4, dropout=0.0,
                                       target_modules=default_target_modules(bb.model_type))
    adapters.add("t0")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for f in adapters.factors("t0"):  # B = 0 at init would make A's gradient zero
            f.B.copy_(torch.randn(f.B.shape, generator=g) * 0.1)
    accelerator = SimpleNamespace(device=torch.device("cpu"), process_index=0, num_processes=1)
    return nlora.MethodContext(nlora.RunConfig(tasks=["harbor"], eval_batch_size=eval_batch_size), adapters,
                               make_objective(bb.kind, bb.tokenizer, 256, 6), accelerator,
                               [load_task(synthetic_dir, "harbor", max_train=examples)])


def _factor_params(ctx):
    return {f"{f.layer}/{s}": t for f in ctx.adapters.factors("t0") for s, t in (("A", f.A), ("B", f.B))}


@pytest.mark.parametrize("model_name", ["tiny-llama", "tiny-bert"])
def test_loss_gradients_is_the_gradient_of_the_mean_over_every_loss_item(synthetic_dir, model_name):
    ctx = _context(model_name, synthetic_dir, examples=5, eval_batch_size=2)  # batches of 2, 2 and 1
    examples, params = ctx.tasks[0].train, _factor_params(ctx)
    grads = nlora.loss_gradients(ctx, examples, params)
    # brute force: each example's summed item losses, over the items of all of them, one example per backward
    model = ctx.adapters.model.eval()
    items = sum(ctx.objective.count_terms(ctx.objective.collate([e])) for e in examples)
    expected = {k: torch.zeros_like(p) for k, p in params.items()}
    for example in examples:
        batch = ctx.objective.collate([example])
        loss = ctx.objective.loss(model, batch) * ctx.objective.count_terms(batch) / items
        for key, g in zip(params, torch.autograd.grad(loss, list(params.values()))):
            expected[key] += g
    assert any(g.abs().sum() > 0 for g in expected.values())
    for key in params:
        torch.testing.assert_close(grads[key], expected[key], rtol=1e-4, atol=1e-8)
        assert params[key].grad is None  # the trained gradients are left alone


class _Recorder(nlora.Method):
    """Records its hooks, and checks in each step that the trained gradient (no penalty, no dropout) is the
    gradient of the task loss alone on the step's examples."""
    name = "hook-recorder"
    adapter_layout = "snapshot"

    def __init__(self, config, options=None):
        super().__init__(config, options)
        self.calls, self.differences, self.step_sizes = [], [], []

    def setup(self, ctx):
        self.calls.append("setup")

    def init_adapter(self, k, ctx):
        self.calls.append("init_adapter")

    def before_task(self, k, ctx):
        self.calls.append("before_task")

    def batch_loss(self, k, batch, out, ctx):
        self.calls.append("batch_loss")

    def transform_gradients(self, k, named, ctx):
        self.calls.append("transform_gradients")
        self.step_sizes.append(len(ctx.step_examples))
        alone = nlora.task_loss_gradients(ctx, named)
        self.differences.append(max(float((alone[n] - p.grad).abs().max() / p.grad.abs().max().clamp_min(1e-12))
                                    for n, p in named.items()))

    def after_step(self, k, ctx):
        self.calls.append("after_step")

    def after_task(self, k, ctx):
        self.calls.append("after_task")


def test_hooks_run_in_the_documented_order_and_task_loss_gradients_is_the_trained_gradient(tmp_path, synthetic_dir,
                                                                                            monkeypatch):
    from nlora.methods import registry

    monkeypatch.setitem(registry.METHODS, _Recorder.name, _Recorder)
    made = []
    monkeypatch.setattr(_Recorder, "setup", lambda self, ctx: (made.append(self), self.calls.append("setup")))
    config = nlora.RunConfig(model="tiny-llama", method="hook-recorder", tasks=["harbor", "orchard"],
                             data_dir=str(synthetic_dir), output_dir=str(tmp_path), max_train_samples=6,
                             max_eval_samples=2, batch_size=2, gradient_accumulation_steps=2, lora_dropout=0.0,
                             device="cpu")
    nlora.run(config, progress=False)
    method, = made
    # 6 examples in batches of 2, 2 per step: steps of 4 and 2 examples, in each of 2 tasks
    per_step = ["batch_loss", "batch_loss", "transform_gradients", "after_step"]
    last_step = ["batch_loss", "transform_gradients", "after_step"]
    task = ["before_task", *per_step, *last_step, "after_task"]
    assert method.calls == ["setup", "init_adapter", *task, *task]  # one shared adapter: one init_adapter
    assert method.step_sizes == [4, 2, 4, 2]
    assert max(method.differences) < 1e-4, method.differences


RECORDING = '''
import nlora

CALLS = []


@nlora.register
class ResumeRecorder(nlora.Method):
    name = "resume-recorder"

    def __init__(self, config, options=None):
        super().__init__(config, options)
        self.steps = 0

    def check_model(self, model, targets):
        CALLS.append("check_model")

    def setup(self, ctx):
        CALLS.append("setup")

    def init_adapter(self, k, ctx):
        CALLS.append(f"init_adapter {k}")

    def before_task(self, k, ctx):
        CALLS.append(f"before_task {k}")

    def after_step(self, k, ctx):
        self.steps += 1
        CALLS.append(f"after_step {k}")

    def after_task(self, k, ctx):
        CALLS.append(f"after_task {k}")

    def state_dict(self):
        return {"steps": self.steps}

    def load_state_dict(self, state):
        self.steps = state["steps"]
        CALLS.append(f"load_state_dict {state['steps']}")
'''


def test_hooks_on_resume_run_in_the_documented_order(tmp_path, synthetic_dir):
    """Method's docstring: on resume, each saved phase's state, then init_adapter and before_task of the
    interrupted phase, then its checkpoint's state (taken after after_step), and training goes on."""
    import os
    import sys

    from nlora.cli import main
    from nlora.methods import registry
    from nlora.testing import fresh_process

    module = tmp_path / "resume_recorder.py"
    module.write_text(RECORDING)
    out = tmp_path / "run"
    argv = ["run", "--method", "resume-recorder", "--method-module", str(module), "--model", "tiny-llama",
            "--tasks", "harbor,orchard", "--data-dir", str(synthetic_dir), "--output-dir", str(out),
            "--max-train-samples", "4", "--max-eval-samples", "2", "--batch-size", "2", "--checkpoint-steps", "1",
            "--device", "cpu", "--quiet"]
    try:
        # 2 steps per task: killed at the 2nd task's 2nd step, after its after_step, before its checkpoint
        killed = fresh_process.run(fresh_process.nlora_main, argv, log=tmp_path / "killed.log",
                                   env=dict(os.environ, NLORA_FAULT="train_step:4"))
        assert killed.returncode == -9, killed.output
        assert main(["resume", str(out), "--quiet"]) == 0
        calls = sys.modules["nlora_user_method_resume_recorder"].CALLS
        assert calls == ["check_model", "setup", "load_state_dict 2",  # phase 0 saved after its 2 steps
                         "init_adapter 1", "before_task 1", "load_state_dict 3",  # the checkpoint after step 3
                         "after_step 1", "after_task 1"]
    finally:
        registry.METHODS.pop("resume-recorder", None)
        sys.modules.pop("nlora_user_method_resume_recorder", None)
