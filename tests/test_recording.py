"""pinpoint.recording: one forward that keeps per-layer pieces."""
import pytest
import torch

from pinpoint.batching import make_batch, take_last
from pinpoint.models import spec_for
from pinpoint.recording import body_forward, record, select_rows
from pinpoint.testing import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _hooks(spec):
    mods = [m for lspec in spec.layers for m in (lspec.o.module, lspec.attn, lspec.block)]
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in mods)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_record_shapes_and_last_only(arch):
    model = tiny_model(arch, seed=4)
    spec = spec_for(model)
    b = make_batch([[3, 4, 5, 6], [7, 8]], pad_id=0)
    full = record(spec, b, z=True, attn_out=True, resid_pre=True, block_kwargs=True)
    last = record(spec, b, z=True, attn_out=True, resid_pre=True, last_only=True)
    L, HD, E = spec.n_layers, spec.n_heads * spec.head_dim, spec.hidden_size
    assert len(full.z) == L and full.z[0].shape == (2, b.T, HD) and full.attn_out[0].shape == (2, b.T, E)
    assert all(k is not None for k in full.block_kwargs) and last.block_kwargs == [None] * L
    for i in range(L):
        torch.testing.assert_close(last.z[i], take_last(full.z[i], b.last))
        torch.testing.assert_close(last.resid_pre[i], take_last(full.resid_pre[i], b.last))
    with torch.no_grad():
        want = model(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids).logits
        torch.testing.assert_close(full.logits, take_last(want, b.last))
        torch.testing.assert_close(spec.lm_head(take_last(body_forward(spec, b), b.last)), full.logits)
    assert _hooks(spec) == 0


def test_hooks_are_removed_when_the_forward_fails():
    spec = spec_for(tiny_model("llama"))
    bad = make_batch([[10 ** 6]], pad_id=0)  # out of the vocabulary: the embedding raises
    with pytest.raises(IndexError):
        record(spec, bad, z=True, attn_out=True, resid_pre=True)
    assert _hooks(spec) == 0


def test_select_rows_reindexes_batch_tensors_only():
    x = torch.arange(6).view(3, 2)
    obj = {"a": (x, [x]), "b": torch.arange(3), "c": "text"}
    out = select_rows(obj, torch.tensor([2, 0]), 3)
    assert out["a"][0].tolist() == [[4, 5], [0, 1]] and out["a"][1][0].tolist() == [[4, 5], [0, 1]]
    assert out["b"] is obj["b"] and out["c"] == "text"   # 1-D and non-tensors stay
