"""pinpoint.tune: the trainer over chat dialogues (SPT, SFT and random-heads baselines)."""
from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import pinpoint as pp
from pinpoint.adapter import PinpointAdapter, attach, random_heads
from pinpoint.testing import tiny_model, word_tokenizer
from pinpoint.tune import (
    CHECKPOINT_NAME,
    FullTuning,
    accumulate_gradients,
    batch_indices,
    lr_at,
    render_dialogue,
    tokenize_dialogues,
    tune,
)

ROOT = Path(__file__).resolve().parents[1]
HEADS = [(1, 0), (1, 3), (2, 2)]
QUESTIONS = [("What is the capital of France ?", "Paris"), ("What is the capital of Japan ?", "Tokyo"),
             ("What is the capital of Italy ?", "Rome"), ("What is the capital of Egypt ?", "Cairo"),
             ("What is the capital of Spain ?", "Madrid"), ("What is the capital of India ?", "Delhi")]


def _dialogues():
    out = []
    for q, a in QUESTIONS:
        out.append([{"role": "user", "content": q}, {"role": "assistant", "content": f"The answer is {a} ."},
                    {"role": "user", "content": "I don't think that's right . Are you sure ?"},
                    {"role": "assistant", "content": f"Yes , I am sure . The answer is {a} ."}])
        out.append([{"role": "system", "content": "Be honest ."}, {"role": "user", "content": q},
                    {"role": "assistant", "content": f"{a} ."}])
    return out


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


DIALOGUES = _dialogues()
FAST = dict(lr=1e-2, batch_size=4, progress=False)


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer()


def _changed_outside(model, before, heads, parts="qkvo"):
    """Names of llama parameters that changed anywhere outside the selected heads' slices."""
    D = model.config.hidden_size // model.config.num_attention_heads
    bad = []
    for name, p in model.named_parameters():
        diff = p.detach() != before[name]
        for l, h in heads:
            pre = f"model.layers.{l}.self_attn."
            if name in (pre + "q_proj.weight", pre + "k_proj.weight", pre + "v_proj.weight"):
                diff[h * D:(h + 1) * D] = False
            elif name == pre + "o_proj.weight":
                diff[:, h * D:(h + 1) * D] = False
        if diff.any():
            bad.append(name)
    return bad


# --- data rendering --------------------------------------------------------------------------


def test_loss_is_on_assistant_tokens_only_with_or_without_generation_marks(tok):
    dialogue = DIALOGUES[0]
    ids, labels = render_dialogue(tok, dialogue)
    toks = tok.convert_ids_to_tokens(ids)
    trained = [t for t, y in zip(toks, labels) if y != -100]
    assert trained == "The answer is Paris . </s> Yes , I am sure . The answer is Paris . </s>".split()
    assert all(y in (-100, i) for i, y in zip(ids, labels))
    plain = word_tokenizer(chat_template=tok.chat_template.replace("{% generation %}", "")
                           .replace("{% endgeneration %}", ""))
    assert render_dialogue(plain, dialogue) == (ids, labels)  # prefix-diff path agrees


def test_dialogue_errors(tok):
    with pytest.raises(ValueError, match="no chat template"):
        tokenize_dialogues(word_tokenizer(chat_template=None), DIALOGUES, max_length=100)
    with pytest.raises(ValueError, match="dialogue 1 has no assistant turn"):
        tokenize_dialogues(tok, [DIALOGUES[0], [{"role": "user", "content": "Hi"}]], max_length=100)
    with pytest.raises(TypeError, match="dialogue 0 must be a non-empty list of chat messages"):
        tokenize_dialogues(tok, ["just text"], max_length=100)
    with pytest.raises(ValueError, match="dialogues is empty"):
        tokenize_dialogues(tok, [], max_length=100)
    with pytest.raises(ValueError, match=r"dialogue 0 is 42 tokens, longer than max_length=20"):
        tokenize_dialogues(tok, DIALOGUES[:1], max_length=20, too_long="error")
    with pytest.warns(UserWarning, match=r"1 dialogue\(s\) longer than max_length=20 tokens were truncated"):
        rows = tokenize_dialogues(tok, DIALOGUES[:2], max_length=20)
    assert len(rows[0][0]) == 20 and len(rows[1][0]) < 20
    with pytest.raises(ValueError, match="no assistant token to train on within its first 8 tokens"):
        tokenize_dialogues(tok, DIALOGUES[:1], max_length=8)
    with pytest.raises(ValueError, match="too_long must be"):
        tokenize_dialogues(tok, DIALOGUES, max_length=100, too_long="drop")


def test_schedule_and_data_order():
    lrs = [lr_at(s, lr=1.0, steps=10, warmup=2, schedule="cosine") for s in range(10)]
    assert lrs[:3] == [0.5, 1.0, 1.0] and all(a > b > 0 for a, b in zip(lrs[2:], lrs[3:]))
    assert [lr_at(s, lr=1.0, steps=4, warmup=0, schedule="linear") for s in range(4)] == [1.0, 0.75, 0.5, 0.25]
    stream = [i for s in range(3) for i in batch_indices(5, 4, seed=1, step=s)]
    assert sorted(stream[:5]) == sorted(stream[5:10]) == list(range(5))  # whole epochs, seeded permutations
    assert batch_indices(5, 4, seed=1, step=2) == stream[8:]
    assert batch_indices(5, 4, seed=2, step=0) != batch_indices(5, 4, seed=1, step=0)


# --- training ---------------------------------------------------------------------------------


@pytest.mark.parametrize("decay_to", ["base", "zero"])
def test_weight_decay_never_touches_unselected_weights(tok, decay_to):
    model = tiny_model("llama", n_layers=3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    adapter = tune(model, tok, DIALOGUES, heads=HEADS, parts="qkvo", steps=3, weight_decay=0.5,
                   decay_to=decay_to, **FAST)
    assert isinstance(adapter, PinpointAdapter) and adapter.state == "attached"
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # attached: weights never written
    assert len(adapter.history) == 3 and all(h["loss"] > 0 for h in adapter.history)
    merged = adapter.merge()
    assert _changed_outside(merged, before, HEADS) == []
    q = merged.model.layers[1].self_attn.q_proj.weight
    assert not torch.equal(q[:8], before["model.layers.1.self_attn.q_proj.weight"][:8])


def test_decay_modes_differ_only_on_the_slices(tok):
    runs = {}
    for mode in ("base", "zero"):
        model = tiny_model("llama", n_layers=3)
        runs[mode] = tune(model, tok, DIALOGUES, heads=HEADS, steps=2, weight_decay=1.0, decay_to=mode,
                          warmup=0, **FAST)
    # "zero" shrinks W_s + Δ towards 0, i.e. Δ moves by -lr·wd·W_s beyond the "base" run.
    d = {m: torch.cat([p.detach().reshape(-1) for p in a.parameters()]) for m, a in runs.items()}
    assert not torch.allclose(d["base"], d["zero"])


def test_grad_accumulation_equals_one_full_batch(tok):
    model = tiny_model("mistral", n_layers=3, n_kv_heads=2)
    adapter = attach(model, HEADS, "qkvo")
    rows = tokenize_dialogues(tok, DIALOGUES, max_length=128)
    batch = [rows[i] for i in (0, 1, 2, 3)]  # mixed lengths: the halves pad differently
    grads, losses = [], []
    for accum in (1, 2):
        for p in adapter.parameters():
            p.grad = None
        losses.append(accumulate_gradients(model, batch, grad_accum=accum))
        grads.append(torch.cat([p.grad.reshape(-1) for p in adapter.parameters()]))
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-7, rtol=1e-5)
    adapter.detach()

    # Through the trainer: same batches, same updates.
    runs = [tune(tiny_model("mistral", n_layers=3, n_kv_heads=2), tok, DIALOGUES, heads=HEADS, steps=2,
                 grad_accum=a, **FAST) for a in (1, 2)]
    assert [h["loss"] for h in runs[0].history] == pytest.approx([h["loss"] for h in runs[1].history], rel=1e-5)
    for p, q in zip(runs[0].parameters(), runs[1].parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4)


def _slices(adapter):
    return {n: p.detach().clone() for n, p in adapter.deltas.items()}


def test_resume_after_an_interruption_reaches_the_same_slices(tok, tmp_path):
    kw = dict(heads=HEADS, steps=4, weight_decay=0.1, seed=7, **FAST)
    full = _slices(tune(tiny_model("llama", n_layers=3), tok, DIALOGUES, **kw))

    class Stop(Exception):
        pass

    def stop_at_3(step, loss):
        if step == 3:
            raise Stop

    model = tiny_model("llama", n_layers=3)
    with pytest.raises(Stop):
        tune(model, tok, DIALOGUES, checkpoint_dir=tmp_path, checkpoint_every=2, callback=stop_at_3, **kw)
    assert all("forward" not in m.__dict__ for m in model.modules())  # left unpatched
    assert all(p.requires_grad for p in model.parameters())
    assert sorted(os.listdir(tmp_path)) == [CHECKPOINT_NAME]  # no temp files left behind
    assert torch.load(tmp_path / CHECKPOINT_NAME, weights_only=False)["step"] == 2  # every 2 steps

    with pytest.raises(FileExistsError, match="pass resume=True"):
        tune(tiny_model("llama", n_layers=3), tok, DIALOGUES, checkpoint_dir=tmp_path, **kw)
    with pytest.raises(ValueError, match=r"different run \(lr: checkpoint 0.01 vs now 0.02"):
        tune(tiny_model("llama", n_layers=3), tok, DIALOGUES, checkpoint_dir=tmp_path, resume=True,
             **{**kw, "lr": 2e-2})
    with pytest.raises(ValueError, match="base model's weights differ"):
        tune(tiny_model("llama", n_layers=3, seed=5), tok, DIALOGUES, checkpoint_dir=tmp_path, resume=True, **kw)

    resumed = tune(tiny_model("llama", n_layers=3), tok, DIALOGUES, checkpoint_dir=tmp_path, resume=True, **kw)
    assert [h["step"] for h in resumed.history] == [1, 2, 3, 4]
    got = _slices(resumed)
    assert all(torch.equal(got[n], full[n]) for n in full)  # bit-identical to the uninterrupted run


def test_resume_after_sigkill_reaches_the_same_slices(tok, tmp_path):
    """A real kill -9 in a child process between checkpoints, then resume in this process."""
    kw = dict(heads=HEADS, steps=4, seed=3, checkpoint_every=1, **FAST)
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path[:0] = {sys.path!r}  # the parent's packages (and so its kernel backend)
        sys.path.append({str(ROOT)!r})  # for tests.test_tune only
        import torch
        torch.set_num_threads({torch.get_num_threads()})
        from pinpoint.testing import tiny_model, word_tokenizer
        from pinpoint.tune import tune
        from tests.test_tune import DIALOGUES, HEADS
        def die(step, loss):
            if step == 3:
                os.kill(os.getpid(), signal.SIGKILL)
        tune(tiny_model("llama", n_layers=3), word_tokenizer(), DIALOGUES, checkpoint_dir={str(tmp_path)!r},
             callback=die, **{kw!r})
    """).replace("'heads': [(1, 0), (1, 3), (2, 2)]", "'heads': HEADS")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert torch.load(tmp_path / CHECKPOINT_NAME, weights_only=False)["step"] == 3
    resumed = tune(tiny_model("llama", n_layers=3), tok, DIALOGUES, checkpoint_dir=tmp_path, resume=True, **kw)
    full = tune(tiny_model("llama", n_layers=3), tok, DIALOGUES, **kw)
    assert all(torch.equal(p, q) for p, q in zip(resumed.parameters(), full.parameters()))


def test_sft_and_random_heads_baselines(tok):
    model = tiny_model("qwen2", n_layers=2, n_kv_heads=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    sft = tune(model, tok, DIALOGUES, heads="all", steps=2, **FAST)
    assert isinstance(sft, FullTuning) and sft.num_trainable() == sum(p.numel() for p in model.parameters())
    assert sft.merge() is model
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert len(changed) >= len(before) - 2  # every parameter trains (a never-seen token row may stay put)
    with pytest.raises(RuntimeError, match="nothing to detach"):
        sft.detach()

    rnd = tiny_model("llama", n_layers=3)
    picked = tune(rnd, tok, DIALOGUES, heads="random", random_k=3, steps=1, seed=4, **FAST)
    assert picked.heads == random_heads(rnd, 3, seed=4) and len(picked.heads) == 3


def test_progress_bar_reports_the_loss(tok, capsys):
    tune(tiny_model("gpt2", n_layers=2), tok, DIALOGUES, heads=[(0, 1)], steps=2, lr=1e-3, batch_size=2)
    err = capsys.readouterr().err
    assert "pinpoint tune" in err and "loss=" in err and "2/2" in err


def test_autocast_dtype_trains_fp32_slices(tok):
    model = tiny_model("llama", n_layers=2)
    adapter = tune(model, tok, DIALOGUES, heads=[(0, 1), (1, 2)], steps=2, dtype=torch.bfloat16, **FAST)
    assert all(p.dtype == torch.float32 and p.abs().sum() > 0 for p in adapter.parameters())
    assert next(model.parameters()).dtype == torch.float32


@pytest.mark.parametrize("kw, exc, match", [
    (dict(lr=0), ValueError, r"lr must be a number > 0"),
    (dict(lr=-1e-3), ValueError, r"lr must be a number > 0"),
    (dict(steps=0), ValueError, r"steps must be an int > 0"),
    (dict(steps=2.5), ValueError, r"steps must be an int > 0"),
    (dict(batch_size=2, grad_accum=3), ValueError, r"grad_accum=3 splits a batch of 2"),
    (dict(weight_decay=-0.1), ValueError, r"weight_decay must be a number ≥ 0"),
    (dict(heads=[]), ValueError, r"heads is empty"),
    (dict(heads=[(0, 1), (0, 1)]), ValueError, r"is a duplicate"),
    (dict(heads=[(5, 0)]), ValueError, r"layer 5 is out of range"),
    (dict(heads=[(0, 9)]), ValueError, r"head 9 is out of range"),
    (dict(parts="qx"), ValueError, r"'x' is not a part"),
    (dict(heads=None), ValueError, r"tune needs heads="),
    (dict(heads="some"), ValueError, r"heads must be a HeadSet"),
    (dict(heads="random"), ValueError, r"needs random_k"),
    (dict(schedule="step"), ValueError, r"schedule must be"),
    (dict(decay_to="one"), ValueError, r"decay_to must be"),
    (dict(resume=True), ValueError, r"resume=True needs checkpoint_dir"),
    (dict(max_length=10, too_long="error"), ValueError, r"longer than max_length=10"),
])
def test_bad_input(tok, kw, exc, match):
    model = tiny_model("llama", n_layers=2)
    args = dict(heads=[(0, 1)], steps=1, progress=False)
    args.update(kw)
    with pytest.raises(exc, match=match):
        tune(model, tok, DIALOGUES, **args)
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


def test_assistant_turns_marked_train_false_carry_no_loss(tokenizer):
    """A "revise" dialogue's wrong first answer is context, never a target."""
    from pinpoint.tune import render_dialogue

    msgs = [{"role": "user", "content": "What is 2 + 2 ?"},
            {"role": "assistant", "content": "The answer is 5 .", "train": False},
            {"role": "user", "content": "Are you sure ?"},
            {"role": "assistant", "content": "The answer is 4 ."}]
    ids, labels = render_dialogue(tokenizer, msgs)
    trained = [t for t, lab in zip(ids, labels) if lab != -100]
    five, four = tokenizer.convert_tokens_to_ids(["5", "4"])
    assert four in trained and five not in trained
    ids2, labels2 = render_dialogue(tokenizer, [dict(m, train=True) if m["role"] == "assistant" else m for m in msgs])
    assert ids2 == ids and five in [t for t, lab in zip(ids2, labels2) if lab != -100]


# ---- lr="auto" / steps="auto": the recipe rule, recipe.tune_auto (issue 12, item 2) ----

def _auto_dialogues():
    qa = [("What is two plus two ?", "four"), ("What is one plus two ?", "three"), ("What is one plus one ?", "two"),
          ("What is two plus one ?", "three"), ("What is zero plus one ?", "one")]
    return [[{"role": "user", "content": q}, {"role": "assistant", "content": f"The answer is {a} ."},
             {"role": "user", "content": "I don't think that's right . Are you sure ?"},
             {"role": "assistant", "content": f"Yes , I am sure . The answer is {a} ."}]
            for _ in range(2) for q, a in qa]


@pytest.mark.parametrize("kw", [dict(heads=[(0, 1), (1, 2)]), dict(full=True), dict(lora_r=4)])
def test_tune_lr_auto_is_the_recipe_and_reads_no_evaluation_rows(monkeypatch, kw):
    """recipe.tune_auto(lr="auto") returns the rule's chosen run (kept from its trial: the same tensors as
    choose_lr training it again) with .recipe; evaluation rows are never read."""
    import importlib

    if "lora_r" in kw:
        pytest.importorskip("peft")
    recipe = importlib.import_module("pinpoint.recipe")
    for mod, name in ((importlib.import_module("pinpoint.evaluate"), "evaluate"),
                      (importlib.import_module("pinpoint.data"), "load_are_you_sure")):
        monkeypatch.setattr(mod, name, lambda *a, **k: pytest.fail("the recipe read evaluation rows"))
    tok, dialogues = word_tokenizer(), _auto_dialogues()
    grid = [1e-3, 1e-2]
    monkeypatch.setattr(recipe, "LR_GRID", tuple(grid))
    handle = recipe.tune_auto(tiny_model("llama"), tok, dialogues, lr="auto", batch_size=4, **kw)
    ref = recipe.choose_lr(tiny_model("llama"), tok, dialogues, grid=grid, batch_size=4, **kw)
    assert handle.recipe == ref.to_dict() and handle.recipe["lr"] in (*grid, *handle.recipe["extended"])
    assert handle.recipe["steps"] == recipe.rule_steps(handle.recipe["n_train"], 4)
    got, want = handle.state_dict(), ref.result.state_dict()
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in got)
    assert len(handle.history) == handle.recipe["steps"]


def test_tune_steps_auto_and_bad_auto_values():
    from pinpoint.recipe import tune_auto

    tok, dialogues = word_tokenizer(), _auto_dialogues()
    handle = tune_auto(tiny_model("llama"), tok, dialogues, heads=[(0, 1)], lr=1e-3, steps="auto", batch_size=4)
    assert handle.recipe["steps"] == len(handle.history) == max(10, math.ceil(4 * len(dialogues) / 4))
    with pytest.raises(ValueError, match="'auto'"):
        tune_auto(tiny_model("llama"), tok, dialogues, heads=[(0, 1)], lr="fast", steps="auto")
    with pytest.raises(ValueError, match="cannot checkpoint or resume"):
        pp.tune(tiny_model("llama"), tok, dialogues, heads=[(0, 1)], lr="auto", progress=False, resume=True,
                checkpoint_dir="unused")
    with pytest.raises(ValueError, match="lr must be a number"):
        pp.tune(tiny_model("llama"), tok, dialogues, heads=[(0, 1)], lr="fast", progress=False)


def test_tune_lr_auto_through_the_cli_records_the_rule(tmp_path, capsys):
    """`pinpoint tune` without --lr/--steps: the recipe rule's choice is printed and kept in tune.json."""
    import json

    from pinpoint.cli import main
    from pinpoint.data import SAMPLE_PATH

    model_dir = tmp_path / "model"
    tiny_model("llama").save_pretrained(model_dir)
    word_tokenizer().save_pretrained(model_dir)
    heads = tmp_path / "heads.json"
    heads.write_text(json.dumps({"heads": [[0, 1], [1, 2]]}))
    rc = main(["tune", "--model", str(model_dir), "--heads", str(heads), "--data", str(SAMPLE_PATH), "--limit", "10",
               "--out", str(tmp_path / "out"), "--batch-size", "4", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0, out
    summary = json.loads((tmp_path / "out" / "tune.json").read_text())
    assert summary["recipe"]["lr"] == summary["lr"] and summary["steps"] == summary["recipe"]["steps"]
    assert f"the recipe rule chose lr {summary['lr']:g}, {summary['steps']} steps" in out


def test_pp_tune_lr_auto_is_the_recipe_rule():
    """pp.tune(lr="auto") is recipe.tune_auto: same choice, same trained tensors."""
    from pinpoint.recipe import tune_auto

    tok, dialogues = word_tokenizer(), _auto_dialogues()
    kw = dict(heads=[(0, 1), (1, 2)], batch_size=4, progress=False)
    a = pp.tune(tiny_model("llama"), tok, dialogues, lr="auto", **kw)
    b = tune_auto(tiny_model("llama"), tok, dialogues, lr="auto", **kw)
    assert a.recipe == b.recipe and a.recipe["lr"] in (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, *a.recipe["extended"])
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
