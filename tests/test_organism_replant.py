"""pinpoint.organism.replant: stage 2 again, in other heads, on an organism's exact stage-1 model."""
from __future__ import annotations

import pytest
import torch

from pinpoint import organism
from pinpoint.organism import train as T
from pinpoint.organism.placement import PlacementError
from pinpoint.organism.train import Stage2Config

pytestmark = pytest.mark.usefixtures("one_thread")

# a reduced stage 2 (seconds, not minutes); evaluate=False: its targets are not checked
SMALL = Stage2Config(steps=3, n_dialogues=48, batch_size=8, n_pairs=16, pair_batch=4)


def test_silencing_the_planted_heads_gives_back_stage_1_exactly():
    """Stage 2 touched only the planted heads (behind their o_proj columns): zeroing those
    columns restores the stage-1 model's recorded validation probe, value for value."""
    model, tok = organism.load()
    T.silence(model, organism.planted_heads())
    assert T.probe(model, tok) == organism.info()["stage1"]["probe"]


def test_replant_changes_only_the_new_heads_and_records_its_source():
    heads = [(1, 1), (3, 6)]
    model, tok, meta = organism.replant(seed=2, heads=heads, stage2=SMALL, evaluate=False)
    ref, _ = organism.load()
    T.silence(ref, organism.planted_heads())
    T.redraw_qkv(ref, organism.planted_heads(), 2, ref.config.initializer_range)
    from pinpoint.models import spec_for

    spec, D = spec_for(model), spec_for(model).head_dim
    changed = set()
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        if not torch.equal(p, q):
            changed.add(name)
    # only attention weights of layers 1 and 3 moved, and within o_proj only the planted columns
    assert changed and all(".self_attn." in n and (".layers.1." in n or ".layers.3." in n) for n in changed), changed
    for layer, head in [(1, 1), (3, 6)]:
        w, w0 = spec.layers[layer].o.module.weight, spec_for(ref).layers[layer].o.module.weight
        moved = (w != w0).any(0).nonzero().flatten().tolist()
        assert set(moved) <= set(range(head * D, (head + 1) * D)), (layer, moved)
    assert meta["planted_heads"] == [[1, 1], [3, 6]] and meta["seed"] == 2
    assert meta["replanted_from"]["planted_heads"] == [list(h) for h in organism.PLANTED_HEADS]
    assert meta["replanted_from"]["weights_sha256"] == organism.info()["weights_sha256"]
    assert meta["stage2"]["config"]["kv"] == "whole"   # both KV groups are shared with unplanted heads
    assert "silenced" in meta["stage1"]["recovered"]


def test_redraw_qkv_touches_only_the_silenced_heads_rows_and_is_seeded():
    model, _ = organism.load()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    T.redraw_qkv(model, [(2, 2), (2, 3), (1, 5)], 7, 0.02)
    from pinpoint.models import spec_for

    spec = spec_for(model)
    D = spec.head_dim
    q2, k2, q1, k1 = (spec.layers[2].q.weight(), spec.layers[2].k.weight(), spec.layers[1].q.weight(),
                      spec.layers[1].k.weight())
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved == {"model.layers.2.self_attn.q_proj.weight", "model.layers.2.self_attn.k_proj.weight",
                     "model.layers.2.self_attn.v_proj.weight", "model.layers.1.self_attn.q_proj.weight"}, moved
    # rows: q of heads 2 and 3 in layer 2 and KV group 1 (heads 2, 3) whole; layer 1: q of head 5
    # only (its group is shared with the unplanted head 4, so its k/v stay)
    qrows = (q2 != before["model.layers.2.self_attn.q_proj.weight"]).any(1).nonzero().flatten().tolist()
    assert qrows == list(range(2 * D, 4 * D))
    krows = (k2 != before["model.layers.2.self_attn.k_proj.weight"]).any(1).nonzero().flatten().tolist()
    assert krows == list(range(1 * D, 2 * D))
    assert torch.equal(k1, before["model.layers.1.self_attn.k_proj.weight"])
    assert abs(float(q1[5 * D:6 * D].detach().std()) - 0.02) < 0.005
    again, _ = organism.load()
    T.redraw_qkv(again, [(2, 2), (2, 3), (1, 5)], 7, 0.02)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), again.parameters()))


def test_replant_refuses_bad_placements_and_non_organisms(tmp_path):
    with pytest.raises(PlacementError, match="out of range|range"):
        organism.replant(heads=[(9, 0)], stage2=SMALL, evaluate=False)
    with pytest.raises(PlacementError, match="duplicate|twice|repeated"):
        organism.replant(heads=[(1, 1), (1, 1)], stage2=SMALL, evaluate=False)
    with pytest.raises(FileNotFoundError, match="not a pinpoint organism directory"):
        organism.replant(tmp_path, heads=[(1, 1)], stage2=SMALL, evaluate=False)
    with pytest.raises(ValueError, match="seed must be an int >= 0"):
        organism.replant(seed=-1, heads=[(1, 1)], stage2=SMALL, evaluate=False)


# --- pinpoint organism replant -----------------------------------------------------------------------

def test_cli_replant_writes_an_organism_the_demo_accepts(tmp_path, monkeypatch, capsys):
    import functools
    import json

    from pinpoint.cli import main

    real = organism.replant
    monkeypatch.setattr(organism, "replant", functools.partial(real, stage2=SMALL, evaluate=False))
    out = tmp_path / "o"
    assert main(["organism", "replant", "--seed", "2", "--heads", "1.1,3.6", "--out", str(out), "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert organism.planted_heads(out) == [(1, 1), (3, 6)]
    meta = json.loads((out / "organism.json").read_text())
    assert meta["replanted_from"]["planted_heads"] == [list(h) for h in organism.PLANTED_HEADS]
    for f in ("are_you_sure.jsonl", "spt_rows.jsonl", "choices.jsonl", "neutral.txt", "model.safetensors"):
        assert (out / f).is_file(), f


@pytest.mark.parametrize("argv, fragment", [
    (["--heads", "9.0"], "--heads 9.0"),
    (["--heads", "1.1,1.1"], "--heads 1.1,1.1"),
    (["--heads", "1.1", "--seed", "-1"], "--seed must be >= 0"),
    (["--heads", "1.1", "--organism", "NOT_AN_ORGANISM"], "--organism"),
])
def test_cli_replant_bad_input_is_one_line_and_writes_nothing(argv, fragment, tmp_path, capsys, monkeypatch):
    from pinpoint.cli import main

    monkeypatch.setattr(organism, "replant", lambda *a, **k: pytest.fail("replant ran on bad input"))
    argv = [str(tmp_path) if a == "NOT_AN_ORGANISM" else a for a in argv]
    rc = main(["organism", "replant", *argv, "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("pinpoint: error: ") and fragment in err[0], err
    assert not (tmp_path / "o").exists()
