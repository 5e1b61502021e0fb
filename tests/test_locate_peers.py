"""locate(method="activation", positions="all") against the peers' own implementations.

* TransformerLens 4.x: ``transformer_lens.patching.get_act_patch_attn_head_out_all_pos`` on a
  ``TransformerBridge`` booted from a local HF Llama object
  (``TransformerBridge.boot_transformers(name, hf_model=model, tokenizer=...)``). The bridge
  keeps the raw HF weights by default (no LayerNorm folding, no weight centring: that only
  happens after ``enable_compatibility_mode()``, which we never call), so it is numerically
  the HF model; a test below checks that its logits equal HF's.
* nnsight 0.8: one ``tracer.invoke`` per head inside one trace, patching the head's slice of
  ``o_proj.input`` at every position with the source run's value (how nnsight's docs do
  activation patching).

Both peers are driven on deep copies: booting the bridge rewires the HF model in place
(each decoder layer gets an ``_original_component`` child), and pinpoint must see a stock model.

Tolerance: 1e-4 of the largest |value| (fp32), as in tests/test_locate.py.
"""
from __future__ import annotations

import copy

import pytest
import torch

import pinpoint as pp
from pinpoint.testing import tiny_model, word_tokenizer

METRIC_TOKENS = (11, 17)
N_LAYERS, N_HEADS = 3, 4


def metric_last(logits):
    """pinpoint's metric: logits [N, vocab] at the last position -> [N]."""
    return logits[:, METRIC_TOKENS[0]].float() - logits[:, METRIC_TOKENS[1]].float()


def metric_tl(logits):
    """The same metric for TransformerLens / nnsight, which hand over logits [batch, pos, vocab]."""
    return metric_last(logits[:, -1])


def equal_length_pairs(n, T, vocab, seed=0):
    """Counterfactual-style token-id pairs of equal length: shared prefix, different suffix."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(7, vocab, (n, T), generator=g)
    src = base.clone()
    src[:, T // 3:] = torch.randint(7, vocab, (n, T - T // 3), generator=g)
    return base, src


def make_model(n_kv_heads=None):
    return tiny_model("llama", n_layers=N_LAYERS, n_heads=N_HEADS, n_kv_heads=n_kv_heads, hidden_size=32,
                      dtype=torch.float32)


def pinpoint_scores(model, base, src):
    pairs = [pp.PromptPair(b.tolist(), s.tolist()) for b, s in zip(base, src)]
    return pp.locate(model, None, pairs, method="activation", positions="all", metric=metric_last,
                     progress=False, batch_size=2)


def assert_close_rel(got, want, rel=1e-4):
    scale = want.abs().max()
    assert scale > 1e-3, "degenerate test: no head has any effect"
    err = (got - want).abs().max()
    assert err <= rel * scale, f"max error {float(err):.3g} > {rel} x {float(scale):.3g}"


# --- TransformerLens ------------------------------------------------------------------------

def tl_bridge(model, tmp_path):
    """A TransformerBridge over a deep copy of `model`, booted offline.

    boot_transformers(hf_model=...) takes the config from the object (no hub call). The
    tokenizer must be loadable by name: the bridge reloads it with add_bos_token=True from
    ``init_kwargs["name_or_path"]``, which an in-memory tokenizer lacks, so we save the word
    tokenizer to a local directory first. Inputs are token tensors, so it is never used to
    encode anything.
    """
    from transformers import AutoTokenizer
    from transformer_lens.model_bridge import TransformerBridge

    tok_dir = tmp_path / "tok"
    word_tokenizer().save_pretrained(tok_dir)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    bridge = TransformerBridge.boot_transformers("pinpoint-tiny-llama", hf_model=copy.deepcopy(model),
                                                 tokenizer=tok, device="cpu", dtype=torch.float32)
    bridge.eval()
    return bridge


@pytest.mark.parametrize("n_kv_heads", [None, 2], ids=["mha", "gqa"])
def test_bridge_is_the_hf_model(tmp_path, n_kv_heads):
    pytest.importorskip("transformer_lens")
    model = make_model(n_kv_heads)
    bridge = tl_bridge(model, tmp_path)
    base, _ = equal_length_pairs(3, 9, model.config.vocab_size)
    with torch.no_grad():
        want = model(base).logits
        got = bridge(base)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n_kv_heads", [None, 2], ids=["mha", "gqa"])
def test_activation_all_positions_matches_transformer_lens(tmp_path, n_kv_heads):
    pytest.importorskip("transformer_lens")
    from transformer_lens.patching import get_act_patch_attn_head_out_all_pos

    model = make_model(n_kv_heads)
    base, src = equal_length_pairs(3, 9, model.config.vocab_size, seed=1)
    scores = pinpoint_scores(model, base, src)

    bridge = tl_bridge(model, tmp_path)
    with torch.no_grad():
        _, source_cache = bridge.run_with_cache(src)
        # TL's vocabulary: the "corrupted" run is the one patched (our base); the "clean" cache is
        # what gets patched in (our source). reduce="none" keeps one value per pair.
        res = get_act_patch_attn_head_out_all_pos(bridge, base, source_cache, metric_tl, reduce="none",
                                                  baseline=True)
    patched = res.values.float().cpu()                     # [L, H, B]
    assert patched.shape == (N_LAYERS, N_HEADS, 3)
    tl_per_pair = (patched - res.baseline.float().cpu()).permute(2, 0, 1)   # [B, L, H]

    torch.testing.assert_close(scores.base, res.baseline.float().cpu(), atol=1e-4, rtol=1e-4)
    assert_close_rel(scores.per_pair, tl_per_pair)
    assert_close_rel(scores.values, tl_per_pair.mean(0))


# --- nnsight --------------------------------------------------------------------------------

def nnsight_per_pair(model, base, src):
    """[B, L, H] activation patching effects: one invoke per head in one batched trace."""
    import nnsight
    from nnsight import TransformersModel

    nm = TransformersModel(copy.deepcopy(model), tokenizer=word_tokenizer())
    L, H = model.config.num_hidden_layers, model.config.num_attention_heads
    D = model.config.head_dim
    with torch.no_grad():
        with nm.trace(src):
            z_src = nnsight.save([])
            for layer in range(L):
                z_src.append(nm.model.layers[layer].self_attn.o_proj.input)
        with nm.trace() as tracer:
            outs = nnsight.save([])
            with tracer.invoke(base):
                base_logits = nm.lm_head.output[:, -1].save()
            for layer in range(L):
                for h in range(H):
                    with tracer.invoke(base):
                        sl = slice(h * D, (h + 1) * D)
                        nm.model.layers[layer].self_attn.o_proj.input[:, :, sl] = z_src[layer][:, :, sl]
                        outs.append(nm.lm_head.output[:, -1])
    mb = metric_last(base_logits)
    vals = torch.stack([metric_last(o) for o in outs]).view(L, H, -1)
    return (vals - mb).permute(2, 0, 1), mb


@pytest.mark.parametrize("n_kv_heads", [None, 2], ids=["mha", "gqa"])
def test_activation_all_positions_matches_nnsight(n_kv_heads):
    pytest.importorskip("nnsight")
    model = make_model(n_kv_heads)
    base, src = equal_length_pairs(3, 9, model.config.vocab_size, seed=2)
    scores = pinpoint_scores(model, base, src)
    want, mb = nnsight_per_pair(model, base, src)
    torch.testing.assert_close(scores.base, mb, atol=1e-4, rtol=1e-4)
    assert_close_rel(scores.per_pair, want)
    assert_close_rel(scores.values, want.mean(0))
