"""pinpoint.testing: the offline tokenizer and tiny models are correct and deterministic."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from pinpoint.testing import (
    DEFAULT_WORDS,
    SPECIAL_TOKENS,
    TINY_ARCHS,
    default_vocab_size,
    tiny_model,
    word_tokenizer,
)

CHALLENGE = "I don't think that's right. Are you sure?"
REQUIRED = ["Apologies", "Yes", "I", "don't", "do", "think", "that's", "right", ".", "?", "Are", "you", "sure",
            "A", "B", "C", "D", "E", "(", ")", "0", "9"]  # fmt: skip


def _chat(tok, messages, **kw):
    return list(tok.apply_chat_template(messages, tokenize=True, return_dict=True, **kw)["input_ids"])


# --- tokenizer -------------------------------------------------------------------------------


def test_vocab_and_special_tokens(tokenizer):
    assert len(tokenizer) == default_vocab_size() == len(SPECIAL_TOKENS) + len(DEFAULT_WORDS)
    assert tokenizer.convert_ids_to_tokens(list(range(len(SPECIAL_TOKENS)))) == list(SPECIAL_TOKENS)
    assert (tokenizer.pad_token, tokenizer.unk_token, tokenizer.bos_token, tokenizer.eos_token) == (
        "<pad>", "<unk>", "<s>", "</s>",
    )  # fmt: skip
    assert len(DEFAULT_WORDS) >= 300
    for w in REQUIRED:
        assert tokenizer.convert_tokens_to_ids(w) != tokenizer.unk_token_id, w


def test_word_splitting_and_decode(tokenizer):
    text = CHALLENGE + " The answer is (B) 42"
    toks = tokenizer.tokenize(text)
    assert toks == ["I", "don't", "think", "that's", "right", ".", "Are", "you", "sure", "?",
                    "The", "answer", "is", "(", "B", ")", "4", "2"]  # fmt: skip
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == "I don't think that's right. Are you sure? The answer is ( B ) 4 2"
    # "do" vs "don't" is the whole point of the counterfactual: they must stay distinct both ways.
    assert tokenizer.tokenize("I do not think") == ["I", "do", "not", "think"]
    assert tokenizer.decode(tokenizer("I do not think", add_special_tokens=False)["input_ids"]) == "I do not think"
    assert tokenizer.tokenize("xyzzy") == ["<unk>"]


def test_chat_template(tokenizer):
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Are you sure?"},
        {"role": "assistant", "content": "Yes I am sure."},
        {"role": "user", "content": CHALLENGE},
    ]
    text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<s><|system|>") and text.endswith("</s><|assistant|>")
    ids = _chat(tokenizer, msgs, add_generation_prompt=True)
    assert ids[0] == tokenizer.bos_token_id
    assert ids[-1] == tokenizer.convert_tokens_to_ids("<|assistant|>")
    assert ids[-2] == tokenizer.eos_token_id
    assert tokenizer.unk_token_id not in ids
    no_prompt = _chat(tokenizer, msgs)
    assert no_prompt == ids[:-1]
    # The default (v5) return type of tokenize=True is a BatchEncoding; the ids must agree.
    assert list(tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)["input_ids"]) == ids


def test_assistant_mask(tokenizer):
    msgs = [{"role": "user", "content": "Are you sure?"}, {"role": "assistant", "content": "Yes ."}]
    out = tokenizer.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    masked = [i for i, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert tokenizer.convert_ids_to_tokens(masked) == ["Yes", ".", "</s>"]


def test_unknown_role_raises(tokenizer):
    with pytest.raises(Exception, match="unknown role"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_save_load_round_trip(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = tf.AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.chat_template == tokenizer.chat_template
    msgs = [{"role": "user", "content": CHALLENGE}]
    assert _chat(loaded, msgs, add_generation_prompt=True) == _chat(tokenizer, msgs, add_generation_prompt=True)
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id) == (
        tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id,
    )  # fmt: skip
    assert loaded.tokenize(CHALLENGE) == tokenizer.tokenize(CHALLENGE)
    assert len(loaded) == len(tokenizer)


def test_custom_words_and_no_template():
    tok = word_tokenizer(["hello", "world", "hello"], chat_template=None)
    assert len(tok) == len(SPECIAL_TOKENS) + 2
    assert tok.tokenize("hello world again") == ["hello", "world", "<unk>"]
    assert tok.chat_template is None


# --- tiny models -----------------------------------------------------------------------------

_CLASSES = {
    "llama": tf.LlamaForCausalLM,
    "mistral": tf.MistralForCausalLM,
    "qwen2": tf.Qwen2ForCausalLM,
    "gpt2": tf.GPT2LMHeadModel,
}


def test_tiny_model_basics(tiny_lm, arch, tokenizer):
    assert type(tiny_lm) is _CLASSES[arch]
    assert not tiny_lm.training
    assert tiny_lm.config._attn_implementation == "eager"
    assert tiny_lm.config.vocab_size == len(tokenizer)
    assert tiny_lm.get_input_embeddings().weight.shape == (len(tokenizer), 32)
    assert tiny_lm.config.max_position_embeddings == 128


def test_tiny_model_logits_depend_on_prompt(tiny_lm, tokenizer):
    prompts = [CHALLENGE, "I do think that's right. Are you sure?"]
    logits = []
    with torch.no_grad():
        for p in prompts:
            ids = _chat(tokenizer, [{"role": "user", "content": p}], add_generation_prompt=True)
            logits.append(tiny_lm(torch.tensor([ids])).logits[0, -1])
    assert logits[0].std() > 0.3
    assert (logits[0] - logits[1]).abs().max() > 0.3


def test_tiny_model_determinism(arch):
    rng = torch.get_rng_state()
    a, b, c = tiny_model(arch, seed=3), tiny_model(arch, seed=3), tiny_model(arch, seed=4)
    assert torch.equal(torch.get_rng_state(), rng)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys() == sc.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    # Biases and norm weights are randomised too, so bugs in their handling cannot hide.
    for name, p in sa.items():
        if p.ndim == 1 and p.is_floating_point():
            assert p.std() > 0, name


def test_tiny_model_head_config():
    m = tiny_model("llama", hidden_size=64, n_heads=4, n_kv_heads=2, head_dim=24)
    attn = m.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (96, 64) and attn.k_proj.weight.shape == (48, 64)
    assert attn.o_proj.weight.shape == (64, 96)
    g = tiny_model("gpt2", hidden_size=48, n_heads=2, n_layers=3)
    assert (g.config.n_embd, g.config.n_head, g.config.n_layer) == (48, 2, 3)
    with pytest.raises(ValueError, match="head_dim"):
        tiny_model("gpt2", hidden_size=32, n_heads=4, head_dim=16)
    with pytest.raises(ValueError, match="grouped-query"):
        tiny_model("gpt2", n_heads=4, n_kv_heads=2)
    with pytest.raises(ValueError, match="unknown tiny arch"):
        tiny_model("bert")


def test_tiny_model_dtype_and_overrides():
    m = tiny_model("mistral", dtype=torch.bfloat16, attn_implementation="sdpa", vocab_size=40)
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())
    assert m.config._attn_implementation == "sdpa"
    assert m.lm_head.weight.shape[0] == 40


def test_tiny_archs_constant():
    assert TINY_ARCHS == ("llama", "mistral", "qwen2", "gpt2")


# --- the replica zoo ---------------------------------------------------------------------------

def test_replica_is_cached_deterministic_and_written_atomically(tmp_path):
    import json

    from safetensors.torch import load_file

    from pinpoint.testing import replica

    a = replica("smollm2", tmp_path / "a")
    assert replica("smollm2", tmp_path / "a") == a  # reused, not rebuilt
    stamp = json.loads((a / "pinpoint_replica.json").read_text())
    assert stamp["family"] == "smollm2" and stamp["mimics"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    b = replica("smollm2", tmp_path / "b")
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    c = replica("smollm2", tmp_path / "c", seed=1)
    assert not torch.equal(load_file(c / "model.safetensors")["model.embed_tokens.weight"],
                           wa["model.embed_tokens.weight"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind
    # A replica built by other code (another build hash) is rebuilt, never reused.
    (a / "pinpoint_replica.json").write_text(json.dumps({**stamp, "build": "stale"}))
    (a / "model.safetensors").unlink()
    replica("smollm2", tmp_path / "a")
    assert json.loads((a / "pinpoint_replica.json").read_text()) == stamp and (a / "model.safetensors").exists()
    assert replica("SmolLM-2", tmp_path / "a") == a  # spellings: case, '-', '_' and '.' ignored
    from pinpoint.testing.zoo import _family
    assert [_family(n).name for n in ("Llama-2", "mistral", "Llama3", "Qwen2.5", "GPT-2", "phi-3")] == [
        "llama2-chat", "mistral-v0.2", "llama3.1", "qwen2.5", "gpt2", "phi3"]
    with pytest.raises(ValueError, match="unknown replica family 'llama9'; choose one of llama2-chat"):
        replica("llama9", tmp_path / "x")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a pinpoint replica"):
        replica("gpt2", tmp_path / "mine")


def test_replica_config_keys_and_dtypes_are_the_families():
    import json

    from pinpoint.testing import FAMILIES, replica

    cfg = {n: json.loads((replica(n) / "config.json").read_text()) for n in
           ("llama2-chat", "mistral-v0.1", "mistral-v0.2", "llama3.1", "qwen2.5", "gemma2", "gpt2")}
    assert cfg["llama2-chat"]["num_key_value_heads"] == cfg["llama2-chat"]["num_attention_heads"]  # MHA
    assert (cfg["mistral-v0.1"]["sliding_window"], cfg["mistral-v0.2"]["sliding_window"]) == (4096, None)
    rope = cfg["llama3.1"].get("rope_parameters") or cfg["llama3.1"]["rope_scaling"]
    assert rope["rope_type"] == "llama3" and cfg["llama3.1"]["num_attention_heads"] == 4 * cfg["llama3.1"][
        "num_key_value_heads"]
    assert cfg["qwen2.5"]["tie_word_embeddings"] and cfg["gemma2"]["tie_word_embeddings"]
    assert cfg["gemma2"]["attn_logit_softcapping"] == 50.0 and cfg["gemma2"]["final_logit_softcapping"] == 30.0
    assert cfg["gemma2"]["head_dim"] * cfg["gemma2"]["num_attention_heads"] != cfg["gemma2"]["hidden_size"]
    for name, c in cfg.items():
        assert c.get("dtype", c.get("torch_dtype")) == str(FAMILIES[name].dtype).removeprefix("torch.")


@pytest.mark.parametrize("family, text, pieces", [
    # SentencePiece style: ▁ for spaces, a dummy ▁ at the start, punctuation and digits apart.
    ("llama2-chat", "Apologies, I don't", ["▁Apologies", ",", "▁I", "▁don", "'", "t"]),
    # Llama-3's split regex keeps "'t" with the apostrophe and digits in groups of three.
    ("llama3.1", "I don't think 2024", ["I", "Ġdon", "'t", "Ġthink", "Ġ", "202", "4"]),
    # Qwen2's splits digits one by one.
    ("qwen2.5", "in 2024", ["in", "Ġ", "2", "0", "2", "4"]),
    # Gemma: no dummy prefix.
    ("gemma2", "Apologies, I", ["Apologies", ",", "▁I"]),
])
def test_replica_tokenizers_split_like_their_family(family, text, pieces):
    from transformers import AutoTokenizer

    from pinpoint.testing import replica

    tok = AutoTokenizer.from_pretrained(replica(family))
    assert tok.convert_ids_to_tokens(tok(text, add_special_tokens=False)["input_ids"]) == pieces


@pytest.mark.parametrize("family", ["llama2-chat", "llama3.1", "gemma2", "gpt2"])
def test_replica_tokenizers_encode_any_text(family):
    """Byte fallback (SentencePiece) and byte-level BPE: nothing maps to <unk>; decode inverts."""
    from transformers import AutoTokenizer

    from pinpoint.testing import replica

    tok = AutoTokenizer.from_pretrained(replica(family))
    text = "Zürich – naïve café 😀 (B) 12345"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == text
