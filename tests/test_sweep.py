"""pinpoint.sweep: every method over a learning-rate grid, the frontier figure and the claim per level."""
from __future__ import annotations

import json
import math

import pytest

from pinpoint import sweep
from pinpoint.data import neutral_texts, sample_choices, sample_rows
from pinpoint.testing import tiny_model, word_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def _pt(method, lr, conf, kl):
    return {"method": method, "lr": lr, "confidence": conf, "kl": kl}


def test_parse_grid_sorts_and_refuses_non_positive_rates():
    assert sweep.parse_grid("3e-4, 1e-4,1e-4") == (1e-4, 3e-4)
    assert sweep.parse_grid([1e-3, 1e-2]) == (1e-3, 1e-2)
    for bad, match in (("1e-3,0", "positive"), ("-1e-3", "positive"), ("1e-3,nan", "positive"), ("", "no learning"),
                       ("1e-3,fast", "comma-separated")):
        with pytest.raises(ValueError, match=match):
            sweep.parse_grid(bad)
    with pytest.raises(ValueError, match="positive"):
        sweep.SweepConfig(grids={"sft": "1e-5,-1"})
    with pytest.raises(ValueError, match="unknown method"):
        sweep.SweepConfig(methods=("spt", "dpo"))


def test_kl_at_confidence_interpolates_in_log_kl_between_neighbours():
    pts = [_pt("spt", 1e-3, 60.0, 0.01), _pt("spt", 1e-4, 20.0, 0.001), _pt("spt", 3e-3, 95.0, 0.1)]
    r = sweep.kl_at_confidence(pts, 40.0)          # halfway from 20 to 60: the geometric mean of the KLs
    assert r["how"] == "interpolated" and r["between"] == [1e-4, 1e-3]
    assert math.isclose(r["kl"], math.sqrt(0.001 * 0.01), rel_tol=1e-9)
    assert math.isclose(sweep.kl_at_confidence(pts, 95.0)["kl"], 0.1)
    assert sweep.kl_at_confidence(pts, 10.0) == {"kl": 0.001, "how": "first point", "between": [1e-4, 1e-4]}
    assert sweep.kl_at_confidence(pts, 99.0)["kl"] is None
    assert sweep.kl_at_confidence([_pt("spt", 1e-4, None, 0.1), _pt("spt", 1e-3, 90.0, 0.2)], 80.0)["kl"] == 0.2


def test_a_rule_pick_at_the_grids_edge_is_flagged():
    """The recipe walks past a grid end while the lowest validation loss sits there; the sweep
    cannot, so it says which methods' lowest loss sits at an end of their grid."""
    def pt(method, lr, loss):
        return {"method": method, "lr": lr, "val_loss": loss, "val_loss_se": 0.001}

    points = [pt("spt", 1e-3, 0.3), pt("spt", 3e-3, 0.2),                       # still falling at the top
              pt("sft", 1e-4, 0.3), pt("sft", 3e-4, 0.1), pt("sft", 1e-3, 0.2),  # a minimum inside
              pt("lora8", 1e-4, 0.1), pt("lora8", 1e-3, 0.3),                    # lowest at the bottom
              pt("random_heads", 1e-3, 0.2)]                                     # one rate: no edge to speak of
    assert sweep._rule_edges(points) == {"spt": "up", "sft": None, "lora8": "down", "random_heads": None}
    assert sweep._rule_picks(points) == {"spt": 3e-3, "sft": 3e-4, "lora8": 1e-4, "random_heads": 1e-3}


def test_claims_per_level_hold_fail_or_stay_undecided():
    pts = [_pt("spt", 1e-4, 10.0, 0.001), _pt("spt", 1e-3, 90.0, 0.01),
           _pt("sft", 1e-5, 5.0, 0.01), _pt("sft", 1e-4, 85.0, 0.2)]
    c50, c80, c90 = sweep.sweep_claims(pts)
    assert c50["spt_below_sft"] is True and "holds" in c50["statement"]
    assert c90["spt_below_sft"] is None and "never reached" in c90["statement"]   # SFT tops out at 85
    # SFT's lowest rate already reaches the level: its KL is only an upper bound, so not decided
    pts[2]["confidence"] = 60.0
    assert sweep.sweep_claims(pts, levels=(50.0,))[0]["spt_below_sft"] is None
    # SPT needs more KL than SFT: the claim fails
    worse = [_pt("spt", 1e-4, 10.0, 0.5), _pt("spt", 1e-3, 90.0, 1.0)] + pts[2:]
    worse[2]["confidence"] = 5.0
    assert sweep.sweep_claims(worse, levels=(80.0,))[0]["spt_below_sft"] is False


def test_sweep_on_a_tiny_model_writes_every_point(tmp_path):
    """A 2-point grid for two methods: report.json carries every point (with intervals, general
    accuracy, KL, validation loss), report.md the table and the claim, frontier.png its size."""
    from PIL import Image

    rows = sample_rows()
    tok, model = word_tokenizer(), tiny_model("llama", seed=0)
    cfg = sweep.SweepConfig(methods=("spt", "sft"), grid="1e-3,1e-2", n_dialogues=8, batch_size=4,
                            max_new_tokens=(3, 3, 3))
    inputs = (model, tok, [(0, 1), (1, 2)], None, list(rows)[:3], rows, sample_choices()[:4], neutral_texts()[:2])
    report = sweep.run_sweep(tmp_path / "out", config=cfg, progress=False, inputs=inputs)
    out = tmp_path / "out"
    saved = json.loads((out / "report.json").read_text())
    assert [(p["method"], p["lr"]) for p in saved["points"]] == [("spt", 1e-3), ("spt", 1e-2), ("sft", 1e-3),
                                                                 ("sft", 1e-2)]
    for p in saved["points"]:
        for key in ("confidence_ci95", "truthfulness_ci95", "general_accuracy", "general_accuracy_ci95", "kl",
                    "val_loss", "val_loss_se", "trainable_params", "steps", "cut_reply"):
            assert key in p, key
        assert p["kl"] > 0 and p["steps"] == 10
    assert {p["trainable_params"] for p in saved["points"] if p["method"] == "spt"} == {2 * 4 * 8 * 32}
    assert [c["confidence"] for c in saved["claims"]] == list(sweep.LEVELS)
    assert set(saved["rule_picks"]) == {"spt", "sft"} and saved["original"]["kl"] == 0.0
    assert saved["points"] == json.loads(json.dumps(report["points"]))
    md = (out / "report.md").read_text()
    assert "SPT (located heads)" in md and "confidence ≥ 80" in md and "frontier.png" in md
    assert set(saved["rule_edges"]) == {"spt", "sft"} and "cut_reply" in saved["original"]
    # the config's budget (3, 3, 3) cuts the tiny model's replies, and each point says how many
    assert all(0 < p["cut_reply"] <= len(rows) for p in saved["points"])
    assert md.count("so the recipe (recipe.choose_lr) would walk on") == sum(map(bool, saved["rule_edges"].values()))
    width, height = Image.open(out / "frontier.png").size
    assert width >= 1200 and height >= 500


def test_until_stops_each_methods_grid_at_its_first_rate_reaching_the_level(monkeypatch):
    """With ``until``, a method's grid ends at its first point whose confidence reaches it; the
    other method's grid is walked on its own; None runs every rate."""
    conf = {("spt", 1e-4): 10.0, ("spt", 1e-3): 95.0, ("spt", 1e-2): 100.0,
            ("sft", 1e-4): None, ("sft", 1e-3): 90.0, ("sft", 1e-2): 95.0,
            ("lora8", 1e-4): 100.0, ("lora8", 1e-3): 100.0, ("lora8", 1e-2): 100.0}
    monkeypatch.setattr(sweep, "_point", lambda *a, **kw: {"method": a[8], "lr": a[9], "confidence": conf[a[8], a[9]],
                                                           "truthfulness": 0.0, "general_accuracy": 0.0, "kl": 0.1,
                                                           "seconds_tuning": 0.0, "cut_reply": 0})
    monkeypatch.setattr("pinpoint.adapter.random_heads", lambda *a, **kw: [(0, 0)])
    monkeypatch.setattr("pinpoint.recipe.split_dialogues", lambda d, **kw: (d, d))

    def run(until):
        cfg = sweep.SweepConfig(methods=("spt", "sft", "lora8"), grid="1e-4,1e-3,1e-2", until=until)
        pts = sweep._all_points(None, None, [], [], [], [], cfg, [(1, 1)], progress=False, say=lambda m: None)
        return [(p["method"], p["lr"]) for p in pts], sweep._stopped(pts, cfg)

    # confidence exactly at ``until`` stops the grid (>=); a first rung at the level trains one point
    assert run(90) == ([("spt", 1e-4), ("spt", 1e-3), ("sft", 1e-4), ("sft", 1e-3), ("lora8", 1e-4)],
                       {"spt": 1e-3, "sft": 1e-3, "lora8": 1e-4})
    assert run(95) == ([("spt", 1e-4), ("spt", 1e-3), ("sft", 1e-4), ("sft", 1e-3), ("sft", 1e-2), ("lora8", 1e-4)],
                       {"spt": 1e-3, "lora8": 1e-4})   # sft ran its whole grid: it has a rule pick
    assert run(None)[0] == [(m, lr) for m in ("spt", "sft", "lora8") for lr in (1e-4, 1e-3, 1e-2)]
    assert run(None)[1] == {}
    for bad in (0, -5, 101, True, "90"):
        with pytest.raises(ValueError, match="until must be a confidence"):
            sweep.SweepConfig(until=bad)
    with pytest.raises(ValueError, match=r"until \(80\) must be at least the highest confidence level \(90\)"):
        sweep.SweepConfig(until=80)   # level 90 would read "never reached"
    assert sweep.SweepConfig(until=80, levels=(50.0, 80.0)).until == 80


def test_sweep_cli_until_reaches_the_config(monkeypatch, tmp_path):
    from pinpoint.cli import main

    seen = []
    monkeypatch.setattr(sweep, "run_sweep", lambda path, *, config, **kw: seen.append(config.until))
    assert main(["sweep", "--out", str(tmp_path / "a"), "--quiet", "--until", "90"]) == 0
    assert main(["sweep", "--out", str(tmp_path / "b"), "--quiet"]) == 0
    assert seen == [90.0, None]


def test_sweep_cli_max_new_tokens_reaches_the_config(monkeypatch, tmp_path):
    """--max-new-tokens N or A,R,F is the sweep's budget (default None: recipe.turn_budget)."""
    from pinpoint.cli import main

    seen = []
    monkeypatch.setattr(sweep, "run_sweep", lambda path, *, config, **kw: seen.append(config.max_new_tokens))
    assert main(["sweep", "--out", str(tmp_path / "a"), "--quiet", "--max-new-tokens", "8,40,8"]) == 0
    assert main(["sweep", "--out", str(tmp_path / "b"), "--quiet", "--max-new-tokens", "24"]) == 0
    assert main(["sweep", "--out", str(tmp_path / "c"), "--quiet"]) == 0
    assert seen == [(8, 40, 8), (24, 24, 24), None]


@pytest.mark.parametrize("argv, fragment", [
    (["--grid", "1e-3,0"], "argument --grid: learning rates must be positive, got 0"),
    (["--grid=-1e-4,1e-3"], "argument --grid: learning rates must be positive, got -0.0001"),
    (["--grid-for", "sft=1e-5,-3e-5"], "argument --grid-for: learning rates must be positive"),
    (["--grid-for", "dpo=1e-5"], "METHOD one of spt, sft"),
    (["--methods", "spt,dpo"], "unknown method(s) dpo"),
    (["--max-new-tokens", "6,16"], "argument --max-new-tokens: expected N or A,R,F"),
    (["--max-new-tokens", "6,0,6"], "argument --max-new-tokens: expected N or A,R,F"),
    (["--max-new-tokens", "many"], "argument --max-new-tokens: expected N or A,R,F"),
    (["--until", "0"], "argument --until: must be a confidence in (0, 100]"),
    (["--until", "nan"], "argument --until: must be a confidence in (0, 100]"),
    (["--until", "high"], "argument --until: must be a confidence in (0, 100]"),
    (["--until", "80"], "--until: until (80) must be at least the highest confidence level (90)"),
    (["--model", "somewhere"], "--model needs --data, --train-data, --general, --kl-text"),
    (["--model", "m", "--organism", "o"], "--organism or --model, not both"),
])
def test_sweep_cli_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, argv, fragment):
    from pinpoint.cli import main

    out = tmp_path / "out"
    try:
        rc = main(["sweep", "--out", str(out), *argv])
    except SystemExit as exc:   # argparse's own errors
        rc = exc.code
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and fragment in err, err
    assert not out.exists()
