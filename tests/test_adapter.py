"""pinpoint.adapter: attach / PinpointAdapter on stock tiny models.

The reference is ordinary full-model autograd on an untouched copy: the slices must get
exactly the selected part of its weight gradient, and nothing else may change by a bit.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch.nn import functional as F

from pinpoint.adapter import AdapterMismatchError, PinpointAdapter, attach, random_heads
from pinpoint.models import adapter_for
from pinpoint.testing import tiny_model

# arch -> tiny_model kwargs. mistral/qwen2 use GQA (4 query heads over 2 KV heads).
ARCHS = {
    "llama": dict(n_layers=3),
    "mistral": dict(n_layers=3, n_kv_heads=2),
    "qwen2": dict(n_layers=3, n_kv_heads=2),
    "gpt2": dict(n_layers=3),
}
HEADS = [(1, 0), (1, 3), (2, 2)]  # layer 0 untouched; two heads of layer 1 share KV head 0/1 under GQA


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


def _ids(seed=0, B=2, T=9):
    return torch.randint(7, 300, (B, T), generator=torch.Generator().manual_seed(seed))


def _loss(model, ids):
    logits = model(input_ids=ids, use_cache=False).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def _selected_masks(model, heads, parts, kv="group", bias=True):
    """name -> bool mask over that parameter of the elements pinpoint trains (built from the
    module layout directly, independently of the adapter's bookkeeping)."""
    ad = adapter_for(model)
    D = ad.head_dim
    masks = {n: torch.zeros_like(p, dtype=torch.bool) for n, p in model.named_parameters()}
    names = {id(p): n for n, p in model.named_parameters()}
    for l, h in heads:
        spec = ad.layers[l]
        for part in parts:
            if part in "kv" and kv == "none":
                continue
            proj = getattr(spec, part)
            g = h if part in "qo" else h // ad.group_size
            wname = names[id(proj.module.weight)]
            m = masks[wname]
            mm = m if proj.kind == "linear" else m.t()  # [out, in] view
            if part == "o":
                mm[:, g * D:(g + 1) * D] = True
            else:
                mm[proj.out_offset + g * D: proj.out_offset + (g + 1) * D] = True
                if bias and proj.module.bias is not None:
                    masks[names[id(proj.module.bias)]][proj.out_offset + g * D: proj.out_offset + (g + 1) * D] = True
    return masks


@pytest.mark.parametrize("arch, kv", [("llama", "group"), ("mistral", "group"), ("mistral", "none"),
                                      ("qwen2", "group"), ("qwen2", "none"), ("gpt2", "group")])
def test_one_sgd_step_equals_full_autograd_on_the_slices_and_nothing_else(arch, kv):
    model = tiny_model(arch, **ARCHS[arch])
    ref = copy.deepcopy(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids, lr = _ids(), 0.5

    adapter = attach(model, HEADS, "qkvo", kv=kv)
    opt = torch.optim.SGD(adapter.parameters(), lr=lr)
    _loss(model, ids).backward()
    opt.step()
    merged = adapter.merge()

    for p in ref.parameters():
        p.requires_grad_(True)
    _loss(ref, ids).backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    masks = _selected_masks(model, HEADS, "qkvo", kv=kv)
    n_sel = 0
    for name, p in merged.named_parameters():
        m = masks[name]
        n_sel += int(m.sum())
        assert torch.equal(p.detach()[~m], before[name][~m]), f"{name} changed outside the selected slices"
        if m.any():
            want = before[name][m] - lr * ref_grads[name][m]
            torch.testing.assert_close(p.detach()[m], want, atol=1e-6, rtol=1e-5)
            assert not torch.equal(p.detach()[m], before[name][m]), f"{name}: the selected slices did not move"
    assert n_sel == sum(q.numel() for q in adapter.parameters())
    assert all(p.requires_grad for p in merged.parameters())  # flags as before attach (all trainable)


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("parts, kv", [("qkvo", "group"), ("qo", "group"), ("qkvo", "none"), ("kv", "group")])
def test_parameters_hold_exactly_the_slices(arch, parts, kv):
    model = tiny_model(arch, **ARCHS[arch])
    ad = adapter_for(model)
    D, E, S = ad.head_dim, ad.hidden_size, len(HEADS)
    layers = {}
    for l, h in HEADS:
        layers.setdefault(l, set()).add(h)
    q_o = S * D * E
    kv_heads = sum(len({h // ad.group_size for h in hs}) for hs in layers.values())
    bias = ad.has_qkv_bias
    want = 0
    if "q" in parts:
        want += q_o + (S * D if bias else 0)
    if "o" in parts:
        want += q_o
    if kv == "group":
        for part in "kv":
            if part in parts:
                want += kv_heads * D * E + (kv_heads * D if bias else 0)
    adapter = attach(model, HEADS, parts, kv=kv)
    assert sum(p.numel() for p in adapter.parameters()) == want == adapter.num_trainable()
    assert all(p.dtype == torch.float32 and p.requires_grad and not p.any() for p in adapter.parameters())
    assert not any(p.requires_grad for p in model.parameters())
    masks = _selected_masks(model, HEADS, parts, kv=kv)
    assert sum(int(m.sum()) for m in masks.values()) == want


@pytest.mark.parametrize("arch", list(ARCHS))
def test_forward_merge_and_detach(arch):
    model = tiny_model(arch, **ARCHS[arch])
    model.lm_head.weight.requires_grad_(False)  # a flag that attach/detach must put back as it was
    flags = [p.requires_grad for p in model.parameters()]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = _ids(1)
    base = model(ids).logits

    adapter = attach(model, HEADS, "qkvo")
    assert torch.equal(model(ids).logits, base)  # zero deltas: the stock forward, bit for bit
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_(0, 0.05, generator=torch.Generator().manual_seed(p.numel()))
    attached = model(ids).logits
    assert not torch.allclose(attached, base)

    adapter.detach()
    assert adapter.state == "detached"
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert torch.equal(model(ids).logits, base)
    for mod in model.modules():
        assert "forward" not in mod.__dict__
    with pytest.raises(RuntimeError, match="already detached"):
        adapter.merge()

    adapter2 = attach(model, HEADS, "qkvo")
    with torch.no_grad():
        for p2, p in zip(adapter2.parameters(), adapter.parameters()):
            p2.copy_(p)
    assert torch.equal(model(ids).logits, attached)
    merged = adapter2.merge()
    assert type(merged) is type(model) and merged is model
    assert torch.equal(merged(ids).logits, attached)  # merge rounds exactly like the attached forward
    assert [p.requires_grad for p in model.parameters()] == flags


def test_gradients_with_nonzero_deltas_match_autograd_of_the_merged_model():
    """Slices already trained: dX through W+Δ (not just W) must reach the lower layers' slices."""
    model = tiny_model("mistral", n_layers=3, n_kv_heads=2)
    adapter = attach(model, HEADS, "qkvo", kv="group")  # shared K/V rows too (the default, "whole", trains fewer)
    with torch.no_grad():
        for i, p in enumerate(adapter.parameters()):
            p.normal_(0, 0.1, generator=torch.Generator().manual_seed(i))
    ids = _ids(2)
    _loss(model, ids).backward()
    merged = copy.deepcopy(model)
    for mod in merged.modules():  # the copy carries the patched forwards: unpatch it, then merge by hand
        mod.__dict__.pop("forward", None)
    ref_adapter = attach(merged, HEADS, "qkvo", kv="group")
    with torch.no_grad():
        for p2, p in zip(ref_adapter.parameters(), adapter.parameters()):
            p2.copy_(p)
    merged = ref_adapter.merge()
    for p in merged.parameters():
        p.requires_grad_(True)
    _loss(merged, ids).backward()
    masks = _selected_masks(merged, HEADS, "qkvo")
    ref_grads = {n: p.grad for n, p in merged.named_parameters()}
    got = torch.cat([p.grad.reshape(-1) for p in adapter.parameters()])
    # Same elements, gathered in the adapter's packing order, via base_slices' layout.
    want = []
    ad = adapter_for(merged)
    for name, (part, l, local) in adapter.slices.items():
        proj = getattr(ad.layers[l], part)
        g = ref_grads[[n for n, p in merged.named_parameters() if p is proj.module.weight][0]]
        g = g if proj.kind == "linear" else g.t()
        D = ad.head_dim
        want.append(torch.stack([g[:, h * D:(h + 1) * D] if part == "o" else g[h * D:(h + 1) * D]
                                 for h in local]).reshape(-1))
    torch.testing.assert_close(got, torch.cat(want), atol=1e-5, rtol=1e-4)
    assert sum(int(m.sum()) for m in masks.values()) == got.numel()


def test_nothing_below_the_lowest_layer_is_differentiated_and_o_proj_keeps_only_its_columns():
    # head_dim 6 * 4 heads = 24 != hidden 32, so an o_proj input (last dim 24) is recognisable.
    model = tiny_model("llama", n_layers=4, n_heads=4, head_dim=6)
    ad = adapter_for(model)
    seen = {}
    for i, layer in enumerate(ad.layers):
        layer.block.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, (out[0] if isinstance(out, tuple) else out).requires_grad))
    embed_grad = []
    ad.embed.register_forward_hook(lambda m, a, out: embed_grad.append(out.requires_grad))

    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    ids = _ids(3, B=2, T=7)
    # Control: plain autograd with a trainable o_proj weight keeps the whole o_proj input.
    ad.layers[2].o.module.weight.requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _loss(model, ids)
    full_z = [(2, 7, 24), (14, 24)]  # the o_proj input, batched or flattened (weights are [32, 24])
    assert any(s in full_z for s in saved)
    ad.layers[2].o.module.weight.requires_grad_(False)

    adapter = attach(model, [(2, 1), (3, 0), (3, 2)], "qkvo")
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = _loss(model, ids)
    assert embed_grad[-1] is False
    assert seen == {0: False, 1: False, 2: True, 3: True}
    assert not any(s in full_z for s in saved), "a full o_proj input was kept for backward"
    assert (14, 6) in saved and (14, 12) in saved  # Z[:, cols] of layer 2 (1 head) and layer 3 (2 heads)
    loss.backward()
    assert all(p.grad is not None for p in adapter.parameters())
    assert all(p.grad is None for p in model.parameters())


def test_optimizers_clipping_autocast_and_optimizer_state_saving(tmp_path):
    model = tiny_model("qwen2", **ARCHS["qwen2"])
    adapter = attach(model, HEADS, "qkvo")
    opt = torch.optim.AdamW(adapter.parameters(), lr=1e-3, weight_decay=0.1)
    ids = _ids(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = _loss(model, ids)
    loss.backward()
    assert all(p.grad.dtype == torch.float32 and p.grad.abs().sum() > 0 for p in adapter.parameters())
    norm = torch.nn.utils.clip_grad_norm_(adapter.parameters(), 1e-3)
    assert norm > 1e-3
    opt.step()
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    opt2 = torch.optim.AdamW(adapter.parameters(), lr=1e-3, weight_decay=0.1)
    opt2.load_state_dict(torch.load(tmp_path / "opt.pt"))
    state_elems = sum(v.numel() for s in opt2.state.values() for k, v in s.items() if k != "step")
    assert state_elems == 2 * adapter.num_trainable()  # two moments per trained element, nothing more


def test_save_load_merge_reproduces_logits_and_refuses_other_models(tmp_path):
    model = tiny_model("gpt2", **ARCHS["gpt2"])
    adapter = attach(model, HEADS, "qkvo")
    with torch.no_grad():
        for i, p in enumerate(adapter.parameters()):
            p.normal_(0, 0.05, generator=torch.Generator().manual_seed(i))
    ids = _ids(5)
    adapter.save(tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "pinpoint_adapter.json").read_text())
    assert not (tmp_path / "a" / "adapter_config.json").exists()   # PEFT's file name stays free
    assert cfg["heads"] == [list(h) for h in HEADS] and cfg["parts"] == "qkvo"
    assert cfg["model_config"]["model_type"] == "gpt2" and cfg["base_fingerprint"].startswith("sha256:")
    want = adapter.merge()(ids).logits

    fresh = tiny_model("gpt2", **ARCHS["gpt2"])  # same seed: the same base weights
    loaded = PinpointAdapter.load(tmp_path / "a", fresh)
    assert loaded.heads == tuple(HEADS)
    assert torch.equal(loaded.merge()(ids).logits, want)

    other = tiny_model("gpt2", seed=1, **ARCHS["gpt2"])
    with pytest.raises(AdapterMismatchError, match="base weights .* differ"):
        PinpointAdapter.load(tmp_path / "a", other)
    assert all("forward" not in m.__dict__ for m in other.modules())
    PinpointAdapter.load(tmp_path / "a", other, check_fingerprint=False).detach()
    with pytest.raises(AdapterMismatchError, match="n_heads: adapter 4 vs model 8"):
        PinpointAdapter.load(tmp_path / "a", tiny_model("gpt2", n_layers=3, n_heads=8))
    with pytest.raises(AdapterMismatchError, match="arch: adapter 'gpt2' vs model 'llama'"):
        PinpointAdapter.load(tmp_path / "a", tiny_model("llama", n_layers=3))
    with pytest.raises(FileNotFoundError, match="no pinpoint adapter"):
        PinpointAdapter.load(tmp_path / "missing", fresh)


def test_random_heads_are_seeded_and_distinct():
    model = tiny_model("llama", n_layers=4)
    a = random_heads(model, 5, seed=3)
    assert a == random_heads(model, 5, seed=3) != random_heads(model, 5, seed=4)
    assert len(set(a)) == 5 and all(0 <= l < 4 and 0 <= h < 4 for l, h in a)
    with pytest.raises(ValueError, match="k must be an int in 1..16"):
        random_heads(model, 17)


@pytest.mark.parametrize("heads, parts, kv, exc, match", [
    ([], "qkvo", "group", ValueError, r"heads is empty"),
    ([(1, 0), (1, 0)], "qkvo", "group", ValueError, r"heads\[1\] = \(1, 0\) is a duplicate"),
    ([(3, 0)], "qkvo", "group", ValueError, r"layer 3 is out of range; the model has 3 layers"),
    ([(0, 4)], "qkvo", "group", ValueError, r"head 4 is out of range; each layer has 4 query heads"),
    ([(0, -1)], "qkvo", "group", ValueError, r"head -1 is out of range"),
    ([(0, 1, 2)], "qkvo", "group", TypeError, r"is not a \(layer, head\) pair"),
    ([(0, 1.5)], "qkvo", "group", TypeError, r"layer and head must be ints"),
    ("all", "qkvo", "group", TypeError, r"got the string 'all'"),
    ([(0, 1)], "qkx", "group", ValueError, r"parts: 'x' is not a part; use letters from 'qkvo'"),
    ([(0, 1)], "", "group", ValueError, r"parts is empty"),
    ([(0, 1)], "qq", "group", ValueError, r"repeats a letter"),
    ([(0, 1)], "qkvo", "all", ValueError, r"kv must be 'group'"),
])
def test_bad_input(heads, parts, kv, exc, match):
    model = tiny_model("llama", n_layers=3)
    with pytest.raises(exc, match=match):
        attach(model, heads, parts, kv=kv)
    assert all(p.requires_grad for p in model.parameters())  # a refused attach leaves the model alone


def test_attach_twice_is_refused():
    model = tiny_model("llama", n_layers=3)
    a = attach(model, [(0, 1)])
    with pytest.raises(RuntimeError, match="already has a pinpoint adapter attached"):
        attach(model, [(1, 1)])
    a.detach()
    attach(model, [(1, 1)]).detach()


# --- kv rules under GQA, accelerate hooks, the sampled fingerprint ----------------------------


def _kv_rows_changed(model, before, layer, part):
    """KV heads (of head_dim rows each) whose k_proj/v_proj rows differ from ``before``."""
    ad = adapter_for(model)
    name = f"model.layers.{layer}.self_attn.{part}_proj.weight"
    w = dict(model.named_parameters())[name].detach()
    D = ad.head_dim
    return [g for g in range(ad.n_kv_heads) if not torch.equal(w[g * D:(g + 1) * D], before[name][g * D:(g + 1) * D])]


@pytest.mark.parametrize("kv, changed_l1, changed_l2", [("whole", [], [1]), ("group", [0, 1], [1]),
                                                        ("none", [], [])])
def test_kv_rules_decide_which_keys_and_values_change(kv, changed_l1, changed_l2):
    # GQA 4/2: layer 1 selects heads 0 and 3 (one of each group), layer 2 the whole group 1 (heads 2, 3)
    heads = [(1, 0), (1, 3), (2, 2), (2, 3)]
    model = tiny_model("mistral", n_layers=3, n_kv_heads=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    adapter = attach(model, heads, "qkvo", kv=kv)
    changes = adapter.kv_changes()
    assert changes["kv_heads"] == [(1, g) for g in changed_l1] + [(2, g) for g in changed_l2]
    assert changes["unselected"] == ([(1, 1), (1, 2)] if kv == "group" else [])
    torch.optim.SGD(adapter.parameters(), lr=0.5).zero_grad()
    _loss(model, _ids()).backward()
    torch.optim.SGD(adapter.parameters(), lr=0.5).step()
    merged = adapter.merge()
    for part in "kv":
        assert _kv_rows_changed(merged, before, 1, part) == changed_l1
        assert _kv_rows_changed(merged, before, 2, part) == changed_l2


def test_whole_kv_with_only_kv_parts_and_no_whole_group_is_refused():
    model = tiny_model("mistral", n_layers=3, n_kv_heads=2)
    with pytest.raises(ValueError, match="nothing to train: .* no KV head has all of its 2 query heads selected"):
        attach(model, [(1, 0)], "kv", kv="whole")
    assert all(p.requires_grad for p in model.parameters())


def test_attach_keeps_accelerate_hooks_and_works_on_offloaded_weights():
    accelerate = pytest.importorskip("accelerate")
    ids = _ids(6)
    ref = tiny_model("qwen2", **ARCHS["qwen2"])
    a = attach(ref, HEADS)
    with torch.no_grad():
        for i, p in enumerate(a.parameters()):
            p.normal_(0, 0.05, generator=torch.Generator().manual_seed(i))
    want = ref(ids).logits

    model = tiny_model("qwen2", **ARCHS["qwen2"])
    accelerate.cpu_offload(model, execution_device=torch.device("cpu"))  # weights on meta, loaded per call
    assert {p.device.type for p in model.parameters()} == {"meta"}
    hooked = model.model.layers[1].self_attn.q_proj
    wrapper = hooked.forward
    b = attach(model, HEADS)
    assert hooked.forward is wrapper  # accelerate's wrapper stays; the patch sits under it
    with torch.no_grad():
        for p, q in zip(b.parameters(), a.parameters()):
            p.copy_(q)
    assert torch.equal(model(ids).logits, want)
    b.detach()
    assert hooked.forward is wrapper and not getattr(hooked._old_forward, "_pinpoint_patch", False)
    assert torch.equal(model(ids).logits, a.detach()(ids).logits)


def test_fingerprint_samples_without_copies_and_sees_changed_slices():
    from pinpoint.fingerprint import SAMPLE, sample_positions, weights_fingerprint

    model = tiny_model("llama", n_layers=3)
    fp = weights_fingerprint(model)
    assert fp == weights_fingerprint(tiny_model("llama", n_layers=3)) != weights_fingerprint(
        tiny_model("llama", n_layers=3, seed=1))
    assert len(sample_positions(10**9)) == SAMPLE and sample_positions(100).tolist() == list(range(100))
    # a changed element at a sampled position changes it, in a big (sampled) tensor too
    w = model.lm_head.weight
    assert w.numel() > 4096
    pos = int(sample_positions(w.numel())[5])
    old = float(w.view(-1)[pos])
    with torch.no_grad():
        w.view(-1)[pos] += 1.0
    assert weights_fingerprint(model) != fp
    with torch.no_grad():
        w.view(-1)[pos] = old
    assert weights_fingerprint(model) == fp
    # a merged adapter (a few head slices) changes it
    adapter = attach(model, [(2, 1)], "q")
    with torch.no_grad():
        adapter.deltas["l2_q"].fill_(1e-3)
    adapter.merge()
    assert weights_fingerprint(model) != fp


def test_fingerprint_of_a_meta_model_is_structural():
    from transformers import AutoModelForCausalLM

    from pinpoint.fingerprint import weights_fingerprint

    config = tiny_model("llama", n_layers=3).config
    with torch.device("meta"):
        a = AutoModelForCausalLM.from_config(config)
        b = AutoModelForCausalLM.from_config(config)
    assert weights_fingerprint(a) == weights_fingerprint(b) != weights_fingerprint(tiny_model("llama", n_layers=3))


def test_adapters_saved_with_the_full_hash_fingerprint_still_load(tmp_path):
    from pinpoint.fingerprint import legacy_fingerprint

    model = tiny_model("llama", n_layers=3)
    adapter = attach(model, HEADS)
    adapter.save(tmp_path)
    cfg = json.loads((tmp_path / "pinpoint_adapter.json").read_text())
    cfg["base_fingerprint"] = legacy_fingerprint(model)
    (tmp_path / "pinpoint_adapter.json").write_text(json.dumps(cfg))
    adapter.detach()
    PinpointAdapter.load(tmp_path, tiny_model("llama", n_layers=3)).detach()
    # an old directory: only the old config name, which was PEFT's
    (tmp_path / "pinpoint_adapter.json").rename(tmp_path / "adapter_config.json")
    PinpointAdapter.load(tmp_path, tiny_model("llama", n_layers=3)).detach()
    with pytest.raises(AdapterMismatchError, match="base weights .* differ"):
        PinpointAdapter.load(tmp_path, tiny_model("llama", n_layers=3, seed=2))


def test_patches_keep_forward_hooks_and_restore_an_existing_instance_forward():
    model = tiny_model("llama", n_layers=3)
    ad = adapter_for(model)
    q = ad.layers[1].q.module
    seen = []
    q.register_forward_hook(lambda m, a, out: seen.append(out.shape))
    own = q.forward  # a bound method someone else installed on the instance
    q.forward = own
    ids = _ids(7)
    adapter = attach(model, HEADS, "qkvo")
    assert q.forward is not own
    model(ids)
    assert len(seen) == 1  # the module's hooks run around the patched computation
    adapter.detach()
    assert q.__dict__["forward"] is own  # put back exactly what was there
    from pinpoint.install import is_patched

    assert not any(is_patched(m) for m in model.modules())


def test_default_kv_changes_no_unselected_heads_keys_or_values():
    """GQA: by default only KV heads whose every reader is selected are trained, so a step on
    the default adapter leaves the K/V of every unselected head exactly as it was."""
    model = tiny_model("mistral", n_layers=3, n_kv_heads=2)   # 2 query heads per KV head
    spec = adapter_for(model)
    G = spec.group_size
    heads = [(1, 0), (1, 1), (2, 2)]                           # layer 1: KV head 0 whole; layer 2: partial
    adapter = attach(model, heads, "qkvo")
    assert adapter.kv_changes()["unselected"] == []
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    merged = adapter.merge()
    base = tiny_model("mistral", n_layers=3, n_kv_heads=2)
    D = spec.head_dim
    for l in range(3):
        for part in ("k_proj", "v_proj"):
            w = getattr(merged.model.layers[l].self_attn, part).weight
            w0 = getattr(base.model.layers[l].self_attn, part).weight
            for g in range(spec.n_kv_heads):
                trained = all((l, h) in heads for h in range(g * G, (g + 1) * G))
                same = torch.equal(w[g * D:(g + 1) * D], w0[g * D:(g + 1) * D])
                assert same != trained, (l, part, g)
    group = attach(tiny_model("mistral", n_layers=3, n_kv_heads=2), heads, "qkvo", kv="group")
    assert sorted(map(tuple, group.kv_changes()["unselected"])) == [(2, 3)]
