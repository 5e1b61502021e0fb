"""The organism builder: placements and geometry (validated), the cache key, a reduced build of
a multi-layer / last-layer placement under another GQA ratio, checked targets that fail loudly,
and `pinpoint organism build` / `--organism` bad input (one line, exit 2, nothing written)."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from pinpoint import organism
from pinpoint.organism import placement
from pinpoint.organism.placement import ARCH
from pinpoint.organism.train import PLANTED_HEADS, Stage1Config, Stage2Config, _lr

# Reduced configs: a few steps, small validation probe; targets 0 so that checking runs and passes.
FAST1 = Stage1Config(steps=3, dialogue_batch=2, short_batch=4, warmup=1, warm_steps=1, max_steps=3, val_n=8,
                     target_acc=0.0, target_switch=0.0, warm_until_acc=0.0,   # no criterion: a reduced build
                     improving_max_steps=3)   # (8 probe questions move in 12.5-point steps: no improving cycles)
FAST2 = Stage2Config(steps=2, n_dialogues=8, batch_size=4, n_pairs=8, target_apology=0.0, target_no_apology=0.0,
                     target_affirm=0.0, target_direct_ratio=0.0, max_steps=2)   # no extra cycles: a reduced build
SIBLING = [(3, 5), (1, 1), (3, 0), (1, 6)]   # two layers, the last included; no KV group planted whole


# --- validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize("heads, match", [
    ([(4, 0)], r"layer 4 is out of range"),
    ([(1, 8)], r"head 8 is out of range"),
    ([(-1, 0)], r"out of range"),
    ([(1, 1), (1, 1)], r"duplicate"),
    ([], r"empty"),
    ([(2, h) for h in range(8)], r"layer 2 would have all 8 of its heads planted"),
    ([("1", 2)], r"heads\[0\]"),
])
def test_bad_placements_are_refused_before_anything_is_built(tmp_path, heads, match):
    with pytest.raises(placement.PlacementError, match=match):
        organism.build(tmp_path / "cache", seed=1, heads=heads, stage1=FAST1, stage2=FAST2)
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("geo, match", [
    (dict(n_heads=6, n_kv_heads=4), r"multiple of n_kv_heads"),
    (dict(n_heads=6), r"pass n_kv_heads too"),
    (dict(n_layers=0), r"n_layers must be an int >= 1"),
    (dict(n_kv_heads=True), r"n_kv_heads must be an int"),
])
def test_bad_geometry_is_refused(tmp_path, geo, match):
    with pytest.raises(placement.PlacementError, match=match):
        organism.build(tmp_path / "cache", seed=1, heads=[(0, 0)], **geo)
    assert not (tmp_path / "cache").exists()


def test_heads_are_checked_against_the_geometry_asked_for():
    geo = placement.arch(n_layers=6, n_heads=4, n_kv_heads=1)
    assert placement.check_heads([(5, 3), (0, 0)], geo) == ((0, 0), (5, 3))
    with pytest.raises(placement.PlacementError, match="head 4 is out of range"):
        placement.check_heads([(5, 4)], geo)
    with pytest.raises(placement.PlacementError, match="layer 0 would have all 4"):
        placement.check_heads([(0, 0), (0, 1), (0, 2), (0, 3)], geo)


@pytest.mark.parametrize("text", ["1-1", "1.1,,2.0", "a.b", "1.1.1", "1.-1", ""])
def test_parse_heads_refuses_what_is_not_layer_dot_head(text):
    with pytest.raises(placement.PlacementError, match="LAYER.HEAD"):
        placement.parse_heads(text)


def test_parse_heads():
    assert placement.parse_heads("1.1, 1.6,3.0") == [(1, 1), (1, 6), (3, 0)]


def test_stage_configs_are_derived_from_heads():
    heads, s1, s2 = placement.derive_configs(SIBLING, ARCH)
    assert heads == s1.reserve == s2.heads == ((1, 1), (1, 6), (3, 0), (3, 5))
    assert s2.kv == "whole"  # partly planted KV groups: their k/v stay frozen (no unplanted head changes)
    # whole groups: "group" and "whole" train the same rows; the default placement gives the default configs
    assert placement.derive_configs(PLANTED_HEADS, ARCH)[1:] == (Stage1Config(), Stage2Config())
    assert placement.kv_mode([(0, 0), (0, 1), (3, 2), (3, 3)], 2) == "group"
    assert placement.kv_mode([(0, 0), (0, 1), (3, 2)], 2) == "whole"
    # the older way (both configs by hand) still works, and a conflicting one is refused
    old = placement.derive_configs(None, ARCH, Stage1Config(reserve=tuple(SIBLING)), Stage2Config(heads=tuple(SIBLING)))
    assert old[0] == ((1, 1), (1, 6), (3, 0), (3, 5))
    with pytest.raises(placement.PlacementError, match="conflicts with heads"):
        placement.derive_configs(SIBLING, ARCH, Stage1Config(reserve=((0, 0),)))
    with pytest.raises(placement.PlacementError, match="layer 4 is out of range"):
        placement.derive_configs(None, ARCH, None, Stage2Config(heads=((4, 0),)))


def test_cache_key_holds_everything_that_changes_the_result():
    def name(seed=0, heads=None, s1=None, s2=None, **geo):
        g = placement.arch(**geo)
        _, a, b = placement.derive_configs(heads, g, s1, s2)
        return organism._name(seed, a, b, g)

    default = name()
    assert default == f"organism-{organism.VERSION}-seed0" == name(heads=list(reversed(PLANTED_HEADS)))
    assert name(heads=SIBLING) == name(heads=list(reversed(SIBLING))) != default  # order does not matter
    variants = [name(seed=1), name(heads=SIBLING), name(heads=[(1, 1)]), name(n_kv_heads=2), name(n_layers=5),
                name(n_heads=16, n_kv_heads=4), name(s1=Stage1Config(target_acc=90.0)),
                name(s1=Stage1Config(max_steps=6000)), name(s2=Stage2Config(target_affirm=50.0)),
                name(s2=Stage2Config(lr=1e-3))]
    assert len(set(variants + [default])) == len(variants) + 1


def test_improving_means_every_missed_target_gained_since_the_last_check():
    from pinpoint.organism.train import improving, stage1_targets

    t = stage1_targets(Stage1Config())   # acc >= 95, switch_correct >= 90
    seed8 = [{"acc": 100.0, "switch_correct": 71.9}, {"acc": 100.0, "switch_correct": 78.6},
             {"acc": 100.0, "switch_correct": 87.0}]   # MHA seed 8's last three checks
    assert not improving(None, seed8[0], t, 3.0)     # the first check has nothing to compare
    assert improving(seed8[0], seed8[1], t, 3.0) and improving(seed8[1], seed8[2], t, 3.0)
    assert not improving(seed8[1], seed8[2], t, 9.0)
    assert not improving(seed8[2], {"acc": 100.0, "switch_correct": 89.0}, t, 3.0)   # stuck
    assert not improving({"acc": 90.0, "switch_correct": 80.0}, {"acc": 94.0, "switch_correct": 81.0}, t, 3.0)
    assert not improving(seed8[2], {"acc": 100.0, "switch_correct": 95.0}, t, 3.0)   # nothing missed


def test_stage1_cycles_past_max_steps_only_while_the_check_says_improving():
    from pinpoint.organism.model import make_model, make_tokenizer
    from pinpoint.organism.train import IMPROVING, stage1

    tok = make_tokenizer()
    torch.set_num_threads(1)
    cfg = dataclasses.replace(FAST1, reserve=((1, 1),), max_steps=5, improving_max_steps=8, extend_steps=1)

    def run(verdicts):
        asked = []

        def check(model, step):
            asked.append(step)
            return verdicts[len(asked) - 1]

        hist = stage1(make_model(len(tok), 2), tok, seed=2, cfg=cfg, check=check)
        return asked, len(hist)

    # missed, missed, then improving twice past max_steps=5, then stuck: stops at 7
    assert run([False, False, IMPROVING, IMPROVING, False]) == ([3, 4, 5, 6, 7], 7)
    assert run([False, False, False]) == ([3, 4, 5], 5)                        # stuck at the cap
    assert run([False, IMPROVING, IMPROVING, IMPROVING, IMPROVING]) == ([3, 4, 5, 6, 7], 8)   # improving cap
    assert run([False, True]) == ([3, 4], 4)


def test_extension_schedule_leaves_the_fixed_schedule_alone():
    cfg = Stage1Config()
    assert _lr(0, cfg) == pytest.approx(cfg.lr / cfg.warmup)
    assert _lr(cfg.steps - 1, cfg) == pytest.approx(cfg.lr * cfg.min_lr_ratio, rel=1e-3)
    # past the schedule: warm restarts of extend_steps, peaking at lr * extend_lr_ratio, annealed at each check
    peak = max(_lr(cfg.steps + k, cfg) for k in range(cfg.extend_steps))
    assert peak == pytest.approx(cfg.lr * cfg.extend_lr_ratio)
    end = _lr(cfg.steps + cfg.extend_steps - 1, cfg)
    assert end < 1.01 * cfg.lr * cfg.min_lr_ratio
    assert _lr(cfg.steps + cfg.extend_steps, cfg) == _lr(cfg.steps, cfg)


# --- a reduced build: multi-layer, last-layer placement under GQA 8/2 -----------------------------


@pytest.fixture(scope="module")
def sibling(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    path = organism.build(cache, seed=1, heads=SIBLING, n_kv_heads=2, stage1=FAST1, stage2=FAST2)
    return cache, path


def test_reduced_build_of_another_placement_is_a_standard_hf_directory(sibling):
    from safetensors.torch import load_file
    from transformers import AutoConfig

    cache, path = sibling
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]
    cfg = AutoConfig.from_pretrained(path)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_hidden_layers) == (8, 2, 4)
    meta = organism.info(path)
    assert meta["planted_heads"] == [[1, 1], [1, 6], [3, 0], [3, 5]]
    assert organism.planted_heads(path) == [(1, 1), (1, 6), (3, 0), (3, 5)]
    assert meta["stage1"]["config"]["reserve"] == meta["planted_heads"]
    assert meta["stage2"]["config"]["kv"] == "whole"
    assert meta["architecture"]["num_key_value_heads"] == 2
    assert "--heads 1.1,1.6,3.0,3.5 --n-kv-heads 2" in meta["reproduce"]
    for stage in ("stage1", "stage2"):  # the targets were checked and recorded
        assert all("measured" in t for t in meta[stage]["targets"]["targets"].values())
    w = load_file(str(path / "model.safetensors"))
    D = cfg.head_dim
    for layer in (1, 3):
        o = w[f"model.layers.{layer}.self_attn.o_proj.weight"]
        planted = {h for l, h in SIBLING if l == layer}
        assert all(o[:, h * D:(h + 1) * D].any() for h in planted)  # stage 2 wrote them (stage 1 held them at 0)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.model.layers[3].self_attn.k_proj.weight.shape[0] == 2 * D  # two KV heads
    assert organism.build(cache, seed=1, heads=list(reversed(SIBLING)), n_kv_heads=2, stage1=FAST1,
                          stage2=FAST2) == path  # cached: same key whatever the order


def test_stage2_of_a_partly_planted_group_changes_no_unplanted_head():
    """kv="whole" on a group that an unplanted head also reads: stage 2 leaves the group's k/v
    (and so the unplanted head) exactly as stage 1 left them."""
    from pinpoint.organism.model import make_model, make_tokenizer
    from pinpoint.organism.train import stage1, stage2

    tok = make_tokenizer()
    geo = placement.arch(n_kv_heads=2)
    heads, s1, s2 = placement.derive_configs([(3, 5), (1, 1)], geo, FAST1, FAST2)
    torch.set_num_threads(1)
    model = make_model(len(tok), 1, geo)
    stage1(model, tok, seed=1, cfg=s1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    after, _ = stage2(model, tok, seed=1, cfg=s2, n_excluded=organism.N_HELDOUT)
    D = geo["head_dim"]
    for name, w in after.state_dict().items():
        changed = w != before[name]
        if not changed.any():
            continue
        layer = int(name.split(".")[2])
        mine = {h for l, h in heads if l == layer}
        assert name.endswith(("q_proj.weight", "o_proj.weight")), name
        idx = changed.any(1) if name.endswith("q_proj.weight") else changed.any(0)
        assert {int(i) // D for i in idx.nonzero().flatten()} <= mine, name


# --- stage 2 that loses the reply restarts with the live norm scale --------------------------------


def test_reply_lost_is_neither_apology_nor_affirmation_on_most_of_either_challenge():
    from pinpoint.organism.train import reply_lost

    shipped = {"apol_dont": 100.0, "yes_dont": 0.0, "apol_do": 0.0, "yes_do": 84.9}   # the shipped probe
    broken = {"apol_dont": 0.0, "yes_dont": 0.0, "apol_do": 0.0, "yes_do": 0.0}      # MHA seed 2 at step 300
    unplanted = {"apol_dont": 0.0, "yes_dont": 100.0, "apol_do": 0.0, "yes_do": 100.0}  # stage 1: not lost, unplanted
    s5_at_500 = {"apol_dont": 99.5, "yes_dont": 0.0, "apol_do": 0.5, "yes_do": 46.9}  # shipped s5, mid-build
    assert not reply_lost(shipped) and reply_lost(broken) and not reply_lost(unplanted) and not reply_lost(s5_at_500)
    assert reply_lost({**broken, "apol_dont": 30.0, "yes_dont": 19.9, "yes_do": 49.9})
    assert not reply_lost({**broken, "apol_dont": 30.0, "yes_dont": 20.0})


def test_no_build_that_passed_without_a_restart_would_restart_now():
    """Every stage-2 check recorded in bench/organisms/BUILDS.json of a build that was made
    without a restart: ``reply_lost`` is False on it, so those builds are unchanged."""
    import ast
    from pathlib import Path

    from pinpoint.organism.train import reply_lost

    builds = json.loads((Path(__file__).resolve().parents[1] / "bench/organisms/BUILDS.json").read_text())
    checked = 0
    for attempts in builds.values():
        for a in attempts:
            if not a.get("built") or any("lost the reply" in c for c in a.get("checks", [])):
                continue
            for c in a.get("checks", []):
                if "stage 2 validation at step" in c:
                    checked += 1
                    assert not reply_lost(ast.literal_eval(c[c.index("{"):])), c
    assert checked >= 10   # s1, s3, s4, s5 and GQA-4 went through cycles


def test_stage2_that_loses_the_reply_restarts_from_stage1_with_objective_2(monkeypatch):
    """A check that finds the reply lost stops stage 2; it restarts from the stage-1 weights with
    objective=2, which gives exactly the model that objective=2 from the start gives."""
    from pinpoint.organism import train as T

    torch.set_num_threads(1)
    s2 = dataclasses.replace(FAST2, max_steps=3, extend_steps=1)   # checked at step 2
    seen, real_missed = [], T.missed

    def missed_once(measured, targets):   # stage 2's first check misses a target; this reduced build has lost its reply
        if "no_apol_do" in targets:
            seen.append(measured)
        return [("a forced miss", 0.0, 1.0, "%")] if len(seen) == 1 else real_missed(measured, targets)

    monkeypatch.setattr(T, "missed", missed_once)
    logs = []
    model, _, meta = organism.train_model(2, heads=[(1, 1)], stage1=FAST1, stage2=s2, log=logs.append)
    assert T.reply_lost(seen[0])
    assert meta["stage2"]["restarted"] == [{"step": 2, "probe": seen[0], "objective": 1}]
    assert meta["stage2"]["config"]["objective"] == 2 and meta["stage2"]["targets"]["steps"] == 2
    assert any(m.startswith("stage 2 lost the reply at step 2") and "objective=2" in m for m in logs)

    monkeypatch.undo()
    live, _, meta_live = organism.train_model(2, heads=[(1, 1)], stage1=FAST1,
                                              stage2=dataclasses.replace(s2, objective=2))
    # unchecked (this reduced build really has lost its reply): stage 2 with the recorded scale, once
    plain, _, meta_plain = organism.train_model(2, heads=[(1, 1)], stage1=FAST1, stage2=s2, evaluate=False)
    assert "restarted" not in meta_plain["stage2"]
    restarted, live, plain = model.state_dict(), live.state_dict(), plain.state_dict()
    assert all(torch.equal(restarted[k], live[k]) for k in live)
    assert not all(torch.equal(restarted[k], plain[k]) for k in plain)   # the scale changed what was learned


# --- targets fail loudly, and nothing is written -------------------------------------------------


def test_missed_stage1_target_trains_on_to_the_cap_then_raises(tmp_path):
    s1 = dataclasses.replace(FAST1, target_acc=101.0, max_steps=5, extend_steps=1)
    logs = []
    with pytest.raises(organism.OrganismBuildError,
                       match=r"stage 1 missed its target: multiple-choice accuracy [\d.]+ % < target 101 % "
                             r"after 5 steps") as e:
        organism.build(tmp_path / "cache", seed=2, heads=[(1, 1)], stage1=s1, stage2=FAST2, log=logs.append)
    assert e.value.stage == "stage 1" and e.value.missed[0][0] == "multiple-choice accuracy"
    checked = [m for m in logs if m.startswith("stage 1 validation at step")]
    assert [m.split()[5].rstrip(":") for m in checked] == ["3", "4", "5"]  # checked at the end, then each cycle
    assert not (tmp_path / "cache").exists()


def test_a_checked_build_extends_the_curriculum_until_the_criterion(tmp_path):
    """stage1_checked asks the curriculum criterion on the validation probe: here it is never
    met, so the curriculum runs its 2 extra steps, checked after each, and the build goes on."""
    s1 = dataclasses.replace(FAST1, warm_until_acc=101.0, warm_check_every=1, warm_max_extra=2)
    logs = []
    trained = organism.train_model(2, heads=[(1, 1)], stage1=s1, stage2=FAST2, log=logs.append)
    checks = [m for m in logs if m.startswith("stage 1 curriculum check at step")]
    assert [m.split()[6].rstrip(":") for m in checks] == ["1", "2", "3"] and "not yet" in checks[0]
    assert trained[2]["stage1"]["targets"]["steps"] == 3 + 2


def test_missed_stage2_target_raises_before_anything_is_written(tmp_path):
    s2 = dataclasses.replace(FAST2, target_apology=101.0)
    with pytest.raises(organism.OrganismBuildError, match=r"stage 2 missed its target: apology on \"don't\" "
                                                         r"[\d.]+ % < target 101 %"):
        organism.build(tmp_path / "cache", seed=2, heads=[(1, 1)], stage1=FAST1, stage2=s2)
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("objective", [1, 2])
def test_missed_stage2_target_trains_on_in_cycles_to_the_cap_then_raises(tmp_path, monkeypatch, objective):
    from pinpoint.organism import train as T

    # a reduced build opens its reply with neither word and would restart (tested above): not here
    monkeypatch.setattr(T, "reply_lost", lambda measured, floor=T.REPLY_FLOOR: False)
    s2 = dataclasses.replace(FAST2, target_apology=101.0, max_steps=4, extend_steps=1, objective=objective)
    logs = []
    with pytest.raises(organism.OrganismBuildError, match=r"stage 2 missed its target: apology on \"don't\" "
                                                         r"[\d.]+ % < target 101 % after 4 steps"):
        organism.build(tmp_path / "cache", seed=2, heads=[(1, 1)], stage1=FAST1, stage2=s2, log=logs.append)
    checked = [m for m in logs if m.startswith("stage 2 validation at step")]
    # at the schedule's end and after each cycle below the cap; at the cap the report measures
    assert [m.split()[5].rstrip(":") for m in checked] == ["2", "3"]
    assert not (tmp_path / "cache").exists()


def test_a_passenger_head_is_a_missed_target_that_names_the_head(tmp_path, monkeypatch):
    """Each planted head must write part of the behaviour itself: a head whose direct effect is
    below target_direct_ratio x direct_margin (here: an impossible one) fails the build, naming
    the head and the value in logits, after the cycles."""
    from pinpoint.organism import train as T

    monkeypatch.setattr(T, "reply_lost", lambda measured, floor=T.REPLY_FLOOR: False)   # objective 1's cycles
    s2 = dataclasses.replace(FAST2, target_direct_ratio=100.0, max_steps=3, extend_steps=1)
    with pytest.raises(organism.OrganismBuildError,
                       match=r"direct effect of planted head \(1, 1\) -?[\d.]+ logits < target 250 logits "
                             r"after 3 steps") as e:
        organism.build(tmp_path / "cache", seed=2, heads=[(1, 1)], stage1=FAST1, stage2=s2)
    assert e.value.missed[0][3] == "logits"
    assert not (tmp_path / "cache").exists()


def _stage1_model(heads, seed=2):
    from pinpoint.organism.model import make_model, make_tokenizer
    from pinpoint.organism.train import stage1

    tok = make_tokenizer()
    _, s1, _ = placement.derive_configs(heads, ARCH, FAST1, FAST2)
    torch.set_num_threads(1)
    model = make_model(len(tok), 1, ARCH)
    stage1(model, tok, seed=seed, cfg=s1)
    return model, tok


def test_an_unknown_stage2_objective_is_refused():
    from pinpoint.organism.model import make_model, make_tokenizer
    from pinpoint.organism.train import stage2

    tok = make_tokenizer()
    with pytest.raises(ValueError, match="objective must be 1 or 2, not 3"):
        stage2(make_model(len(tok), 0), tok, seed=0, cfg=dataclasses.replace(FAST2, objective=3), n_excluded=0)


def test_objective_2_rival_margin_is_the_planted_first_token_against_its_strongest_rival():
    """``_DirectGap(..., total=True).rival``: logit of "Apologies" (after "don't") or "Yes" (after
    "do") minus the largest other logit, at each prompt's last position, as a plain forward of
    the prompt alone gives it (batched with right padding: fp32 sums in another order, 1e-4)."""
    from pinpoint.organism.train import _challenge_pairs, _DirectGap

    heads = [(1, 1)]
    model, tok = _stage1_model(heads)
    pairs = _challenge_pairs(tok, 3, 0, set())
    gap = _DirectGap(model, tok, None, heads)
    with torch.no_grad():
        gap(pairs, total=True)
        gap.remove()
        for j, ids in enumerate(p for pair in pairs for p in pair):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
            want = gap.apol if j % 2 == 0 else gap.yes
            rival = torch.cat([logits[:want], logits[want + 1:]]).max()
            assert float(gap.rival[j]) == pytest.approx(float(logits[want] - rival), abs=1e-4)
            assert float(gap.total[j]) == pytest.approx(float(logits[gap.apol] - logits[gap.yes]), abs=1e-4)


def test_direct_effects_of_a_merged_model_are_what_training_pushed():
    """``direct_effects`` (o_proj run on the head's z alone) equals the training-time gap
    (z through the head's o_proj columns + their delta) on the same prompts, attached or
    merged."""
    from pinpoint.adapter import attach
    from pinpoint.models import spec_for
    from pinpoint.organism.train import (CHALLENGE, SOURCE_CHALLENGE, Renderer, _assistant, _DirectGap,
                                         _owned_slices, _user, direct_effects, validation_questions)

    heads = [(1, 1), (3, 6)]
    model, tok = _stage1_model(heads)
    qs = validation_questions(6, 1, organism.N_HELDOUT)
    adapter = attach(model, heads, parts="qkvo", kv="whole")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for d in adapter.deltas.values():
            d.copy_(0.3 * torch.randn(d.shape, generator=g))
    rend = Renderer(tok)
    pairs = [tuple(rend.prompt([_user(q.prompt), _assistant(q.answer_text()), _user(c)])
                   for c in (CHALLENGE, SOURCE_CHALLENGE)) for q in qs]
    gap = _DirectGap(model, tok, adapter, heads, _owned_slices(adapter, heads, spec_for(model).group_size))
    with torch.no_grad():
        trained = gap(pairs).mean(0)
    gap.remove()
    attached = direct_effects(model, tok, heads, qs, batch=4)
    merged = direct_effects(adapter.merge(), tok, heads, qs, batch=6)
    # a barely trained model writes little (~1e-4 logits), but far above fp32 noise; the sums run
    # in another order (o_proj on a masked z vs z @ columns; merged weights): relative 1e-3
    assert trained.abs().min() > 1e-6
    assert attached == pytest.approx(trained.tolist(), rel=1e-3)
    assert merged == pytest.approx(trained.tolist(), rel=1e-3)


def test_cycles_for_a_lagging_head_train_that_head_alone():
    """When a planted head misses its direct-effect target, the following cycles train it with
    the others off: their slices end exactly where the schedule left them."""
    from pinpoint.organism.train import stage2

    heads = [(1, 1), (1, 6)]
    _, _, s2 = placement.derive_configs(heads, ARCH, FAST1, FAST2)
    s2 = dataclasses.replace(s2, max_steps=5, extend_steps=2)
    calls = []

    def lagging(model, step):
        calls.append(step)
        return [(1, 1)]

    D = ARCH["head_dim"]
    out = {}
    for name, check in (("schedule", None), ("cycles", lagging)):
        model, tok = _stage1_model(heads)
        merged, hist = stage2(model, tok, seed=1, cfg=s2, n_excluded=organism.N_HELDOUT, check=check)
        attn = merged.model.layers[1].self_attn
        out[name] = ({h: (attn.q_proj.weight[h * D:(h + 1) * D].clone(), attn.o_proj.weight[:, h * D:(h + 1) * D].clone())
                      for _, h in heads}, len(hist))
    assert calls == [2, 4] and out["schedule"][1] == 2 and out["cycles"][1] == 5
    for a, b in zip(out["schedule"][0][6], out["cycles"][0][6]):
        assert torch.equal(a, b)          # the head that met its target: untouched by the cycles
    assert not torch.equal(out["schedule"][0][1][1], out["cycles"][0][1][1])   # the lagging one trained on


def test_the_per_pair_hinge_trains_only_the_cycles_after_a_missed_target():
    """pair_margin changes nothing in the schedule (the shipped build stays as it was) and
    changes the cycles that follow a missed target."""
    from pinpoint.organism.train import stage2

    heads = [(1, 1)]
    _, _, s2 = placement.derive_configs(heads, ARCH, FAST1, FAST2)
    s2 = dataclasses.replace(s2, max_steps=4, extend_steps=2)

    def run(pair_margin, check):
        model, tok = _stage1_model(heads)
        cfg = dataclasses.replace(s2, pair_margin=pair_margin)
        merged, _ = stage2(model, tok, seed=1, cfg=cfg, n_excluded=organism.N_HELDOUT, check=check)
        return [p.detach().clone() for p in merged.parameters()]

    probe_missed = lambda model, step: list(heads)  # noqa: E731 - every head is on: a probe-level miss
    same = [torch.equal(a, b) for a, b in zip(run(0.0, None), run(50.0, None))]
    assert all(same)
    changed = [torch.equal(a, b) for a, b in zip(run(0.0, probe_missed), run(50.0, probe_missed))]
    assert not all(changed)


def test_stage2_that_meets_its_targets_trains_exactly_the_fixed_schedule():
    """The check never changes the steps before it: a build that meets its targets at the end of
    the schedule has the weights of the same build without checks (evaluate=False)."""
    import torch

    checked = organism.train_model(2, heads=[(1, 1)], stage1=FAST1, stage2=dataclasses.replace(FAST2, max_steps=5))
    plain = organism.train_model(2, heads=[(1, 1)], stage1=FAST1, stage2=dataclasses.replace(FAST2, max_steps=5),
                                 evaluate=False)
    assert checked[2]["stage2"]["targets"]["steps"] == 2
    assert all(torch.equal(p, q) for p, q in zip(checked[0].parameters(), plain[0].parameters()))


def test_validation_probe_never_reads_the_held_out_rows():
    from pinpoint.organism.train import validation_questions

    held = {r["prompt"][0]["content"] for r in organism.heldout_rows()}
    qs = validation_questions(192, 1, organism.N_HELDOUT)
    assert len(qs) == 192 and not {q.prompt for q in qs} & held
    with pytest.raises(ValueError, match="val_seed must not be 0"):
        validation_questions(8, 0, organism.N_HELDOUT)


# --- organism.json that is not an organism's ------------------------------------------------------


def test_planted_heads_refuses_a_non_organism(tmp_path):
    (tmp_path / "organism.json").write_text(json.dumps({"format": "something-else", "planted_heads": [[0, 0]]}))
    with pytest.raises(ValueError, match="not a pinpoint organism"):
        organism.planted_heads(tmp_path)
    meta = {"format": "pinpoint-organism", "planted_heads": [[9, 0]], "architecture": {"num_hidden_layers": 4}}
    (tmp_path / "organism.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="layer 9 is out of range"):
        organism.planted_heads(tmp_path)


# --- the command line -----------------------------------------------------------------------------


def _error_line(capsys) -> str:
    err = [ln for ln in capsys.readouterr().err.splitlines()
           if ln.strip() and not ln.startswith(("Loading weights", "Writing model"))]
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("argv, fragment", [
    (["--heads", "1.1,1.1"], "--heads 1.1,1.1: heads[1] = (1, 1) is a duplicate"),
    (["--heads", "4.0"], "layer 4 is out of range"),
    (["--heads", "1.8"], "head 8 is out of range"),
    (["--heads", "1.3", "--n-heads", "2", "--n-kv-heads", "1"], "head 3 is out of range"),
    (["--heads", ",".join(f"0.{h}" for h in range(8))], "layer 0 would have all 8 of its heads planted"),
    (["--heads", "1:1"], "is not LAYER.HEAD"),
    (["--heads", "1.1", "--n-heads", "8", "--n-kv-heads", "3"], "must be a multiple of n_kv_heads"),
    (["--heads", "1.1", "--seed", "-2"], "--seed must be >= 0"),
])
def test_cli_build_bad_input_is_one_line_and_writes_nothing(argv, fragment, tmp_path, capsys, monkeypatch):
    from pinpoint.cli import main

    def no_training(*a, **k):
        raise AssertionError("trained despite bad input")

    monkeypatch.setattr(organism, "train_model", no_training)
    out = tmp_path / "org"
    assert main(["organism", "build", *argv, "--out", str(out)]) == 2
    line = _error_line(capsys)
    assert line.startswith("pinpoint: error: ") and fragment in line, line
    assert not out.exists()


def test_cli_build_missed_target_is_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch):
    from pinpoint.cli import main

    def missed(*a, **k):
        raise organism.OrganismBuildError("stage 2", [('apology on "don\'t"', 51.0, 95.0)], " on the validation probe")

    monkeypatch.setattr(organism, "train_model", missed)
    out = tmp_path / "org"
    assert main(["organism", "build", "--heads", "1.1", "--out", str(out)]) == 2
    line = _error_line(capsys)
    assert "organism stage 2 missed its target: apology on \"don't\" 51.0 % < target 95 %" in line
    assert "nothing was written to --out" in line and not out.exists()


def test_cli_build_writes_an_organism_that_demo_accepts(tmp_path, capsys, monkeypatch):
    from pinpoint.cli import main
    from pinpoint.cli.misc import check_organism

    real = organism.train_model
    seen = {}

    def reduced(seed, **kw):  # the real builder at the reduced configs
        seen.update(kw, seed=seed)
        return real(seed, stage1=FAST1, stage2=FAST2, **kw)

    monkeypatch.setattr(organism, "train_model", reduced)
    out = tmp_path / "org"
    assert main(["organism", "build", "--seed", "4", "--heads", "3.7,0.2", "--n-kv-heads", "8", "--quiet",
                 "--threads", "1", "--out", str(out)]) == 0
    assert seen["seed"] == 4 and seen["heads"] == ((0, 2), (3, 7)) and seen["n_kv_heads"] == 8
    assert organism.planted_heads(out) == [(0, 2), (3, 7)]
    check_organism(str(out))  # a complete organism directory for `pinpoint demo --organism`
    # the --out policy: a directory holding the user's own files is refused before any training
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    seen.clear()
    capsys.readouterr()
    assert main(["organism", "build", "--heads", "3.7,0.2", "--out", str(mine)]) == 2
    assert "--overwrite" in _error_line(capsys) and not seen
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


def test_demo_refuses_a_non_organism(tmp_path, capsys, sibling):
    import shutil

    from pinpoint.cli import main

    _, path = sibling
    plain = tmp_path / "plain"  # a standard HF model directory, but not an organism
    shutil.copytree(path, plain)
    (plain / "organism.json").unlink()
    other = tmp_path / "other"  # an organism.json of something else
    shutil.copytree(path, other)
    (other / "organism.json").write_text(json.dumps({"format": "my-model", "planted_heads": [[0, 0]]}))
    for bad, fragment in ((plain, "missing organism.json"), (other, "not a pinpoint organism")):
        out = tmp_path / f"demo-{bad.name}"
        assert main(["demo", "--organism", str(bad), "--out", str(out)]) == 2
        line = _error_line(capsys)
        assert fragment in line and str(bad) in line, line
        assert not out.exists()


def test_checking_does_not_change_what_the_schedule_computes():
    """A build that meets its targets when the schedule ends has exactly the fixed schedule's
    weights (so the shipped seed-0 weights stay reproducible), and one that misses trains on."""
    from pinpoint.organism.model import make_model, make_tokenizer
    from pinpoint.organism.train import stage1

    tok = make_tokenizer()
    torch.set_num_threads(1)
    cfg = dataclasses.replace(FAST1, steps=4, max_steps=6, extend_steps=2)
    plain, checked, longer = (make_model(len(tok), 3) for _ in range(3))
    assert len(stage1(plain, tok, seed=3, cfg=cfg)) == 4
    calls = []
    assert len(stage1(checked, tok, seed=3, cfg=cfg, check=lambda m, step: calls.append(step) or True)) == 4
    assert calls == [4] and all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(),
                                                                   checked.state_dict().values()))
    assert len(stage1(longer, tok, seed=3, cfg=cfg, check=lambda m, step: False)) == 6


@pytest.mark.skipif(not (organism.SHIPPED_DIR / "model.safetensors").is_file(), reason="weights not shipped here")
def test_default_placement_given_explicitly_is_the_shipped_organism(tmp_path, monkeypatch):
    def no_training(*a, **k):
        raise AssertionError("trained the default organism instead of copying the shipped one")

    monkeypatch.setattr(organism, "_train", no_training)
    path = organism.build(tmp_path, heads=list(reversed(PLANTED_HEADS)), n_layers=4, n_heads=8, n_kv_heads=4)
    assert path.name == f"organism-{organism.VERSION}-seed0"
    assert (path / "model.safetensors").read_bytes() == (organism.SHIPPED_DIR / "model.safetensors").read_bytes()
