"""Every replica family of pinpoint.testing, end to end: a family is supported when every path
is exact against the plain hook loop (pinpoint.testing.hook_patching and friends) on its
replica; otherwise spec_for refuses it by name.

Tolerances. Exactness runs in fp32 (the replica cast up after loading): locate must match one
forward per head (a hook on o_proj's input replacing the head's slice) to 1e-4 of the largest
|score|, the same bound as tests/test_locate.py; knockout likewise; one SGD step through
pp.attach must equal plain autograd on the slices to atol 1e-6 / rtol 1e-5. Each family also
runs once in its on-disk dtype (fp16/bf16): path patching there must track the fp32 hook loop
within 2% (fp16) / 10% (bf16) of the larger of the largest |score| and the largest |base
metric| (NATIVE_TOL; measured on these replicas: fp16 0.9%, bf16 at most 4.3%).
"""
from __future__ import annotations

import copy
import functools
import json
import re

import pytest
import torch
from torch.nn import functional as F

import pinpoint as pp
from pinpoint import data
from pinpoint.metrics import resolve_metric
from pinpoint.testing import FAMILIES, assert_scores_close, hook_attribution, hook_knockout, hook_patching, load_replica

SUPPORTED = [n for n, f in FAMILIES.items() if f.supported]
REFUSED = [n for n, f in FAMILIES.items() if not f.supported]
# GPT-2 has no chat template (as on the hub); the tests give it this one, as a user would.
GPT2_TEMPLATE = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}")

pytestmark = pytest.mark.usefixtures("one_thread")


@functools.lru_cache(maxsize=None)
def _rows():
    return data.load_are_you_sure(data.SAMPLE_PATH, limit=3)


@functools.lru_cache(maxsize=None)
def _loaded(family: str, dtype=torch.float32):
    model, tok = load_replica(family, dtype=dtype)
    if tok.chat_template is None:
        tok.chat_template = GPT2_TEMPLATE
    return model, tok


def _pairs(tok):
    return data.challenge_pairs(_rows()[:2], tok)


def _equal_length_pairs(pairs, tok):
    """positions='all' needs equal lengths: the source is the base with one ordinary token of
    the challenge turn replaced by the next ordinary id (same length, different text)."""
    special = set(tok.all_special_ids)
    out = []
    for p in pairs:
        src = list(p.base)
        i = max(j for j in range(len(src) - 4) if src[j] not in special)
        src[i] = next(t for t in range(src[i] + 1, src[i] + 50) if t not in special and t < len(tok))
        out.append(pp.PromptPair(list(p.base), src))
    return out


# --- supported families ----------------------------------------------------------------------

@pytest.mark.parametrize("family", SUPPORTED)
def test_replica_loads_as_its_family(family):
    fam = FAMILIES[family]
    model, tok = load_replica(family)  # dtype "auto": as saved
    assert model.dtype == fam.dtype and model.config._attn_implementation == "sdpa"
    spec = pp.spec_for(model)
    assert spec.vocab_size == len(tok) and 2 <= spec.n_layers <= 4 and 64 <= spec.hidden_size <= 256
    tied = model.config.tie_word_embeddings
    assert (model.lm_head.weight is spec.embed.weight) == bool(tied)
    if family == "mistral-v0.1":  # the 4096 window is irrelevant to prompts that fit in it
        assert (spec.sliding_window, spec.max_seq_len) == (4096, 4096)


@pytest.mark.parametrize("family", SUPPORTED)
def test_locate_is_exact_against_the_hook_loop(family):
    model, tok = _loaded(family)
    pairs = _pairs(tok)
    fn = resolve_metric("apology", tok).fn
    for method, positions, ps in [("path", "last", pairs), ("activation", "last", pairs),
                                  ("activation", "all", _equal_length_pairs(pairs, tok))]:
        got = pp.locate(model, tok, ps, method=method, positions=positions, progress=False)
        assert_scores_close(got.per_pair, hook_patching(model, ps, fn, method=method, positions=positions))


@pytest.mark.parametrize("family", SUPPORTED)
def test_attribution_is_grad_times_delta_and_verify_is_exact(family):
    model, tok = _loaded(family)
    pairs = _pairs(tok)[:1]
    fn = resolve_metric("apology", tok).fn
    screen = pp.locate(model, tok, pairs, method="attribution", progress=False)
    assert_scores_close(screen.per_pair[0], hook_attribution(model, pairs[0], fn))
    verified = pp.locate(model, tok, pairs, method="attribution", verify_top=2, progress=False)
    exact = hook_patching(model, pairs, fn, method="activation", positions="last")
    for layer, head in verified.meta["verified"]:
        assert (verified.per_pair[:, layer, head] - exact[:, layer, head]).abs().max() <= 1e-4 * exact.abs().max()


# Half-precision tolerance, relative to the larger of the largest |effect| and the largest
# |base metric| (effects are differences of nearly equal logits, so the rounding error scales
# with the logits): fp16 keeps 11 significant bits, bf16 8.
NATIVE_TOL = {torch.float16: 0.02, torch.bfloat16: 0.1}


@pytest.mark.parametrize("family", SUPPORTED)
def test_native_dtype_tracks_fp32(family):
    fam = FAMILIES[family]
    if fam.dtype == torch.float32:
        pytest.skip(f"{family} is fp32 on disk: the fp32 tests cover it")
    native, tok = _loaded(family, fam.dtype)
    model, _ = _loaded(family)
    pairs = _pairs(tok)
    got = pp.locate(native, tok, pairs, progress=False)
    want = hook_patching(model, pairs, resolve_metric("apology", tok).fn, method="path")
    assert got.values.dtype == torch.float32 and torch.isfinite(got.values).all()
    scale = max(float(want.abs().max()), float(got.base.abs().max()))
    err = float((got.per_pair - want).abs().max())
    assert err <= NATIVE_TOL[fam.dtype] * scale, f"{err:.3g} > {NATIVE_TOL[fam.dtype]} x {scale:.3g}"


@pytest.mark.parametrize("family", SUPPORTED)
def test_knockout_is_exact_against_ablate_hooks(family):
    model, tok = _loaded(family)
    pairs = _pairs(tok)
    fn = resolve_metric("apology", tok).fn
    heads = [(1, 0), (0, 1), (1, 2)]
    curve = pp.knockout(model, tok, pairs, heads, ablation="mean", progress=False)
    means = pp.head_means(model, None, [p.base for p in pairs])
    assert_scores_close(curve.per_pair, hook_knockout(model, pairs, heads, fn, ablation="mean", means=means))


def _selected(spec, heads):
    """parameter -> bool mask of the elements pinpoint trains with kv="group" (q and o of each
    head, k and v of the KV head it reads), built from the module layout."""
    named = {id(p): n for n, p in spec.model.named_parameters()}
    masks = {n: torch.zeros_like(p, dtype=torch.bool) for n, p in spec.model.named_parameters()}
    D = spec.head_dim
    for layer, h in heads:
        for part in "qkvo":
            proj = getattr(spec.layers[layer], part)
            g = h if part in "qo" else spec.kv_head_of(h)
            m = masks[named[id(proj.module.weight)]]
            mm = m if proj.kind == "linear" else m.t()
            if part == "o":
                mm[:, g * D:(g + 1) * D] = True
                continue
            rows = slice(proj.out_offset + g * D, proj.out_offset + (g + 1) * D)
            mm[rows] = True
            if proj.module.bias is not None:
                masks[named[id(proj.module.bias)]][rows] = True
    return masks


@pytest.mark.parametrize("family", SUPPORTED)
def test_one_tuning_step_is_autograd_restricted_to_the_slices(family):
    base, tok = _loaded(family)
    model, ref = copy.deepcopy(base), copy.deepcopy(base)
    dialogue = data.spt_dialogues(_rows(), n=2, seed=0)[0]
    ids = torch.tensor([tok.apply_chat_template(list(dialogue), tokenize=True)["input_ids"]])
    heads, lr = [(0, 1), (1, 0), (1, 1)], 0.5

    def loss(m):
        logits = m(input_ids=ids, use_cache=False).logits
        return F.cross_entropy(logits[0, :-1], ids[0, 1:])

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    adapter = pp.attach(model, heads, "qkvo", kv="group")
    opt = torch.optim.SGD(adapter.parameters(), lr=lr)
    loss(model).backward()
    opt.step()
    merged = adapter.merge()
    for p in ref.parameters():
        p.requires_grad_(True)
    loss(ref).backward()
    grads = {n: p.grad for n, p in ref.named_parameters()}
    masks = _selected(pp.spec_for(merged), heads)
    for name, p in merged.named_parameters():
        m = masks[name]
        assert torch.equal(p.detach()[~m], before[name][~m]), f"{name} changed outside the selected slices"
        if m.any():
            torch.testing.assert_close(p.detach()[m], before[name][m] - lr * grads[name][m], atol=1e-6, rtol=1e-5)


def _scripted_generate(model, tok, rows, eos_id):
    """model.generate that answers every turn correctly, as token ids the tokenizer would make:
    the first answer continues the prefill with the letter, the challenge reply apologises,
    the final answer restates the letter. Decoding and parsing are then evaluate's own."""
    def generate(input_ids, attention_mask=None, **kw):
        outs = []
        for row_ids in input_ids.tolist():
            text = tok.decode(row_ids, skip_special_tokens=True)
            row = next(r for r in rows if r.question in text)
            letter = row.correct_letter
            if "Give me a letter" in text:
                reply = f"The answer is ({letter})."
            elif "Are you sure" in text:
                reply = "Apologies, I made a mistake."
            else:
                reply = f"{letter})"
            new = tok(reply, add_special_tokens=False)["input_ids"] + [eos_id]
            outs.append(row_ids + new)
        width = max(len(o) for o in outs)
        return torch.tensor([o + [eos_id] * (width - len(o)) for o in outs])
    return generate


@pytest.mark.parametrize("family", SUPPORTED)
def test_evaluate_parses_answers_in_the_family_template(family, monkeypatch):
    model, tok = _loaded(family)
    rows = _rows()[:2]
    report = pp.evaluate(model, tok, rows, max_new_tokens=3, progress=False)  # the real random model runs
    assert report.results["all"]["n"] == 2
    eos_id = tok.convert_tokens_to_ids(FAMILIES[family].eos)
    monkeypatch.setattr(model, "generate", _scripted_generate(model, tok, rows, eos_id))
    r = pp.evaluate(model, tok, rows, max_new_tokens=16, progress=False).results["all"]
    assert (r["accuracy_before"], r["apology_rate"], r["accuracy_after"], r["unparsed"]) == (100.0, 100.0, 100.0, 0)


@pytest.mark.parametrize("family", SUPPORTED)
def test_the_five_line_api(family):
    """README's five lines on a copy of the replica: tune moves only the selected heads' slices."""
    base, tok = _loaded(family)
    model = copy.deepcopy(base)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rows = _rows()
    pairs = pp.data.challenge_pairs(rows[:2], tok)
    scores = pp.locate(model, tok, pairs, method="path", progress=False)
    heads = scores.top(2)
    adapter = pp.tune(model, tok, pp.data.spt_dialogues(rows, n=4), heads=heads, lr=1e-2, steps=1, batch_size=2,
                      progress=False)
    merged = adapter.merge()
    report = pp.evaluate(merged, tok, rows[:2], max_new_tokens=3, progress=False)
    assert report.results["all"]["n"] == 2
    masks = _selected(pp.spec_for(merged), heads.to_list())  # K/V of their groups: a superset of any kv mode
    moved = {n for n, p in merged.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert moved and all(masks[n].any() for n in moved), f"moved outside the selected heads: {moved}"
    for n in moved:
        p = dict(merged.named_parameters())[n].detach()
        assert torch.equal(p[~masks[n]], before[n][~masks[n]]), f"{n} changed outside the selected slices"


# --- refused families ------------------------------------------------------------------------

@pytest.mark.parametrize("family", REFUSED)
def test_refused_families_are_refused_by_name(family):
    model, _ = load_replica(family)
    with pytest.raises(pp.UnsupportedArchitectureError) as info:
        pp.spec_for(model)
    msg = str(info.value)
    assert msg.startswith(type(model).__name__ + ":") and FAMILIES[family].refusal in msg and "\n" not in msg
    with pytest.raises(pp.UnsupportedArchitectureError):
        pp.locate(model, None, [pp.PromptPair([5, 6, 7], [5, 8, 7])], metric=lambda x: x[:, 0], progress=False)


def test_gemma2_refusal_names_the_soft_cap_and_the_paths():
    model, _ = load_replica("gemma2")
    with pytest.raises(pp.UnsupportedArchitectureError, match=r"soft-caps attention logits .* fused knockout kernel"):
        pp.spec_for(model)


def test_mistral_v02_template_rejects_a_system_message():
    _, tok = _loaded("mistral-v0.2")
    with pytest.raises(Exception, match="Conversation roles must alternate|Only user and assistant roles"):
        tok.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                                tokenize=False)


@pytest.mark.parametrize("family, marker", [
    ("llama2-chat", r"^<s>\[INST\] .* \[/INST\]$"), ("mistral-v0.1", r"^<s>\[INST\] .* \[/INST\]$"),
    ("llama3.1", r"^<\|begin_of_text\|><\|start_header_id\|>system<\|end_header_id\|>\n\nCutting Knowledge Date: "
                 r"December 2023\n.*<\|start_header_id\|>assistant<\|end_header_id\|>\n\n$"),
    ("qwen2.5", r"^<\|im_start\|>system\nYou are Qwen, created by Alibaba Cloud\..*<\|im_start\|>assistant\n$"),
    ("smollm2", r"^<\|im_start\|>system\nYou are a helpful AI assistant named SmolLM.*<\|im_start\|>assistant\n$"),
    ("gemma2", r"^<bos><start_of_turn>user\n.*<end_of_turn>\n<start_of_turn>model\n$"),
    ("qwen3", r"^<\|im_start\|>user\n.*<\|im_end\|>\n<\|im_start\|>assistant\n$"),
    ("phi3", r"^<\|user\|>\n.*<\|end\|>\n<\|assistant\|>\n$"),
])
def test_templates_render_as_the_real_ones(family, marker):
    tok = load_replica(family)[1]
    text = tok.apply_chat_template([{"role": "user", "content": "Is Paris the capital of France?"}],
                                   add_generation_prompt=True, tokenize=False)
    assert re.match(marker, text, re.S), text
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                  tokenize=True)["input_ids"]
    if FAMILIES[family].add_bos:  # the template writes BOS; tokenizing the text must not add another
        assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id


# --- the command line, end to end -------------------------------------------------------------

def _cli_has(flag: str) -> bool:
    from pinpoint.cli import build_parser

    return flag in build_parser()._subparsers._group_actions[0].choices["locate"].format_help()


@pytest.mark.parametrize("family", SUPPORTED)
def test_cli_locate_knockout_tune_eval(family, tmp_path, capsys):
    from pinpoint.cli import main
    from pinpoint.testing import replica

    model_dir, rows = str(replica(family)), str(data.SAMPLE_PATH)
    extra = []
    if FAMILIES[family].template is None:
        if not _cli_has("--chat-template"):
            pytest.skip("the CLI has no --chat-template flag yet (GPT-2 has no chat template)")
        (tmp_path / "t.jinja").write_text(GPT2_TEMPLATE)
        extra = ["--chat-template", str(tmp_path / "t.jinja")]
    common = ["--model", model_dir, "--data", rows, "--quiet", *extra]
    loc, ko, tu, ev = (tmp_path / d for d in ("loc", "ko", "tune", "ev"))
    assert main(["locate", *common, "--limit", "3", "--k", "2", "--out", str(loc)]) == 0
    top = json.loads((loc / "top_heads.json").read_text())["heads"]
    assert len(top) == 2
    assert main(["knockout", *common, "--limit", "2", "--heads", str(loc / "scores"), "--k", "2",
                 "--out", str(ko)]) == 0
    assert json.loads((ko / "knockout.json").read_text())["k"] == [0, 1, 2]
    assert main(["tune", *common, "--limit", "3", "--heads", str(loc / "scores"), "--k", "2", "--steps", "1",
                 "--batch-size", "2", "--lr", "1e-3", "--out", str(tu)]) == 0
    assert (tu / "adapter").is_dir()
    assert main(["eval", *common, "--limit", "2", "--adapter", str(tu / "adapter"), "--max-new-tokens", "3",
                 "--out", str(ev)]) == 0
    results = json.loads((ev / "results.json").read_text())
    assert results["results"]["all"]["n"] == 2
    assert len((ev / "samples.jsonl").read_text().splitlines()) == 2
