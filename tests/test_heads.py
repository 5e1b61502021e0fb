"""heads.py: the one head validator, HeadScores.top's NaN guard, scores.csv and the heatmap."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import pinpoint as pp
from pinpoint.heads import HeadScores, HeadSet, as_head_list


# --- as_head_list: the one validator ---------------------------------------------------------

def test_order_is_kept_unless_sort():
    heads = [(2, 1), (0, 3), (1, 0)]
    assert as_head_list(heads) == heads
    assert as_head_list(heads, sort=True) == [(0, 3), (1, 0), (2, 1)]
    assert as_head_list(HeadSet(heads), n_layers=3, n_heads=4) == heads


def test_accepted_forms_become_int_pairs():
    class Head:
        def __init__(self, layer, head):
            self.layer, self.head = layer, head

    got = as_head_list([[1, 2], (np.int64(0), torch.tensor(3)), Head(2, 0)])
    assert got == [(1, 2), (0, 3), (2, 0)] and all(type(v) is int for p in got for v in p)
    assert as_head_list(torch.tensor([[1, 0], [0, 1]])) == [(1, 0), (0, 1)]


@pytest.mark.parametrize("heads, exc, match", [
    ([], ValueError, r"^heads is empty"),
    ([(0, 1), (2, 2), (0, 1)], ValueError, r"^heads\[2\] = \(0, 1\) is a duplicate"),
    ([(0, 0), (3, 0)], ValueError, r"^heads\[1\] = \(3, 0\): layer 3 is out of range; the model has 3 layers \(0\.\.2\)"),
    ([(-1, 0)], ValueError, r"layer -1 is out of range"),
    ([(0, 4)], ValueError, r"^heads\[0\] = \(0, 4\): head 4 is out of range; each layer has 4 query heads \(0\.\.3\)"),
    ([(0, 1, 2)], TypeError, r"^heads\[0\] = \(0, 1, 2\) is not a \(layer, head\) pair"),
    ([3], TypeError, r"^heads\[0\] = 3 is not a \(layer, head\) pair"),
    ([(0, 1.5)], TypeError, r"^heads\[0\] = \(0, 1\.5\): layer and head must be ints$"),
    ([(True, 1)], TypeError, r"not bools"),
    ("0.1", TypeError, r"got the string '0\.1'"),
    (7, TypeError, r"got int"),
])
def test_bad_entries_are_named(heads, exc, match):
    with pytest.raises(exc, match=match):
        as_head_list(heads, n_layers=3, n_heads=4)


def test_bounds_are_optional_and_where_names_the_input():
    assert as_head_list([(99, 99)]) == [(99, 99)]
    assert as_head_list([], allow_empty=True) == []
    with pytest.raises(ValueError, match=r"^exclude\[0\] = \(5, 0\)"):
        as_head_list([(5, 0)], n_layers=2, where="exclude")


def test_headset_and_mask_use_the_validator():
    with pytest.raises(ValueError, match="listed twice"):
        pp.HeadSet([(0, 1), (0, 1)])
    m = pp.HeadSet([(1, 2)]).mask(2, 3)
    assert m.dtype == torch.bool and m.sum() == 1 and m[1, 2]


# --- HeadScores: NaN guard, CSV, figure ------------------------------------------------------

def _scores(values, **meta):
    return HeadScores(torch.tensor(values, dtype=torch.float32), meta={"method": "path", "metric": "apology",
                                                                      "aggregate": "diff", **meta})


def test_top_never_returns_nan_or_inf_heads():
    s = _scores([[float("nan"), -1.0, 0.5], [float("-inf"), -2.0, float("inf")]])
    with pytest.warns(RuntimeWarning, match=r"3 head\(s\) have NaN or inf scores"):
        assert s.top(3).to_list() == [[1, 1], [0, 1], [0, 2]]
    with pytest.warns(RuntimeWarning):
        assert s.top(2, largest=True).to_list() == [[0, 2], [0, 1]]
    with pytest.warns(RuntimeWarning), pytest.raises(ValueError, match=r"k=4, but only 3 of 6 heads have finite"):
        s.top(4)
    assert "top=" in repr(s)  # the repr shows finite heads only, without warning


def test_save_writes_scores_csv(tmp_path):
    s = _scores([[0.5, -1.0], [float("nan"), -2.0]])
    s.save(tmp_path / "sc")
    lines = (tmp_path / "sc" / "scores.csv").read_text().splitlines()
    assert lines[0] == "layer,head,score,rank"
    rows = [ln.split(",") for ln in lines[1:]]
    assert [(r[0], r[1]) for r in rows] == [("0", "0"), ("0", "1"), ("1", "0"), ("1", "1")]
    assert {(r[0], r[1]): r[3] for r in rows} == {("0", "0"): "3", ("0", "1"): "2", ("1", "0"): "", ("1", "1"): "1"}
    assert float(rows[1][2]) == -1.0 and rows[2][2] == "nan"
    assert torch.allclose(HeadScores.load(tmp_path / "sc").values, s.values, equal_nan=True)


def test_heatmap_is_legible(tmp_path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    g = torch.Generator().manual_seed(0)
    v = torch.randn(6, 8, generator=g)
    v[2, 3] = -10.0  # the darkest blue cell: its rank must be written in white
    v[4, 5] = 0.0    # a white cell (planted): dark text
    s = HeadScores(v, meta={"method": "path", "metric": "apology", "aggregate": "diff"})
    fig = s.figure(k=4, planted=[(4, 5), (0, 0)])
    FigureCanvasAgg(fig).draw()
    w, h = fig.get_size_inches() * fig.dpi
    assert w >= 1200
    ax, cax = fig.axes[0], fig.axes[1]
    assert cax.get_ylabel() == "Δ logit(Apologies) − logit(Yes)"
    assert ax.get_xlabel() == "head" and ax.get_ylabel() == "layer"
    title = ax.title
    assert "path patching" in title.get_text() and "top 4 outlined" in title.get_text()
    tb, fb = title.get_window_extent(), fig.bbox  # the whole title is inside the picture
    assert fb.x0 <= tb.x0 and tb.x1 <= fb.x1 and tb.y1 <= fb.y1
    texts = {t.get_text(): t.get_color() for t in ax.texts}
    assert texts["1"] == "white" and set(texts) == {"1", "2", "3", "4"}
    outlines = [p for p in ax.patches if p.get_edgecolor()[:3] == (0.0, 0.0, 0.0)]
    assert len(outlines) == 4 and all(p.get_linewidth() >= 2 for p in outlines)
    assert len(ax.patches) == 6  # + two planted outlines
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["top 4 (rank in the cell)", "planted"]
    path = s.plot(tmp_path / "h.png", k=4)
    from PIL import Image

    assert Image.open(path).size[0] >= 1200


def test_text_colour_by_luminance():
    from pinpoint.heads import _text_colour

    assert _text_colour((0.02, 0.19, 0.38, 1)) == "white"  # navy
    assert _text_colour((0.97, 0.97, 0.97, 1)) == "black"
    assert _text_colour((0.4, 0.0, 0.12, 1)) == "white"    # dark red


def test_colorbar_label_names_the_metric():
    assert _scores([[1.0]], aggregate="relative").colorbar_label() == "% change of logit(Apologies) − logit(Yes)"
    assert _scores([[1.0]], metric="my_metric").colorbar_label() == "Δ my_metric"
