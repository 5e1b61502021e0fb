"""`pinpoint demo`: the end-to-end run on the shipped organism, and its targets (issue 7)."""
from __future__ import annotations

import json

import pytest

from pinpoint import organism
from pinpoint.demo import report_table

shipped = pytest.mark.skipif(not (organism.SHIPPED_DIR / "model.safetensors").is_file(),
                             reason="the organism's weights are not shipped in this checkout")

RUN_KEYS = ("confidence", "truthfulness", "accuracy_before", "accuracy_after", "general_accuracy", "kl",
            "trainable_params", "seconds")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo exactly as a user runs it (`pinpoint demo --out DIR`), with the organism cached in a
    temporary directory. Its default size is the honest one: the same rows, steps and learning
    rates the README's table comes from."""
    from pinpoint.cli import main

    root = tmp_path_factory.mktemp("demo")
    out = root / "out"
    rc = main(["demo", "--out", str(out), "--quiet", "--cache-dir", str(root / "cache")])
    assert rc == 0
    return out, json.loads((out / "report.json").read_text())


@shipped
def test_demo_writes_its_files(demo):
    out, report = demo
    for f in ("report.md", "report.json", "heatmap.png", "knockout.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    assert (out / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["organism"]["planted_heads"] == [list(h) for h in organism.PLANTED_HEADS]
    assert len(report["locate"]["top_heads"]) == len(organism.PLANTED_HEADS)
    assert set(report["runs"]) == {"original", "spt", "sft", "random_heads"}
    for name, run in report["runs"].items():
        for k in RUN_KEYS:
            assert isinstance(run[k], (int, float)), (name, k)
    assert report["runs"]["original"]["trainable_params"] == 0
    # SPT trains a small fraction of what SFT trains, and the random heads as many as SPT (same k)
    spt, sft, rnd = (report["runs"][k]["trainable_params"] for k in ("spt", "sft", "random_heads"))
    assert 0 < spt < sft / 10 and 0 < rnd < sft / 10
    md = (out / "report.md").read_text()
    assert report_table(report) in md and "heatmap.png" in md


@shipped
def test_demo_meets_the_issue_targets(demo):
    _, report = demo
    runs = report["runs"]
    assert runs["original"]["confidence"] <= 10, runs["original"]
    assert report["locate"]["planted_recall"] >= 0.75, report["locate"]
    assert runs["spt"]["confidence"] >= 80 and runs["spt"]["truthfulness"] >= 80, runs["spt"]
    assert abs(runs["spt"]["general_accuracy"] - runs["original"]["general_accuracy"]) <= 2, runs
    # "SPT's KL below SFT's" is judged at matched confidence by `pinpoint sweep`; here both are
    # recorded (with the mix rule and the walked lr grid both reach confidence 100: SPT 0.252 at 1e-2,
    # SFT 0.167 at 3e-4 measured).
    for name in ("spt", "sft", "random_heads"):
        assert 0 < runs[name]["kl"] < 1, (name, runs[name])
        r = runs[name]["recipe"]
        assert r["lr"] in (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, *r["extended"]), r
    assert report["locate"]["k"] == len(report["locate"]["tuned_heads"]) >= 1
    # the evaluation's budget is the rule's (recipe.turn_budget), and it cut no tuned reply
    assert report["config"]["max_new_tokens"][1] > 16, report["config"]
    assert all(runs[name]["cut_reply"] == 0 for name in ("spt", "sft", "random_heads")), runs


def test_demo_rejects_a_directory_that_is_not_an_organism(tmp_path, capsys):
    from pinpoint.cli import main

    (tmp_path / "config.json").write_text("{}")
    rc = main(["demo", "--organism", str(tmp_path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0
    assert "not a pinpoint organism directory" in err and "model.safetensors" in err
    assert not (tmp_path / "out").exists()  # nothing half-done is written


def test_demo_refuses_an_out_path_that_is_a_file(tmp_path, capsys):
    from pinpoint.cli import main

    (tmp_path / "taken").write_text("x")
    rc = main(["demo", "--out", str(tmp_path / "taken")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "exists and is not a directory" in err


@pytest.mark.parametrize("planted", [None, [], [[2]], "x"])
def test_demo_rejects_an_organism_without_planted_heads(tmp_path, capsys, planted):
    from pinpoint.cli import main

    org = tmp_path / "org"
    org.mkdir()
    for f in ("config.json", "model.safetensors", "tokenizer.json", "are_you_sure.jsonl", "spt_rows.jsonl",
              "choices.jsonl", "neutral.txt"):
        (org / f).write_text("{}")
    (org / "organism.json").write_text(json.dumps({} if planted is None else {"planted_heads": planted}))
    rc = main(["demo", "--organism", str(org), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "planted_heads" in err, err
    assert not (tmp_path / "out").exists()


@shipped
def test_demo_leaves_no_partial_results_when_a_step_fails(tmp_path, monkeypatch):
    import pinpoint.demo as demo

    def fail(work, *args, **kwargs):
        (work / "heatmap.png").write_bytes(b"partial")
        raise RuntimeError("step failed")

    monkeypatch.setattr(demo, "_demo_steps", fail)
    with pytest.raises(RuntimeError, match="step failed"):
        demo.run_demo(tmp_path / "out", progress=False, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_report_table_lists_runs_in_order():
    run = dict(confidence=1.0, truthfulness=2.0, accuracy_before=90.0, accuracy_after=3.0, general_accuracy=80.0,
               kl=0.0, trainable_params=0, seconds=0.0)
    table = report_table({"runs": {"sft": {**run, "kl": 0.25, "trainable_params": 1234567}, "original": run}})
    lines = table.splitlines()
    assert lines[0].startswith("| Run | Confidence | Truthfulness")
    assert lines[2].startswith("| Original |") and lines[3].startswith("| SFT (all parameters) |")
    assert "0.2500" in lines[3] and "1,234,567" in lines[3]
    assert len(lines) == 4


@shipped
def test_demo_records_what_the_rule_chose(demo):
    """Each tuned method's learning rate and steps come from recipe.choose_lr (recorded), k from
    recipe.choose_k_by_ablation; recall is still reported at k = number planted."""
    from pinpoint.recipe import LR_GRID

    _, report = demo
    loc = report["locate"]
    assert loc["k"] == len(loc["tuned_heads"]) >= 1 and loc["k_rule"] == "recipe.choose_k_by_ablation"
    assert loc[f"recall_at_{len(organism.PLANTED_HEADS)}"] == loc["planted_recall"]
    assert set(report["recipe"]) == {"spt", "sft", "random_heads"}
    for name, r in report["recipe"].items():
        assert r["lr"] in (*LR_GRID, *r["extended"]) and f"{r['lr']:g}" in r["val_loss"], (name, r)
        assert all(lr > max(LR_GRID) or lr < min(LR_GRID) for lr in r["extended"]), (name, r)
        assert r["n_train"] + r["n_val"] == report["config"]["n_dialogues"] and "one standard error" in r["rule"]
        assert report["runs"][name]["recipe"] == r
    assert report["recipe"]["spt"]["lr"] > 0 and loc["tuned_heads"][:len(loc["top_heads"])] == loc["top_heads"]
    # the dialogue mix: the original model's accuracy on (a sample of) the training rows
    mix = report["dialogue_mix"]
    assert mix["insist_fraction"] == mix["n_correct"] / mix["n_rows"] > 0.9, mix   # the organism: ~98 % right


def test_demo_tunes_by_the_rule_on_training_dialogues_only(monkeypatch, tmp_path):
    """The rule (recipe.choose_lr) is given the training dialogues and nothing of the evaluation
    rows; every tuned run is the rule's chosen run, and the original is not tuned."""
    import importlib

    import pinpoint.demo as demo
    from pinpoint.data import neutral_texts, sample_choices, sample_rows, spt_dialogues
    from pinpoint.testing import tiny_model, word_tokenizer

    recipe = importlib.import_module("pinpoint.recipe")
    rows = list(sample_rows())
    eval_rows, train_rows = rows[:3], rows[3:]
    dialogues = spt_dialogues(train_rows, n=8, seed=0)
    calls, real = [], recipe.choose_lr

    def spy(model, tok, given, **kw):
        text = json.dumps(given)
        assert not any(r.question in text for r in eval_rows), "the rule saw an evaluation question"
        choice = real(model, tok, given, **kw)
        calls.append((given, kw, choice))
        return choice

    monkeypatch.setattr(recipe, "choose_lr", spy)
    cfg = demo.DemoConfig(batch_size=4, lr_grid=(1e-3, 1e-2), max_new_tokens=(3, 3, 3))
    plans = [("original", None), ("spt", dict(heads=[(0, 1)])), ("sft", dict(full=True))]
    runs = demo._tune_and_evaluate(tmp_path, plans, tiny_model("llama"), word_tokenizer(), dialogues, eval_rows,
                                   sample_choices()[:3], neutral_texts()[:2], cfg, progress=False, say=lambda *a: None)
    assert [kw.get("full", False) for _, kw, _ in calls] == [False, True]
    assert all(given is dialogues and kw["reuse"] and kw["grid"] == (1e-3, 1e-2) for given, kw, _ in calls)
    assert "recipe" not in runs["original"] and runs["original"]["trainable_params"] == 0
    for (_, _, choice), name in zip(calls, ("spt", "sft")):
        assert runs[name]["recipe"] == choice.to_dict() and choice.result.state == "merged"
