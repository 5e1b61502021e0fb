"""TuneConfig + Trainer (the pieces under pp.tune), SFT's fp32 master weights, and tune's GQA K/V default."""
from __future__ import annotations

import copy

import pytest
import torch

from pinpoint.adapter import attach
from pinpoint.batching import pad_id
from pinpoint.chat import tokenize_dialogues
from pinpoint.testing import tiny_model, word_tokenizer
from pinpoint.trainer import Trainer
from pinpoint.tune import tune
from pinpoint.tune_config import TuneConfig
from tests.test_tune import DIALOGUES, HEADS

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer()


@pytest.mark.parametrize("kw, match", [
    (dict(lr=float("nan")), r"^lr must be a number > 0"),
    (dict(steps=True), r"^steps must be an int > 0"),
    (dict(batch_size=0), r"^batch_size must be an int > 0"),
    (dict(warmup=float("inf")), r"^warmup must be a number ≥ 0"),
    (dict(max_grad_norm=0), r"^max_grad_norm must be a number > 0"),
    (dict(checkpoint_every=0), r"^checkpoint_every must be an int > 0"),
    (dict(max_length=-3), r"^max_length must be an int > 0"),
    (dict(kv="all"), r"^kv must be 'group'"),
    (dict(betas=(0.9, 1.0)), r"^betas must be two numbers in \[0, 1\)"),
    (dict(eps=0.0), r"^eps must be a number > 0"),
])
def test_config_errors_name_the_field(kw, match):
    with pytest.raises(ValueError, match=match):
        TuneConfig(**kw)


def test_config_resolves_heads_and_defaults(tok):
    model = tiny_model("llama", n_layers=3)
    c = TuneConfig(heads=[(2, 1), (0, 3)], parts="oq", steps=25, warmup=0.1).resolve(model, tok)
    assert c.heads == ((0, 3), (2, 1)) and c.parts == "qo" and c.warmup_steps == 3 and c.checkpoint_every == 2
    assert c.max_length == min(model.config.max_position_embeddings, tok.model_max_length)
    assert TuneConfig(heads="all").resolve(model).full and TuneConfig(full=True).resolve(model).heads == "all"
    assert len(TuneConfig(heads="random", random_k=2, seed=1).resolve(model).heads) == 2
    with pytest.raises(ValueError, match="do not also pass heads"):
        TuneConfig(heads=HEADS, full=True).resolve(model)


def test_trainer_from_public_pieces_equals_tune(tok):
    """Config -> rows -> attach -> Trainer.fit is exactly what tune() runs."""
    kw = dict(lr=1e-2, steps=3, batch_size=4, seed=5, weight_decay=0.1)
    want = tune(tiny_model("llama", n_layers=3), tok, DIALOGUES, heads=HEADS, progress=False, **kw)

    model = tiny_model("llama", n_layers=3)
    config = TuneConfig(heads=HEADS, **kw).resolve(model, tok)
    rows = tokenize_dialogues(tok, DIALOGUES, max_length=config.max_length)
    adapter = attach(model, config.heads, config.parts, config.kv)
    trainer = Trainer(adapter, rows, config, signature={}, pad_id=pad_id(tok))
    trainer.fit(progress=False)
    assert [h["loss"] for h in adapter.history] == [h["loss"] for h in want.history]
    assert all(torch.equal(adapter.deltas[n], want.deltas[n]) for n in want.deltas)
    assert trainer.lr_at(0) == pytest.approx(1e-2 / 1)  # warmup 0.1 of 3 steps = 1 step


def _flat(tensors):
    return torch.cat([t.detach().float().reshape(-1) for t in tensors])


def test_sft_on_bf16_weights_keeps_fp32_master_weights(tok):
    """AdamW directly on bf16 weights loses updates below half an ulp; the masters keep them.
    Measured here (2 layers, 6 steps, lr 3e-5): the masters' update has cosine 0.999 with the
    fp32 run's, plain bf16 AdamW's about 0.18, and changes 2 % of the weights instead of 14 %."""
    kw = dict(heads="all", steps=6, lr=3e-5, batch_size=4, warmup=0, schedule="constant", progress=False)
    base = tiny_model("llama", n_layers=2)
    b16 = copy.deepcopy(base).to(torch.bfloat16)
    ref = tune(copy.deepcopy(base), tok, DIALOGUES, **kw)
    assert ref.masters is None  # an fp32 model trains its own weights
    update_ref = _flat(ref.model.parameters()) - _flat(base.parameters())

    sft = tune(copy.deepcopy(b16), tok, DIALOGUES, **kw)
    assert all(m.dtype == torch.float32 for m in sft.masters.values())
    assert all(p.dtype == torch.bfloat16 for p in sft.model.parameters())
    masters = _flat(sft.masters.values())
    assert torch.equal(_flat(sft.model.parameters()), masters.bfloat16().float())  # one rounding per step
    update = masters - _flat(b16.parameters())
    assert torch.nn.functional.cosine_similarity(update, update_ref, 0) > 0.99
    changed = (_flat(sft.merge().parameters()) != _flat(b16.parameters())).float().mean()
    assert changed > 0.1  # plain bf16 AdamW: ~0.02


def test_sft_resume_on_bf16_is_exact(tok, tmp_path):
    kw = dict(heads="all", steps=3, lr=1e-3, batch_size=4, progress=False, checkpoint_every=1)
    base = tiny_model("llama", n_layers=2).to(torch.bfloat16)
    full = tune(copy.deepcopy(base), tok, DIALOGUES, **kw)

    def stop(step, loss):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tune(copy.deepcopy(base), tok, DIALOGUES, checkpoint_dir=tmp_path, callback=stop, **kw)
    resumed = tune(copy.deepcopy(base), tok, DIALOGUES, checkpoint_dir=tmp_path, resume=True, **kw)
    assert all(torch.equal(a, b) for a, b in zip(resumed.masters.values(), full.masters.values()))


def test_tune_changes_no_unselected_heads_keys_or_values_by_default(tok):
    # GQA 4/2: (1, 0) and (1, 3) select one head of each group; (2, 2) and (2, 3) the whole group 1
    heads = [(1, 0), (1, 3), (2, 2), (2, 3)]
    kw = dict(heads=heads, steps=2, lr=1e-2, batch_size=4, progress=False)
    model = tiny_model("mistral", n_layers=3, n_kv_heads=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    adapter = tune(model, tok, DIALOGUES, **kw)
    assert adapter.kv == "whole" and adapter.kv_changes()["unselected"] == []
    assert adapter.kv_changes()["kv_heads"] == [(2, 1)]
    merged = adapter.merge()
    D = merged.config.head_dim
    for name, p in merged.named_parameters():
        if ".k_proj." in name or ".v_proj." in name:
            rows = [g for g in range(2) if not torch.equal(p[g * D:(g + 1) * D], before[name][g * D:(g + 1) * D])]
            assert rows == ([1] if ".layers.2." in name else []), name

    group = tune(tiny_model("mistral", n_layers=3, n_kv_heads=2), tok, DIALOGUES, kv="group", **kw)
    assert group.kv_changes()["unselected"] == [(1, 1), (1, 2)]  # the old behaviour, asked for explicitly
    assert group.num_trainable() > adapter.num_trainable()
