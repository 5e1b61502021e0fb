"""locate(model_dir, ..., stream=True): decoder layers read from the safetensors files one at a
time give the in-memory run's scores, each layer read at most twice per batch of pairs."""
from __future__ import annotations

import json

import pytest
import torch

import pinpoint as pp
from pinpoint.locate import locate
from pinpoint.models import UnsupportedArchitectureError
from pinpoint.stream import LayerStream, NoSafetensorsError
from pinpoint.testing import tiny_model, word_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

PAIRS = [pp.PromptPair("I don't think that's right . Are you sure ?", "I do think that's right . Are you sure ?"),
         pp.PromptPair("Is it true ? I don't think so", "Is it true ? I do think so"),
         pp.PromptPair("Are you sure ? I don't think so", "Are you sure ? I do think so")]
EQUAL_LENGTH = [PAIRS[2], pp.PromptPair("So what's the answer ? I don't think", "So what's the answer ? I do think")]


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer()


def saved(arch: str, tmp_path, *, shard: str | None = None, **kwargs):
    """(directory, the in-memory model loaded back from it)."""
    from transformers import AutoModelForCausalLM

    d = tmp_path / f"{arch}-model"
    model = tiny_model(arch, n_layers=3, **kwargs)
    model.save_pretrained(d, **({"max_shard_size": shard} if shard else {}))
    word_tokenizer().save_pretrained(d)
    return d, AutoModelForCausalLM.from_pretrained(d).eval()


@pytest.mark.parametrize("arch,shard", [("llama", None), ("qwen2", "20KB"), ("gpt2", "30KB")])
@pytest.mark.parametrize("method,positions", [("path", "last"), ("activation", "last"), ("activation", "all")])
def test_streamed_scores_equal_the_in_memory_run(arch, shard, method, positions, tmp_path, tok):
    d, model = saved(arch, tmp_path, shard=shard)
    if shard:
        assert len(json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]) > 0
        assert len(list(d.glob("*.safetensors"))) > 2
    pairs = PAIRS if positions == "last" else EQUAL_LENGTH
    kw = dict(method=method, positions=positions, batch_size=2, progress=False)
    want = locate(model, tok, pairs, **kw)
    got = locate(str(d), tok, pairs, stream=True, **kw)
    torch.testing.assert_close(got.values, want.values, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(got.base, want.base, rtol=1e-5, atol=2e-6)
    n_batches = -(-len(pairs) // 2)
    assert got.meta["layer_reads"] == [2 * n_batches] * 3          # at most twice per batch of pairs
    layer_bytes = sum(p.numel() * 4 for p in model.model.layers.parameters()) if arch != "gpt2" else \
        sum(p.numel() * 4 for p in model.transformer.h.parameters())
    assert got.meta["bytes_read"] == 2 * n_batches * layer_bytes
    assert got.meta["stream"] is True and got.meta["model"] == str(d)


def test_at_most_one_layer_is_in_memory_and_the_rest_stay_on_meta(tmp_path, tok, monkeypatch):
    d, _ = saved("llama", tmp_path)
    stream = LayerStream(d)
    held = []
    load = LayerStream.load

    def counting(self, i):
        load(self, i)
        held.append(sum(any(p.device.type != "meta" for p in l.block.parameters()) for l in self.spec.layers))
    monkeypatch.setattr(LayerStream, "load", counting)
    locate(stream, tok, PAIRS, stream=True, progress=False)
    assert held and max(held) == 1
    assert all(p.device.type == "meta" for p in stream.spec.decoder.parameters())
    assert stream.spec.embed.weight.device.type == "cpu" and stream.spec.lm_head.weight.device.type == "cpu"


def test_tied_embeddings_and_bf16_files(tmp_path, tok):
    from transformers import AutoModelForCausalLM

    d = tmp_path / "tied"
    tiny_model("llama", n_layers=2, tie_word_embeddings=True, dtype=torch.bfloat16).save_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16).eval()
    stream = LayerStream(d)
    assert stream.spec.lm_head.weight is stream.spec.embed.weight and stream.spec.dtype == torch.bfloat16
    want = locate(model, tok, PAIRS[:2], progress=False)
    got = locate(stream, tok, PAIRS[:2], stream=True, progress=False)
    torch.testing.assert_close(got.values, want.values, rtol=2e-2, atol=2e-2)


def test_a_directory_without_safetensors_is_one_clear_error(tmp_path, tok):
    d = tmp_path / "bin"
    model = tiny_model("llama", n_layers=2)
    model.config.save_pretrained(d)
    torch.save(model.state_dict(), d / "pytorch_model.bin")
    with pytest.raises(NoSafetensorsError, match=r"has none \(it has pytorch_model.bin\); re-save"):
        locate(str(d), tok, PAIRS, stream=True, progress=False)
    with pytest.raises(NoSafetensorsError, match="not a directory"):
        locate(str(tmp_path / "nope"), tok, PAIRS, stream=True, progress=False)


def test_bad_stream_arguments(tmp_path, tok):
    d, model = saved("llama", tmp_path)
    with pytest.raises(TypeError, match="pass the model directory"):
        locate(model, tok, PAIRS, stream=True, progress=False)
    with pytest.raises(ValueError, match="stream=True supports method='path' and 'activation'"):
        locate(str(d), tok, PAIRS, method="attribution", stream=True, progress=False)


def test_blocks_that_are_not_pre_norm_residual_are_refused(tmp_path, tok):
    """The path tails rebuild the recorded logits from the per-layer pieces on the first batch."""
    d, model = saved("llama", tmp_path)
    model.model.layers[1].register_forward_hook(lambda m, a, out: (out[0] * 1.5, *out[1:]) if isinstance(out, tuple)
                                                else out * 1.5)
    with pytest.raises(UnsupportedArchitectureError, match="not plain pre-norm residual blocks"):
        locate(model, tok, PAIRS, progress=False)


def test_cli_locate_stream(tmp_path, capsys):
    from pinpoint import data
    from pinpoint.cli import main
    from pinpoint.heads import HeadScores

    d, _ = saved("llama", tmp_path)
    common = ["locate", "--model", str(d), "--data", str(data.SAMPLE_PATH), "--limit", "3", "--k", "2", "--quiet"]
    assert main([*common, "--out", str(tmp_path / "a")]) == 0
    assert main([*common, "--out", str(tmp_path / "b"), "--stream"]) == 0
    a, b = HeadScores.load(tmp_path / "a" / "scores"), HeadScores.load(tmp_path / "b" / "scores")
    torch.testing.assert_close(b.values, a.values, rtol=1e-5, atol=2e-6)
    capsys.readouterr()
    bad = tmp_path / "bin"
    tiny_model("llama", n_layers=2).config.save_pretrained(bad)
    word_tokenizer().save_pretrained(bad)
    assert main(["locate", "--model", str(bad), "--data", str(data.SAMPLE_PATH), "--out", str(tmp_path / "c"),
                 "--stream"]) == 2
    err = capsys.readouterr().err.strip()
    assert "reads layers from safetensors files" in err and len(err.splitlines()) == 1
    assert main([*common, "--out", str(tmp_path / "d"), "--stream", "--method", "attribution"]) == 2
    assert main([*common, "--out", str(tmp_path / "d"), "--stream", "--device", "cuda"]) == 2
    assert "no --device other than cpu" in capsys.readouterr().err
