"""pinpoint.files: atomic writes and publishing a staged directory."""
import json
import os

import pytest
import torch

from pinpoint.files import (atomic_torch_save, atomic_write_bytes, atomic_write_json, atomic_write_text, publish_dir,
                            staging_dir)


def _leftovers(d):
    return [p.name for p in d.iterdir() if p.name.endswith(".tmp")]


def test_atomic_writes_create_parents_and_replace(tmp_path):
    p = tmp_path / "a" / "b" / "x.bin"
    assert atomic_write_bytes(p, b"one") == p and p.read_bytes() == b"one"
    atomic_write_bytes(p, b"two")
    assert p.read_bytes() == b"two"
    atomic_write_text(tmp_path / "t.txt", "h\u00e9")
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "h\u00e9"
    atomic_write_json(tmp_path / "j.json", {"a": [1, 2]}, sort_keys=True)
    raw = (tmp_path / "j.json").read_text()
    assert raw.endswith("}\n") and json.loads(raw) == {"a": [1, 2]}
    atomic_torch_save({"w": torch.arange(3)}, tmp_path / "c.pt")
    assert torch.equal(torch.load(tmp_path / "c.pt")["w"], torch.arange(3))
    assert _leftovers(tmp_path) == [] and _leftovers(p.parent) == []


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    p = tmp_path / "x.json"
    atomic_write_json(p, {"ok": 1})
    with pytest.raises(TypeError):
        atomic_write_json(p, {"bad": object()})
    assert json.loads(p.read_text()) == {"ok": 1}
    q = tmp_path / "c.pt"
    atomic_torch_save({"ok": 1}, q)
    with pytest.raises(Exception):
        atomic_torch_save({"bad": lambda: 0}, q)  # lambdas cannot be pickled: fails mid-write
    assert torch.load(q) == {"ok": 1}
    assert _leftovers(tmp_path) == []


def test_publish_dir_replaces_same_names_and_keeps_others(tmp_path):
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "sub" / "old.txt").write_text("old")
    (out / "keep.txt").write_text("keep")
    (out / "r.json").write_text("old")
    with staging_dir(out) as work:
        assert work.parent == out.parent and work.name.startswith(".out.tmp-")
        (work / "sub").mkdir()
        (work / "sub" / "new.txt").write_text("new")
        (work / "r.json").write_text("new")
        assert publish_dir(work, out) == out
        assert list(work.iterdir()) == []
    assert not work.exists()
    assert sorted(os.listdir(out)) == ["keep.txt", "r.json", "sub"]
    assert os.listdir(out / "sub") == ["new.txt"] and (out / "r.json").read_text() == "new"


def test_publish_dir_creates_out_and_refuses_files(tmp_path):
    with staging_dir(tmp_path / "new") as work:
        (work / "a").write_text("a")
        publish_dir(work, tmp_path / "new")
    assert (tmp_path / "new" / "a").read_text() == "a"
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="not a directory"):
        publish_dir(tmp_path / "new", tmp_path / "file")
    with pytest.raises(NotADirectoryError, match="not a directory to publish"):
        publish_dir(tmp_path / "missing", tmp_path / "new")


def test_staging_dir_is_removed_on_error(tmp_path):
    with pytest.raises(RuntimeError):
        with staging_dir(tmp_path / "out") as work:
            (work / "half").write_text("x")
            raise RuntimeError("boom")
    assert not work.exists() and not (tmp_path / "out").exists()


def test_replace_dir_leaves_exactly_the_new_contents(tmp_path):
    from pinpoint.files import replace_dir, staging_dir

    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    with staging_dir(out) as work:
        (work / "new.txt").write_text("new")
        assert replace_dir(work, out) == out
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]       # no temporary left beside it


def test_file_sha256_is_the_digest_of_the_bytes(tmp_path):
    import hashlib

    from pinpoint.files import file_sha256

    data = bytes(range(256)) * 5000   # more than one read chunk
    (tmp_path / "f").write_bytes(data)
    assert file_sha256(tmp_path / "f") == hashlib.sha256(data).hexdigest()
