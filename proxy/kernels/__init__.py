"""Kernels that return instability statistics as by-products, and their dispatch.

Files: ``reference.py`` (plain PyTorch, the ground truth and the CPU path; its cross-entropy runs
as ``torch_cross_entropy.py``, the same numbers with a backward in fewer passes),
``flash_attention.py`` and ``fused_cross_entropy.py`` (Triton, each kernel beside its launch
wrapper), ``bench.py`` (``python -m proxy.kernels.bench``, GPU speed and memory).

Three operations, each with a plain-PyTorch reference (reference.py) and a Triton kernel
with the same signature and outputs:

- ``attention(q, k, v)``            -> (out, max_logit[b, h])
- ``cross_entropy(logits, labels)`` -> (ce, z_term, {logit_mean, logit_max, lse_mean, lse_max})
- ``linear_cross_entropy(hidden, weight, labels)`` -> the same, logits never materialised

``use_triton=True`` runs the Triton kernel when the tensors are on CUDA, or anywhere under the
Triton interpreter (``TRITON_INTERPRET=1``, how the tests run the real kernel code on CPU).
Otherwise it falls back to the reference, so a CPU run never needs Triton at import.
"""

from __future__ import annotations

import os
from typing import Optional

from torch import Tensor

from proxy.kernels import reference, torch_cross_entropy


def triton_runs_on(t: Tensor) -> bool:
    """Whether a Triton kernel can run on this tensor here."""
    return t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = True,
    scale: Optional[float] = None,
    return_lse: bool = False,
    use_triton: bool = False,
) -> tuple[Tensor, ...]:
    if use_triton and triton_runs_on(q):
        from proxy.kernels.flash_attention import flash_attention

        return flash_attention(q, k, v, causal=causal, scale=scale, return_lse=return_lse)
    return reference.attention(q, k, v, causal=causal, scale=scale, return_lse=return_lse)


def cross_entropy(
    logits: Tensor,
    labels: Tensor,
    *,
    z_loss: float = 0.0,
    ignore_index: int = -100,
    use_triton: bool = False,
    stats: bool = True,
):
    """``stats=False``: the plain-PyTorch path skips the logit statistics (the kernel's are free)."""
    if use_triton and triton_runs_on(logits):
        from proxy.kernels.fused_cross_entropy import fused_cross_entropy

        return fused_cross_entropy(logits, labels, z_loss=z_loss, ignore_index=ignore_index)
    return torch_cross_entropy.cross_entropy(logits, labels, z_loss=z_loss, ignore_index=ignore_index, stats=stats)


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    z_loss: float = 0.0,
    ignore_index: int = -100,
    chunk_size: Optional[int] = None,
    use_triton: bool = False,
):
    if use_triton and triton_runs_on(hidden):
        from proxy.kernels.fused_cross_entropy import fused_linear_cross_entropy

        return fused_linear_cross_entropy(
            hidden, weight, labels, z_loss=z_loss, ignore_index=ignore_index, chunk_size=chunk_size
        )
    return reference.linear_cross_entropy(
        hidden, weight, labels, z_loss=z_loss, ignore_index=ignore_index, chunk_size=chunk_size
    )
