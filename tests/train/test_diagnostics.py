"""The per-parameter diagnostics (proxy/train/diagnostics.py) against their definitions, written
out parameter by parameter: grad RMS, update RMS / LR, parameter norms, and the forward statistics.
The module computes them with multi-tensor kernels and one host copy; these tests hold the numbers
to the plain formulas."""

from __future__ import annotations

import math

import pytest
import torch

from proxy.config import Config, as_dict, to_config
from proxy.model import ModelOutput, build_model
from proxy.records import ATTN_MAX_LOGIT, GRAD_RMS, OUTPUT, PARAM_NORM, UPDATE_RMS, attn_layer_key
from proxy.train import diagnostics


def tiny_model(tie: bool = True):
    cfg = as_dict(Config())
    cfg["model"].update(d_model=32, n_heads=2, n_layers=2, tie_embeddings=tie)
    torch.manual_seed(0)
    return build_model(to_config(cfg).model, 64)


def one_step(model, optimizer):
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    out = model(idx, torch.roll(idx, -1, dims=1))
    optimizer.zero_grad()
    out.loss.backward()
    return out


@pytest.mark.parametrize("tie", [True, False])
def test_grad_update_and_norm_statistics_follow_their_definitions(tie):
    model = tiny_model(tie)
    named = list(model.named_parameters())
    decay = [p for n, p in named if p.ndim >= 2]
    frozen = [p for n, p in named if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "lr": 3e-3}, {"params": frozen, "lr": 0.0}])
    tracker = diagnostics.UpdateTracker(model, optimizer)
    for _ in range(2):  # the second logging step reuses the tracker's buffers
        one_step(model, optimizer)
        grads = diagnostics.grad_stats(model)
        expected = {GRAD_RMS + n: p.grad.float().pow(2).mean().sqrt().item() for n, p in named}
        assert grads.keys() == expected.keys()
        for key, value in expected.items():
            assert grads[key] == pytest.approx(value, rel=1e-5, abs=1e-12), key
        before = {n: p.detach().clone() for n, p in named}
        tracker.before()
        optimizer.step()
        stats = tracker.after()
        for n, p in named:
            lr = 3e-3 if p.ndim >= 2 else 0.0
            update = (p.detach() - before[n]).pow(2).mean().sqrt().item() / lr if lr else 0.0
            assert stats[UPDATE_RMS + n] == pytest.approx(update, rel=1e-4, abs=1e-9), n
            assert stats[PARAM_NORM + n] == pytest.approx(p.detach().norm().item(), rel=1e-5), n
        assert any(stats[UPDATE_RMS + n] > 0.1 for n, p in named if p.ndim >= 2)  # Adam: ~lr-sized updates
    assert tracker.after() == {}  # nothing armed: no stale comparison


def test_forward_statistics_in_one_copy():
    maxima = [torch.tensor([[1.0, 7.0]]), None, torch.tensor([[3.0, 2.0]])]
    out = ModelOutput(
        loss=torch.tensor(1.0),
        ce_loss=torch.tensor(1.0),
        z_loss=torch.tensor(0.0),
        attn_max_logits=maxima,
        output_stats={"logit_mean": torch.tensor(-1.5), "lse_max": torch.tensor(float("nan")), "lse_mean": 4.25},
    )
    stats = diagnostics.forward_stats(out)
    assert stats == {
        attn_layer_key(0): 7.0,
        attn_layer_key(1): 3.0,
        ATTN_MAX_LOGIT: 7.0,
        OUTPUT + "logit_mean": -1.5,
        OUTPUT + "lse_mean": 4.25,
    }
    empty = ModelOutput(
        loss=torch.tensor(1.0), ce_loss=torch.tensor(1.0), z_loss=torch.tensor(0.0), attn_max_logits=[], output_stats={}
    )
    assert diagnostics.forward_stats(empty) == {}
    assert not math.isnan(stats[ATTN_MAX_LOGIT])


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA H200 NVL", 835e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_peak_flops_by_the_name_the_driver_reports(name, peak):
    from proxy.train.diagnostics import peak_flops_of

    assert peak_flops_of(name) == peak  # a card not listed is unknown, not guessed
