"""The commands end to end on a tiny model: tune (interrupt + --resume, --full), eval with
general ability and KL, compare, export, organism path, --dtype auto, --chat-template."""
from __future__ import annotations

import json

import pytest
import torch

from pinpoint import data
from pinpoint.cli import main
from pinpoint.testing import tiny_model, word_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
ROWS = str(data.SAMPLE_PATH)
CHOICES = str(data.SAMPLE_PATH.with_name("choices_mini.jsonl"))
NEUTRAL = str(data.SAMPLE_PATH.with_name("neutral_texts.txt"))



@pytest.fixture(scope="module")
def heads_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("heads") / "heads.json"
    p.write_text(json.dumps({"heads": [[0, 1], [1, 2]]}))
    return p


def _tune(model_dir, heads_file, out, *extra):
    return main(["tune", "--model", str(model_dir), "--data", ROWS, "--limit", "8", "--heads", str(heads_file),
                 "--out", str(out), "--steps", "4", "--batch-size", "2", "--lr", "1e-3", "--quiet", *extra])


def test_tune_prints_its_values_and_ctrl_c_then_resume(model_dir, heads_file, tmp_path, capsys, monkeypatch):
    out = tmp_path / "spt"
    real_step = torch.optim.AdamW.step
    calls = {"n": 0}

    def step(self, *a, **k):  # Ctrl-C during the third optimizer step
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    assert _tune(model_dir, heads_file, out) == 130
    cap = capsys.readouterr()
    assert "tune: k = 2 heads [[0, 1], [1, 2]], parts qkvo; lr 0.001, 4 steps, batch 2" in cap.out
    lines = [ln for ln in cap.err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("pinpoint: interrupted: the last checkpoint is saved in"), lines
    assert str(out / "checkpoints") in lines[0] and "--resume" in lines[0]
    assert not (out / "adapter").exists() and any((out / "checkpoints").iterdir())
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    assert _tune(model_dir, heads_file, out) == 2  # a fresh start over a checkpoint needs --overwrite
    assert "add --resume to continue that run, or --overwrite" in capsys.readouterr().err
    assert _tune(model_dir, heads_file, out, "--resume") == 0
    summary = json.loads((out / "tune.json").read_text())
    assert summary["kind"] == "spt" and summary["steps"] == 4 and summary["k"] == 2 and summary["lr"] == 1e-3
    assert (out / "adapter").is_dir() and summary["trainable_params"] > 0
    capsys.readouterr()
    assert main(["eval", "--model", str(model_dir), "--adapter", str(out), "--data", ROWS, "--out",
                 str(tmp_path / "ev")]) == 2  # the tune run's --out, not its adapter
    assert f"did you mean --adapter {out / 'adapter'}?" in capsys.readouterr().err
    assert _tune(model_dir, heads_file, out, "--resume", "--lr", "2e-3") == 2  # another run's checkpoint
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("pinpoint: error: --resume: cannot resume from"), lines
    assert "lr" in lines[0] and "--overwrite to start over" in lines[0]


def test_tune_dialogues_end_with_the_final_turn_unless_told_not_to(model_dir, heads_file, tmp_path, monkeypatch):
    seen = []
    real = data.spt_dialogues
    monkeypatch.setattr(data, "spt_dialogues", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    for flag, final in (((), True), (("--no-final-turn",), False)):
        out = tmp_path / f"spt-{final}"
        assert _tune(model_dir, heads_file, out, "--insist-fraction", "0.5", *flag) == 0
        assert json.loads((out / "tune.json").read_text())["dialogue_mix"]["final_turn"] is final
        last = seen[-1]
        assert len(last) == 8 and all((d[-2]["content"] != d.challenge) is final for d in last)


def test_tune_full_writes_a_loadable_model_that_eval_accepts(model_dir, tmp_path, capsys):
    out = tmp_path / "sft"
    assert main(["tune", "--model", str(model_dir), "--data", ROWS, "--limit", "4", "--full", "--out", str(out),
                 "--steps", "1", "--batch-size", "2", "--quiet"]) == 0
    assert "the SFT model (with its tokenizer) is" in capsys.readouterr().out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert AutoTokenizer.from_pretrained(out / "model").chat_template is not None
    AutoModelForCausalLM.from_pretrained(out / "model")
    assert not (out / "adapter").exists()
    for flag in ("--model", "--adapter"):
        argv = ["eval", "--data", ROWS, "--limit", "1", "--max-new-tokens", "2", "--out", str(tmp_path / f"ev{flag}"),
                "--quiet"]
        argv += [flag, str(out / "model")] + (["--model", str(model_dir)] if flag == "--adapter" else [])
        assert main(argv) == 0, flag
        assert (tmp_path / f"ev{flag}" / "results.json").exists()
    assert "is a full model" in capsys.readouterr().out


def test_eval_general_and_kl_then_compare(model_dir, heads_file, tmp_path, capsys):
    ev = tmp_path / "ev"
    assert main(["eval", "--model", str(model_dir), "--data", ROWS, "--limit", "2", "--max-new-tokens", "2",
                 "--out", str(ev), "--general", CHOICES, "--kl-against", str(model_dir), "--kl-text", NEUTRAL,
                 "--quiet"]) == 0
    printed = capsys.readouterr().out
    g = json.loads((ev / "general.json").read_text())
    assert g["kl"]["value"] == 0.0 and g["kl"]["n_texts"] > 0  # a model against itself
    lo, hi = g["general"]["accuracy_ci95"]
    assert lo <= g["general"]["accuracy"] <= hi and g["general"]["n"] > 0
    assert "general accuracy:" in printed and "KL(--kl-against || model)" in printed
    results = json.loads((ev / "results.json").read_text())["results"]["all"]
    assert "confidence_ci95" in results and "truthfulness_ci95" in results
    tu = tmp_path / "tu"
    assert _tune(model_dir, heads_file, tu) == 0
    capsys.readouterr()
    csv_path = tmp_path / "cmp.csv"
    assert main(["compare", str(ev), str(tu), "--csv", str(csv_path)]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].split()[:3] == ["run", "kind", "n"] and "general acc" in table
    assert str(ev) in table and "spt" in table
    header = csv_path.read_text().splitlines()[0].split(",")
    assert {"run", "confidence", "confidence_ci95_low", "confidence_ci95_high", "kl", "lr", "k"} <= set(header)
    assert main(["compare", str(ev), "--csv", str(csv_path)]) == 2  # an existing file is not replaced silently
    assert "--overwrite" in capsys.readouterr().err
    assert main(["compare", str(ev), str(tmp_path)]) == 2
    assert "holds neither results.json" in capsys.readouterr().err


def test_export_writes_the_merged_model(model_dir, heads_file, tmp_path):
    tu = tmp_path / "tu"
    assert _tune(model_dir, heads_file, tu) == 0
    out = tmp_path / "merged"
    assert main(["export", "--model", str(model_dir), "--adapter", str(tu / "adapter"), "--out", str(out)]) == 0
    from transformers import AutoModelForCausalLM

    from pinpoint import PinpointAdapter

    merged = AutoModelForCausalLM.from_pretrained(out)
    ref = PinpointAdapter.load(tu / "adapter", AutoModelForCausalLM.from_pretrained(model_dir)).merge()
    ids = torch.tensor([[1, 5, 7, 9]])
    torch.testing.assert_close(merged(ids).logits, ref(ids).logits)
    lora = tmp_path / "lora"
    assert main(["export", "--model", str(model_dir), "--adapter", str(tu / "adapter"), "--out", str(lora),
                 "--peft"]) == 0
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in lora.iterdir()}
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), lora).eval()
    torch.testing.assert_close(peft_model(input_ids=ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)


def test_eval_adapter_on_other_weights_names_the_flag(model_dir, heads_file, tmp_path, capsys):
    tu = tmp_path / "tu"
    assert _tune(model_dir, heads_file, tu) == 0
    other = tmp_path / "other"
    tiny_model("llama", n_layers=2, n_heads=4, n_kv_heads=2, seed=7).save_pretrained(other)
    word_tokenizer().save_pretrained(other)
    capsys.readouterr()
    argv = ["eval", "--model", str(other), "--adapter", str(tu / "adapter"), "--data", ROWS, "--limit", "1",
            "--max-new-tokens", "2", "--out", str(tmp_path / "ev"), "--quiet"]
    assert main(argv) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and not ln.startswith("Loading")]
    assert len(err) == 1 and "pass --no-fingerprint-check" in err[0] and "check_fingerprint" not in err[0]
    assert main(argv + ["--no-fingerprint-check"]) == 0


def test_dtype_auto_means_the_dtype_on_disk(tmp_path):
    from pinpoint.cli.common import load_model

    d = tmp_path / "fp16"
    tiny_model("llama", n_layers=1, n_heads=2, n_kv_heads=2).to(torch.float16).save_pretrained(d)
    word_tokenizer().save_pretrained(d)
    cfg = json.loads((d / "config.json").read_text())
    assert (cfg.get("dtype") or cfg.get("torch_dtype")) == "float16"
    model, _ = load_model(str(d), device="cpu")
    assert next(model.parameters()).dtype == torch.float16
    model, _ = load_model(str(d), device="cpu", dtype="float32")
    assert next(model.parameters()).dtype == torch.float32
    for key in ("dtype", "torch_dtype"):
        cfg.pop(key, None)
    (d / "config.json").write_text(json.dumps(cfg))
    model, _ = load_model(str(d), device="cpu")  # no dtype recorded: float32, transformers' own default
    assert next(model.parameters()).dtype == torch.float32


def test_chat_template_flag_supplies_a_missing_template(tmp_path, capsys):
    d = tmp_path / "plain"
    tiny_model("llama", n_layers=1, n_heads=2, n_kv_heads=2).save_pretrained(d)
    tok = word_tokenizer()
    template = tok.chat_template
    tok.chat_template = None
    tok.save_pretrained(d)
    (tmp_path / "t.jinja").write_text(template)
    argv = ["eval", "--model", str(d), "--data", ROWS, "--limit", "1", "--max-new-tokens", "2", "--quiet"]
    assert main(argv + ["--out", str(tmp_path / "a"), "--chat-template", str(tmp_path / "t.jinja")]) == 0
    (tmp_path / "bad.jinja").write_text("no template here")
    assert main(argv + ["--out", str(tmp_path / "b"), "--chat-template", str(tmp_path / "bad.jinja")]) == 2
    assert "not a Jinja chat template" in capsys.readouterr().err


def test_organism_path_prints_the_organism_directory(tmp_path, capsys):
    from pinpoint import organism

    if not (organism.SHIPPED_DIR / "model.safetensors").is_file():
        pytest.skip("the organism's weights are not shipped in this checkout")
    assert main(["organism", "path", "--cache-dir", str(tmp_path / "cache")]) == 0
    path = capsys.readouterr().out.strip()
    assert path.startswith(str(tmp_path / "cache")) and (tmp_path / "cache").exists()
    from pathlib import Path

    for f in ("config.json", "model.safetensors", "are_you_sure.jsonl", "spt_rows.jsonl"):
        assert (Path(path) / f).is_file(), f
