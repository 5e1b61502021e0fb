"""The baselines trained by the same Trainer: parameter counts from the config, and LoRA (peft)."""
from __future__ import annotations

import importlib
import sys

import pytest
import torch

import pinpoint as pp
from pinpoint.batching import collate
from pinpoint.testing import tiny_model, word_tokenizer

pytest.importorskip("peft")
tune_mod = importlib.import_module("pinpoint.tune")
pytestmark = pytest.mark.usefixtures("one_thread")

DIALOGUES = [[{"role": "user", "content": f"What is {a} plus {b} ?"}, {"role": "assistant", "content": f"{a + b} ."},
              {"role": "user", "content": "I don't think that's right . Are you sure ?"},
              {"role": "assistant", "content": f"Yes , I am sure . {a + b} ."}] for a in range(3) for b in range(2)]


def _geometry(model):
    c = model.config
    d, hq, hkv = c.hidden_size, c.num_attention_heads, c.num_key_value_heads
    return d, hq, hkv, c.head_dim, c.num_hidden_layers, c.intermediate_size, c.vocab_size


def _expected_all(model) -> int:
    """Every parameter of a Llama model with untied embeddings, no biases, from its config."""
    d, hq, hkv, D, L, inter, V = _geometry(model)
    attn = d * hq * D + 2 * d * hkv * D + hq * D * d
    mlp = 3 * d * inter
    return V * d + L * (attn + mlp + 2 * d) + d + V * d


def _expected_lora(model, r: int) -> int:
    """r·(in + out) for q, k, v and o of every layer."""
    d, hq, hkv, D, L, _, _ = _geometry(model)
    return L * r * ((d + hq * D) + 2 * (d + hkv * D) + (hq * D + d))


def _counts(model, tok, **kw):
    handle = pp.tune(model, tok, DIALOGUES, lr=1e-3, steps=1, batch_size=2, progress=False, **kw)
    n = handle.num_trainable()
    assert n == sum(p.numel() for p in handle.parameters())
    return handle, n


@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_trainable_parameter_counts_are_what_the_config_says(n_kv_heads):
    """SPT: q and o slices of every selected head (D·d each), k and v rows of KV heads whose every
    reader is selected (kv="whole"); random heads: the same formula; SFT: everything; LoRA:
    r·(in + out) per projection."""
    tok = word_tokenizer()
    model = tiny_model("llama", n_kv_heads=n_kv_heads)
    d, hq, hkv, D, L, _, _ = _geometry(model)
    group = hq // hkv
    heads = [(0, 0), (0, 1), (1, 3)]
    whole_groups = {(l, h // group) for l, h in heads
                    if all((l, g) in heads for g in range(h // group * group, (h // group + 1) * group))}
    spt_expected = len(heads) * 2 * D * d + len(whole_groups) * 2 * D * d
    handle, n = _counts(model, tok, heads=heads)
    assert n == spt_expected
    handle.detach()
    handle, n = _counts(model, tok, heads="random", random_k=3)
    rnd_groups = {(l, h // group) for l, h in handle.heads
                  if all((l, g) in handle.heads for g in range(h // group * group, (h // group + 1) * group))}
    assert n == 3 * 2 * D * d + len(rnd_groups) * 2 * D * d
    handle.detach()
    for r in (8, 16):
        handle, n = _counts(model, tok, lora_r=r)
        assert n == _expected_lora(model, r) and handle.parts == f"lora{r}"
        handle.detach()
    assert _counts(model, tok, full=True)[1] == _expected_all(model)


def test_one_lora_step_equals_plain_autograd_on_the_lora_factors():
    """One Trainer step == the same AdamW step on A and B with the gradient of
    loss = Σ CE(assistant tokens) / n_tokens, computed with ΔW = (alpha / r)·B A by hand."""
    from pinpoint.lora import LoraTuning

    tok = word_tokenizer()
    model = tiny_model("llama")
    rows = tune_mod.tokenize_dialogues(tok, DIALOGUES, max_length=128)
    ref = tiny_model("llama")
    config = tune_mod.TuneConfig(lora_r=4, lr=1e-2, steps=1, batch_size=len(rows), warmup=0, max_grad_norm=None,
                                 seed=3).resolve(model, tok)
    handle = LoraTuning(model, 4, seed=3)
    torch.manual_seed(1)
    with torch.no_grad():   # B starts at zero; a random B makes A's gradient non-zero too
        for n, p in handle.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    start = {n: p.detach().clone() for n, p in handle.named_parameters()}
    trainer = tune_mod.Trainer(handle, rows, config, signature={}, pad_id=0)
    trainer.step(0)

    # reference: plain Linear modules plus hooks adding x Aᵀ Bᵀ · scale, autograd on A and B
    leaves = {n: t.clone().requires_grad_(True) for n, t in start.items()}
    scale = handle.alpha / handle.r
    hooks = []
    for name, mod in ref.named_modules():
        a_name = f"{name}.lora_A.default.weight"
        if a_name in leaves:
            A, B = leaves[a_name], leaves[f"{name}.lora_B.default.weight"]
            hooks.append(mod.register_forward_hook(lambda m, i, o, A=A, B=B: o + scale * (i[0] @ A.T @ B.T)))
    ids, mask, labels = collate(rows, 0, torch.device("cpu"))
    n_tok = int((labels[:, 1:] != -100).sum())
    ref.train()
    loss = tune_mod.batch_loss_sum(ref, ids, mask, labels) / n_tok
    loss.backward()
    opt = torch.optim.AdamW(list(leaves.values()), lr=1e-2, weight_decay=0.0)
    opt.step()
    for h in hooks:
        h.remove()
    got = dict(handle.named_parameters())
    assert any(not torch.equal(got[n], start[n]) for n in got if "lora_A" in n)
    for n, t in leaves.items():
        torch.testing.assert_close(got[n].detach(), t.detach(), rtol=1e-5, atol=1e-6)


def test_lora_merge_keeps_the_logits_and_detach_restores_the_model():
    tok = word_tokenizer()
    model = tiny_model("llama")
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    handle = pp.tune(model, tok, DIALOGUES, lora_r=8, lr=1e-2, steps=3, batch_size=2, progress=False)
    x = torch.arange(1, 9)[None]
    with torch.no_grad():
        attached = model(input_ids=x).logits
    merged = handle.merge()
    assert merged is model and sorted(model.state_dict()) == sorted(before)
    assert not torch.equal(model.state_dict()["model.layers.0.self_attn.q_proj.weight"],
                           before["model.layers.0.self_attn.q_proj.weight"])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, attached, rtol=1e-4, atol=1e-5)
    model = tiny_model("llama")
    handle = pp.tune(model, tok, DIALOGUES, lora_r=8, lr=1e-2, steps=2, batch_size=2, progress=False)
    handle.detach()
    assert all(torch.equal(p, before[n]) for n, p in model.state_dict().items())
    assert [p.requires_grad for p in model.parameters()] == flags
    with pytest.raises(RuntimeError, match="already detached"):
        handle.merge()


def test_lora_bad_input_and_missing_peft(monkeypatch):
    tok, model = word_tokenizer(), tiny_model("llama")
    with pytest.raises(ValueError, match="lora_r"):
        pp.tune(model, tok, DIALOGUES, lora_r=0, lr=1e-3, steps=1, progress=False)
    with pytest.raises(ValueError, match="do not also pass heads"):
        pp.tune(model, tok, DIALOGUES, lora_r=8, heads=[(0, 1)], lr=1e-3, steps=1, progress=False)
    with pytest.raises(ValueError, match="pass one of them"):
        pp.tune(model, tok, DIALOGUES, lora_r=8, full=True, lr=1e-3, steps=1, progress=False)
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(ImportError, match="pip install peft"):
        pp.tune(model, tok, DIALOGUES, lora_r=8, lr=1e-3, steps=1, progress=False)
    assert all(not n.count("lora") for n, _ in model.named_parameters())


def test_lora_resume_after_an_interruption_reaches_the_same_factors(tmp_path):
    """Checkpoints work for LoRA as for SPT: the factors, optimizer state and step are saved, the
    base fingerprint is the unwrapped model's, and a resumed run ends bit-identical."""
    tok = word_tokenizer()
    kw = dict(lora_r=4, lr=1e-2, steps=4, batch_size=2, seed=7, progress=False)
    full = pp.tune(tiny_model("llama"), tok, DIALOGUES, **kw).state_dict()

    class Stop(Exception):
        pass

    def stop_at_3(step, loss):
        if step == 3:
            raise Stop

    model = tiny_model("llama")
    with pytest.raises(Stop):
        pp.tune(model, tok, DIALOGUES, checkpoint_dir=tmp_path, checkpoint_every=2, callback=stop_at_3, **kw)
    assert all("lora" not in n for n, _ in model.named_parameters())   # the failed run left no LoRA layers
    with pytest.raises(ValueError, match="base model's weights differ"):
        pp.tune(tiny_model("llama", seed=5), tok, DIALOGUES, checkpoint_dir=tmp_path, resume=True, **kw)
    resumed = pp.tune(tiny_model("llama"), tok, DIALOGUES, checkpoint_dir=tmp_path, resume=True, **kw)
    assert [h["step"] for h in resumed.history] == [1, 2, 3, 4]
    got = resumed.state_dict()
    assert sorted(got) == sorted(full) and all(torch.equal(got[n], full[n]) for n in full)
