"""Plain-PyTorch references for every kernel in proxy/kernels/.

Each function here has exactly the signature and outputs of its Triton counterpart. The tests hold
the kernels to these; on CPU the model calls these directly. They are written for clarity, not
speed: scores and logits are materialised in fp32.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def at_least_fp32(t: Tensor) -> Tensor:
    """``t`` in fp32, or as it is if it is already fp64 (a train.dtype=fp64 run stays fp64)."""
    return t if t.dtype == torch.float64 else t.float()


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = True,
    scale: Optional[float] = None,
    return_lse: bool = False,
) -> tuple[Tensor, ...]:
    """Causal softmax attention that also returns the max attention logit.

    q, k, v: (batch, heads, seq, head_dim). Returns ``(out, max_logit)`` with ``out`` shaped like q
    (in q's dtype) and ``max_logit`` (batch, heads) fp32, detached: the largest scaled pre-softmax
    score z_ij = <q_i, k_j> * scale over the unmasked (j <= i) positions. With ``return_lse`` also
    the natural-log log-sum-exp of each query row's scores, (batch, heads, seq_q) fp32, detached.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(at_least_fp32(q), at_least_fp32(k).transpose(-1, -2)) * scale
    if causal:
        t_q, t_k = scores.shape[-2], scores.shape[-1]
        mask = torch.ones(t_q, t_k, dtype=torch.bool, device=q.device).tril(t_k - t_q)
        scores = scores.masked_fill(~mask, float("-inf"))
    max_logit = scores.detach().amax(dim=(-2, -1))
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, at_least_fp32(v)).to(q.dtype)
    if return_lse:
        return out, max_logit, torch.logsumexp(scores.detach(), dim=-1)
    return out, max_logit


def _logit_stats(logits: Tensor, lse: Tensor, valid: Tensor) -> dict[str, Tensor]:
    """Means over the rows that count; ``logit_max`` is NaN when none counts (every label
    ignored): there is no largest logit to report, and -inf would pass for a number."""
    n_valid = valid.sum().clamp(min=1)
    with torch.no_grad():
        row_mean = logits.mean(dim=-1)
        row_max = logits.amax(dim=-1)
        neg_inf = torch.tensor(float("-inf"), device=logits.device)
        logit_max = torch.where(valid, row_max, neg_inf).max()
        lse_max = torch.where(valid, lse.detach(), neg_inf).max()
        return {
            "logit_mean": (row_mean * valid).sum() / n_valid,
            "logit_max": torch.where(valid.any(), logit_max, float("nan")),
            "lse_mean": (lse.detach() * valid).sum() / n_valid,
            "lse_max": torch.where(valid.any(), lse_max, float("nan")),
        }


def cross_entropy(
    logits: Tensor, labels: Tensor, *, z_loss: float = 0.0, ignore_index: int = -100
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Mean cross-entropy and the z-loss term over the labels that are not ``ignore_index``.

    logits: (N, V) any float dtype (computed in fp32, fp64 input in fp64); labels: (N,) int64.
    Returns ``(ce, z_term, stats)``: ce = mean(lse - logit[label]), z_term = z_loss * mean(lse^2),
    both scalars with gradients, and stats = {logit_mean, logit_max, lse_mean, lse_max} (detached
    fp32 scalars over the valid rows; lse is log Z, whose drift from 0 is output-logit
    divergence). With no valid row both losses are 0, not NaN, and logit_max is NaN (there is no
    largest logit to report).
    """
    logits = at_least_fp32(logits)
    valid = labels != ignore_index
    n_valid = valid.sum().clamp(min=1)
    lse = torch.logsumexp(logits, dim=-1)
    safe_labels = torch.where(valid, labels, torch.zeros_like(labels))
    target_logit = logits.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
    ce = ((lse - target_logit) * valid).sum() / n_valid
    z_term = z_loss * ((lse * lse) * valid).sum() / n_valid
    return ce, z_term, _logit_stats(logits, lse, valid)


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    z_loss: float = 0.0,
    ignore_index: int = -100,
    chunk_size: Optional[int] = None,
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Cross-entropy of ``hidden @ weight.T`` without a bias; same outputs as :func:`cross_entropy`.

    hidden: (N, C), weight: (V, C). The reference materialises the logits; the fused kernel never
    does (``chunk_size`` rows at a time), so this is its ground truth.
    """
    del chunk_size  # the reference does it in one piece
    logits = F.linear(hidden, weight)
    return cross_entropy(logits, labels, z_loss=z_loss, ignore_index=ignore_index)
