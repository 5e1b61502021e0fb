"""Stage 1's curriculum runs on until the lookup skill has formed (organism.train.stage1's
``warm_check``), and a model that passes the first check trains exactly as before."""
from __future__ import annotations

import pytest
import torch

from pinpoint.organism import train as T
from pinpoint.organism.model import make_model, make_tokenizer
from pinpoint.organism.placement import ARCH

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = T.Stage1Config(steps=12, warm_steps=4, warmup=2, dialogue_batch=2, short_batch=2, warm_check_every=2,
                      warm_max_extra=4)


def _run(warm_check=None, spy=None, cfg=TINY):
    tok = make_tokenizer()
    model = make_model(len(tok), 0, ARCH)
    if spy is not None:
        spy.clear()
    hist = T.stage1(model, tok, seed=0, cfg=cfg, warm_check=warm_check)
    return model, hist


def test_an_unformed_skill_extends_the_curriculum_with_the_schedule_paused(monkeypatch):
    seen, rates = [], []
    real_batch, real_lr = T.Stage1Data.batch, T._lr
    monkeypatch.setattr(T.Stage1Data, "batch", lambda self, step, warm=None: seen.append((step, warm))
                        or real_batch(self, step, warm))
    monkeypatch.setattr(T, "_lr", lambda step, cfg: rates.append(step) or real_lr(step, cfg))
    answers, asked = iter([False, False, True]), []

    def warm_check(model, step):
        asked.append(step)
        return next(answers)

    _, hist = _run(warm_check)
    assert asked == [4, 6, 8]                      # at the curriculum's end, then every 2 extra steps
    assert len(hist) == 12 + 4                     # 4 extra curriculum steps
    assert [w for _, w in seen] == [True] * 8 + [False] * 8
    assert rates[::2] == [0, 1, 2, 3, 3, 3, 3, 3] + list(range(4, 12))   # (two param groups) paused at the curriculum's last rate


def test_the_extension_is_capped(monkeypatch):
    _, hist = _run(lambda m, s: False)
    assert len(hist) == 12 + TINY.warm_max_extra


def test_a_skill_formed_in_time_trains_exactly_as_without_the_check():
    a, ha = _run(lambda m, s: True)
    b, hb = _run(None)
    assert ha == hb
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
