"""Issue 13 fixes in pinpoint.metrics, on the replica tokenizers: the metric reads the first
token the model emits for the word in its reply; near-zero denominators never reach top()."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from transformers import AutoTokenizer

import pinpoint as pp
from pinpoint.metrics import RATIO_EPS, aggregate_scores, first_token, resolve_metric
from pinpoint.testing import replica, tiny_model, word_tokenizer


def _tok(family):
    return AutoTokenizer.from_pretrained(replica(family), local_files_only=True)


def _reply_first_token(tok, word):
    """The token right after the generation prompt when the template renders the reply."""
    user = [{"role": "user", "content": "Are you sure?"}]
    prompt = tok.apply_chat_template(user, add_generation_prompt=True, tokenize=True)["input_ids"]
    full = tok.apply_chat_template(user + [{"role": "assistant", "content": word + ", I was wrong."}],
                                   tokenize=True)["input_ids"]
    assert full[:len(prompt)] == prompt
    return full[len(prompt)]


@pytest.mark.parametrize("family, apology, yes", [
    ("llama2-chat", "▁Apologies", "▁Yes"),     # template puts ' ' + content after [/INST]
    ("mistral-v0.1", "▁Apologies", "▁Yes"),    # "[/INST]Apologies": SentencePiece replies keep ▁
    ("llama3.1", "Apologies", "Yes"),          # after "<|end_header_id|>\n\n": no leading space
    ("qwen2.5", "Apologies", "Yes"),           # after "<|im_start|>assistant\n"
    ("gpt2", "ĠApologies", "ĠYes"),            # no template: a word after a space carries Ġ
])
def test_metric_tokens_are_the_first_tokens_of_the_reply(family, apology, yes):
    tok = _tok(family)
    r = resolve_metric("apology", tok)
    assert (r.tokens.apology_token, r.tokens.yes_token) == (apology, yes)
    assert r.tokens.ids == tuple(tok.convert_tokens_to_ids([apology, yes]))
    if family in ("llama2-chat", "llama3.1", "qwen2.5"):  # the template renders exactly that token
        assert r.tokens.apology_id == _reply_first_token(tok, "Apologies")
        assert r.tokens.yes_id == _reply_first_token(tok, "Yes")


def test_qwen3_metric_reads_the_word_after_the_empty_think_block():
    """Qwen3's template writes "<think>\n\n</think>\n\n" before the final reply. pinpoint renders
    prompts with enable_thinking=False (chat.apply_template), so the prompt already ends with
    the empty think block and the first new token is the word itself: no warning is needed."""
    import warnings

    tok = _tok("qwen3")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = resolve_metric("apology", tok)
    assert not [w for w in caught if "<think>" in str(w.message)]
    assert (r.tokens.apology_token, r.tokens.yes_token) == ("Apologies", "Yes")
    user = [{"role": "user", "content": "Are you sure?"}]
    prompt = tok.apply_chat_template(user, add_generation_prompt=True, enable_thinking=False,
                                     tokenize=True)["input_ids"]
    full = tok.apply_chat_template(user + [{"role": "assistant", "content": "Apologies, no."}],
                                   tokenize=True)["input_ids"]
    assert full[:len(prompt)] == prompt and full[len(prompt)] == r.tokens.apology_id


def test_gpt2_metric_token_differs_from_the_word_alone():
    """The old rule (the word tokenized alone) picks 'Apologies' without the space GPT-2 emits."""
    tok = _tok("gpt2")
    assert tok.convert_ids_to_tokens(first_token(tok, "Apologies")) == "Apologies"
    assert resolve_metric("apology", tok).tokens.apology_token == "ĠApologies"


def test_tokens_are_exposed_for_printing_and_saving():
    tok = _tok("llama3.1")
    r = resolve_metric("apology_ratio", tok)
    fn, name = r                                   # still unpacks as (fn, name)
    assert name == "apology_ratio" and fn.metric_tokens is r.tokens
    d = json.loads(json.dumps(r.tokens.to_dict()))
    assert d["apology_token"] == "Apologies" and d["apology_pieces"] == ["Apologies"] and d["yes_id"] == r.tokens.yes_id
    assert "'Apologies' -> token" in str(r.tokens)
    assert resolve_metric(lambda x: x[:, 0], tok).tokens is None
    given = resolve_metric("apology", None, token_ids=(5, 6)).tokens
    assert given.ids == (5, 6) and given.apology_token == "<id 5>"


def test_a_word_that_splits_warns_and_reads_its_first_token():
    tok = _tok("llama3.1")
    with pytest.warns(UserWarning, match=r"'Apologetically' is \d+ tokens .* the metric reads only the first"):
        r = resolve_metric("apology", tok, apology_word="Apologetically")
    assert len(r.tokens.apology_pieces) > 1 and r.tokens.apology_token == r.tokens.apology_pieces[0]


def test_a_tokenizer_that_cannot_encode_apologies_gets_a_one_line_error():
    tok = word_tokenizer(words=["Yes", "No", "A", "B"])
    with pytest.raises(ValueError) as info:
        resolve_metric("apology", tok)
    msg = str(info.value)
    assert "cannot encode 'Apologies'" in msg and "metric_tokens=(apology_id, yes_id)" in msg and "\n" not in msg


def test_apology_ratio_guards_a_near_zero_denominator():
    fn, _ = resolve_metric("apology_ratio", None, token_ids=(0, 1))
    logits = torch.tensor([[2.0, -2.0 + 1e-5, 0.0], [1.0, 3.0, 0.0], [0.0, 0.0, 5.0]])
    with pytest.warns(UserWarning, match="within 0.001 of zero"):
        out = fn(logits)
    assert torch.isfinite(out).all()
    assert out[0].abs() >= 2.0 / RATIO_EPS * 0.99 and out[1] == pytest.approx(0.25) and out[2] == 0.0


def test_relative_aggregate_leaves_out_near_zero_bases_and_never_returns_nan():
    per_pair = torch.ones(3, 2, 2)
    base = torch.tensor([2.0, 0.0, 4.0])
    with pytest.warns(UserWarning, match=r"near zero .* for 1 of 3 pairs \(pairs \[1\]\)"):
        out = aggregate_scores(per_pair, base, "relative")
    torch.testing.assert_close(out, torch.full((2, 2), 100.0 * (0.5 + 0.25) / 2))
    with pytest.raises(ValueError, match="near zero .* for all 2 pairs; use aggregate='diff'"):
        aggregate_scores(per_pair[:2], torch.zeros(2), "relative")
    bad = per_pair.clone()
    bad[:, 1, 0] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or inf for 1 heads \(first \(layer, head\): \(1, 0\)\)"):
        aggregate_scores(bad, base[:1].expand(3), "diff")


def test_locate_relative_leaves_out_a_pair_whose_base_metric_is_near_zero():
    """Through locate: pair 0's base metric is ~0 (the metric subtracts its own base logit), so
    the old 100·mean(diff / base) was dominated by one division by ~1e-7."""
    model = tiny_model("llama", n_layers=2, n_heads=4)
    pairs = [pp.PromptPair([7, 8, 9, 10], [7, 8, 11, 10]), pp.PromptPair([12, 13, 14], [12, 15, 14])]
    with torch.no_grad():
        c = float(model(torch.tensor([pairs[0].base])).logits[0, -1, 20])
    metric = lambda x: x[:, 20].float() - c  # noqa: E731
    with pytest.warns(UserWarning, match=r"for 1 of 2 pairs \(pairs \[0\]\)"):
        scores = pp.locate(model, None, pairs, metric=metric, aggregate="relative", progress=False)
    assert abs(float(scores.base[0])) < 1e-4 < abs(float(scores.base[1]))
    want = 100.0 * scores.per_pair[1] / scores.base[1]
    torch.testing.assert_close(scores.values, want)
    assert len(scores.top(3).to_list()) == 3


def test_locate_and_knockout_results_record_the_metric_tokens(tmp_path):
    """The ids a named metric read are in the results' metadata (and survive save/load), so a
    scores file says which tokens its numbers are about; a callable metric records none."""
    from pinpoint import organism

    model, tok = organism.load()
    pairs = pp.data.challenge_pairs(pp.data.load_are_you_sure(organism.build() / "are_you_sure.jsonl")[:3], tok)
    want = resolve_metric("apology", tok).tokens.to_dict()
    scores = pp.locate(model, tok, pairs, progress=False)
    assert scores.meta["metric_tokens"] == want
    scores.save(tmp_path / "s")
    assert type(scores).load(tmp_path / "s").meta["metric_tokens"] == want
    curve = pp.knockout(model, tok, pairs, scores.top(2), progress=False)
    assert curve.meta["metric_tokens"] == want
    plain = pp.locate(model, tok, pairs, metric=lambda logits: logits[:, 0], progress=False)
    assert "metric_tokens" not in plain.meta
