"""The command line on a local HF directory: results as files, one-line errors with exit 2."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pinpoint import data
from pinpoint.cli import main
from pinpoint.testing import word_tokenizer



def test_locate_knockout_eval_write_their_files(model_dir, tmp_path, capsys):
    rows = str(data.SAMPLE_PATH)
    out = tmp_path / "loc"
    assert main(["locate", "--model", str(model_dir), "--data", rows, "--limit", "4", "--out", str(out),
                 "--k", "3", "--quiet"]) == 0
    assert (out / "scores" / "scores.safetensors").exists() and (out / "heatmap.png").exists()
    top = json.loads((out / "top_heads.json").read_text())["heads"]
    assert len(top) == 3
    ko = tmp_path / "ko"
    assert main(["knockout", "--model", str(model_dir), "--data", rows, "--limit", "3", "--heads",
                 str(out / "scores"), "--k", "3", "--out", str(ko), "--quiet"]) == 0
    curve = json.loads((ko / "knockout.json").read_text())
    assert curve["k"] == [0, 1, 2, 3] and curve["heads"] == top
    assert "top 3 heads" in capsys.readouterr().out
    auto = tmp_path / "loc-auto"   # no --k: the recipe rule, checked by ablation
    assert main(["locate", "--model", str(model_dir), "--data", rows, "--limit", "4", "--out", str(auto),
                 "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "as many as ablating removes 90% of the metric's fall" in printed
    from pinpoint.heads import HeadScores
    from pinpoint.recipe import choose_k

    k_auto = len(json.loads((auto / "top_heads.json").read_text())["heads"])
    saved = HeadScores.load(auto / "scores")
    assert f"top {k_auto} heads" in printed and k_auto >= choose_k(saved)
    # tune --heads <scores> without --k takes the k locate chose (recorded with the scores) ...
    from pinpoint.cli.common import _recipe_k

    assert saved.meta["recipe_k"] == {"k": k_auto, "rule": "recipe.choose_k_by_ablation"}
    assert _recipe_k(auto / "scores") == k_auto
    # ... and scores saved without it (older runs, the API) fall back to the scores alone
    del saved.meta["recipe_k"]
    saved.save(tmp_path / "bare")
    assert _recipe_k(tmp_path / "bare") == choose_k(saved)
    assert "the heads above the largest drop" in capsys.readouterr().out
    ev = tmp_path / "ev"
    assert main(["eval", "--model", str(model_dir), "--data", rows, "--limit", "2", "--max-new-tokens", "3",
                 "--out", str(ev), "--quiet"]) == 0
    results = json.loads((ev / "results.json").read_text())
    assert {"results", "config", "versions"} <= set(results)
    assert len((ev / "samples.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize("argv, message", [
    (["locate", "--model", "/no/such/dir", "--data", "{rows}", "--out", "{tmp}/o"], "no such directory"),
    (["locate", "--model", "{model}", "--data", "/no/such.jsonl", "--out", "{tmp}/o"], "--data /no/such.jsonl: no such file"),
    (["knockout", "--model", "{model}", "--data", "{rows}", "--heads", "{tmp}/nope.json", "--out", "{tmp}/o"],
     "no such file or directory"),
    (["knockout", "--model", "{model}", "--data", "{rows}", "--heads", "{tmp}/bad.json", "--out", "{tmp}/o"],
     "out of range"),
    (["locate", "--model", "{model}", "--data", "{rows}", "--out", "{tmp}/o", "--dtype", "int8"], "--dtype 'int8'"),
    (["locate", "--model", "{bert}", "--data", "{rows}", "--out", "{tmp}/o"], "BertLMHeadModel: no supported decoder layout"),
])
def test_user_errors_are_one_line_exit_2(argv, message, model_dir, tmp_path, capsys):
    (tmp_path / "bad.json").write_text(json.dumps({"heads": [[0, 1], [5, 0]]}))
    bert = tmp_path / "bert"
    if any("{bert}" in a for a in argv):
        from transformers import BertConfig, BertForMaskedLM

        BertForMaskedLM(BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=16)).save_pretrained(bert)
        word_tokenizer().save_pretrained(bert)
    fill = {"model": str(model_dir), "rows": str(data.SAMPLE_PATH), "tmp": str(tmp_path), "bert": str(bert)}
    argv = [a.format(**fill) for a in argv]
    assert main(argv) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and not ln.startswith(("Loading weights", "Writing model shards"))]
    assert len(lines) == 1 and lines[0].startswith("pinpoint: error:") and message in lines[0], lines


def test_console_entry_point_prints_no_traceback(tmp_path):
    env = dict(os.environ, PINPOINT_NO_PROGRESS="1")
    proc = subprocess.run([sys.executable, "-m", "pinpoint.cli", "eval", "--model", str(tmp_path / "none"),
                           "--data", str(data.SAMPLE_PATH), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"pinpoint: error: --model {tmp_path / 'none'}: no such directory "
                                                "(pass a local HF model directory)"]


def test_help_texts_have_examples(capsys):
    for cmd in ("locate", "knockout", "tune", "eval", "demo"):
        with pytest.raises(SystemExit) as exc:
            main([cmd, "--help"])
        assert exc.value.code == 0
        assert "examples:" in capsys.readouterr().out
