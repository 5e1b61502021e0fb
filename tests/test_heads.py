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
