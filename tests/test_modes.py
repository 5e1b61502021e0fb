"""pinpoint.modes: train/eval mode and requires_grad, saved and restored."""
import pytest
import torch
from torch import nn

from pinpoint.modes import eval_mode, frozen, inference, train_mode


def _net():
    net = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5), nn.Linear(2, 1))
    net.train()
    net[1].eval()          # a mixed state: only restoring each submodule's own flag keeps it
    net[2].weight.requires_grad_(False)
    return net


def _state(net):
    return [m.training for m in net.modules()], [p.requires_grad for p in net.parameters()]


def test_eval_and_train_mode_restore_every_submodule():
    net = _net()
    before = _state(net)
    with eval_mode(net, None, "not a module"):
        assert not any(m.training for m in net.modules())
    assert _state(net) == before
    with train_mode(net):
        assert all(m.training for m in net.modules())
    assert _state(net) == before


def test_frozen_restores_flags_even_after_an_error():
    net = _net()
    before = _state(net)
    with pytest.raises(RuntimeError):
        with frozen(net):
            assert not any(p.requires_grad for p in net.parameters())
            raise RuntimeError("boom")
    assert _state(net) == before


def test_inference_grads():
    net = _net()
    before = _state(net)
    x = torch.randn(3, 2, requires_grad=True)
    with inference(net):
        assert not torch.is_grad_enabled() and not net.training
        assert not net(x).requires_grad
    with inference(net, grads=True):  # gradients w.r.t. activations, none for parameters
        net(x).sum().backward()
        assert x.grad is not None and all(p.grad is None for p in net.parameters())
    assert _state(net) == before and torch.is_grad_enabled()
