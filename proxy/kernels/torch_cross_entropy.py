"""The cross-entropy the model runs in plain PyTorch (``model.loss_impl=torch``): the reference's
arithmetic (reference.py), value for value and gradient for gradient, with a backward that makes
fewer passes over the (N, V) logits.

Autograd, left to the reference's formula ``mean(lse - logits[label])``, goes back through
``logsumexp`` (d/dlogits = g * exp(logits - lse): a subtraction, an exp and a product, each a new
(N, V) tensor), then through ``gather`` (a zero (N, V) tensor with -g scattered into it) and adds
the two (a fourth (N, V) pass). Here one Function returns ``lse`` and the label logits, and its
backward writes the same numbers in place into one tensor:

    grad = exp(logits - lse[:, None]) * g_lse[:, None]       # the same elementwise operations
    grad[i, label_i] += g_label_i                            # what the zero tensor's add did

Every element is the same IEEE operation on the same operands as autograd's, so the gradients are
bit for bit the reference's (tests/kernels/test_torch_cross_entropy.py), a run's trajectory does
not move, and the CPU step is a few percent faster (benchmarks/plain_loop.py). The per-row
statistics (logit mean and max) are computed only when asked for: they are detached, and a
non-logging step never reads them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from proxy.kernels.reference import _logit_stats, at_least_fp32


class _LseAndLabelLogit(torch.autograd.Function):
    """(logits (N, V), labels (N,)) -> (lse (N,), logits[i, labels[i]] (N,)); labels in range."""

    generate_vmap_rule = True  # a sweep maps the model over its members (proxy/train/ensemble.py)

    @staticmethod
    def forward(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        lse = torch.logsumexp(logits, dim=-1)
        return lse, logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, Tensor], output: tuple[Tensor, Tensor]) -> None:
        logits, labels = inputs
        ctx.save_for_backward(logits, labels, output[0])
        ctx.mark_non_differentiable(labels)

    @staticmethod
    def backward(ctx: Any, g_lse: Tensor, g_label: Tensor) -> tuple[Tensor, None]:
        logits, labels, lse = ctx.saved_tensors
        if torch.is_grad_enabled():  # a double backward (curvature probes): differentiable, not in place
            grad = (logits - lse.unsqueeze(-1)).exp() * g_lse.unsqueeze(-1)
            return grad.scatter_add(-1, labels.unsqueeze(-1), g_label.unsqueeze(-1)), None
        grad = torch.sub(logits, lse.unsqueeze(-1)).exp_()
        grad.mul_(g_lse.unsqueeze(-1))
        grad.scatter_add_(-1, labels.unsqueeze(-1), g_label.unsqueeze(-1))
        return grad, None


def cross_entropy(
    logits: Tensor, labels: Tensor, *, z_loss: float = 0.0, ignore_index: int = -100, stats: bool = True
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """reference.cross_entropy's outputs (``stats=False``: no statistics, an empty dict)."""
    logits = at_least_fp32(logits)
    valid = labels != ignore_index
    n_valid = valid.sum().clamp(min=1)
    safe_labels = torch.where(valid, labels, torch.zeros_like(labels))
    lse, target_logit = _LseAndLabelLogit.apply(logits, safe_labels)
    ce = ((lse - target_logit) * valid).sum() / n_valid
    z_term = z_loss * ((lse * lse) * valid).sum() / n_valid
    return ce, z_term, _logit_stats(logits, lse, valid) if stats else {}


__all__ = ["cross_entropy"]
