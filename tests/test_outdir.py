"""outdir.OutDir: the --out policy (refuse foreign contents, lock, stage and publish, create nothing early)."""
from __future__ import annotations

import json

import pytest

from pinpoint.errors import UserError
from pinpoint.outdir import LOCK_NAME, MARKER_NAME, OutDir


def test_check_creates_nothing_and_refuses_files(tmp_path):
    OutDir(tmp_path / "a" / "b", command="locate").check()
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match=r"^--out .*f exists and is not a directory$"):
        OutDir(tmp_path / "f", command="locate").check()
    with pytest.raises(UserError, match=r"f exists and is not a directory"):
        OutDir(tmp_path / "f" / "sub", command="locate").check()


def test_foreign_contents_are_refused_unless_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "heatmap.png").write_text("mine")
    with pytest.raises(UserError, match=r"is not empty and it holds files pinpoint did not write \(heatmap.png\); "
                                        r"choose another --out, or pass --overwrite"):
        OutDir(out, command="locate").check()
    with OutDir(out, command="locate", overwrite=True).open() as stage:
        (stage / "scores.csv").write_text("new")
    assert (out / "heatmap.png").read_text() == "mine"  # --overwrite replaces only what the command writes
    assert (out / "scores.csv").read_text() == "new"


def test_same_command_may_rerun_another_may_not(tmp_path):
    out = tmp_path / "out"
    with OutDir(out, command="eval").open() as stage:
        (stage / "results.json").write_text("1")
    info = json.loads((out / MARKER_NAME).read_text())
    assert info["command"] == "eval" and info["finished"] and info["started"]
    with OutDir(out, command="eval").open() as stage:
        (stage / "results.json").write_text("2")
    assert (out / "results.json").read_text() == "2"
    with pytest.raises(UserError, match=r"it holds results of `pinpoint eval`"):
        OutDir(out, command="tune").check()


def test_a_rerun_leaves_no_stale_outputs_and_no_user_file_is_touched(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with OutDir(out, command="eval", overwrite=True).open() as stage:
        (stage / "results.json").write_text("1")
        (stage / "general.json").write_text("from run 1")
    assert json.loads((out / MARKER_NAME).read_text())["outputs"] == ["general.json", "results.json"]
    with OutDir(out, command="eval", overwrite=True).open() as stage:  # run 2: no --general this time
        (stage / "results.json").write_text("2")
    assert sorted(p.name for p in out.iterdir() if p.name not in (MARKER_NAME, LOCK_NAME)) == ["notes.txt",
                                                                                              "results.json"]
    assert (out / "notes.txt").read_text() == "mine"


def test_results_appear_only_on_success(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        with OutDir(out, command="locate").open() as stage:
            (stage / "heatmap.png").write_text("half")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []  # a failed first run leaves no --out and no staging sibling
    with OutDir(out, command="locate").open() as stage:
        (stage / "heatmap.png").write_text("v1")
    with pytest.raises(KeyboardInterrupt):
        with OutDir(out, command="locate").open() as stage:
            (stage / "heatmap.png").write_text("v2-partial")
            raise KeyboardInterrupt
    assert (out / "heatmap.png").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_second_run_fails_fast_while_the_first_holds_the_lock(tmp_path):
    out = tmp_path / "out"
    with OutDir(out, command="tune").open():
        assert (out / LOCK_NAME).exists()
        with pytest.raises(UserError, match=r"is in use by another pinpoint run \(pid \d+, `pinpoint tune` since"):
            with OutDir(out, command="tune").open():
                pass
    with OutDir(out, command="tune").open() as stage:  # released when the first run ends
        (stage / "done").write_text("")
    assert (out / "done").exists()


def test_stage_false_yields_out_itself(tmp_path):
    out = tmp_path / "out"
    with OutDir(out, command="demo").open(stage=False) as path:
        assert path == out and out.is_dir()
        (path / "report.json").write_text("{}")
    assert (out / "report.json").exists() and json.loads((out / MARKER_NAME).read_text())["command"] == "demo"


def test_only_rank_0_writes_under_torchrun(tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setenv("RANK", "1")
    with OutDir(out, command="tune").open() as stage:
        assert not stage.is_relative_to(tmp_path)
        (stage / "adapter").write_text("rank 1")
    assert not out.exists() and not stage.exists()
    monkeypatch.setenv("RANK", "0")
    with OutDir(out, command="tune").open() as stage:
        (stage / "adapter").write_text("rank 0")
        with monkeypatch.context() as m:  # rank 1 meanwhile: no lock taken, so no clash with rank 0's
            m.setenv("RANK", "1")
            with OutDir(out, command="tune").open():
                pass
    assert (out / "adapter").read_text() == "rank 0"


def test_other_ranks_do_not_race_rank_0s_writes(tmp_path, monkeypatch):
    """Rank 0 may be mid-way through writing its marker (an atomic write's temporary file sits
    in --out, and no marker yet) when rank 1 starts: rank 1 must not call that a foreign
    --out. A CI run once failed this way (`torchrun ... pinpoint tune`: rank 1 exited 2)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / f".{MARKER_NAME}.abc123.tmp").write_text("{")
    OutDir(out, command="tune").check()         # the marker's temporary is pinpoint's own, on any rank
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        OutDir(out, command="tune").check()
    monkeypatch.setenv("RANK", "1")             # only rank 0 checks: it alone writes --out
    OutDir(out, command="tune").check()
    with OutDir(out, command="tune").open() as stage:
        assert not stage.is_relative_to(tmp_path)


def test_an_unwritable_place_is_a_user_error(tmp_path, monkeypatch):
    import errno
    import pathlib

    def refuse(self, *a, **k):  # what mkdir does in a read-only directory (root is never refused)
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(pathlib.Path, "mkdir", refuse)
    with pytest.raises(UserError, match=r"^--out .*out: cannot write there \(Permission denied: .*out\)$"):
        with OutDir(tmp_path / "out", command="eval").open():
            pass


def test_check_refuses_an_unwritable_parent_early(tmp_path, monkeypatch):
    import os

    monkeypatch.setattr(os, "access", lambda path, mode: False)  # as for a non-root user in a read-only dir
    with pytest.raises(UserError, match=r"cannot write there \(no write permission on "):
        OutDir(tmp_path / "out", command="eval").check()
