"""bench/organisms.py: the shipped variants are what their recipes and checksums say, and the
benchmark's tables and targets read the measured numbers right."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
import organisms as B  # noqa: E402

from pinpoint import organism  # noqa: E402

SHIPPED = json.loads(B.CHECKSUMS.read_text()) if B.CHECKSUMS.is_file() else {}


def test_every_benchmark_variant_is_shipped_or_recorded_as_failed():
    builds = json.loads(B.BUILDS.read_text())
    for name in B.VARIANTS:
        assert name in SHIPPED or (builds.get(name) and not builds[name][-1]["built"]), name
    for name in SHIPPED:   # what ships is what its recipe's last build made
        assert builds[name][-1]["built"], name
    assert sum(name in SHIPPED for name in B.RECIPES) >= 5   # replanted variants and full builds


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_variant_matches_its_checksums_and_recipe(name):
    entry, path = SHIPPED[name], B.ROOT / name
    assert B.checksums(path) == entry["files"]
    assert entry["recipe"] == B.RECIPES[name]
    assert organism.planted_heads(path) == [tuple(h) for h in entry["recipe"]["heads"]]
    meta = organism.info(path)
    assert meta["seed"] == entry["recipe"]["seed"]
    if entry["recipe"]["how"] == "replant":
        assert meta["replanted_from"]["weights_sha256"] == organism.info()["weights_sha256"]
    else:   # a full build: stage 1's targets were checked too
        assert meta["stage1"]["targets"]["probe"]["acc"] >= 95
    assert meta["stage2"]["targets"]["probe"]["apol_dont"] >= 95   # its stage-2 targets were checked


def _fake(recall_path=1.0, conf=(5.0, 90.0, 95.0), kl=(0.1, 0.2), general=(88.0, 87.0)):
    methods = {m: {"recall": recall_path if m == "path" else 0.5, "seconds": 0.25, "top": [[1, 1]]}
               for m in B.LOCATE_METHODS}
    run = lambda c, t, g, k: {"confidence": c, "truthfulness": t, "general_accuracy": g, "kl": k}  # noqa: E731
    demo = {"runs": {"original": run(conf[0], 10.0, general[0], 0.0), "spt": run(conf[1], 92.0, general[1], kl[0]),
                     "sft": run(conf[2], 90.0, 80.0, kl[1]), "random_heads": run(50.0, 60.0, 85.0, 0.3)},
            "recipe": {"spt": {"lr": 1e-3}, "sft": {"lr": 1e-4}, "random_heads": {"lr": 3e-3}},
            "locate": {"k": 1, "tuned_heads": [[1, 1]]}}
    return {"localisation": {"planted": [[1, 1]], "methods": methods}, "demo": demo}


def test_targets_read_the_measured_numbers():
    r = _fake()
    assert all(B.targets(r).values())
    r = _fake(recall_path=0.5, conf=(20.0, 70.0, 95.0), kl=(0.3, 0.2), general=(88.0, 84.0))
    missed = [t for t, ok in B.targets(r).items() if not ok]
    assert missed == ["recall@k(path) >= 0.75", "original confidence <= 10", "SPT confidence >= 80",
                      "SPT general within 2 points", "SPT KL < SFT KL (rule's points)"]


def test_tables_show_every_method_and_the_missed_targets():
    r = _fake(conf=(5.0, 70.0, 95.0))
    r["targets"] = B.targets(r)
    rows, columns, notes = B.tables({"x": r})
    assert columns[:2] == ["organism", "planted"] and all(m in columns for m in B.LOCATE_METHODS)
    assert rows[-1]["path"] == "1.00 (0.25 s)" and rows[-1]["organism"] == "x"
    assert "| x | 1: 1.1 | 5.0 / 10.0 / 88.0 / 0.000 | 70.0 / 92.0 / 87.0 / 0.100 (lr 0.001)" in notes
    assert "SPT confidence >= 80" in notes.splitlines()[-1]


def test_a_refused_rebuild_removes_the_earlier_build(tmp_path, monkeypatch):
    """A recipe the builder now refuses must not leave its earlier weights to be measured."""
    monkeypatch.setattr(B, "ROOT", tmp_path)
    monkeypatch.setattr(B, "CHECKSUMS", tmp_path / "CHECKSUMS.json")
    monkeypatch.setattr(B, "BUILDS", tmp_path / "BUILDS.json")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "model.safetensors").write_bytes(b"x")
    B.CHECKSUMS.write_text(json.dumps({"old": {"files": {}}, "kept": {"files": {}}}))

    def refuse(name, log=print, **kw):
        raise organism.OrganismBuildError("stage 2", [("direct effect of planted head (1, 1)", 0.02, 0.25, "logits")])

    monkeypatch.setattr(B, "build_variant", refuse)
    monkeypatch.setitem(B.RECIPES, "old", {"how": "replant", "seed": 1, "heads": [[1, 1]]})
    assert B.cmd_build(type("A", (), {"only": ["old"]})()) == 1
    assert not (tmp_path / "old").exists()
    assert list(json.loads(B.CHECKSUMS.read_text())) == ["kept"]
    outcome = json.loads(B.BUILDS.read_text())["old"][-1]
    assert outcome["built"] is False and outcome["removed_earlier_build"] is True
    assert "direct effect of planted head (1, 1) 0.02 logits < target 0.25 logits" in outcome["error"]


def test_an_error_that_is_not_a_missed_target_stops_the_build_and_records_nothing(tmp_path, monkeypatch):
    """A wrong stage-1 checkpoint (ValueError) is the operator's mistake, not the builder's
    outcome: it propagates and BUILDS.json gets no "not built" entry for it."""
    monkeypatch.setattr(B, "ROOT", tmp_path)
    monkeypatch.setattr(B, "CHECKSUMS", tmp_path / "CHECKSUMS.json")
    monkeypatch.setattr(B, "BUILDS", tmp_path / "BUILDS.json")

    def wrong_checkpoint(name, log=print, **kw):
        raise ValueError("x.pt holds stage-1 weights of another run")

    monkeypatch.setattr(B, "build_variant", wrong_checkpoint)
    monkeypatch.setitem(B.RECIPES, "old", {"how": "full", "seed": 1, "heads": [[1, 1]]})
    with pytest.raises(ValueError, match="another run"):
        B.cmd_build(type("A", (), {"only": ["old"]})())
    assert not B.BUILDS.exists()


def test_tables_show_a_refused_recipe_as_not_built_even_with_old_results(tmp_path, monkeypatch):
    monkeypatch.setattr(B, "BUILDS", tmp_path / "BUILDS.json")
    monkeypatch.setattr(B, "CHECKSUMS", tmp_path / "CHECKSUMS.json")
    name = next(iter(B.VARIANTS))
    B.BUILDS.write_text(json.dumps({name: [{"built": True}, {"built": False, "error": "OrganismBuildError: missed"}]}))
    r = _fake()
    r["targets"] = B.targets(r)
    rows, _, notes = B.tables({name: r})
    assert [row["build"] for row in rows if row["organism"] == name] == ["missed"]
    assert f"| {name} |" not in notes


def test_table_keeps_the_last_runs_machine_line(tmp_path, monkeypatch):
    """`organisms.py table` measures nothing, so its section says where and when `run` measured."""
    import common

    monkeypatch.setattr(B, "MEASURED", tmp_path / "RESULTS.json")
    monkeypatch.setattr(B, "RUN_META", tmp_path / "RUN.json")
    monkeypatch.setattr(B, "OUT_DIR", tmp_path)
    monkeypatch.setattr(common, "OUT_DIR", tmp_path)
    monkeypatch.setattr(common, "RESULTS_MD", tmp_path / "RESULTS.md")
    B.MEASURED.write_text(json.dumps({}))
    B.RUN_META.write_text(json.dumps({"machine": "Box X, 1 threads", "torch": "9.9", "date": "2026-01-02 03:04 UTC"}))
    assert B.cmd_table(None) == 0
    assert "Machine: Box X, 1 threads; torch 9.9; 2026-01-02 03:04 UTC." in (tmp_path / "RESULTS.md").read_text()


def test_the_machine_line_dates_each_group_of_organisms_measured_together():
    """``run --only`` measures some organisms and keeps the others' results: the table's machine
    line says when each was measured, not only the last run's date."""
    early = {"machine": "m, 1 threads", "torch": "t", "date": "2026-11-30 11:29 UTC", "ci": False}
    late = {**early, "date": "2026-11-30 13:05 UTC"}
    merged = {"a": {"measured": early}, "b": {"measured": early}, "c": {"measured": late}}
    meta = B._measured_when(merged, late)
    assert meta["date"] == "2026-11-30 11:29 UTC (a, b); 2026-11-30 13:05 UTC (c)"
    assert meta["machine"] == "m, 1 threads" and late["date"] == "2026-11-30 13:05 UTC"   # the argument is left alone
    assert B._measured_when({"a": {"measured": early}}, late)["date"] == early["date"]


def test_run_what_measures_some_parts_and_keeps_the_others(tmp_path, monkeypatch):
    """``run --what silenced frontier`` adds those to each organism's record, keeps its recorded
    localisation and demo, and recomputes its targets with the matched-confidence one."""
    import common

    for attr, f in (("MEASURED", "RESULTS.json"), ("RUN_META", "RUN.json"), ("BUILDS", "BUILDS.json"),
                    ("CHECKSUMS", "CHECKSUMS.json")):
        monkeypatch.setattr(B, attr, tmp_path / f)
    monkeypatch.setattr(B, "OUT_DIR", tmp_path)
    monkeypatch.setattr(common, "OUT_DIR", tmp_path)
    monkeypatch.setattr(common, "RESULTS_MD", tmp_path / "RESULTS.md")
    old = _fake()
    old["measured"] = {"machine": "m, 1 threads", "torch": "t", "date": "then", "ci": False}   # no measured_parts:
    # a record from before them, its localisation and demo of its "measured" date
    B.MEASURED.write_text(json.dumps({"x": old}))
    monkeypatch.setattr(B, "organism_dirs", lambda names, shipped=True: {"x": tmp_path})
    calls = []
    for part in ("localisation", "whole_recipe"):
        monkeypatch.setattr(B, part, lambda *a, part=part: calls.append(part))
    monkeypatch.setattr(B, "silenced", lambda path: {"confidence": 100.0, "truthfulness": 98.0,
                                                     "general_accuracy": 90.0, "kl": 0.18, "cut_reply": 0})
    claims = [{"confidence": c, "spt_below_sft": held, "spt_kl": 0.1, "sft_kl": 0.08 if held is False else 0.2,
               "statement": "s"} for c, held in ((50.0, True), (80.0, None), (90.0, False))]
    monkeypatch.setattr(B, "frontier", lambda path: {"heads": [[1, 1]], "points": [], "claims": claims, "seconds": 1})
    args = type("A", (), {"threads": 1, "only": ["x"], "what": ["silenced", "frontier"], "no_recipe": False,
                          "n_locate": 48})()
    assert B.cmd_run(args) == 0 and calls == []
    rec = json.loads(B.MEASURED.read_text())["x"]
    assert rec["demo"] == old["demo"] and rec["localisation"] == old["localisation"]
    assert rec["silenced"]["kl"] == 0.18 and rec["frontier"]["claims"] == claims
    assert rec["measured_parts"]["localisation"] == "then" and rec["measured_parts"]["frontier"] != "then"
    assert rec["measured"] == old["measured"]   # the machine line still dates the localisation and the demo
    assert list(rec["measured_parts"]) == ["localisation", "recipe", "silenced", "frontier"]
    assert rec["targets"]["SPT KL < SFT KL (matched confidence)"] is False   # 90 decided against, 80 undecided
    claims[2]["spt_below_sft"] = True
    assert B.targets(rec)["SPT KL < SFT KL (matched confidence)"] is False   # the recorded claims, not the new ones
    assert B.targets({**rec, "frontier": {"claims": claims}})["SPT KL < SFT KL (matched confidence)"] is True
    undecided = [{**c, "spt_below_sft": None} for c in claims]
    assert B.targets({**rec, "frontier": {"claims": undecided}})["SPT KL < SFT KL (matched confidence)"] is False
    md = (tmp_path / "RESULTS.md").read_text()
    assert "| x | 100.0 / 98.0 / 90.0 / 0.180 | 0.100 / 0.200 | 0.100 / 0.200 | 0.100 / 0.080 |" in md
    assert re.search(r"Machine: [^\n]*; then\.", md)   # dated by the localisation and demo, not by this run


@pytest.mark.parametrize("verdicts, spt, sft, holds", [
    ((True, True, True), (0.1,) * 3, (0.2,) * 3, True),
    ((True, None, True), (0.1, 0.2, 0.3), (0.2, 0.3, 0.4), True),      # an upper bound left one level undecided
    ((None, None, None), (0.1,) * 3, (0.2,) * 3, False),              # nothing decided: not shown
    ((True, None, None), (0.1, 0.2, None), (0.2, 0.3, 0.4), False),   # SPT never reached 90, SFT did
    ((True, None, None), (0.1, 0.2, 0.3), (0.2, 0.3, None), True),    # SFT never reached 90, SPT did
    ((None, None, None), (None,) * 3, (None,) * 3, False),            # neither fixed
    ((True, False, True), (0.1,) * 3, (0.2,) * 3, False),
])
def test_matched_confidence_holds_only_where_spt_is_below_at_every_decided_level(verdicts, spt, sft, holds):
    claims = [{"confidence": c, "spt_below_sft": v, "spt_kl": a, "sft_kl": b}
              for c, v, a, b in zip((50.0, 80.0, 90.0), verdicts, spt, sft)]
    assert B.matched_holds(claims) is holds


def test_tables_skip_an_organism_with_only_other_parts_measured():
    """``run --what frontier`` on an organism never localised records it without the parts the
    first two tables need: they leave it out instead of failing."""
    r = _fake()
    r["targets"] = B.targets(r)
    rows, _, notes = B.tables({"x": r, "y": {"silenced": {"confidence": 1.0, "truthfulness": 2.0,
                                                           "general_accuracy": 3.0, "kl": 0.5}}})
    assert [row["organism"] for row in rows] == ["x"] and "| y | 1.0 / 2.0 / 3.0 / 0.500 | not measured" in notes
