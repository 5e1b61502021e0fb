"""The CLI's error contract: a user's mistake is one line naming the flag (exit 2), a bug is a
traceback plus a request to report it (exit 1), Ctrl-C is one line (exit 130); and the --out
policy as a user meets it."""
from __future__ import annotations

import importlib
import json

import pytest
import torch

from pinpoint import data
from pinpoint.cli import main
from pinpoint.outdir import OutDir
from pinpoint.testing import tiny_model, word_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
ROWS = str(data.SAMPLE_PATH)


def module(name):
    """pinpoint.<name> the module (``pinpoint.locate`` the attribute is the function)."""
    return importlib.import_module(f"pinpoint.{name}")



def _err_lines(capsys):
    err = capsys.readouterr().err
    return [ln for ln in err.splitlines() if ln.strip() and not ln.startswith(("Loading weights", "Writing model"))]


def _one_line(capsys, *fragments):
    lines = _err_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith("pinpoint: error: "), lines
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if locate/knockout/tune/evaluate start: validation must come first."""
    def forbidden(*a, **k):
        raise AssertionError("work started before validation finished")

    for mod, name in (("locate", "locate"), ("locate", "knockout"), ("tune", "tune"), ("evaluate", "evaluate")):
        monkeypatch.setattr(module(mod), name, forbidden)


# --- bad flags: one line, exit 2, nothing created ------------------------------------------------

@pytest.mark.parametrize("argv, fragments", [
    (["locate", "--model", "{model}", "--data", ROWS, "--out", "{out}", "--k", "100"],
     ["--k 100: must be between 1 and 8 (the model has 2 layers x 4 heads)"]),
    (["locate", "--model", "{file}", "--data", ROWS, "--out", "{out}"], ["--model", "is a file; pass the model's directory"]),
    (["locate", "--model", "{model}", "--data", "{readme}", "--out", "{out}"],
     ["--data", "no usable rows", "are_you_sure.jsonl-format"]),
    (["locate", "--model", "{model}", "--data", "{tmp}", "--out", "{out}"], ["--data", "is a directory"]),
    (["locate", "--model", "{model}", "--data", ROWS, "--out", "{out}", "--method", "path", "--positions", "all"],
     ["--positions all needs --method activation"]),
    (["tune", "--model", "{model}", "--data", ROWS, "--out", "{out}", "--steps", "2"], ["--heads is required", "--full"]),
    (["tune", "--model", "{model}", "--data", ROWS, "--out", "{out}", "--full", "--heads", "{heads}"],
     ["--full trains every parameter"]),
    (["tune", "--model", "{model}", "--data", ROWS, "--out", "{out}", "--heads", "{heads}", "--resume"],
     ["--resume: there is no checkpoint in", "checkpoints"]),
    (["tune", "--model", "{model}", "--data", "{bench}", "--out", "{out}", "--heads", "{heads}"],
     ["SycophancyEval benchmark (aqua_mc)", "--allow-benchmark-rows"]),
    (["tune", "--model", "{model}", "--data", ROWS, "--out", "{out}", "--heads", "{heads}", "--k", "5"],
     ["--k 5:", "lists only 2 heads"]),
    (["tune", "--model", "{model}", "--data", ROWS, "--out", "{out}", "--heads", "{heads}", "--grad-accum", "17"],
     ["--grad-accum 17: must be at most --batch-size 16"]),
    (["eval", "--model", "{model}", "--data", ROWS, "--out", "{out}", "--adapter", "{file}"], ["--adapter", "is a file"]),
    (["eval", "--model", "{model}", "--data", ROWS, "--out", "{out}", "--kl-text", "{file}"],
     ["--kl-against MODEL and --kl-text FILE go together"]),
    (["eval", "--model", "{model}", "--data", ROWS, "--out", "{out}", "--general", "{readme}"], ["--general", "README.md"]),
    (["eval", "--model", "{notemplate}", "--data", ROWS, "--out", "{out}"], ["no chat template", "--chat-template FILE"]),
    (["demo", "--organism", "{file}", "--out", "{out}"], ["--organism", "is a file"]),
    (["locate", "--model", "{model}", "--data", ROWS, "--out", "{out}", "--apology-word", "Zyzzyva"],
     ["cannot encode 'Zyzzyva'", "pass --apology-word/--yes-word", "--metric-tokens APOLOGY_ID,YES_ID"]),
    (["knockout", "--model", "{model}", "--data", ROWS, "--out", "{out}", "--heads", "{heads}", "--metric-tokens",
      "5,100000"], ["--metric-tokens 5,100000: the model has"]),
])
def test_bad_input_is_one_line_and_creates_nothing(argv, fragments, model_dir, tmp_path, capsys, no_work):
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "README.md").write_text("# A readme\n\nnot rows\n" * 8)
    (tmp_path / "heads.json").write_text(json.dumps({"heads": [[0, 1], [1, 2]]}))
    row = json.loads(data.SAMPLE_PATH.read_text().splitlines()[0])
    row["base"]["dataset"] = "aqua_mc"
    (tmp_path / "bench.jsonl").write_text(json.dumps(row) + "\n")
    nt = tmp_path / "notemplate"
    tiny_model("llama", n_layers=2, n_heads=4, n_kv_heads=2).save_pretrained(nt)
    tok = word_tokenizer()
    tok.chat_template = None
    tok.save_pretrained(nt)
    capsys.readouterr()
    fill = {"model": str(model_dir), "out": str(tmp_path / "out"), "file": str(tmp_path / "file.txt"),
            "readme": str(tmp_path / "README.md"), "tmp": str(tmp_path), "heads": str(tmp_path / "heads.json"),
            "bench": str(tmp_path / "bench.jsonl"), "notemplate": str(nt)}
    assert main([a.format(**fill) for a in argv]) == 2
    _one_line(capsys, *fragments)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("argv, fragment", [
    (["locate", "--limit", "-5"], "argument --limit: must be a positive integer, got -5"),
    (["tune", "--steps", "-1"], "argument --steps: must be a positive integer, got -1"),
    (["tune", "--lr", "-1"], "argument --lr: must be a positive number, got -1"),
    (["tune", "--lr", "nan"], "argument --lr: must be a positive number, got nan"),
    (["tune", "--parts", "xyz"], "argument --parts: 'xyz' has 'x', 'y', 'z'; use letters of q, k, v, o"),
    (["eval", "--threads", "0"], "argument --threads: must be a positive integer, got 0"),
    (["locate", "--k", "0"], "argument --k: must be a positive integer, got 0"),
    (["locate", "--metric-tokens", "5"], "argument --metric-tokens: must be two token ids APOLOGY_ID,YES_ID"),
    (["tune", "--insist-fraction", "1.5"], "argument --insist-fraction: must be in [0, 1], got 1.5"),
    (["tune", "--insist-fraction", "-0.1"], "argument --insist-fraction: must be a number >= 0, got -0.1"),
])
def test_bad_flag_values_are_usage_errors_before_anything_runs(argv, fragment, tmp_path, capsys):
    base = {"locate": ["--model", "m", "--data", "d", "--out", str(tmp_path / "o")],
            "tune": ["--model", "m", "--data", "d", "--out", str(tmp_path / "o")],
            "eval": ["--model", "m", "--data", "d", "--out", str(tmp_path / "o")]}[argv[0]]
    with pytest.raises(SystemExit) as exc:
        main(argv + base)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pinpoint: error: ") and fragment in err[0], err
    assert not (tmp_path / "o").exists()


# --- bugs are not hidden ---------------------------------------------------------------------------

@pytest.mark.parametrize("exc", [RuntimeError("boom inside"), ValueError("an internal ValueError")])
def test_an_internal_error_prints_the_traceback_and_asks_for_a_report(exc, model_dir, tmp_path, capsys, monkeypatch):
    def broken(*a, **k):
        raise exc

    monkeypatch.setattr(module("locate"), "locate", broken)
    rc = main(["locate", "--model", str(model_dir), "--data", ROWS, "--limit", "2", "--out", str(tmp_path / "o"),
               "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "Traceback (most recent call last)" in err and str(exc) in err
    assert err.strip().splitlines()[-1].startswith("pinpoint: internal error") and "report it" in err
    assert not (tmp_path / "o").exists()  # and nothing half-written


def test_a_stopped_torchrun_peer_is_one_line_and_not_called_a_bug(model_dir, tmp_path, capsys, monkeypatch):
    """Under torchrun a rank whose peer stopped (its own error printed in its own log) reports
    that in one line, exit 1, without calling it a bug in pinpoint."""
    from pinpoint.distributed import RankFailure

    def stopped(*a, **k):
        raise RankFailure("rank 0: the device check failed, so another of the 2 ranks has stopped")

    monkeypatch.setattr(module("locate"), "locate", stopped)
    rc = main(["locate", "--model", str(model_dir), "--data", ROWS, "--limit", "2", "--out", str(tmp_path / "o"),
               "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and err == ["pinpoint: stopped: rank 0: the device check failed, so another of the 2 ranks "
                               "has stopped"], err
    assert not (tmp_path / "o").exists()


def test_a_library_input_error_is_one_line(model_dir, tmp_path, capsys, monkeypatch):
    from pinpoint.errors import InputError

    def too_long(*a, **k):
        raise InputError("pairs[0].base is 500 tokens, longer than the model's context of 128\nmore detail")

    monkeypatch.setattr(module("locate"), "locate", too_long)
    rc = main(["locate", "--model", str(model_dir), "--data", ROWS, "--limit", "2", "--out", str(tmp_path / "o"),
               "--quiet"])
    assert rc == 2
    _one_line(capsys, "pairs[0].base is 500 tokens, longer than the model's context of 128")
    assert not (tmp_path / "o").exists()


def test_ctrl_c_is_one_line_exit_130(model_dir, tmp_path, capsys, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    out = tmp_path / "o"
    monkeypatch.setattr(module("locate"), "locate", interrupted)
    rc = main(["locate", "--model", str(model_dir), "--data", ROWS, "--limit", "2", "--out", str(out), "--quiet"])
    assert rc == 130
    lines = _err_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith("pinpoint: interrupted: nothing new was written to --out"), lines
    assert not out.exists()


# --- the --out policy, as a user meets it ------------------------------------------------------------

def _locate(model_dir, out, *extra):
    return main(["locate", "--model", str(model_dir), "--data", ROWS, "--limit", "2", "--k", "2", "--out", str(out),
                 "--quiet", *extra])


def test_a_users_files_are_never_overwritten_silently(model_dir, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "heatmap.png").write_text("my own figure")
    assert _locate(model_dir, out) == 2
    _one_line(capsys, "--out", "is not empty", "heatmap.png", "--overwrite")
    assert (out / "heatmap.png").read_text() == "my own figure"
    assert _locate(model_dir, out, "--overwrite") == 0
    assert (out / "heatmap.png").read_bytes()[:4] == b"\x89PNG" and (out / "scores" / "scores.csv").exists()


def test_rerun_of_the_same_command_is_allowed_another_command_is_refused(model_dir, tmp_path, capsys):
    out = tmp_path / "loc"
    assert _locate(model_dir, out) == 0
    assert _locate(model_dir, out) == 0
    assert "metric tokens: 'Apologies' -> token" in capsys.readouterr().out
    rc = main(["eval", "--model", str(model_dir), "--data", ROWS, "--limit", "1", "--out", str(out), "--quiet"])
    assert rc == 2
    _one_line(capsys, "holds results of `pinpoint locate`", "--overwrite")


def test_a_concurrent_run_into_the_same_out_fails_fast(model_dir, tmp_path, capsys, no_work):
    out = tmp_path / "busy"
    with OutDir(out, command="locate").open():
        assert _locate(model_dir, out) == 2
    _one_line(capsys, "is in use by another pinpoint run", "pid")


# --- --threads ---------------------------------------------------------------------------------------

def test_threads_flag_sets_torch_threads_and_help_says_why(capsys):
    n = torch.get_num_threads()
    try:
        assert main(["info", "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1 and "1 CPU threads" in capsys.readouterr().out
    finally:
        torch.set_num_threads(n)
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "shared machine" in capsys.readouterr().out
    for cmd in ("locate", "knockout", "tune", "eval", "compare", "export", "demo", "info"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "--threads N" in text and "On a shared machine pass 1 or 2" in text, cmd
    with pytest.raises(SystemExit):
        main(["organism", "path", "--help"])
    assert "--threads N" in capsys.readouterr().out
