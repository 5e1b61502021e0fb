"""pinpoint.models: adapters must describe the stock modules exactly, or refuse clearly."""

from __future__ import annotations

import math

import pytest
import torch
import transformers as tf
from torch import nn

from pinpoint import UnsupportedArchitectureError, adapter_for
from pinpoint.models import ModelAdapter, Projection
from pinpoint.testing import tiny_model

# (arch, tiny_model kwargs): GQA ratios 1/2/4 and head_dim * n_heads != hidden_size.
CONFIGS = [
    ("llama", {}),
    ("llama", dict(n_heads=4, n_kv_heads=2)),
    ("llama", dict(n_heads=8, n_kv_heads=2, head_dim=8)),
    ("llama", dict(hidden_size=64, n_heads=4, n_kv_heads=1, head_dim=24)),
    ("mistral", dict(hidden_size=64, n_heads=4, n_kv_heads=2, head_dim=24)),
    ("mistral", dict(n_heads=4, n_kv_heads=1, head_dim=64)),
    ("qwen2", {}),
    ("qwen2", dict(hidden_size=64, n_heads=4, n_kv_heads=2, head_dim=80)),
    ("qwen2", dict(n_heads=8, n_kv_heads=2)),
    ("gpt2", {}),
    ("gpt2", dict(hidden_size=48, n_heads=2)),
    ("gpt2", dict(hidden_size=64, n_heads=1)),
]
IDS = [f"{a}-" + "-".join(f"{k}{v}" for k, v in kw.items()) for a, kw in CONFIGS]


def _expected(model):
    c = model.config
    if c.model_type == "gpt2":
        return dict(n_heads=c.n_head, n_kv_heads=c.n_head, head_dim=c.n_embd // c.n_head, hidden=c.n_embd)
    return dict(
        n_heads=c.num_attention_heads, n_kv_heads=c.num_key_value_heads, head_dim=c.head_dim, hidden=c.hidden_size
    )


def _ids(n_batch=2, n_tok=9, vocab=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(7, vocab, (n_batch, n_tok), generator=g)


@pytest.fixture(params=CONFIGS, ids=IDS)
def model(request):
    arch, kw = request.param
    return tiny_model(arch, **kw)


def test_numbers_match_config(model):
    a = adapter_for(model)
    e = _expected(model)
    assert a.arch == model.config.model_type
    got = (a.n_heads, a.n_kv_heads, a.head_dim, a.hidden_size)
    assert got == (e["n_heads"], e["n_kv_heads"], e["head_dim"], e["hidden"])
    assert a.group_size == e["n_heads"] // e["n_kv_heads"]
    assert a.n_layers == len(a.layers) == len(a.decoder) == model.config.num_hidden_layers
    assert a.vocab_size == model.config.vocab_size
    assert a.max_positions == model.config.max_position_embeddings == 128
    assert math.isclose(a.attn_scale, e["head_dim"] ** -0.5, rel_tol=1e-12)
    assert a.has_qkv_bias == (a.arch in ("qwen2", "gpt2"))
    assert a.lm_head is model.lm_head and a.embed is model.get_input_embeddings()
    assert a.model is model and a.config is model.config
    assert adapter_for(a) is a


def test_projection_shapes(model):
    a = adapter_for(model)
    qd, kd = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
    for i, layer in enumerate(a.layers):
        assert layer.index == i and layer.block is a.decoder[i]
        for proj, out in ((layer.q, qd), (layer.k, kd), (layer.v, kd), (layer.o, a.hidden_size)):
            assert proj.weight().shape == (out, proj.in_features)
            if proj.bias() is not None:
                assert proj.bias().shape == (out,)
        assert layer.q.in_features == layer.k.in_features == layer.v.in_features == a.hidden_size
        assert layer.o.in_features == qd
        assert (layer.q.bias() is not None) == a.has_qkv_bias
    if a.arch == "gpt2":
        q, k, v = a.layers[0].q, a.layers[0].k, a.layers[0].v
        assert q.module is k.module is v.module and q.fused
        assert (q.out_offset, k.out_offset, v.out_offset) == (0, a.hidden_size, 2 * a.hidden_size)


def _flat_index(proj: Projection, r: int, c: int) -> tuple[int, int]:
    """Index into ``proj.module.weight`` of element (r, c) of ``proj.weight()``."""
    return (proj.out_offset + r, c) if proj.kind == "linear" else (c, proj.out_offset + r)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_views_alias_parameters(arch):
    model = tiny_model(arch, n_heads=4, n_kv_heads=2 if arch != "gpt2" else None)
    a = adapter_for(model)
    ids = _ids()
    with torch.no_grad():
        before = model(ids).logits
    layer = a.layers[1]
    for name in ("q", "k", "v", "o"):
        proj = getattr(layer, name)
        w = proj.weight()
        assert w.untyped_storage().data_ptr() == proj.module.weight.untyped_storage().data_ptr()
        full_before = proj.module.weight.detach().clone()
        r, c = w.shape[0] - 1, w.shape[1] - 2
        with torch.no_grad():
            w[r, c] += 1.5
        diff = (proj.module.weight.detach() - full_before).nonzero().tolist()
        assert diff == [list(_flat_index(proj, r, c))]
        b = proj.bias()
        if b is not None:
            b_before = proj.module.bias.detach().clone()
            with torch.no_grad():
                b[1] -= 2.0
            assert (proj.module.bias.detach() - b_before).nonzero().flatten().tolist() == [proj.out_offset + 1]
    with torch.no_grad():
        after = model(ids).logits
    assert not torch.allclose(before, after)


def test_head_slices_and_kv_map(model):
    a = adapter_for(model)
    seen = []
    for h in range(a.n_heads):
        s = a.head_slice(h)
        assert s.stop - s.start == a.head_dim
        seen.extend(range(s.start, s.stop))
        assert a.kv_head_of(h) == h * a.n_kv_heads // a.n_heads
        g = a.kv_head_slice(a.kv_head_of(h))
        assert g.stop <= a.n_kv_heads * a.head_dim
    assert seen == list(range(a.n_heads * a.head_dim))
    with pytest.raises(IndexError):
        a.head_slice(a.n_heads)
    with pytest.raises(IndexError):
        a.kv_head_of(-1)


class _Capture:
    """Forward hooks recording each layer's block input, attention input, q/k/v/o and MLP input."""

    def __init__(self, adapter: ModelAdapter):
        self.data: dict[tuple[int, str], torch.Tensor] = {}
        self.handles = []
        for layer in adapter.layers:
            i = layer.index
            self._pre(layer.block, (i, "block_in"))
            self._pre(layer.attn, (i, "attn_in"))
            self._post(layer.attn, (i, "attn_out"))
            self._pre(layer.mlp, (i, "mlp_in"))
            self._pre(layer.o.module, (i, "z"))
            self._post(layer.o.module, (i, "o_out"))
            for name in ("q", "k", "v"):
                # GPT-2's q/k/v share c_attn: the same full output is stored under each name.
                self._post(getattr(layer, name).module, (i, name))

    def _pre(self, module, key):
        def hook(mod, args, kwargs):
            self.data[key] = args[0] if args else kwargs["hidden_states"]

        self.handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def _post(self, module, key):
        def hook(mod, args, out):
            self.data[key] = out[0] if isinstance(out, tuple) else out

        self.handles.append(module.register_forward_hook(hook))

    def __enter__(self):
        return self.data

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def test_projections_and_norms_reproduce_model(model):
    a = adapter_for(model)
    with torch.no_grad(), _Capture(a) as cap:
        model(_ids())
        for layer in a.layers:
            i = layer.index
            x = cap[i, "attn_in"]
            torch.testing.assert_close(layer.input_norm(cap[i, "block_in"]), x)
            for name in ("q", "k", "v"):
                proj = getattr(layer, name)
                torch.testing.assert_close(proj.apply(x), cap[i, name][..., proj.out_slice])
            torch.testing.assert_close(layer.o.apply(cap[i, "z"]), cap[i, "o_out"])
            resid = cap[i, "block_in"] + cap[i, "attn_out"]
            torch.testing.assert_close(layer.post_attn_norm(resid), cap[i, "mlp_in"])


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def test_per_head_attention_reproduces_o_input(model):
    """Rebuild every head's output from the adapter's pieces alone and compare with the o input."""
    a = adapter_for(model)
    ids = _ids(n_tok=11)
    B, T = ids.shape
    D = a.head_dim
    pos = torch.arange(T)[None]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    with torch.no_grad(), _Capture(a) as cap:
        model(ids)
        for layer in a.layers:
            x = cap[layer.index, "attn_in"]
            q = layer.q.apply(x).view(B, T, a.n_heads, D)
            k = layer.k.apply(x).view(B, T, a.n_kv_heads, D)
            v = layer.v.apply(x).view(B, T, a.n_kv_heads, D)
            if a.positions == "rope":
                cos, sin = a.rotary_emb(x, pos)  # [1, T, D]
                cos, sin = cos[:, :, None], sin[:, :, None]
                q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
            z = torch.empty(B, T, a.n_heads * D)
            for h in range(a.n_heads):
                g = a.kv_head_of(h)
                s = torch.einsum("bid,bjd->bij", q[:, :, h], k[:, :, g]) * a.attn_scale
                p = s.masked_fill(~causal, float("-inf")).softmax(-1)
                z[..., a.head_slice(h)] = p @ v[:, :, g]
            torch.testing.assert_close(z, cap[layer.index, "z"], rtol=1e-4, atol=1e-5)


def test_bfloat16_model():
    model = tiny_model("qwen2", n_kv_heads=2, dtype=torch.bfloat16)
    a = adapter_for(model)
    assert a.dtype == torch.bfloat16 and a.device.type == "cpu"
    assert a.layers[0].q.weight().dtype == torch.bfloat16


def test_gpt2_without_attention_scaling():
    a = adapter_for(tiny_model("gpt2", scale_attn_weights=False))
    assert a.attn_scale == 1.0


# ---------------------------------------------------------------------------------------------
# Refusals: each names the model class and the missing or unsupported thing.


def _raises(model, *fragments, **kw):
    with pytest.raises(UnsupportedArchitectureError) as info:
        adapter_for(model, **kw)
    msg = str(info.value)
    for frag in (type(model).__name__,) + fragments:
        assert frag in msg, msg
    return msg


def test_rejects_bert():
    cfg = tf.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    _raises(tf.BertForMaskedLM(cfg), "model.layers", "transformer.h")


def test_rejects_base_model_without_lm_head():
    _raises(tiny_model("llama").model, "lm_head")
    _raises(tiny_model("gpt2").transformer, "lm_head")


def test_rejects_non_module():
    with pytest.raises(UnsupportedArchitectureError, match="str"):
        adapter_for("llama")


def test_rejects_wrapped_model():
    _raises(nn.DataParallel(tiny_model("llama")), "wrapper", "model.module")


def test_rejects_missing_projection():
    model = tiny_model("llama")
    del model.model.layers[1].self_attn.q_proj
    _raises(model, "model.layers[1].self_attn.q_proj")

    model = tiny_model("gpt2")
    del model.transformer.h[0].attn.c_attn
    _raises(model, "transformer.h[0].attn.c_attn")


def test_rejects_missing_norm():
    model = tiny_model("mistral")
    del model.model.layers[0].post_attention_layernorm
    _raises(model, "post_attention_layernorm")


def test_rejects_wrong_projection_type():
    model = tiny_model("qwen2")
    model.model.layers[0].self_attn.o_proj = nn.Identity()
    _raises(model, "o_proj", "Identity", "nn.Linear")


def test_rejects_extra_attention_submodule():
    model = tiny_model("llama")
    model.model.layers[0].self_attn.q_norm = nn.LayerNorm(8)
    _raises(model, "q_norm")


def test_rejects_attention_parameters():
    model = tiny_model("llama")
    model.model.layers[1].self_attn.sinks = nn.Parameter(torch.zeros(4))
    _raises(model, "sinks")


def test_rejects_qk_norm_relative():
    # Issue 13: per-head q/k norms (Qwen3) keep heads separable and are supported (exactness:
    # tests/test_zoo.py); a norm over all heads together mixes them and is refused by name.
    cfg = tf.Qwen3Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2,
    )
    a = adapter_for(tf.Qwen3ForCausalLM(cfg))
    assert (a.arch, a.head_dim, a.n_heads * a.head_dim != a.hidden_size) == ("qwen3", 128, True)
    model = tf.Qwen3ForCausalLM(cfg)
    model.model.layers[0].self_attn.q_norm = nn.LayerNorm(4 * 128)  # over all heads together
    _raises(model, "self_attn.q_norm` normalises across all heads together")
    olmo2 = tf.Olmo2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=4, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    _raises(tf.Olmo2ForCausalLM(olmo2), "across all heads together (q_norm")


def test_accepts_same_layout_relative():
    cfg = tf.Starcoder2Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, sliding_window=None,
    )
    a = adapter_for(tf.Starcoder2ForCausalLM(cfg))
    assert (a.arch, a.n_heads, a.n_kv_heads, a.head_dim) == ("starcoder2", 4, 2, 8)


def test_sliding_window():
    # Issue 13: a window is irrelevant to sequences that fit in it (Mistral-7B-v0.1's 4096 is no
    # longer refused); a longer sequence is refused by ModelSpec.check_length, naming the window.
    assert adapter_for(tiny_model("mistral")).sliding_window == 4096
    model = tiny_model("mistral", sliding_window=16)
    a = adapter_for(model)
    assert (a.sliding_window, a.window_layer, a.max_seq_len) == (16, 0, 16)
    a.check_length(16)
    with pytest.raises(ValueError, match=r"pairs\[0\].base is 17 tokens, longer than the sliding window of 16 "
                                         r"tokens that layer 0 attends through \(config.sliding_window\)"):
        a.check_length(17, "pairs[0].base")
    a = adapter_for(model, max_seq_len=8)
    assert (a.sliding_window, a.max_seq_len) == (16, 8)
    with pytest.raises(ValueError, match="longer than the model's context of 8 tokens"):
        a.check_length(9)

    model = tiny_model("qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=1)
    a = adapter_for(model)
    assert (a.sliding_window, a.window_layer, a.max_seq_len) == (8, 1, 8)
    with pytest.raises(ValueError, match="sliding window of 8 tokens that layer 1"):
        a.check_length(9)
    # Llama ignores config.sliding_window entirely.
    assert adapter_for(tiny_model("llama", sliding_window=8)).sliding_window is None


def test_sliding_window_is_exact_within_it_and_refused_beyond(tokenizer):
    """Mistral with a window of 16: locate on prompts that fit equals the same model without a
    window; a prompt longer than the window gets a one-line error naming both numbers."""
    import pinpoint as pp

    windowed = tiny_model("mistral", sliding_window=16, attn_implementation="sdpa")
    plain = tiny_model("mistral", sliding_window=None, attn_implementation="sdpa")
    pairs = [pp.PromptPair(list(range(7, 21)), list(range(8, 22)))]
    fn = lambda logits: logits[:, 11].float() - logits[:, 17].float()  # noqa: E731
    got = pp.locate(windowed, None, pairs, metric=fn, progress=False).values
    want = pp.locate(plain, None, pairs, metric=fn, progress=False).values
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    long = [pp.PromptPair(list(range(7, 27)), list(range(8, 28)))]
    with pytest.raises(ValueError, match="20 tokens, longer than the (sliding window of 16|model's context of 16)"):
        pp.locate(windowed, None, long, metric=fn, progress=False)


def test_rejects_gpt2_cross_attention():
    _raises(tiny_model("gpt2", add_cross_attention=True), "add_cross_attention")


def test_rejects_gpt2_layer_scaled_attention():
    _raises(tiny_model("gpt2", scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx")


def test_rejects_config_module_mismatch():
    model = tiny_model("llama", n_heads=4, n_kv_heads=2)
    model.config.num_key_value_heads = 4
    _raises(model, "k_proj.weight", "shape")

    model = tiny_model("qwen2", hidden_size=64, head_dim=24)
    model.config.head_dim = 16
    _raises(model, "head_dim")

    model = tiny_model("gpt2", n_layers=3)
    del model.transformer.h[2]
    _raises(model, "num_hidden_layers")


def test_rejects_known_incompatible_model_type():
    cfg = tf.GemmaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=1, head_dim=8,
    )
    _raises(tf.GemmaForCausalLM(cfg), "gemma")


def test_rejects_an_unknown_attention_implementation():
    model = tiny_model("llama")
    model.config._attn_implementation = "my_sparse_attention"
    _raises(model, "attention implementation 'my_sparse_attention'", "attn_implementation='sdpa'")


@pytest.mark.parametrize("n_kv", [4, 2])
def test_phi3_fused_qkv_rows_are_the_head_slices(n_kv):
    """Phi-3 fuses q/k/v into one qkv_proj ([q | k | v] rows): each projection is a row block of
    it, and applying the projections reproduces the fused module's output."""
    cfg = tf.Phi3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=n_kv, max_position_embeddings=128,
                        sliding_window=None, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = tf.Phi3ForCausalLM(cfg).eval()
    a = adapter_for(model)
    layer = a.layers[1]
    fused = model.model.layers[1].self_attn.qkv_proj
    assert layer.q.module is layer.k.module is layer.v.module is fused
    assert (layer.k.out_offset, layer.v.out_offset) == (32, 32 + 8 * n_kv)
    x = torch.randn(3, 32)
    y = fused(x)
    got = torch.cat([layer.q.apply(x), layer.k.apply(x), layer.v.apply(x)], -1)
    torch.testing.assert_close(got, y)
    fused.weight.data[-1] = 0  # a wrong shape is refused by name
    model.model.layers[0].self_attn.qkv_proj = nn.Linear(32, 40, bias=False)
    _raises(model, "qkv_proj.weight", "has shape (40, 32)")


def test_rejects_mixture_of_experts_mlps():
    cfg = tf.MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=2, num_experts_per_tok=1,
                           sliding_window=None)
    # the attribute is `mlp` in transformers 5 and `block_sparse_moe` in 4.x: the message names the one there
    name = "mlp" if hasattr(tf.MixtralForCausalLM(cfg).model.layers[0], "mlp") else "block_sparse_moe"
    _raises(tf.MixtralForCausalLM(cfg), f"model.layers[0].{name}` (MixtralSparseMoeBlock)", "mixture-of-experts")
