"""PinpointAdapter.save_peft: an exact LoRA form that peft.PeftModel.from_pretrained loads."""
from __future__ import annotations

import json
import warnings

import pytest
import torch

from pinpoint.adapter import PinpointAdapter, attach
from pinpoint.adapter_io import AdapterMismatchError, peft_tensors
from pinpoint.testing import tiny_model

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("one_thread")

HEADS = [(1, 0), (1, 3), (2, 2), (2, 3)]  # (2, 2) + (2, 3) is a whole KV group under GQA 4/2
CASES = {
    "llama-mha": ("llama", dict(n_layers=3), "qkvo", "group"),
    "mistral-gqa-group": ("mistral", dict(n_layers=3, n_kv_heads=2), "qkvo", "group"),
    "mistral-gqa-whole": ("mistral", dict(n_layers=3, n_kv_heads=2), "qkvo", "whole"),
    "qwen2-bias": ("qwen2", dict(n_layers=3, n_kv_heads=2), "qkvo", "group"),
    "qwen2-qv": ("qwen2", dict(n_layers=3, n_kv_heads=2), "qv", "group"),
    "gpt2-conv1d": ("gpt2", dict(n_layers=3), "qkvo", "group"),
}


def _trained(arch, kw, parts, kv):
    model = tiny_model(arch, **kw)
    adapter = attach(model, HEADS, parts, kv=kv)
    with torch.no_grad():
        for i, p in enumerate(adapter.parameters()):
            p.normal_(0, 0.05, generator=torch.Generator().manual_seed(i))
    return adapter


@pytest.mark.parametrize("case", list(CASES))
def test_peft_model_from_pretrained_equals_the_merged_model(case, tmp_path):
    arch, kw, parts, kv = CASES[case]
    adapter = _trained(arch, kw, parts, kv)
    adapter.save_peft(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    ids = torch.randint(7, 300, (2, 11), generator=torch.Generator().manual_seed(0))
    merged = adapter.merge()
    with torch.no_grad():
        want = merged(ids).logits

    fresh = tiny_model(arch, **kw)  # same seed: the base weights
    with torch.no_grad():
        base = fresh(ids).logits
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*has no bias.*")  # lora_bias on Qwen2's bias-free o_proj
        loaded = peft.PeftModel.from_pretrained(fresh, str(tmp_path))
    loaded.eval()
    with torch.no_grad():
        got = loaded(input_ids=ids).logits
    assert (want - base).abs().max() > 1e-2  # the adapter does something
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    if arch != "qwen2":  # PEFT cannot merge a lora_bias into Qwen2's bias-free o_proj
        with torch.no_grad():
            remerged = loaded.merge_and_unload()(ids).logits  # PEFT's own merge: the same model
        torch.testing.assert_close(remerged, want, atol=2e-5, rtol=1e-5)


def test_lora_factors_are_selectors_and_deltas():
    adapter = _trained("mistral", dict(n_layers=3, n_kv_heads=2), "qkvo", "group")
    tensors, config = peft_tensors(adapter)
    D = adapter.spec.head_dim
    q = "base_model.model.model.layers.1.self_attn.q_proj"
    o = "base_model.model.model.layers.1.self_attn.o_proj"
    # q rows: B is a 0/1 selector onto rows of heads 0 and 3; A is the delta itself
    B, A = tensors[f"{q}.lora_B.weight"], tensors[f"{q}.lora_A.weight"]
    assert B.shape == (4 * D, 2 * D) and set(B.unique().tolist()) == {0.0, 1.0} and B.sum() == 2 * D
    assert torch.equal(A, adapter.deltas["l1_q"].detach().reshape(2 * D, -1))
    assert torch.equal(B[3 * D:4 * D, D:], torch.eye(D))
    # o columns: the other way round
    B, A = tensors[f"{o}.lora_B.weight"], tensors[f"{o}.lora_A.weight"]
    assert torch.equal(A[D:, 3 * D:4 * D], torch.eye(D)) and A.sum() == 2 * D
    assert torch.equal(B[:, :D], adapter.deltas["l1_o"].detach()[0])
    assert config["lora_alpha"] == config["r"] and config["rank_pattern"] == config["alpha_pattern"]
    assert config["rank_pattern"][r"model\.layers\.2\.self_attn\.k_proj"] == D  # one KV head of layer 2
    adapter.detach()


def test_pinpoint_config_never_collides_with_peft(tmp_path):
    adapter = _trained("llama", dict(n_layers=3), "qkvo", "group")
    adapter.save(tmp_path)
    assert json.loads((tmp_path / "pinpoint_adapter.json").read_text())["format"] == "pinpoint-adapter"
    adapter.save_peft(tmp_path)  # same directory: the two configs have different names
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "LORA"
    adapter.save(tmp_path)  # saving again never overwrites PEFT's file
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "LORA"
    want = {n: p.detach().clone() for n, p in adapter.deltas.items()}
    adapter.detach()
    loaded = PinpointAdapter.load(tmp_path, tiny_model("llama", n_layers=3))  # reads pinpoint_adapter.json
    assert all(torch.equal(loaded.deltas[n], want[n]) for n in want)
    loaded.detach()
    (tmp_path / "pinpoint_adapter.json").unlink()
    with pytest.raises(AdapterMismatchError,
                       match=r"holds a PEFT adapter \(.*\), not a pinpoint adapter; load it with peft.PeftModel"):
        PinpointAdapter.load(tmp_path, tiny_model("llama", n_layers=3))
