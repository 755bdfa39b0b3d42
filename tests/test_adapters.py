import json
import warnings

import pytest
import torch
from peft import PeftModel

from nlora.adapters import ContinualAdapters
from nlora.models import load_backbone


def _adapters(kind_model="tiny-bert"):
    bb = load_backbone(kind_model)
    return bb, ContinualAdapters(bb.model, bb.kind, r=4, alpha=8, dropout=0.0, target_modules=["query", "value"])


def _randomize(adapters, name, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for f in adapters.factors(name):
            f.B.copy_(torch.randn(f.B.shape, generator=g) * 0.1)


def test_only_the_current_adapter_trains():
    _, ad = _adapters()
    ad.add("task0")
    ad.add("task1")
    trainable = {n for n, p in ad.model.named_parameters() if p.requires_grad}
    assert trainable and all(".task1." in n for n in trainable)
    assert len(trainable) == 2 * 2 * 2  # 2 layers x (query, value) x (A, B)
    assert all(not p.requires_grad for f in ad.factors("task0") for p in (f.A, f.B))


def test_earlier_adapter_is_bit_identical_after_training_a_later_one():
    bb, ad = _adapters()
    ad.add("task0")
    _randomize(ad, "task0", 0)
    before = {n: p.detach().clone() for n, p in ad.model.named_parameters() if ".task0." in n}
    ad.add("task1")
    opt = torch.optim.AdamW(ad.trainable_parameters(), lr=1e-2, weight_decay=0.1)
    x = torch.randint(3, 100, (4, 12))
    for _ in range(3):
        ad.model(input_ids=x).last_hidden_state.pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    after = {n: p.detach() for n, p in ad.model.named_parameters() if ".task0." in n}
    assert all(torch.equal(before[n], after[n]) for n in before)
    moved = [f.B.detach().abs().sum().item() for f in ad.factors("task1")]
    assert all(m > 0 for m in moved)  # B starts at zero: the new adapter did train


def test_forward_sums_all_active_adapters():
    bb, ad = _adapters()
    ad.add("task0")
    ad.add("task1")
    _randomize(ad, "task0", 1)
    _randomize(ad, "task1", 2)
    ad.model.eval()
    name, layer = ad.lora_layers()[0]
    x = torch.randn(3, layer.base_layer.in_features)
    expected = layer.base_layer(x)
    for t in ("task0", "task1"):
        expected = expected + layer.scaling[t] * x @ (layer.lora_B[t].weight @ layer.lora_A[t].weight).T
    torch.testing.assert_close(layer(x), expected)


def test_saved_adapter_reloads_with_peft(tmp_path):
    bb, ad = _adapters()
    ad.add("task0")
    _randomize(ad, "task0", 3)
    ad.add("task1")
    _randomize(ad, "task1", 4)
    folder = ad.save("task1", tmp_path / "1-b")
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    ad.activate(["task1"])
    ad.model.eval()
    x = torch.randint(3, 100, (2, 9))
    want = ad.model(input_ids=x).last_hidden_state
    fresh = PeftModel.from_pretrained(load_backbone("tiny-bert").model, str(folder)).eval()
    torch.testing.assert_close(fresh(input_ids=x).last_hidden_state, want)


@pytest.mark.filterwarnings("ignore:Could not find a config file")  # PEFT looks the name up on the (offline) hub
def test_every_saved_adapter_names_the_base_model(tmp_path):
    bb, ad = _adapters()
    bb.model.name_or_path = "org/base-model"  # what from_pretrained records on a loaded model
    for k in range(3):
        ad.add(f"task{k}")
        ad.save(f"task{k}", tmp_path / f"{k}-t")
    recorded = [json.loads((tmp_path / f"{k}-t" / "adapter_config.json").read_text())["base_model_name_or_path"]
                for k in range(3)]
    assert recorded == ["org/base-model"] * 3  # the later ones too: AutoPeftModel loads the base from it


class _SetInReverseOrder(set):
    """A set that iterates in reverse name order: how a set of module names may come out in another process."""

    def __iter__(self):
        return iter(sorted(set.__iter__(self), reverse=True))


def test_saved_adapter_config_lists_target_modules_sorted(tmp_path):
    _, ad = _adapters()
    ad.add("task1")
    ad.peft_model.peft_config["task1"].target_modules = _SetInReverseOrder({"query", "value"})
    ad.save("task1", tmp_path / "1-t")
    saved = json.loads((tmp_path / "1-t" / "adapter_config.json").read_text())["target_modules"]
    assert saved == ["query", "value"]  # the same bytes from identical runs, whatever the hash order


def test_wrapping_the_model_prints_no_gradient_checkpointing_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, ad = _adapters()
        ad.add("task0")
        ad.add("task1")
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]


def test_saved_adapters_combined_with_peft_cat_at_weight_1_give_the_summed_model(tmp_path):
    # what README "Using a trained model" tells a plain PEFT user: the sum, PEFT's "cat"; "linear" is another model
    bb, ad = _adapters()
    for k in range(2):
        ad.add(f"task{k}")
        _randomize(ad, f"task{k}", 5 + k)
        with torch.no_grad():
            for f in ad.factors(f"task{k}"):
                f.A.mul_(3.0)  # large enough that the cross terms of "linear" show
        ad.save(f"task{k}", tmp_path / f"{k}-t")
    ad.activate(["task0", "task1"])
    ad.model.eval()
    x = torch.randint(3, 100, (2, 9))
    want = ad.model(input_ids=x).last_hidden_state
    plain = PeftModel.from_pretrained(load_backbone("tiny-bert").model, str(tmp_path / "0-t"), adapter_name="a")
    plain.load_adapter(str(tmp_path / "1-t"), adapter_name="b")
    for combination, same in (("cat", True), ("linear", False)):
        plain.add_weighted_adapter(["a", "b"], [1.0, 1.0], combination, combination_type=combination)
        plain.set_adapter(combination)
        got = plain.eval()(input_ids=x).last_hidden_state
        assert torch.allclose(got, want, atol=1e-5) == same, combination


def test_a_learnable_scale_trains_and_each_update_takes_effect():
    bb, ad = _adapters()
    ad.add("task0")
    _randomize(ad, "task0", 5)
    ad.add("task1")
    name, layer = ad.lora_layers()[0]
    x = torch.randn(3, layer.base_layer.in_features)
    update = x @ (layer.lora_B["task0"].weight @ layer.lora_A["task0"].weight).T * (8 / 4)
    base = layer(x) - update  # task1 adds nothing yet (B = 0)
    scale = torch.nn.Parameter(torch.tensor(2.0))
    per_layer = torch.nn.Parameter(torch.tensor(3.0))
    ad.scale_by("task0", {name: lambda: per_layer * scale})  # a function of learnable tensors, this layer only
    torch.testing.assert_close(layer(x), base + 6.0 * update)
    (layer(x) * update).sum().backward()  # d/dscale = 3 |update|², d/dper_layer = 2 |update|²
    torch.testing.assert_close(scale.grad, 3 * (update ** 2).sum())
    torch.testing.assert_close(per_layer.grad, 2 * (update ** 2).sum())
    with torch.no_grad():
        scale.sub_(1.5)  # an optimizer step: the next forward reads the new value
    torch.testing.assert_close(layer(x), base + 1.5 * update)
    ad.scale_by("task0", scale)  # one value for every layer
    for _, m in ad.lora_layers():
        ones = torch.ones(1, m.base_layer.in_features)
        own = ones @ (m.lora_B["task0"].weight @ m.lora_A["task0"].weight).T * (8 / 4)
        torch.testing.assert_close(m(ones), m.base_layer(ones) + 0.5 * own)
    ad.scale_by("task0", None)
    torch.testing.assert_close(layer(x), base + update)
