"""pinpoint.batching: pad-id policy, padding/collate, device policy, batching order."""
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from pinpoint.batching import (IGNORE, Batch, collate, input_device, length_batches, make_batch, pad, pad_id,
                               take_last)
from pinpoint.models import spec_for
from pinpoint.testing import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def test_pad_both_sides_and_errors():
    ids, mask = pad([[1, 2, 3], [4]], 0, "right")
    assert ids.tolist() == [[1, 2, 3], [4, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, mask = pad([[1, 2, 3], [4]], 9, "left")
    assert ids.tolist() == [[1, 2, 3], [9, 9, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    with pytest.raises(ValueError, match="padding side must be 'left' or 'right'"):
        pad([[1]], 0, "middle")
    with pytest.raises(ValueError, match="empty list"):
        pad([], 0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_make_batch_positions_follow_real_tokens(side):
    b = make_batch([[5, 6, 7], [8]], pad_id=0, side=side)
    assert b.size == 2 and b.T == 3 and b.side == side
    real = b.attention_mask.bool()
    assert b.input_ids[0].tolist() == [5, 6, 7] and b.input_ids[1][real[1]].tolist() == [8]
    assert b.position_ids[0].tolist() == [0, 1, 2] and b.position_ids[1][real[1]].tolist() == [0]
    assert take_last(b.input_ids, b.last).tolist() == [7, 8]
    sub = b.rows(torch.tensor([1]))
    assert isinstance(sub, Batch) and sub.input_ids.tolist() == b.input_ids[1:].tolist() and sub.side == side


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_rows_give_what_each_row_gives_alone(side):
    model = tiny_model("llama", seed=3)
    seqs = [[5, 9, 11, 13, 2], [7, 8]]
    b = make_batch(seqs, pad_id=0, side=side)
    with torch.no_grad():
        out = model(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids).logits
        for i, s in enumerate(seqs):
            alone = model(input_ids=torch.tensor([s])).logits[0, -1]
            torch.testing.assert_close(take_last(out, b.last)[i], alone, atol=1e-5, rtol=1e-5)


def test_collate_pads_labels_with_ignore():
    ids, mask, labels = collate([([1, 2, 3], [IGNORE, 2, 3]), ([4], [4])], pad_id=7)
    assert ids.tolist() == [[1, 2, 3], [4, 7, 7]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert labels.tolist() == [[IGNORE, 2, 3], [4, IGNORE, IGNORE]]
    ids, mask, labels = collate([([1, 2, 3], [1])], pad_id=0)  # short labels: the rest carry no loss
    assert labels.tolist() == [[1, IGNORE, IGNORE]]
    with pytest.raises(ValueError, match="row 0 has 2 labels for 1 tokens"):
        collate([([1], [1, 2])], pad_id=0)


def test_length_batches_longest_first_stable():
    seqs = [[1], [1, 2, 3], [1, 2], [4, 5, 6], [7]]
    assert length_batches(seqs, 2) == [[1, 3], [2, 0], [4]]
    assert length_batches([], 3) == []
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        length_batches(seqs, 0)


def test_pad_id_policy_order():
    ns = SimpleNamespace
    assert pad_id(ns(pad_token_id=5, eos_token_id=6)) == 5
    assert pad_id(ns(pad_token_id=None, eos_token_id=6)) == 6
    model = ns(config=ns(pad_token_id=None, eos_token_id=[8, 9]), generation_config=ns(pad_token_id=3))
    assert pad_id(ns(pad_token_id=None, eos_token_id=None), model) == 8
    assert pad_id(None, ns(config=ns(), generation_config=ns(pad_token_id=3))) == 3
    assert pad_id(None, None) == 0


def test_input_device_is_the_embedding_device():
    model = tiny_model("gpt2")
    spec = spec_for(model)
    assert input_device(model) == spec.device == torch.device("cpu")
    assert input_device(spec) == spec.device
    assert input_device(nn.Linear(2, 2)) == torch.device("cpu")   # no embedding: its parameters
    assert input_device(lambda x: x) == torch.device("cpu")        # nothing at all: the CPU
    meta = nn.Linear(2, 2, device="meta")
    assert input_device(meta) == torch.device("meta")
