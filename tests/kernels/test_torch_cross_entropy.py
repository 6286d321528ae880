"""proxy/kernels/torch_cross_entropy.py: the reference's numbers, bit for bit, with its own backward."""

from __future__ import annotations

import pytest
import torch
from torch.func import vmap

from proxy.kernels import reference, torch_cross_entropy


def _inputs(n: int, v: int, dtype: torch.dtype, seed: int, ignored: float = 0.2):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, v, generator=g) * 4).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < ignored] = -100
    return logits, labels


def _run(fn, logits, labels, z_loss):
    x = logits.clone().requires_grad_(True)
    ce, z, stats = fn(x, labels, z_loss=z_loss)
    (ce + z).backward()
    return ce.detach(), z.detach(), stats, x.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("z_loss", [0.0, 1e-4, 0.5])
def test_values_and_gradients_are_the_references_bit_for_bit(dtype, z_loss):
    for seed in range(3):
        logits, labels = _inputs(64, 97, dtype, seed)
        ours = _run(torch_cross_entropy.cross_entropy, logits, labels, z_loss)
        ref = _run(reference.cross_entropy, logits, labels, z_loss)
        assert torch.equal(ours[0], ref[0]) and torch.equal(ours[1], ref[1])
        assert torch.equal(ours[3], ref[3])
        assert ours[2].keys() == ref[2].keys()
        for key in ref[2]:
            assert torch.equal(ours[2][key], ref[2][key]), key


def test_every_label_ignored_gives_zero_losses_and_gradients():
    logits, labels = _inputs(8, 11, torch.float32, 0, ignored=1.0)
    ce, z, stats, grad = _run(torch_cross_entropy.cross_entropy, logits, labels, 1e-4)
    assert ce.item() == 0.0 and z.item() == 0.0 and torch.isnan(stats["logit_max"])
    assert torch.equal(grad, torch.zeros_like(grad))


def test_without_stats_nothing_else_changes():
    logits, labels = _inputs(32, 50, torch.float32, 1)
    with_stats = _run(torch_cross_entropy.cross_entropy, logits, labels, 1e-4)
    without = _run(
        lambda x, y, z_loss: torch_cross_entropy.cross_entropy(x, y, z_loss=z_loss, stats=False), logits, labels, 1e-4
    )
    assert without[2] == {}
    assert torch.equal(with_stats[0], without[0]) and torch.equal(with_stats[3], without[3])


def test_mapped_over_members_as_a_sweep_maps_it():
    """vmap over a member dim (proxy/train/ensemble.py): each member's gradient is its own call's."""
    stacked = torch.stack([_inputs(16, 23, torch.float32, s)[0] for s in range(3)])
    _, labels = _inputs(16, 23, torch.float32, 9)
    x = stacked.clone().requires_grad_(True)
    ce, z, _ = vmap(lambda lg: torch_cross_entropy.cross_entropy(lg, labels, z_loss=1e-4, stats=False))(x)
    (ce + z).sum().backward()
    for k in range(3):
        ref = _run(reference.cross_entropy, stacked[k], labels, 1e-4)
        assert torch.allclose(ce[k], ref[0], rtol=1e-6, atol=0) and torch.allclose(
            x.grad[k], ref[3], rtol=1e-6, atol=1e-12
        )


def test_a_hessian_vector_product_is_the_references():
    """Curvature probes (proxy/forensics) differentiate the gradient again (create_graph=True)."""
    logits, labels = _inputs(16, 13, torch.float64, 4)
    v = torch.randn_like(logits)
    products = []
    for fn in (torch_cross_entropy.cross_entropy, reference.cross_entropy):
        x = logits.clone().requires_grad_(True)
        ce, z, _ = fn(x, labels, z_loss=1e-4)
        (grad,) = torch.autograd.grad(ce + z, x, create_graph=True)
        (hv,) = torch.autograd.grad((grad * v).sum(), x)
        products.append(hv)
    assert torch.allclose(products[0], products[1], rtol=1e-10, atol=1e-14)
