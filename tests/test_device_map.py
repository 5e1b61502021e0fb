"""Models dispatched by accelerate (``device_map``: layers on "cpu", others offloaded to disk):
every entry point gives the undispatched model's numbers, and accelerate's hooks survive."""
from __future__ import annotations

import copy

import pytest
import torch

import pinpoint as pp
from pinpoint.locate import knockout, locate
from pinpoint.models import spec_for
from pinpoint.patching import ablate, head_means
from pinpoint.placement import check_materialised
from pinpoint.testing import tiny_model, word_tokenizer

accelerate = pytest.importorskip("accelerate")

pytestmark = pytest.mark.usefixtures("one_thread")

PAIRS = [pp.PromptPair("I don't think that's right . Are you sure ?", "I do think that's right . Are you sure ?"),
         pp.PromptPair("Is it true ? I don't think so", "Is it true ? I do think so")]
HEADS = [(0, 1), (1, 2), (3, 0), (2, 3)]
DIALOGUES = [[{"role": "user", "content": f"What is the capital of {c} ?"},
              {"role": "assistant", "content": f"The answer is {a} ."},
              {"role": "user", "content": "I don't think that's right . Are you sure ?"},
              {"role": "assistant", "content": f"Yes , I am sure . The answer is {a} ."}]
             for c, a in [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid")]]


def device_map(arch: str, n_layers: int = 4, odd: str = "disk") -> dict:
    """Even layers on "cpu", odd ones on ``odd`` ("disk": offloaded, loaded per call)."""
    if arch == "gpt2":
        m = {"transformer.wte": "cpu", "transformer.wpe": "cpu", "transformer.ln_f": "cpu", "lm_head": "cpu"}
        prefix = "transformer.h"
    else:
        m = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
        prefix = "model.layers"
    m.update({f"{prefix}.{i}": ("cpu" if i % 2 == 0 else odd) for i in range(n_layers)})
    return m


def dispatched(arch: str, tmp_path, **kwargs):
    """(reference model, the same weights dispatched with CPU and disk offload)."""
    ref = tiny_model(arch, n_layers=4, **kwargs)
    model = accelerate.dispatch_model(copy.deepcopy(ref), device_map=device_map(arch), offload_dir=str(tmp_path))
    return ref, model


def hooks_of(model) -> dict:
    return {name: id(m._hf_hook) for name, m in model.named_modules() if hasattr(m, "_hf_hook")}


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_the_map_really_offloads(arch, tmp_path):
    _, model = dispatched(arch, tmp_path)
    spec = spec_for(model)
    assert spec.layers[1].q.module.weight.device.type == "meta"       # on disk, loaded per call
    assert spec.layers[0].q.module.weight.device.type == "cpu"
    assert all(d.type == "cpu" for d in (spec.layer_device(1), spec.device, spec.unembed_device))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("method,positions", [("path", "last"), ("activation", "last"), ("activation", "all"),
                                              ("attribution", "last")])
def test_locate_equals_the_undispatched_model(arch, method, positions, tmp_path, tok):
    ref, model = dispatched(arch, tmp_path)
    pairs = PAIRS if positions == "last" else [PAIRS[0], pp.PromptPair("Are you sure ? I don't think so",
                                                                       "Are you sure ? I do think so")]
    before = hooks_of(model)
    kw = dict(method=method, positions=positions, progress=False, batch_size=2)
    want = locate(ref, tok, pairs, **kw)
    got = locate(model, tok, pairs, **kw)
    torch.testing.assert_close(got.values, want.values, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.base, want.base, rtol=1e-5, atol=1e-6)
    assert hooks_of(model) == before and len(before) > 0


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("ablation", ["mean", "zero"])
def test_knockout_equals_the_undispatched_model(arch, ablation, tmp_path, tok):
    ref, model = dispatched(arch, tmp_path)
    before = hooks_of(model)
    want = knockout(ref, tok, PAIRS, HEADS, ablation=ablation, progress=False)
    got = knockout(model, tok, PAIRS, HEADS, ablation=ablation, progress=False)
    torch.testing.assert_close(got.per_pair, want.per_pair, rtol=1e-5, atol=1e-6)
    assert hooks_of(model) == before


def test_ablate_and_head_means_equal_the_undispatched_model(tmp_path, tok):
    ref, model = dispatched("llama", tmp_path)
    prompts = [p.base for p in PAIRS]
    means_ref, means = head_means(ref, tok, prompts), head_means(model, tok, prompts)
    torch.testing.assert_close(means, means_ref, rtol=1e-5, atol=1e-6)
    ids = torch.tensor([tok(PAIRS[0].base)["input_ids"]])
    with torch.no_grad():
        with ablate(ref, HEADS, ablation="mean", means=means_ref):
            want = ref(input_ids=ids).logits
        with ablate(model, HEADS, ablation="mean", means=means):
            got = model(input_ids=ids).logits
        plain = model(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, plain)             # the ablation did something
    assert hooks_of(model)


def test_evaluate_equals_the_undispatched_model(tmp_path, tok):
    from pinpoint.data import sample_rows
    from pinpoint.evaluate import evaluate

    ref, model = dispatched("llama", tmp_path, seed=2)
    rows = [r for i, r in enumerate(sample_rows()) if i % 9 == 0][:3]
    kw = dict(max_new_tokens=(5, 4, 3), batch_size=3, progress=False)
    assert evaluate(model, tok, rows, **kw).samples == evaluate(ref, tok, rows, **kw).samples


def test_a_layer_left_on_meta_is_one_clear_error(tmp_path, tok):
    ref = tiny_model("llama", n_layers=4)
    dm = device_map("llama")
    dm["model.layers.2"] = "meta"
    model = accelerate.dispatch_model(ref, device_map=dm, offload_dir=str(tmp_path), main_device="cpu")
    with pytest.raises(ValueError, match=r"model\.layers\.2\..*'meta' device.*no accelerate offload hook"):
        check_materialised(spec_for(model))
    with pytest.raises(ValueError, match="'meta' device"):
        locate(model, tok, PAIRS, progress=False)
    with pytest.raises(ValueError, match="'meta' device"):
        knockout(model, tok, PAIRS, HEADS, progress=False)
    with pytest.raises(ValueError, match=r"model\.layers\.2\..*'meta' device"):
        pp.attach(model, HEADS)
    assert not any(p.requires_grad is False for p in model.parameters())   # refused before freezing anything


def test_an_empty_skeleton_is_refused(tok):
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = tiny_model("llama", n_layers=2)
    with pytest.raises(ValueError, match="'meta' device"):
        locate(model, tok, PAIRS, progress=False)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_attach_on_a_dispatched_model_trains_the_same_slices(arch, tmp_path, tok):
    ref, model = dispatched(arch, tmp_path)
    before = hooks_of(model)
    ids = torch.tensor([tok(PAIRS[0].base)["input_ids"]])
    grads, logits = [], []
    for m in (ref, model):
        adapter = pp.attach(m, HEADS, parts="qkvo")
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in adapter.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        out = m(input_ids=ids).logits
        out.float().square().mean().backward()
        logits.append(out.detach())
        grads.append({k: p.grad.clone() for k, p in adapter.deltas.items()})
        adapter.detach()
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-5, atol=1e-5)
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-4, atol=1e-6)
    assert hooks_of(model) == before
    spec = spec_for(model)
    assert spec.layers[1].q.module.weight.device.type == "meta"    # still offloaded, never materialised for good


def test_tune_on_a_dispatched_model_equals_the_undispatched_model(tmp_path, tok):
    ref, model = dispatched("llama", tmp_path / "offload")
    kw = dict(heads=HEADS, parts="qo", lr=1e-2, steps=3, batch_size=4, progress=False, seed=0)
    want = pp.tune(ref, tok, DIALOGUES, **kw)
    got = pp.tune(model, tok, DIALOGUES, **kw)
    assert hooks_of(model)
    for k, p in want.deltas.items():
        torch.testing.assert_close(got.deltas[k], p, rtol=1e-4, atol=1e-6)
    assert any(float(p.detach().abs().max()) > 0 for p in got.deltas.values())


@pytest.fixture(scope="module")
def model_dir(make_model_dir):
    return make_model_dir("tiny-llama-dm", n_layers=4)


def test_cli_device_map_and_max_memory_give_the_same_scores(model_dir, tmp_path):
    """--device-map auto with a --max-memory too small for the model puts layers on disk; the
    scores equal those of the plain load (weights are ~0.5 MB: 100 KB of "cpu" offloads most)."""
    import json

    from pinpoint import data
    from pinpoint.cli import main
    from pinpoint.cli.common import load_model

    model, _ = load_model(str(model_dir), device_map="auto", max_memory="cpu=200KB",
                          offload_dir=str(tmp_path / "off"))
    kinds = {p.device.type for p in model.parameters()}
    assert kinds == {"cpu", "meta"} and hooks_of(model)          # some weights really are offloaded
    rows = str(data.SAMPLE_PATH)
    common = ["--model", str(model_dir), "--data", rows, "--limit", "3", "--k", "3", "--quiet"]
    assert main(["locate", *common, "--out", str(tmp_path / "a")]) == 0
    assert main(["locate", *common, "--out", str(tmp_path / "b"), "--device-map", "auto",
                 "--max-memory", "cpu=200KB", "--offload-dir", str(tmp_path / "off2")]) == 0
    from pinpoint.heads import HeadScores

    a, b = HeadScores.load(tmp_path / "a" / "scores"), HeadScores.load(tmp_path / "b" / "scores")
    torch.testing.assert_close(b.values, a.values, rtol=1e-5, atol=1e-6)
    assert json.loads((tmp_path / "a" / "top_heads.json").read_text()) == \
        json.loads((tmp_path / "b" / "top_heads.json").read_text())


@pytest.mark.parametrize("extra, message", [
    (["--max-memory", "cpu=lots", "--device-map", "auto"], "--max-memory: max_memory size 'lots'"),
    (["--max-memory", "gpu0=1GiB", "--device-map", "auto"], "--max-memory: max_memory device 'gpu0'"),
    (["--max-memory", "cpu=1GiB"], "--max-memory: max_memory needs a device_map"),
    (["--device", "cpu", "--device-map", "auto"], "give one of them"),
])
def test_cli_bad_placement_is_one_line_exit_2(extra, message, model_dir, tmp_path, capsys):
    from pinpoint import data
    from pinpoint.cli import main

    argv = ["locate", "--model", str(model_dir), "--data", str(data.SAMPLE_PATH), "--out", str(tmp_path / "o"),
            *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_parse_max_memory():
    from pinpoint.placement import parse_max_memory

    assert parse_max_memory("0=10GiB, 1=20GB,cpu=30GiB,disk=1000") == {0: "10GiB", 1: "20GB", "cpu": "30GiB",
                                                                       "disk": 1000}
    for bad in ("0=10GiB,0=1GiB", "cpu", "=1GiB", "cpu=1XB"):
        with pytest.raises(ValueError, match="max_memory"):
            parse_max_memory(bad)


def test_cpu_offload_hooks_only_on_leaf_modules(tok):
    """accelerate.cpu_offload puts every weight on "meta" and hooks only the leaf modules: the
    blocks still run on the CPU, and locate/knockout/attach give the plain model's numbers."""
    from pinpoint.placement import layer_devices

    ref = tiny_model("llama", n_layers=4)
    model = accelerate.cpu_offload(copy.deepcopy(ref), execution_device=torch.device("cpu"))
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert [d.type for d in layer_devices(spec_for(model))] == ["cpu"] * 4
    for method in ("path", "activation"):
        want = locate(ref, tok, PAIRS, method=method, progress=False)
        torch.testing.assert_close(locate(model, tok, PAIRS, method=method, progress=False).values, want.values,
                                   rtol=1e-5, atol=1e-6)
    want = knockout(ref, tok, PAIRS, HEADS, ablation="zero", progress=False)
    torch.testing.assert_close(knockout(model, tok, PAIRS, HEADS, ablation="zero", progress=False).per_pair,
                               want.per_pair, rtol=1e-5, atol=1e-6)


def test_cli_tune_with_device_map_equals_the_plain_load(model_dir, tmp_path):
    import json

    from safetensors.torch import load_file

    from pinpoint import data
    from pinpoint.cli import main

    (tmp_path / "heads.json").write_text(json.dumps({"heads": [[0, 1], [1, 2], [3, 0]]}))
    argv = ["tune", "--model", str(model_dir), "--data", str(data.SAMPLE_PATH), "--limit", "6", "--heads",
            str(tmp_path / "heads.json"), "--steps", "2", "--batch-size", "2", "--lr", "1e-3", "--quiet"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    assert main([*argv, "--out", str(tmp_path / "b"), "--device-map", "auto", "--max-memory", "cpu=200KB",
                 "--offload-dir", str(tmp_path / "off")]) == 0
    a, b = (load_file(tmp_path / d / "adapter" / "adapter.safetensors") for d in ("a", "b"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)
