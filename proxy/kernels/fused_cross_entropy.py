"""Fused cross-entropy (+ z-loss) in Triton whose by-products are the output-logit statistics.

Why: output-logit divergence (Wortsman et al.) shows up as drifting log-sum-exp and logit moments
long before the loss moves. The online log-sum-exp already touches every logit once, so the
statistics {logit_mean, logit_max, lse_mean} come out of the same pass for free.

Tiling: one program per row (token). It streams the vocabulary in BLOCK_V columns, keeping a
running max m and a running sum s = sum exp(x - m) (rescaled by exp(m_old - m_new) whenever the
max grows), and the plain sum of the logits. Per row it writes lse = m + log(s), the loss
lse - x[label], the max and the mean; torch then reduces these N-vectors (tiny) to the outputs.

Backward: one more pass per row writes
    dL/dx_j = g_ce / n * (p_j - [j == label]) + g_z * 2 z_loss / n * lse * p_j,  p_j = exp(x_j - lse)
straight into a buffer of the logits' dtype, never an fp32 copy of the whole gradient. For an
intermediate logits tensor the buffer is the logits tensor itself (see fused_cross_entropy).

fused_linear_cross_entropy never materialises all N x V logits: per chunk of rows it computes the
logits with a matmul, runs both passes (the gradient lands in place in the chunk) and folds the
chunk into grad_hidden = dlogits @ W and grad_weight += dlogits^T @ hidden, all during the forward;
backward only scales them by the incoming gradient.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.graph import increment_version

INTERPRETED = bool(triton.knobs.runtime.interpret)

# A 4096-wide block streams a 128k vocabulary in 32 steps with 16 fp32 values per thread at 8
# warps. The interpreter uses a small block so CPU tests cross several blocks with small vocabs.
_MAX_BLOCK_V = 128 if INTERPRETED else 4096
_MIN_CHUNK_ROWS = 256  # fewer rows per matmul leaves the GPU idle


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _cross_entropy_forward_kernel(
    Logits, stride_row, Labels,
    RowLoss, RowLSE, RowMax, RowMean,
    n_vocab, ignore_index,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    Logits += row * stride_row
    label = tl.load(Labels + row)

    running_max = tl.full([], float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros([], dtype=tl.float32)  # sum exp(x - running_max)
    logit_total = tl.zeros([], dtype=tl.float32)
    for start in range(0, n_vocab, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        in_vocab = cols < n_vocab
        x = tl.load(Logits + cols, mask=in_vocab, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(running_max, tl.max(x, 0))
        # A row that is -inf so far would give exp(-inf - -inf) = nan; shift by 0 instead.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        running_sum = running_sum * tl.exp(running_max - shift) + tl.sum(tl.exp(x - shift), 0)
        logit_total += tl.sum(tl.where(in_vocab, x, 0.0), 0)
        running_max = new_max

    lse = running_max + tl.log(running_sum)
    valid = label != ignore_index
    target = tl.load(Logits + tl.where(valid, label, 0), mask=valid, other=0.0).to(tl.float32)
    tl.store(RowLoss + row, tl.where(valid, lse - target, 0.0))
    tl.store(RowLSE + row, lse)
    tl.store(RowMax + row, running_max)
    tl.store(RowMean + row, logit_total / n_vocab)


@triton.jit
def _cross_entropy_backward_kernel(
    Logits, stride_row, Grad, stride_grad_row, Labels, RowLSE, Coefs,
    n_vocab, ignore_index,
    BLOCK_V: tl.constexpr,
):
    """Grad may alias Logits: every element is loaded before its own gradient overwrites it."""
    row = tl.program_id(0).to(tl.int64)
    Logits += row * stride_row
    Grad += row * stride_grad_row
    label = tl.load(Labels + row)
    valid = label != ignore_index
    ce_coef = tl.load(Coefs)  # g_ce / n_valid
    z_coef = tl.load(Coefs + 1)  # g_z * 2 * z_loss / n_valid
    lse = tl.load(RowLSE + row)
    softmax_coef = ce_coef + z_coef * lse
    for start in range(0, n_vocab, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        in_vocab = cols < n_vocab
        x = tl.load(Logits + cols, mask=in_vocab, other=float("-inf")).to(tl.float32)
        grad = softmax_coef * tl.exp(x - lse) - tl.where(cols == label, ce_coef, 0.0)
        grad = tl.where(valid, grad, 0.0)  # ignored rows contribute nothing
        tl.store(Grad + cols, grad.to(Grad.dtype.element_ty), mask=in_vocab)


# --------------------------------------------------------------------------------------------
# Launch wrappers
# --------------------------------------------------------------------------------------------
class RowStatistics(NamedTuple):
    loss: Tensor  # lse - logit[label], 0 on ignored rows
    lse: Tensor
    max: Tensor
    mean: Tensor


def _launch_options(n_vocab: int) -> dict:
    block = min(_MAX_BLOCK_V, triton.next_power_of_2(n_vocab))
    return {"BLOCK_V": block, "num_warps": 8 if block >= 2048 else 4}


def _row_statistics_into(logits: Tensor, labels: Tensor, out: RowStatistics, ignore_index: int) -> None:
    """First pass: fills ``out`` (fp32 vectors of len(logits)) from one sweep over each row."""
    _cross_entropy_forward_kernel[(logits.shape[0],)](
        logits, logits.stride(0), labels, out.loss, out.lse, out.max, out.mean,
        logits.shape[1], ignore_index, **_launch_options(logits.shape[1]),
    )


def _logit_gradient_into(
    grad: Tensor, logits: Tensor, labels: Tensor, lse: Tensor, coefs: Tensor, ignore_index: int
) -> None:
    """Second pass: writes dLoss/dlogits into ``grad`` (which may be ``logits`` itself)."""
    _cross_entropy_backward_kernel[(logits.shape[0],)](
        logits, logits.stride(0), grad, grad.stride(0), labels, lse, coefs,
        logits.shape[1], ignore_index, **_launch_options(logits.shape[1]),
    )


def _empty_row_statistics(n_rows: int, device: torch.device) -> RowStatistics:
    return RowStatistics(*torch.empty(4, n_rows, device=device, dtype=torch.float32))


def _gradient_coefficients(n_valid: Tensor, z_loss: float, grad_ce: Tensor, grad_z: Tensor) -> Tensor:
    """[g_ce / n, g_z * 2 z_loss / n] on the device, so no host sync is needed."""
    return torch.stack([grad_ce / n_valid, grad_z * (2.0 * z_loss) / n_valid]).float()


def _summarise(rows: RowStatistics, valid: Tensor, n_valid: Tensor, z_loss: float) -> tuple[Tensor, ...]:
    """(ce, z_term, logit_mean, logit_max, lse_mean) from the per-row vectors, like the reference."""
    ce = rows.loss.sum() / n_valid
    z_term = z_loss * torch.where(valid, rows.lse.square(), 0.0).sum() / n_valid
    logit_mean = torch.where(valid, rows.mean, 0.0).sum() / n_valid
    logit_max = torch.where(valid, rows.max, float("-inf")).max()
    lse_mean = torch.where(valid, rows.lse, 0.0).sum() / n_valid
    return ce, z_term, logit_mean, logit_max, lse_mean


def _pack(ce: Tensor, z_term: Tensor, logit_mean: Tensor, logit_max: Tensor, lse_mean: Tensor):
    return ce, z_term, {"logit_mean": logit_mean, "logit_max": logit_max, "lse_mean": lse_mean}


def _check_labels(labels: Tensor, n_rows: int, n_vocab: int, ignore_index: int, device: torch.device) -> None:
    if labels.dim() != 1 or labels.shape[0] != n_rows:
        raise ValueError(f"labels must be shaped ({n_rows},), got {tuple(labels.shape)}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be int64 or int32, got {labels.dtype}")
    if labels.device != device:
        raise ValueError(f"labels are on {labels.device} but the logits on {device}")
    # One reduction and a host sync: an out-of-range label would otherwise read out of bounds.
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= n_vocab))
    if bool(bad.any()):
        raise ValueError(
            f"label {int(labels[bad][0])} is outside the vocabulary [0, {n_vocab}) "
            f"and is not ignore_index={ignore_index}"
        )


def _check_runs_here(t: Tensor, name: str) -> None:
    if not (t.is_cuda or INTERPRETED):
        raise RuntimeError(f"{name} runs on CUDA tensors, or on CPU only under TRITON_INTERPRET=1")
    if not t.is_floating_point():
        raise TypeError(f"{name} needs floating-point inputs, got {t.dtype}")


def _vocab_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


# --------------------------------------------------------------------------------------------
# Cross-entropy over materialised logits
# --------------------------------------------------------------------------------------------
class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, z_loss: float, ignore_index: int, overwrite: bool):
        valid = labels != ignore_index
        n_valid = valid.sum().clamp(min=1)
        rows = _empty_row_statistics(logits.shape[0], logits.device)
        _row_statistics_into(logits, labels, rows, ignore_index)
        outputs = _summarise(rows, valid, n_valid, z_loss)
        ctx.save_for_backward(logits, labels, rows.lse, n_valid)
        ctx.z_loss, ctx.ignore_index, ctx.overwrite = z_loss, ignore_index, overwrite
        ctx.mark_non_differentiable(*outputs[2:])
        return outputs

    @staticmethod
    def backward(ctx, grad_ce: Tensor, grad_z: Tensor, *_stat_grads):
        logits, labels, lse, n_valid = ctx.saved_tensors
        grad = logits if ctx.overwrite else torch.empty_like(logits)
        coefs = _gradient_coefficients(n_valid, ctx.z_loss, grad_ce, grad_z)
        _logit_gradient_into(grad, logits, labels, lse, coefs, ctx.ignore_index)
        if ctx.overwrite:
            # Any other autograd node that saved these logits now fails loudly instead of
            # silently reading the gradient.
            increment_version(logits)
        return grad, None, None, None, None


def fused_cross_entropy(
    logits: Tensor, labels: Tensor, *, z_loss: float = 0.0, ignore_index: int = -100
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Mean cross-entropy, z-loss term and logit statistics; as :func:`proxy.kernels.reference.cross_entropy`.

    logits: (N, V) fp32 / fp16 / bf16 (math in fp32); labels: (N,) int64 or int32.

    Memory: when ``logits`` is an intermediate of the graph (has a ``grad_fn``, as the LM-head
    output does), backward writes the gradient into the logits' own storage, so N x V is held
    once. Those logits hold the gradient afterwards; read them before ``backward()``. A leaf
    tensor (the caller's data) is never overwritten.
    """
    if logits.dim() != 2 or logits.shape[0] == 0 or logits.shape[1] == 0:
        raise ValueError(f"fused_cross_entropy expects non-empty (N, V) logits, got {tuple(logits.shape)}")
    _check_runs_here(logits, "fused_cross_entropy")
    _check_labels(labels, logits.shape[0], logits.shape[1], ignore_index, logits.device)
    logits = _vocab_contiguous(logits)  # a copy, if needed, is itself an intermediate
    overwrite = logits.requires_grad and logits.grad_fn is not None
    return _pack(*_CrossEntropy.apply(logits, labels, float(z_loss), int(ignore_index), overwrite))


# --------------------------------------------------------------------------------------------
# Linear + cross-entropy, chunked over rows
# --------------------------------------------------------------------------------------------
def default_chunk_size(n_rows: int, hidden_dim: int, n_vocab: int) -> int:
    """Rows per chunk so that one chunk of logits takes about as much memory as the hidden states."""
    rows = triton.next_power_of_2(triton.cdiv(n_rows * hidden_dim, n_vocab))
    return max(1, min(n_rows, max(_MIN_CHUNK_ROWS, rows)))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, hidden: Tensor, weight: Tensor, labels: Tensor, z_loss: float, ignore_index: int,
        chunk_size: int, grad_hidden_needed: bool, grad_weight_needed: bool,
    ):
        n_rows = hidden.shape[0]
        valid = labels != ignore_index
        n_valid = valid.sum().clamp(min=1)
        one = torch.ones((), device=hidden.device)
        # Gradient of ce + z_term; backward rescales by the incoming gradient.
        coefs = _gradient_coefficients(n_valid, z_loss, one, one)
        rows = _empty_row_statistics(n_rows, hidden.device)
        grad_hidden = None
        if grad_hidden_needed:
            grad_hidden = torch.empty_like(hidden, memory_format=torch.contiguous_format)
        # Accumulates in the weight's dtype: fp32 is exact; bf16/fp16 round once per chunk.
        grad_weight = torch.zeros_like(weight) if grad_weight_needed else None

        for start in range(0, n_rows, chunk_size):
            chunk = slice(start, min(start + chunk_size, n_rows))
            hidden_chunk, labels_chunk = hidden[chunk], labels[chunk]
            logits = hidden_chunk @ weight.t()
            chunk_rows = RowStatistics(*(r[chunk] for r in rows))
            _row_statistics_into(logits, labels_chunk, chunk_rows, ignore_index)
            if grad_hidden is None and grad_weight is None:
                continue
            _logit_gradient_into(logits, logits, labels_chunk, chunk_rows.lse, coefs, ignore_index)
            if grad_hidden is not None:
                torch.mm(logits, weight, out=grad_hidden[chunk])
            if grad_weight is not None:
                grad_weight.addmm_(logits.t(), hidden_chunk)

        outputs = _summarise(rows, valid, n_valid, z_loss)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.z_loss = z_loss
        ctx.mark_non_differentiable(*outputs[2:])
        return outputs

    @staticmethod
    def backward(ctx, grad_ce: Tensor, grad_z: Tensor, *_stat_grads):
        if getattr(ctx, "used", False):  # backward(retain_graph=True) twice
            raise RuntimeError("fused_linear_cross_entropy supports one backward pass per forward pass")
        ctx.used = True
        grad_hidden, grad_weight = ctx.saved_tensors
        if ctx.z_loss != 0.0 and not torch.equal(grad_ce, grad_z):  # a host sync, only with z-loss
            raise RuntimeError(
                "fused_linear_cross_entropy computes the gradient of ce + z_term in its forward pass: "
                "backpropagate a multiple of their sum, or use z_loss=0"
            )
        # Scaled in place: these buffers exist only for this one backward pass.
        if grad_hidden is not None:
            grad_hidden.mul_(grad_ce.to(grad_hidden.dtype))
        if grad_weight is not None:
            grad_weight.mul_(grad_ce.to(grad_weight.dtype))
        return grad_hidden, grad_weight, None, None, None, None, None, None


def _autocast_like_linear(hidden: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """Cast as F.linear would under autocast; otherwise the two dtypes must already agree."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        return hidden.to(dtype), weight.to(dtype)
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden is {hidden.dtype} but weight is {weight.dtype}; cast one or use autocast")
    return hidden, weight


def fused_linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    z_loss: float = 0.0,
    ignore_index: int = -100,
    chunk_size: Optional[int] = None,
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Cross-entropy of ``hidden @ weight.T``; as :func:`proxy.kernels.reference.linear_cross_entropy`.

    hidden: (N, C), weight: (V, C). Only ``chunk_size`` x V logits exist at a time (default:
    about as many bytes as ``hidden``). The gradients are computed during the forward pass, so
    the forward costs about as much as forward + backward of the unfused version, and backward
    is a rescale. Because that gradient is of ``ce + z_term``, with ``z_loss != 0`` backward
    needs both outputs to receive the same gradient (as in ``loss = ce + z_term``).
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"fused_linear_cross_entropy expects hidden (N, C) and weight (V, C), got {tuple(hidden.shape)} "
            f"and {tuple(weight.shape)}"
        )
    if hidden.shape[0] == 0 or weight.shape[0] == 0:
        raise ValueError(
            f"fused_linear_cross_entropy needs N > 0 and V > 0, got hidden {tuple(hidden.shape)}, "
            f"weight {tuple(weight.shape)}"
        )
    if weight.device != hidden.device:
        raise ValueError(f"hidden is on {hidden.device} but weight on {weight.device}")
    _check_runs_here(hidden, "fused_linear_cross_entropy")
    _check_labels(labels, hidden.shape[0], weight.shape[0], ignore_index, hidden.device)
    if chunk_size is None:
        chunk_size = default_chunk_size(*hidden.shape, weight.shape[0])
    elif int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be a positive number of rows, got {chunk_size}")
    hidden, weight = _autocast_like_linear(hidden, weight)
    grad_enabled = torch.is_grad_enabled()
    outputs = _LinearCrossEntropy.apply(
        hidden, weight, labels, float(z_loss), int(ignore_index), int(chunk_size),
        grad_enabled and hidden.requires_grad, grad_enabled and weight.requires_grad,
    )
    return _pack(*outputs)
