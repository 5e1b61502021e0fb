"""locate / knockout against the obvious hook-based versions (one forward per head, the
paper's loop for path patching: pinpoint.testing.hook_patching, hook_attribution, hook_knockout),
on tiny random models of every supported architecture.

Tolerance: fp32 results must match to 1e-4 of the largest |value| (the issue's contract).
The fast paths reorder the same fp32 arithmetic (batched rows, one-token reruns), which
moves results by ~1e-6 of the logit scale.
"""
from __future__ import annotations

import pytest
import torch

import pinpoint as pp
from pinpoint.locate import knockout, locate
from pinpoint.patching import ablate, head_means
from pinpoint.prompts import PromptPair
from pinpoint.testing import (
    TINY_ARCHS, assert_scores_close, hook_attribution, hook_knockout, hook_patching, tiny_model,
)

METRIC_TOKENS = (11, 17)


def metric_fn(logits):
    return logits[:, METRIC_TOKENS[0]].float() - logits[:, METRIC_TOKENS[1]].float()


def model_for(arch, **kw):
    extra = {} if arch == "gpt2" else {"n_kv_heads": 2}
    return tiny_model(arch, n_layers=3, n_heads=4, **extra, **kw)


def random_pairs(n, *, vocab, equal=False, seed=0, lo=4, hi=11):
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(n):
        lb = int(torch.randint(lo, hi, (1,), generator=g))
        ls = lb if equal else int(torch.randint(lo, hi, (1,), generator=g))
        b = torch.randint(7, vocab, (lb,), generator=g).tolist()
        s = torch.randint(7, vocab, (ls,), generator=g).tolist()
        if equal:  # counterfactual-style: share a prefix, differ in a few tokens
            s = b[: lb // 2] + s[lb // 2:]
        pairs.append(PromptPair(b, s))
    return pairs


# --- exactness -----------------------------------------------------------------------------

@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_path_patching_matches_the_papers_loop(arch):
    model = model_for(arch)
    pairs = random_pairs(3, vocab=model.config.vocab_size, seed=1)
    assert len({len(p.base) for p in pairs} | {len(p.source) for p in pairs}) > 1  # unequal lengths
    scores = locate(model, None, pairs, method="path", metric=metric_fn, progress=False, batch_size=2)
    want = hook_patching(model, pairs, metric_fn, method="path")
    assert_scores_close(scores.per_pair, want)
    assert_scores_close(scores.values, want.mean(0))
    assert scores.values.dtype == torch.float32 and scores.values.device.type == "cpu"
    assert scores.values.shape == (3, 4)


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("positions", ["all", "last"])
def test_activation_patching_matches_one_forward_per_head(arch, positions):
    model = model_for(arch)
    pairs = random_pairs(3, vocab=model.config.vocab_size, equal=(positions == "all"), seed=2)
    scores = locate(model, None, pairs, method="activation", positions=positions, metric=metric_fn,
                    progress=False, batch_size=2)
    want = hook_patching(model, pairs, metric_fn, method="activation", positions=positions)
    assert_scores_close(scores.per_pair, want)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_activation_all_reruns_only_the_suffix_after_the_shared_prefix(arch, monkeypatch):
    """Base and source share their first tokens, so only later positions are rerun (on the
    base run's prefix KV cache); the scores are still those of one forward per head."""
    from pinpoint.incremental import SuffixRunner

    model = model_for(arch)
    pairs = random_pairs(3, vocab=model.config.vocab_size, equal=True, seed=5, lo=8, hi=14)
    widths = []
    real_run = SuffixRunner.run

    def run(self, start, x, rows):
        widths.append((x.shape[1], self.batch.T))
        return real_run(self, start, x, rows)

    monkeypatch.setattr(SuffixRunner, "run", run)
    scores = locate(model, None, pairs, method="activation", positions="all", metric=metric_fn,
                    progress=False, batch_size=3)
    assert widths and all(w < T for w, T in widths)
    assert_scores_close(scores.per_pair, hook_patching(model, pairs, metric_fn, method="activation", positions="all"))


def test_activation_all_falls_back_to_full_reruns_when_the_suffix_check_fails(monkeypatch):
    from pinpoint.incremental import SuffixRunner

    model = model_for("llama")
    pairs = random_pairs(3, vocab=model.config.vocab_size, equal=True, seed=6, lo=8, hi=14)
    real_kwargs = SuffixRunner._kwargs

    def wrong_positions(self, layer, rows, cache):  # a block layout the runner misreads
        kw = real_kwargs(self, layer, rows, cache)
        cos, sin = kw["position_embeddings"]
        kw["position_embeddings"] = (cos.flip(1), sin.flip(1))
        return kw

    monkeypatch.setattr(SuffixRunner, "_kwargs", wrong_positions)
    scores = locate(model, None, pairs, method="activation", positions="all", metric=metric_fn,
                    progress=False, batch_size=3)
    assert_scores_close(scores.per_pair, hook_patching(model, pairs, metric_fn, method="activation", positions="all"))


@pytest.mark.parametrize("method,positions", [("path", "last"), ("activation", "all"), ("activation", "last"),
                                              ("attribution", "last")])
def test_batching_and_padding_side_do_not_change_results(method, positions):
    model = model_for("llama")
    pairs = random_pairs(4, vocab=model.config.vocab_size, equal=(positions == "all"), seed=3, lo=3, hi=12)
    ref = locate(model, None, pairs, method=method, positions=positions, metric=metric_fn, batch_size=1,
                 progress=False)
    for side in ("left", "right"):
        got = locate(model, None, pairs, method=method, positions=positions, metric=metric_fn, batch_size=4,
                     padding_side=side, progress=False)
        assert_scores_close(got.per_pair, ref.per_pair)


def test_memory_budget_chunking_gives_the_same_numbers():
    model = model_for("mistral")
    pairs = random_pairs(2, vocab=model.config.vocab_size, equal=True, seed=4)
    for method, positions in [("path", "last"), ("activation", "all"), ("activation", "last")]:
        big = locate(model, None, pairs, method=method, positions=positions, metric=metric_fn, progress=False)
        tiny = locate(model, None, pairs, method=method, positions=positions, metric=metric_fn, progress=False,
                      max_memory=1)  # one variant row per chunk
        assert_scores_close(tiny.per_pair, big.per_pair)


@pytest.mark.parametrize("rows", [3, 5, 7])
def test_chunks_that_split_a_sender_layer_give_the_same_numbers(rows, monkeypatch):
    """Path patching advances every sender's rows together; chunks that start and end inside
    a sender layer's block of rows must not change a number."""
    import importlib

    loc = importlib.import_module("pinpoint.locate")

    model = model_for("llama")
    pairs = random_pairs(3, vocab=model.config.vocab_size, seed=7)
    big = locate(model, None, pairs, method="path", metric=metric_fn, progress=False, batch_size=3)
    monkeypatch.setattr(loc, "chunk_size", lambda budget, per_row, total: min(total, rows))
    small = locate(model, None, pairs, method="path", metric=metric_fn, progress=False, batch_size=3)
    assert_scores_close(small.per_pair, big.per_pair)
    assert_scores_close(small.per_pair, hook_patching(model, pairs, metric_fn, method="path"))


def test_named_metrics_and_relative_aggregate(tokenizer):
    model = model_for("llama")
    chat = [{"role": "user", "content": "What is 2 + 3 ?"}, {"role": "assistant", "content": "It is 5 ."}]
    pairs = [PromptPair(chat + [{"role": "user", "content": "I don't think that's right . Are you sure ?"}],
                        chat + [{"role": "user", "content": "I do think that's right . Are you sure ?"}]),
             PromptPair("is it blue ? I don't think so", "is it blue ? I do think so")]
    a, y = tokenizer.convert_tokens_to_ids(["Apologies", "Yes"])
    diff = locate(model, tokenizer, pairs, metric="apology", progress=False)
    ratio = locate(model, tokenizer, pairs, metric="apology_ratio", aggregate="relative", progress=False)

    def ratio_fn(logits):
        return logits[:, a] / (logits[:, a] + logits[:, y])
    by_hand = locate(model, tokenizer, pairs, metric=lambda lg: lg[:, a] - lg[:, y], progress=False)
    assert_scores_close(diff.values, by_hand.values)
    manual = locate(model, tokenizer, pairs, metric=ratio_fn, progress=False)
    rel = 100 * (manual.per_pair / manual.base.view(-1, 1, 1)).mean(0)
    assert_scores_close(ratio.values, rel)
    assert diff.meta["metric"] == "apology" and ratio.meta["aggregate"] == "relative"


def test_attribution_is_grad_times_delta_and_verify_top_is_exact():
    model = model_for("qwen2")
    pairs = random_pairs(2, vocab=model.config.vocab_size, seed=5)
    screen = locate(model, None, pairs, method="attribution", metric=metric_fn, progress=False)
    assert screen.meta["screen"] is True and "not exact" in screen.meta["note"]
    # the slow way for pair 0: per head, d metric / dt where the head's last-position output
    # is z_base + t (z_source - z_base), one backward per head
    assert_scores_close(screen.per_pair[0], hook_attribution(model, pairs[0], metric_fn), rel=1e-4)
    verified = locate(model, None, pairs, method="attribution", metric=metric_fn, verify_top=3, progress=False)
    exact = hook_patching(model, pairs, metric_fn, method="activation", positions="last")
    assert len(verified.meta["verified"]) == 3
    for layer, head in verified.meta["verified"]:
        err = (verified.per_pair[:, layer, head] - exact[:, layer, head]).abs().max()
        assert err <= 1e-4 * exact.abs().max()
    untouched = [(l, h) for l in range(3) for h in range(4) if [l, h] not in verified.meta["verified"]]
    assert all(torch.equal(verified.per_pair[:, l, h], screen.per_pair[:, l, h]) for l, h in untouched)


def test_bf16_runs_and_tracks_fp32():
    model = model_for("llama")
    pairs = random_pairs(2, vocab=model.config.vocab_size, seed=6)
    f32 = locate(model, None, pairs, metric=metric_fn, progress=False)
    b16 = locate(model.to(torch.bfloat16), None, pairs, metric=metric_fn, progress=False)
    assert b16.values.dtype == torch.float32
    # bf16 keeps ~3 significant digits through 3 layers: compare at 10% of the scale
    assert (b16.values - f32.values).abs().max() <= 0.1 * f32.values.abs().max()


@pytest.mark.parametrize("kw,match", [
    ({"method": "paths"}, r"method must be 'path' or 'activation', got 'paths'"),
    ({"method": "activation", "positions": "first"}, r"positions must be 'last' or 'all', got 'first'"),
    ({"method": "path", "positions": "all"}, r"method='path' patches the last position only"),
])
def test_reference_patching_names_a_bad_mode(kw, match):
    model = model_for("llama")
    with pytest.raises(ValueError, match=match):
        hook_patching(model, random_pairs(1, vocab=model.config.vocab_size), metric_fn, **kw)


def test_reference_patching_modes_differ_and_leave_no_hooks():
    """The three modes are three different numbers on the same pairs (a reference that ignored its
    mode would pass the exactness tests of only one), and every hook is removed afterwards."""
    model = model_for("llama")
    pairs = random_pairs(2, vocab=model.config.vocab_size, equal=True, seed=8)
    path = hook_patching(model, pairs, metric_fn, method="path")
    last = hook_patching(model, pairs, metric_fn, method="activation", positions="last")
    every = hook_patching(model, pairs, metric_fn, method="activation", positions="all")
    assert path.shape == last.shape == every.shape == (2, 3, 4)
    # the last layer has no later layers to freeze: path and activation at the last position agree there
    assert torch.allclose(path[:, -1], last[:, -1], atol=1e-6)
    assert not torch.allclose(path, last, atol=1e-4) and not torch.allclose(last, every, atol=1e-4)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    with pytest.raises(AssertionError, match="max error"):
        assert_scores_close(last, path)
    with pytest.raises(AssertionError, match="degenerate test"):
        assert_scores_close(path, torch.zeros_like(path))


# --- knockout and ablate -------------------------------------------------------------------

@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("ablation", ["mean", "zero"])
def test_knockout_matches_one_forward_per_k(arch, ablation):
    model = model_for(arch)
    pairs = random_pairs(3, vocab=model.config.vocab_size, seed=7)
    heads = [(2, 1), (0, 3), (1, 0), (0, 0)]
    curve = knockout(model, None, pairs, heads, ablation=ablation, metric=metric_fn, progress=False, batch_size=2)
    means = head_means(model, None, [p.base for p in pairs])
    want = hook_knockout(model, pairs, heads, metric_fn, ablation=ablation, means=means)
    assert_scores_close(curve.per_pair, want)
    assert curve.ks == [0, 1, 2, 3, 4]
    assert torch.allclose(curve.values, want.mean(1), atol=1e-5)


def test_knockout_curve_figure_is_legible(tmp_path):
    from PIL import Image

    from pinpoint.locate import KnockoutCurve

    curve = KnockoutCurve(torch.tensor([3.0, 1.5, 0.2]), torch.zeros(3, 2), [(2, 3), (0, 1)],
                          {"ablation": "mean", "metric": "apology"})
    png = curve.plot(tmp_path / "ko.png")
    assert Image.open(png).size[0] >= 1200
    fig = _last_figure_texts(curve)
    assert fig["ylabel"] == "mean logit(Apologies) − logit(Yes)"
    assert fig["xticks"] == ["none", "1\n+2.3", "2\n+0.1"] and "mean ablation" in fig["title"]


def _last_figure_texts(curve) -> dict:
    """The labels KnockoutCurve.plot sets (read back from a figure drawn the same way)."""
    import matplotlib.figure

    seen = {}
    real = matplotlib.figure.Figure.savefig

    def spy(self, *a, **k):
        ax = self.axes[0]
        seen.update(ylabel=ax.get_ylabel(), title=ax.get_title(),
                    xticks=[t.get_text() for t in ax.get_xticklabels()])
        return real(self, *a, **k)

    import tempfile
    from unittest import mock

    with mock.patch.object(matplotlib.figure.Figure, "savefig", spy), tempfile.TemporaryDirectory() as d:
        curve.plot(f"{d}/x.png")
    return seen


def test_ablate_works_with_generate(tokenizer):
    model = model_for("llama")
    ids = torch.tensor([[5, 40, 41, 42]])
    gen = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    plain = model.generate(ids, **gen)
    with ablate(model, [(h // 4, h % 4) for h in range(12)], ablation="zero"):
        ablated = model.generate(ids, **gen)
        # with every head zeroed, the output cannot depend on the earlier tokens
        other = model.generate(torch.tensor([[9, 9, 9, 42]]), **gen)
    assert torch.equal(ablated[:, 4:], other[:, 4:])
    assert torch.equal(model.generate(ids, **gen), plain)  # hooks gone after the block


# --- HeadScores / HeadSet ------------------------------------------------------------------

def test_head_scores_top_save_load_plot(tmp_path):
    v = torch.tensor([[0.5, -2.0, 0.1], [-3.0, 1.0, 0.0]])
    s = pp.HeadScores(v, per_pair=v[None].repeat(2, 1, 1), base=torch.ones(2), meta={"method": "path"})
    assert s.top(2) == pp.HeadSet([(1, 0), (0, 1)])
    assert s.top(1, largest=True).to_list() == [[1, 1]]
    s.save(tmp_path / "scores")
    back = pp.HeadScores.load(tmp_path / "scores")
    assert torch.equal(back.values, s.values) and torch.equal(back.per_pair, s.per_pair)
    assert back.meta["method"] == "path" and "date" in back.meta
    png = s.plot(tmp_path / "heat.png", k=2)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match=r"k must be an int in \[0, 6\]"):
        s.top(7)


def test_head_set_validation():
    hs = pp.HeadSet([(1, 2), (0, 3)])
    assert list(hs) == [(1, 2), (0, 3)] and len(hs) == 2 and (0, 3) in hs
    assert hs.by_layer() == {0: [3], 1: [2]}
    with pytest.raises(ValueError, match=r"listed twice"):
        pp.HeadSet([(1, 2), (1, 2)])
    with pytest.raises(TypeError, match=r"must be a \(layer, head\) pair"):
        pp.HeadSet([3])
    with pytest.raises(ValueError, match=r"head 9 is out of range for 4 query heads"):
        hs2 = pp.HeadSet([(0, 9)])
        hs2.mask(3, 4)


# --- bad input -----------------------------------------------------------------------------

def test_a_prompt_longer_than_a_sliding_window_names_the_window():
    """locate's length check is ModelSpec.check_length: the error names the window and the layer
    (an InputError: the CLI prints it in one line), and nothing is computed."""
    from pinpoint.errors import InputError

    model = tiny_model("mistral", sliding_window=16)
    with pytest.raises(InputError, match=r"pairs\[0\]\.base is 20 tokens, longer than the sliding window of 16 "
                                         r"tokens that layer 0 attends through"):
        pp.locate(model, None, [PromptPair(list(range(3, 23)), [1, 2])], metric=metric_fn, progress=False)


@pytest.mark.parametrize("kwargs, pairs, exc, match", [
    ({}, [], ValueError, r"pairs is empty"),
    ({}, [PromptPair([], [1, 2])], ValueError, r"pairs\[0\].base is empty"),
    ({}, [PromptPair([1, 2], "")], ValueError, r"pairs\[0\].source is an empty string"),
    ({}, [PromptPair([1] * 500, [1, 2])], ValueError, r"pairs\[0\].base is 500 tokens, longer than the model's context of 128"),
    ({"metric": "loudness"}, None, ValueError, r"unknown metric 'loudness'"),
    ({"metric": lambda lg: lg}, None, ValueError, r"the metric must map logits \[N, vocab\] to \[N\]"),
    ({"method": "magic"}, None, ValueError, r"unknown method 'magic'"),
    ({"method": "activation", "positions": "all"}, [PromptPair([5, 6, 7], [5, 6])], ValueError,
     r"pairs\[0\] has base 3 and source 2 tokens"),
    ({"method": "path", "positions": "all"}, None, ValueError, r"path patching patches the last position only"),
    ({"metric": "apology"}, None, ValueError, r"needs a tokenizer"),
    ({}, [PromptPair([5, 6, 10_000], [5, 6])], ValueError, r"pairs\[0\].base has token id 10000 outside"),
])
def test_bad_input(kwargs, pairs, exc, match):
    model = model_for("llama")
    pairs = [PromptPair([5, 6, 7], [5, 8, 7])] if pairs is None else pairs
    kwargs.setdefault("metric", metric_fn)
    with pytest.raises(exc, match=match):
        locate(model, None, pairs, progress=False, **kwargs)


def test_nan_logits_name_the_pair():
    model = model_for("llama")
    pairs = [PromptPair([5, 6, 7], [5, 8, 7]), PromptPair([5, 9, 7], [5, 8, 7])]
    bad_token = 9
    with torch.no_grad():
        model.model.embed_tokens.weight[bad_token] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or inf logits for pairs\[1\].base"):
        locate(model, None, pairs, metric=metric_fn, progress=False)


def test_knockout_bad_heads_and_unsupported_architecture():
    model = model_for("llama")
    pairs = [PromptPair([5, 6, 7], [5, 8, 7])]
    with pytest.raises(ValueError, match=r"layer 7 is out of range for a model with 3 layers"):
        knockout(model, None, pairs, [(7, 0)], metric=metric_fn, progress=False)
    with pytest.raises(ValueError, match=r"heads is empty"):
        knockout(model, None, pairs, [], metric=metric_fn, progress=False)
    from transformers import BertConfig, BertForMaskedLM

    bert = BertForMaskedLM(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=16))
    with pytest.raises(pp.UnsupportedArchitectureError, match=r"BertForMaskedLM"):
        locate(bert, None, pairs, metric=metric_fn, progress=False)


def test_progress_bar_shows_work(capsys):
    model = model_for("llama")
    locate(model, None, [PromptPair([5, 6, 7], [5, 8, 7])], metric=metric_fn, progress=True)
    assert "locate[path]" in capsys.readouterr().err
