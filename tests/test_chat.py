"""pinpoint.chat: rendering, prefill, assistant spans, batched greedy generation."""
import pytest
import torch

from pinpoint.batching import IGNORE
from pinpoint.chat import (chat_ids, dialogue_messages, eos_ids, generate_texts, max_positions, message_span,
                           render_chat, render_dialogue, require_chat_template, tokenize_dialogues)
from pinpoint.data import sample_rows
from pinpoint.testing import tiny_model, word_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

MSGS = [{"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The answer is Paris."},
        {"role": "user", "content": "I don't think that's right. Are you sure?"},
        {"role": "assistant", "content": "Yes, I am sure."}]


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer()


def _plain(tok):
    """The same template without {% generation %} marks (the prefix-diff path)."""
    return word_tokenizer(chat_template=tok.chat_template.replace("{% generation %}", "")
                          .replace("{% endgeneration %}", ""))


def test_template_errors():
    no = word_tokenizer(chat_template=None)
    with pytest.raises(ValueError, match="evaluate renders chat conversations, but the tokenizer has no chat"):
        require_chat_template(no, "evaluate")
    with pytest.raises(ValueError, match="got tokenizer=None"):
        require_chat_template(None, "evaluate")
    with pytest.raises(ValueError, match="pairs.0. is a chat conversation but the tokenizer has no chat template"):
        render_chat(no, MSGS[:1], where="pairs[0]")
    with pytest.raises(ValueError, match="row 3 renders chat conversations"):
        chat_ids(no, MSGS[:1], where="row 3")


def test_render_chat_and_prefill(tok):
    gen = render_chat(tok, MSGS[:1])
    assert tok.convert_ids_to_tokens(gen)[-1] == "<|assistant|>"
    assert render_chat(tok, MSGS[:1], add_generation_prompt=False) == gen[:-1]
    assert chat_ids(tok, MSGS[:1]) == gen
    assert chat_ids(tok, [dict(MSGS[0], train=False)]) == gen   # only role and content are rendered
    pre = chat_ids(tok, MSGS[:1], prefill="The answer is (")
    assert pre[:len(gen)] == gen and tok.convert_ids_to_tokens(pre[len(gen):]) == ["The", "answer", "is", "("]


def test_prefill_fallback_when_the_template_cannot_continue(tok, monkeypatch):
    want = chat_ids(tok, MSGS[:1], prefill="The answer is (")
    real = type(tok).apply_chat_template

    def strict(self, *args, **kwargs):
        if kwargs.get("continue_final_message"):
            raise ValueError("this template cannot continue a message")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(tok), "apply_chat_template", strict)
    assert chat_ids(tok, MSGS[:1], prefill="The answer is (") == want


@pytest.mark.parametrize("marks", [True, False])
def test_render_dialogue_labels_assistant_tokens(tok, marks):
    t = tok if marks else _plain(tok)
    msgs = [dict(MSGS[1], train=False) if i == 1 else m for i, m in enumerate(MSGS)]
    ids, labels = render_dialogue(t, msgs)
    assert ids == render_chat(t, MSGS, add_generation_prompt=False)
    trained = [x for x, y in zip(tok.convert_ids_to_tokens(ids), labels) if y != IGNORE]
    assert trained == "Yes , I am sure . </s>".split()       # the first answer is context only
    start, stop = message_span(t, msgs, 3, ids)
    assert labels[start:stop] == ids[start:stop] and all(y == IGNORE for y in labels[:start])


def test_render_dialogue_is_tunes():
    import importlib

    tune = importlib.import_module("pinpoint.tune")  # the module (pinpoint.tune is also the function)
    tok = word_tokenizer()
    for t in (tok, _plain(tok)):
        assert render_dialogue(t, MSGS) == tune.render_dialogue(t, MSGS)


def test_message_span_refuses_templates_that_rewrite_history(tok):
    odd = word_tokenizer(chat_template="{% for m in messages %}{{ m['content'] if loop.last else 'x' }}{% endfor %}")
    with pytest.raises(ValueError, match="does not render message 1 as an extension"):
        message_span(odd, MSGS[:2], 1, render_chat(odd, MSGS[:2], add_generation_prompt=False))


def test_dialogue_checks(tok):
    assert dialogue_messages({"messages": MSGS}, 0) == MSGS
    with pytest.raises(ValueError, match="dialogue 2 has no assistant turn"):
        dialogue_messages(MSGS[:1], 2)
    with pytest.raises(TypeError, match="dialogue 0, message 0 must be a dict"):
        dialogue_messages([("user", "hi")], 0)
    rows = tokenize_dialogues(tok, [MSGS, {"messages": MSGS[:2]}], max_length=100)
    assert [r[0] for r in rows] == [render_chat(tok, MSGS, add_generation_prompt=False),
                                    render_chat(tok, MSGS[:2], add_generation_prompt=False)]


# --- generation -------------------------------------------------------------------------------

def _prompts(tok):
    return [chat_ids(tok, r.prompt_messages(), prefill=r.prefill) for r in sample_rows()]


def _both(model, tok, prompts, batch_size):
    batched = generate_texts(model, tok, prompts, max_new_tokens=12, batch_size=batch_size, progress=False)
    alone = [generate_texts(model, tok, [p], max_new_tokens=12, batch_size=1, progress=False)[0] for p in prompts]
    return batched, alone


def test_generate_batch_invariance_fp32_sdpa(tok):
    model = tiny_model("llama", seed=0, hidden_size=64, attn_implementation="sdpa")
    assert model.config._attn_implementation == "sdpa"
    batched, alone = _both(model, tok, _prompts(tok), 16)
    assert batched == alone and len(set(batched)) > 1


def test_generate_batch_invariance_bf16(tok):
    """What holds in bf16 with sdpa (measured; see generate_texts' docstring): not exact, but
    only a few continuations part, and never at their first word."""
    model = tiny_model("llama", seed=0, hidden_size=64, attn_implementation="sdpa", dtype=torch.bfloat16)
    prompts = _prompts(tok)
    batched, alone = _both(model, tok, prompts, 16)
    same = sum(a == b for a, b in zip(batched, alone))
    assert same >= 0.85 * len(prompts), f"only {same} of {len(prompts)} batched continuations match"
    assert all(a.split()[:1] == b.split()[:1] for a, b in zip(batched, alone))


def test_generate_stops_at_eos_and_restores_mode(tok):
    model = tiny_model("llama", seed=2)
    model.train()
    eos = eos_ids(model, tok)
    assert tok.eos_token_id in eos
    prompts = _prompts(tok)[:3]
    out = generate_texts(model, tok, prompts, max_new_tokens=8, batch_size=2, progress=False)
    assert len(out) == 3 and all("</s>" not in o for o in out)
    assert all(m.training for m in model.modules())
    assert generate_texts(model, tok, [], progress=False) == []


def test_generate_errors(tok):
    model = tiny_model("llama")
    assert max_positions(model) == model.config.max_position_embeddings
    with pytest.raises(ValueError, match="exceeds the model's 128 positions"):
        generate_texts(model, tok, [[5] * 120], max_new_tokens=10, progress=False)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate_texts(model, tok, [[5], []], progress=False)
    with pytest.raises(ValueError, match="max_new_tokens must be at least 1"):
        generate_texts(model, tok, [[5]], max_new_tokens=0, progress=False)
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        generate_texts(model, tok, [[5]], batch_size=0, progress=False)


def test_a_template_that_rejects_a_system_message_is_one_clear_error():
    """Mistral v0.2's template raises on a system role: one InputError naming the roles and the fix."""
    from pinpoint.chat import chat_ids, render_chat
    from pinpoint.errors import InputError
    from pinpoint.testing import load_replica

    _, tok = load_replica("mistral-v0.2")
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Are you sure?"}]
    for call in (lambda: render_chat(tok, msgs, where="row 3"), lambda: chat_ids(tok, msgs, prefill="The", where="row 3")):
        with pytest.raises(InputError, match=r"row 3: the chat template rejected .*\[system, user.*\].*no system role"):
            call()
    assert render_chat(tok, msgs[1:])  # without the system message it renders


def test_thinking_templates_render_prompts_with_thinking_off():
    from pinpoint.chat import render_chat
    from pinpoint.testing import load_replica

    _, tok = load_replica("qwen3")
    ids = render_chat(tok, [{"role": "user", "content": "Are you sure?"}])
    assert tok.decode(ids).endswith("<think>\n\n</think>\n\n")
