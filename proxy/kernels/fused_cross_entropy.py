"""Fused cross-entropy (+ z-loss) in Triton whose by-products are the output-logit statistics.

Why: output-logit divergence (Wortsman et al.) shows up as drifting log-sum-exp and logit moments
long before the loss moves. The online log-sum-exp already touches every logit once, so the
statistics {logit_mean, logit_max, lse_mean, lse_max} come out of the same pass for free.

Tiling: one program per row (token). It streams the vocabulary in BLOCK_V columns, keeping a
running max m and a running sum s = sum exp(x - m) (rescaled by exp(m_old - m_new) whenever the
max grows), and the plain sum of the logits. Per row it writes lse = m + log(s), the loss
lse - x[label], the max and the mean; torch then reduces these N-vectors (tiny) to the outputs.

Backward: one more pass per row writes, with a_i = dL/dloss_i and b_i = dL/dlse_i,
    dL/dx_ij = (a_i + b_i) p_ij - a_i [j == label_i],  p_ij = exp(x_ij - lse_i)
straight into a buffer of the logits' dtype, never an fp32 copy of the whole gradient. For an
intermediate logits tensor the buffer is the logits tensor itself (see fused_cross_entropy). The
loss, the z-loss and the statistics are reductions of the per-row vectors, done in torch, so the
operator is one row at a time and vmap folds an ensemble's members into more rows.

fused_linear_cross_entropy never materialises all N x V logits: per chunk of rows it computes the
logits with a matmul, runs both passes (the gradient lands in place in the chunk) and folds the
chunk into grad_hidden = dlogits @ W and grad_weight += dlogits^T @ hidden, all during the forward;
backward only scales them by the incoming gradient. In fp16 the forward forms them at sum scale
(each row's coefficient 1, not 1/N): p/N underflows fp16 (below 6e-8 once N x V passes ~1e7), and a
loss scale such as GradScaler's reaches this op only in backward, after the gradients were formed.
"""

# no `from __future__ import annotations`: torch.library reads the ops' schemas from real
# annotations, on every torch this project runs on (2.11 on the GPU image, 2.13 here)
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
    Logits,
    stride_row,
    Labels,
    RowLoss,
    RowLSE,
    RowMax,
    RowMean,
    n_vocab,
    ignore_index,
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
    Logits,
    stride_row,
    Grad,
    stride_grad_row,
    Labels,
    RowLSE,
    LossCoef,
    LSECoef,
    n_vocab,
    ignore_index,
    BLOCK_V: tl.constexpr,
):
    """Grad may alias Logits: every element is loaded before its own gradient overwrites it."""
    row = tl.program_id(0).to(tl.int64)
    Logits += row * stride_row
    Grad += row * stride_grad_row
    label = tl.load(Labels + row)
    valid = label != ignore_index
    ce_coef = tl.load(LossCoef + row)  # dL / d loss_row
    lse_coef = tl.load(LSECoef + row)  # dL / d lse_row (the z-loss)
    lse = tl.load(RowLSE + row)
    softmax_coef = ce_coef + lse_coef
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
        logits,
        logits.stride(0),
        labels,
        out.loss,
        out.lse,
        out.max,
        out.mean,
        logits.shape[1],
        ignore_index,
        **_launch_options(logits.shape[1]),
    )


def _logit_gradient_into(
    grad: Tensor,
    logits: Tensor,
    labels: Tensor,
    lse: Tensor,
    loss_coef: Tensor,
    lse_coef: Tensor,
    ignore_index: int,
) -> None:
    """Second pass: writes dLoss/dlogits into ``grad`` (which may be ``logits`` itself), given
    per-row dL/dloss and dL/dlse (fp32 vectors)."""
    _cross_entropy_backward_kernel[(logits.shape[0],)](
        logits,
        logits.stride(0),
        grad,
        grad.stride(0),
        labels,
        lse,
        loss_coef,
        lse_coef,
        logits.shape[1],
        ignore_index,
        **_launch_options(logits.shape[1]),
    )


def _empty_row_statistics(n_rows: int, device: torch.device) -> RowStatistics:
    # four tensors, not views of one: a custom op's outputs must not alias each other
    return RowStatistics(*(torch.empty(n_rows, device=device, dtype=torch.float32) for _ in range(4)))


def _sum_coefficients(rows: RowStatistics, valid: Tensor, z_loss: float) -> tuple[Tensor, Tensor]:
    """Per-row dS/dloss and dS/dlse of S = sum over the valid rows of loss + z_loss * lse^2 (the
    mean ce + z_term times n_valid; the caller divides by n_valid where it chooses), on the device."""
    loss_coef = torch.where(valid, 1.0, 0.0).float()
    lse_coef = torch.where(valid, (2.0 * z_loss) * rows.lse, 0.0).float()
    return loss_coef, lse_coef


def _gradients_at_sum_scale(dtype: torch.dtype) -> bool:
    """Whether the linear op keeps its gradients at sum scale until backward (fp16: its range ends
    at 6e-8, where p / N lands for large vocabularies; bf16 and fp32 share fp32's exponent range)."""
    return dtype == torch.float16


def _summarise(
    rows: RowStatistics, valid: Tensor, n_valid: Tensor, z_loss: float
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(ce, z_term, logit_mean, logit_max, lse_mean, lse_max) from the per-row vectors, like the
    reference: over the rows that count; the maxima are NaN when no row counts (every label ignored)."""
    ce = rows.loss.sum() / n_valid
    z_term = z_loss * torch.where(valid, rows.lse.square(), 0.0).sum() / n_valid
    with torch.no_grad():
        logit_mean = torch.where(valid, rows.mean, 0.0).sum() / n_valid
        logit_max = torch.where(valid, rows.max, float("-inf")).max()
        logit_max = torch.where(valid.any(), logit_max, float("nan"))
        lse_mean = torch.where(valid, rows.lse, 0.0).sum() / n_valid
        lse_max = torch.where(valid.any(), torch.where(valid, rows.lse, float("-inf")).max(), float("nan"))
    return ce, z_term, logit_mean, logit_max, lse_mean, lse_max


def _pack(ce: Tensor, z_term: Tensor, logit_mean: Tensor, logit_max: Tensor, lse_mean: Tensor, lse_max: Tensor):
    return ce, z_term, {"logit_mean": logit_mean, "logit_max": logit_max, "lse_mean": lse_mean, "lse_max": lse_max}


def _check_labels(labels: Tensor, n_rows: int, n_vocab: int, ignore_index: int, device: torch.device) -> None:
    if labels.dim() != 1 or labels.shape[0] != n_rows:
        raise ValueError(f"labels must be shaped ({n_rows},), got {tuple(labels.shape)}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be int64 or int32, got {labels.dtype}")
    if labels.device != device:
        raise ValueError(f"labels are on {labels.device} but the logits on {device}")
    if torch.compiler.is_compiling():
        return  # the check below waits on the device: in a compiled graph it would break it
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
@torch.library.custom_op("proxy::cross_entropy_rows", mutates_args=())
def _rows_op(
    logits: Tensor, labels: Tensor, ignore_index: int, overwrite: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-row (loss, lse, max, mean), fp32 vectors; ``overwrite``: the backward may write the
    gradient into the logits' own storage (decided by fused_cross_entropy)."""
    rows = _empty_row_statistics(logits.shape[0], logits.device)
    _row_statistics_into(logits, labels, rows, ignore_index)
    return rows.loss, rows.lse, rows.max, rows.mean


@_rows_op.register_fake
def _rows_fake(logits: Tensor, labels: Tensor, ignore_index: int, overwrite: bool):
    return tuple(logits.new_empty(logits.shape[0], dtype=torch.float32) for _ in range(4))


@torch.library.custom_op("proxy::cross_entropy_rows_backward", mutates_args=())
def _rows_backward_op(
    logits: Tensor, labels: Tensor, lse: Tensor, loss_coef: Tensor, lse_coef: Tensor, ignore_index: int
) -> Tensor:
    grad = torch.empty_like(logits)
    _logit_gradient_into(grad, logits, labels, lse, loss_coef, lse_coef, ignore_index)
    return grad


@_rows_backward_op.register_fake
def _rows_backward_fake(logits, labels, lse, loss_coef, lse_coef, ignore_index):
    return torch.empty_like(logits)


@torch.library.custom_op("proxy::cross_entropy_rows_backward_", mutates_args=("logits",))
def _rows_backward_inplace_op(
    logits: Tensor, labels: Tensor, lse: Tensor, loss_coef: Tensor, lse_coef: Tensor, ignore_index: int
) -> None:
    """The gradient written over the logits (each element is read before it is overwritten)."""
    _logit_gradient_into(logits, logits, labels, lse, loss_coef, lse_coef, ignore_index)


def _rows_setup_context(ctx, inputs, output) -> None:
    logits, labels, ignore_index, overwrite = inputs
    _, lse, row_max, row_mean = output
    ctx.save_for_backward(logits, labels, lse)
    ctx.ignore_index, ctx.overwrite = ignore_index, overwrite
    ctx.mark_non_differentiable(row_max, row_mean)


def _rows_backward(ctx, grad_loss: Optional[Tensor], grad_lse: Optional[Tensor], *_stat_grads):
    logits, labels, lse = ctx.saved_tensors
    zeros = torch.zeros_like(lse)
    loss_coef = zeros if grad_loss is None else grad_loss.float().contiguous()
    lse_coef = zeros if grad_lse is None else grad_lse.float().contiguous()
    if ctx.overwrite:
        _rows_backward_inplace_op(logits, labels, lse, loss_coef, lse_coef, ctx.ignore_index)
        # Any other autograd node that saved these logits now fails loudly instead of
        # silently reading the gradient.
        increment_version(logits)
        return logits, None, None, None
    return _rows_backward_op(logits, labels, lse, loss_coef, lse_coef, ctx.ignore_index), None, None, None


_rows_op.register_autograd(_rows_backward, setup_context=_rows_setup_context)


@_rows_op.register_vmap
def _rows_vmap(info, in_dims, logits, labels, ignore_index, overwrite):
    """Members fold into rows: (K, N, V) logits and (K, N) or shared (N,) labels -> K * N rows."""
    logits_dim, labels_dim = in_dims[0], in_dims[1]
    logits = logits.movedim(logits_dim, 0) if logits_dim is not None else logits.expand(info.batch_size, *logits.shape)
    labels = labels.movedim(labels_dim, 0) if labels_dim is not None else labels.expand(info.batch_size, *labels.shape)
    rows = _rows_op(_vocab_contiguous(logits.reshape(-1, logits.shape[-1])), labels.reshape(-1), ignore_index, False)
    return tuple(r.reshape(info.batch_size, -1) for r in rows), (0, 0, 0, 0)


def _may_overwrite(logits: Tensor) -> bool:
    """Whether the backward may write the gradient into the logits' storage: only when that
    storage is an intermediate of this graph (the logits, or a view of them, are not a leaf's
    data) with rows that do not overlap (an expanded row, stride 0, would race), and not while
    torch.compile traces (it plans the memory itself)."""
    if torch.compiler.is_compiling() or not (logits.requires_grad and logits.grad_fn is not None):
        return False
    base = logits._base if logits._base is not None else logits
    if base.grad_fn is None:  # a view of a leaf tensor: the caller's data
        return False
    n_rows, n_vocab = logits.shape
    return logits.stride(1) == 1 and (n_rows == 1 or logits.stride(0) >= n_vocab)


def fused_cross_entropy(
    logits: Tensor, labels: Tensor, *, z_loss: float = 0.0, ignore_index: int = -100
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Mean cross-entropy, z-loss term and logit statistics; as :func:`proxy.kernels.reference.cross_entropy`.

    logits: (N, V) fp32 / fp16 / bf16 (math in fp32); labels: (N,) int64 or int32.

    Memory: when ``logits`` is an intermediate of the graph (has a ``grad_fn``, as the LM-head
    output does), backward writes the gradient into the logits' own storage, so N x V is held
    once. Those logits hold the gradient afterwards; read them before ``backward()``. A leaf
    tensor or a view of one (the caller's data) and rows that overlap (expanded) are never
    overwritten. ``logit_max`` is NaN when every label is ``ignore_index``.
    """
    if logits.dim() != 2 or logits.shape[0] == 0 or logits.shape[1] == 0:
        raise ValueError(f"fused_cross_entropy expects non-empty (N, V) logits, got {tuple(logits.shape)}")
    _check_runs_here(logits, "fused_cross_entropy")
    _check_labels(labels, logits.shape[0], logits.shape[1], ignore_index, logits.device)
    logits = _vocab_contiguous(logits)  # a copy, if needed, is itself an intermediate
    labels = labels.contiguous()  # the kernels read label i at offset i
    valid = labels != ignore_index
    n_valid = valid.sum().clamp(min=1)
    rows = RowStatistics(*_rows_op(logits, labels, int(ignore_index), _may_overwrite(logits)))
    return _pack(*_summarise(rows, valid, n_valid, float(z_loss)))


# --------------------------------------------------------------------------------------------
# Linear + cross-entropy, chunked over rows
# --------------------------------------------------------------------------------------------
def default_chunk_size(n_rows: int, hidden_dim: int, n_vocab: int) -> int:
    """Rows per chunk so that one chunk of logits takes about as much memory as the hidden states."""
    rows = triton.next_power_of_2(triton.cdiv(n_rows * hidden_dim, n_vocab))
    return max(1, min(n_rows, max(_MIN_CHUNK_ROWS, rows)))


@torch.library.custom_op("proxy::linear_cross_entropy", mutates_args=())
def _linear_op(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    z_loss: float,
    ignore_index: int,
    chunk_size: int,
    grad_hidden_needed: bool,
    grad_weight_needed: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(ce, z_term, logit_mean, logit_max, lse_mean, lse_max, grad_hidden, grad_weight): the gradients of
    ce + z_term, computed chunk by chunk in the forward pass (an empty tensor when not needed)."""
    n_rows = hidden.shape[0]
    valid = labels != ignore_index
    n_valid = valid.sum().clamp(min=1)
    rows = _empty_row_statistics(n_rows, hidden.device)
    grad_hidden = (
        torch.empty_like(hidden, memory_format=torch.contiguous_format) if grad_hidden_needed else hidden.new_empty(0)
    )
    # Summed in fp32 over the chunks and cast once at the end: a bf16 accumulator would round the
    # running sum once per chunk (64 times for 16k rows in chunks of 256).
    grad_weight = torch.zeros_like(weight, dtype=torch.float32) if grad_weight_needed else weight.new_empty(0)
    sum_scale = _gradients_at_sum_scale(hidden.dtype)

    for start in range(0, n_rows, chunk_size):
        chunk = slice(start, min(start + chunk_size, n_rows))
        hidden_chunk, labels_chunk = hidden[chunk], labels[chunk]
        logits = hidden_chunk @ weight.t()
        chunk_rows = RowStatistics(*(r[chunk] for r in rows))
        _row_statistics_into(logits, labels_chunk, chunk_rows, ignore_index)
        if not (grad_hidden_needed or grad_weight_needed):
            continue
        loss_coef, lse_coef = _sum_coefficients(chunk_rows, valid[chunk], z_loss)
        if not sum_scale:  # the mean's coefficients: the buffers then hold the gradient itself
            loss_coef, lse_coef = loss_coef / n_valid, lse_coef / n_valid
        _logit_gradient_into(logits, logits, labels_chunk, chunk_rows.lse, loss_coef, lse_coef, ignore_index)
        if grad_hidden_needed:
            torch.mm(logits, weight, out=grad_hidden[chunk])
        if grad_weight_needed:
            grad_weight.add_(torch.mm(logits.t(), hidden_chunk))  # the chunk's product, summed in fp32
    if grad_weight_needed and not sum_scale:  # at sum scale it stays fp32 until backward scales it
        grad_weight = grad_weight.to(weight.dtype)
    return (*_summarise(rows, valid, n_valid, z_loss), grad_hidden, grad_weight)


@_linear_op.register_fake
def _linear_fake(hidden, weight, labels, z_loss, ignore_index, chunk_size, grad_hidden_needed, grad_weight_needed):
    scalars = [hidden.new_empty((), dtype=torch.float32) for _ in range(6)]
    grad_hidden = (
        torch.empty_like(hidden, memory_format=torch.contiguous_format) if grad_hidden_needed else hidden.new_empty(0)
    )
    weight_grad_dtype = torch.float32 if _gradients_at_sum_scale(hidden.dtype) else weight.dtype
    return (
        *scalars,
        grad_hidden,
        torch.empty_like(weight, dtype=weight_grad_dtype) if grad_weight_needed else weight.new_empty(0),
    )


def _linear_setup_context(ctx, inputs, output) -> None:
    hidden, weight, labels, z_loss, ignore_index, _, grad_hidden_needed, grad_weight_needed = inputs
    ctx.sum_scale, ctx.hidden_dtype, ctx.weight_dtype = (
        _gradients_at_sum_scale(hidden.dtype),
        hidden.dtype,
        weight.dtype,
    )
    n_valid = (labels != ignore_index).sum().clamp(min=1) if ctx.sum_scale else None
    ctx.save_for_backward(output[6], output[7], n_valid)
    ctx.z_loss, ctx.needed = z_loss, (grad_hidden_needed, grad_weight_needed)
    ctx.used = False
    ctx.mark_non_differentiable(*output[2:])


def _linear_backward(ctx, grad_ce: Tensor, grad_z: Tensor, *_rest):
    if ctx.used:  # backward(retain_graph=True) twice
        raise RuntimeError("fused_linear_cross_entropy supports one backward pass per forward pass")
    ctx.used = True
    grad_hidden, grad_weight, n_valid = ctx.saved_tensors
    # a host sync, only with z-loss, and not while torch.compile traces (it cannot wait on values)
    if ctx.z_loss != 0.0 and not torch.compiler.is_compiling() and not torch.equal(grad_ce, grad_z):
        raise RuntimeError(
            "fused_linear_cross_entropy computes the gradient of ce + z_term in its forward pass: "
            "backpropagate a multiple of their sum, or use z_loss=0"
        )
    # Scaled in place: these buffers exist only for this one backward pass.
    outputs = [None] * 8
    if ctx.sum_scale:  # from the sum to the mean, times the incoming gradient, in fp32
        scale = grad_ce.float() / n_valid
        if ctx.needed[0]:
            outputs[0] = (grad_hidden.float() * scale).to(ctx.hidden_dtype)
        if ctx.needed[1]:
            outputs[1] = grad_weight.mul_(scale).to(ctx.weight_dtype)
        return tuple(outputs)
    if ctx.needed[0]:
        outputs[0] = grad_hidden.mul_(grad_ce.to(grad_hidden.dtype))
    if ctx.needed[1]:
        outputs[1] = grad_weight.mul_(grad_ce.to(grad_weight.dtype))
    return tuple(outputs)


_linear_op.register_autograd(_linear_backward, setup_context=_linear_setup_context)


@_linear_op.register_vmap
def _linear_vmap(
    info, in_dims, hidden, weight, labels, z_loss, ignore_index, chunk_size, grad_hidden_needed, grad_weight_needed
):
    """Each member has its own LM head, so members do not fold into rows: one launch each."""

    def member(t: Tensor, dim: Optional[int], k: int) -> Tensor:
        return t.select(dim, k) if dim is not None else t

    grad_enabled = torch.is_grad_enabled()  # the flags seen through vmap's wrappers are not the members'
    per_member = []
    for k in range(info.batch_size):
        h, w = member(hidden, in_dims[0], k), member(weight, in_dims[1], k)
        per_member.append(
            _linear_op(
                h,
                w,
                member(labels, in_dims[2], k),
                z_loss,
                ignore_index,
                chunk_size,
                grad_enabled and h.requires_grad,
                grad_enabled and w.requires_grad,
            )
        )
    return tuple(torch.stack(outputs) for outputs in zip(*per_member)), (0,) * 8


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
    labels = labels.contiguous()  # the kernels read label i at offset i
    if chunk_size is None:
        chunk_size = default_chunk_size(hidden.shape[0], hidden.shape[1], weight.shape[0])
    elif int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be a positive number of rows, got {chunk_size}")
    hidden, weight = _autocast_like_linear(hidden, weight)
    grad_enabled = torch.is_grad_enabled()
    outputs = _linear_op(
        hidden,
        weight,
        labels,
        float(z_loss),
        int(ignore_index),
        int(chunk_size),
        grad_enabled and hidden.requires_grad,
        grad_enabled and weight.requires_grad,
    )[:6]
    return _pack(*outputs)
