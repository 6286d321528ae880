"""Causal flash attention in Triton that also returns the max attention logit, at no extra cost.

Why: the max pre-softmax logit z_ij = <q_i, k_j> * scale is the early-warning signal for attention
logit growth (Dehghani et al.; Wortsman et al.: every run whose max logit passed ~1e4 diverged).
The online softmax already keeps the running row max m_i; writing it out costs one float per row
and a tiny amax over rows, instead of materialising the (seq x seq) scores a second time.

Tiling, forward: one program per (BLOCK_M query rows, batch*head). The Q tile stays in registers;
K and V stream through in tiles of BLOCK_N keys, stopping at the causal diagonal. Per tile:
S = Q K^T (scaled, in base-2 units so exp2 can be used), new row max m, rescale the running
denominator l and the unnormalised output acc by exp2(m_old - m_new), add P V. At the end it
writes O = acc / l, the row log-sum-exp (base 2, kept for the backward pass) and the row max.

Tiling, backward (flash-attention-2): delta_i = rowsum(dO_i * O_i) by a small kernel; then one
program per BLOCK_N keys walks the query tiles that can see those keys, rebuilds P = exp2(S - lse)
and accumulates dV += P^T dO and dK += dS^T Q with dS = P * (dO V^T - delta); a second kernel,
one program per BLOCK_M queries, accumulates dQ += dS K. No atomics, so gradients are
deterministic.

Numerics: all softmax math is fp32; tile products take the input dtype (fp16/bf16 tensor cores,
fp32 in "ieee" precision so fp32 runs stay exact), with fp32 accumulators. Causal masks are
bottom-right aligned (query i sees keys j <= i + seq_k - seq_q), as in proxy/kernels/reference.py.
Head dims that are not a power of two (48, 96) run in a padded BLOCK_D with masked loads.

Under TRITON_INTERPRET=1 (CPU tests) block sizes are fixed and small, and bf16 tiles are
upcast to fp32 right after loading, because the interpreter's bf16 arithmetic is wrong.
"""

# no `from __future__ import annotations`: torch.library reads the ops' schemas from real
# annotations, on every torch this project runs on (2.11 on the GPU image, 2.13 here)
import math
import os
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

# Decided once, when the kernels below are defined: that is when Triton picks the interpreter.
INTERPRETED = bool(triton.knobs.runtime.interpret)

LOG2E = 1.4426950408889634  # exp(x) = exp2(x * log2(e))
LN2_FLOAT = 0.6931471805599453
LN2 = tl.constexpr(LN2_FLOAT)  # a base-2 logit times ln(2) is the natural-units logit
MAX_HEAD_DIM = 128
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Interpreter blocks: BLOCK_M != BLOCK_N on purpose, so the CPU tests cover the causal bounds
# of mismatched tiles that the autotuner picks on a GPU.
_INTERPRETER_FORWARD = {"BLOCK_M": 32, "BLOCK_N": 16}
_INTERPRETER_DKDV = {"BLOCK_M": 16, "BLOCK_N": 32}
_INTERPRETER_DQ = {"BLOCK_M": 32, "BLOCK_N": 16}
_DELTA_BLOCK_M = 32 if INTERPRETED else 128


def _configs(shapes: list[tuple[int, int, int, int]]) -> list[triton.Config]:
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=warps, num_stages=stages)
        for m, n, warps, stages in shapes
    ]


# (BLOCK_M, BLOCK_N, num_warps, num_stages) candidates for an H100; configs that overflow shared
# memory (large tiles with head_dim 128 in fp32) are skipped by the autotuner.
_FORWARD_CONFIGS = _configs(
    [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 32, 4, 4), (64, 32, 4, 4)]
)
# dK/dV: few queries per step against many resident keys; dQ: the mirror image.
_DKDV_CONFIGS = _configs([(32, 128, 8, 3), (64, 128, 8, 3), (32, 64, 4, 3), (64, 64, 4, 3), (16, 64, 4, 2)])
_DQ_CONFIGS = _configs([(128, 32, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3), (32, 64, 4, 2)])
_TUNING_KEY = ["seq_q", "seq_k", "BLOCK_D", "CAUSAL"]
if os.environ.get("PROXY_TRITON_TUNING") == "quick":  # correctness checks: one config each, no autotuning
    _FORWARD_CONFIGS, _DKDV_CONFIGS, _DQ_CONFIGS = _FORWARD_CONFIGS[-1:], _DKDV_CONFIGS[-1:], _DQ_CONFIGS[-1:]


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------
@triton.jit
def _attention_forward_kernel(
    Q,
    K,
    V,
    Out,
    LSE2,
    RowMax,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_vb,
    stride_vh,
    stride_vt,
    stride_ob,
    stride_oh,
    stride_ot,
    n_heads,
    seq_q,
    seq_k,
    head_dim,
    qk_scale_log2,
    CAUSAL: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # batch x heads on grid axis 0 (up to 2^31 - 1; axis 1 stops at 65535, which an ensemble's
    # folded members could pass), the row tiles on axis 1
    batch_head = tl.program_id(0).to(tl.int64)  # 64-bit offsets for large batches
    block_m = tl.program_id(1)
    batch = batch_head // n_heads
    head = batch_head % n_heads
    Q += batch * stride_qb + head * stride_qh
    K += batch * stride_kb + head * stride_kh
    V += batch * stride_vb + head * stride_vh
    Out += batch * stride_ob + head * stride_oh

    rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_in = rows < seq_q
    dim_in = dims < head_dim
    q_mask = row_in[:, None] & dim_in[None, :]
    q = tl.load(Q + rows[:, None] * stride_qt + dims[None, :], mask=q_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    diagonal = seq_k - seq_q  # bottom-right causal alignment: row i sees keys j <= i + diagonal
    hi = seq_k
    if CAUSAL:
        hi = tl.minimum(seq_k, (block_m + 1) * BLOCK_M + diagonal)

    # Key 0 is visible to every row (diagonal >= 0 is checked by the wrapper), so after the first
    # tile m_i is finite and exp2(m_old - m_new) never sees -inf - -inf.
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        col_in = cols < seq_k
        kv_mask = col_in[:, None] & dim_in[None, :]
        k = tl.load(K + cols[:, None] * stride_kt + dims[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + cols[:, None] * stride_vt + dims[None, :], mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)

        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale_log2
        visible = col_in[None, :]
        if CAUSAL:
            visible = visible & (cols[None, :] <= rows[:, None] + diagonal)
        scores = tl.where(visible, scores, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    out = acc / l_i[:, None]
    tl.store(Out + rows[:, None] * stride_ot + dims[None, :], out.to(Out.dtype.element_ty), mask=q_mask)
    tl.store(LSE2 + batch_head * seq_q + rows, m_i + tl.log2(l_i), mask=row_in)
    tl.store(RowMax + batch_head * seq_q + rows, m_i * LN2, mask=row_in)


_attention_forward_tuned = triton.autotune(_FORWARD_CONFIGS, _TUNING_KEY)(_attention_forward_kernel)


# --------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------
@triton.jit
def _attention_backward_delta_kernel(
    Out,
    DOut,
    Delta,
    stride_ob,
    stride_oh,
    stride_ot,
    stride_gb,
    stride_gh,
    stride_gt,
    n_heads,
    seq_q,
    head_dim,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """delta_i = sum_d dO_id * O_id, the softmax-Jacobian term shared by dQ and dK."""
    batch_head = tl.program_id(0).to(tl.int64)
    block_m = tl.program_id(1)
    batch = batch_head // n_heads
    head = batch_head % n_heads
    rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    mask = (rows < seq_q)[:, None] & (dims < head_dim)[None, :]
    Out += batch * stride_ob + head * stride_oh
    DOut += batch * stride_gb + head * stride_gh
    out = tl.load(Out + rows[:, None] * stride_ot + dims[None, :], mask=mask, other=0.0)
    grad = tl.load(DOut + rows[:, None] * stride_gt + dims[None, :], mask=mask, other=0.0)
    delta = tl.sum(out.to(tl.float32) * grad.to(tl.float32), 1)
    tl.store(Delta + batch_head * seq_q + rows, delta, mask=rows < seq_q)


@triton.jit
def _attention_backward_dkdv_kernel(
    Q,
    K,
    V,
    DOut,
    DK,
    DV,
    LSE2,
    Delta,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_vb,
    stride_vh,
    stride_vt,
    stride_gb,
    stride_gh,
    stride_gt,
    stride_dkb,
    stride_dkh,
    stride_dkt,
    stride_dvb,
    stride_dvh,
    stride_dvt,
    n_heads,
    seq_q,
    seq_k,
    head_dim,
    qk_scale_log2,
    scale,
    CAUSAL: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    batch_head = tl.program_id(0).to(tl.int64)
    block_n = tl.program_id(1)
    batch = batch_head // n_heads
    head = batch_head % n_heads
    Q += batch * stride_qb + head * stride_qh
    K += batch * stride_kb + head * stride_kh
    V += batch * stride_vb + head * stride_vh
    DOut += batch * stride_gb + head * stride_gh
    DK += batch * stride_dkb + head * stride_dkh
    DV += batch * stride_dvb + head * stride_dvh
    LSE2 += batch_head * seq_q
    Delta += batch_head * seq_q

    cols = block_n * BLOCK_N + tl.arange(0, BLOCK_N)  # the keys this program owns
    dims = tl.arange(0, BLOCK_D)
    col_in = cols < seq_k
    dim_in = dims < head_dim
    kv_mask = col_in[:, None] & dim_in[None, :]
    k = tl.load(K + cols[:, None] * stride_kt + dims[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + cols[:, None] * stride_vt + dims[None, :], mask=kv_mask, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)

    diagonal = seq_k - seq_q
    lo = 0
    if CAUSAL:  # the first query that sees key cols[0] is cols[0] - diagonal; start at its tile
        lo = (tl.maximum(block_n * BLOCK_N - diagonal, 0) // BLOCK_M) * BLOCK_M

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start_m in range(lo, seq_q, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        row_in = rows < seq_q
        q_mask = row_in[:, None] & dim_in[None, :]
        q = tl.load(Q + rows[:, None] * stride_qt + dims[None, :], mask=q_mask, other=0.0)
        grad_out = tl.load(DOut + rows[:, None] * stride_gt + dims[None, :], mask=q_mask, other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            grad_out = grad_out.to(tl.float32)
        lse2 = tl.load(LSE2 + rows, mask=row_in, other=0.0)
        delta = tl.load(Delta + rows, mask=row_in, other=0.0)

        # Transposed tiles (keys x queries) so dK and dV come out as plain products.
        scores_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale_log2
        visible = col_in[:, None] & row_in[None, :]
        if CAUSAL:
            visible = visible & (cols[:, None] <= rows[None, :] + diagonal)
        p_t = tl.exp2(tl.where(visible, scores_t, float("-inf")) - lse2[None, :])
        dv += tl.dot(p_t.to(grad_out.dtype), grad_out, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(grad_out), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)

    dk = dk * scale
    tl.store(DK + cols[:, None] * stride_dkt + dims[None, :], dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + cols[:, None] * stride_dvt + dims[None, :], dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attention_backward_dq_kernel(
    Q,
    K,
    V,
    DOut,
    DQ,
    LSE2,
    Delta,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_vb,
    stride_vh,
    stride_vt,
    stride_gb,
    stride_gh,
    stride_gt,
    stride_dqb,
    stride_dqh,
    stride_dqt,
    n_heads,
    seq_q,
    seq_k,
    head_dim,
    qk_scale_log2,
    scale,
    CAUSAL: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    batch_head = tl.program_id(0).to(tl.int64)
    block_m = tl.program_id(1)
    batch = batch_head // n_heads
    head = batch_head % n_heads
    Q += batch * stride_qb + head * stride_qh
    K += batch * stride_kb + head * stride_kh
    V += batch * stride_vb + head * stride_vh
    DOut += batch * stride_gb + head * stride_gh
    DQ += batch * stride_dqb + head * stride_dqh

    rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_in = rows < seq_q
    dim_in = dims < head_dim
    q_mask = row_in[:, None] & dim_in[None, :]
    q = tl.load(Q + rows[:, None] * stride_qt + dims[None, :], mask=q_mask, other=0.0)
    grad_out = tl.load(DOut + rows[:, None] * stride_gt + dims[None, :], mask=q_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        grad_out = grad_out.to(tl.float32)
    lse2 = tl.load(LSE2 + batch_head * seq_q + rows, mask=row_in, other=0.0)
    delta = tl.load(Delta + batch_head * seq_q + rows, mask=row_in, other=0.0)

    diagonal = seq_k - seq_q
    hi = seq_k
    if CAUSAL:
        hi = tl.minimum(seq_k, (block_m + 1) * BLOCK_M + diagonal)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        col_in = cols < seq_k
        kv_mask = col_in[:, None] & dim_in[None, :]
        k = tl.load(K + cols[:, None] * stride_kt + dims[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + cols[:, None] * stride_vt + dims[None, :], mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)

        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale_log2
        visible = row_in[:, None] & col_in[None, :]
        if CAUSAL:
            visible = visible & (cols[None, :] <= rows[:, None] + diagonal)
        p = tl.exp2(tl.where(visible, scores, float("-inf")) - lse2[:, None])
        dp = tl.dot(grad_out, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)

    dq = dq * scale
    tl.store(DQ + rows[:, None] * stride_dqt + dims[None, :], dq.to(DQ.dtype.element_ty), mask=q_mask)


_attention_backward_dkdv_tuned = triton.autotune(_DKDV_CONFIGS, _TUNING_KEY)(_attention_backward_dkdv_kernel)
_attention_backward_dq_tuned = triton.autotune(_DQ_CONFIGS, _TUNING_KEY)(_attention_backward_dq_kernel)


# --------------------------------------------------------------------------------------------
# Launch wrappers
# --------------------------------------------------------------------------------------------
def _strides(t: Tensor) -> tuple[int, int, int]:
    """(batch, head, seq) strides; the head dim must be contiguous (stride 1)."""
    return t.stride(0), t.stride(1), t.stride(2)


def _head_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _kernel_options(dtype: torch.dtype) -> dict:
    return {
        # fp32 products in full precision: an fp32 run is the exact one (tf32 would add ~1e-3
        # relative error to the logits the diagnostics report). fp16/bf16 keep Triton's default.
        "DOT_PRECISION": "ieee" if dtype == torch.float32 else "tf32",
        "UPCAST": INTERPRETED and dtype == torch.bfloat16,
    }


def _launch(kernel, tuned, grid, args: tuple, interpreter_blocks: dict, **constexprs) -> None:
    """Fixed small blocks under the interpreter; autotuned blocks and warps on a GPU."""
    if INTERPRETED:
        kernel[grid](*args, **constexprs, **interpreter_blocks)
    else:
        tuned[grid](*args, **constexprs)


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            "flash_attention expects (batch, heads, seq, head_dim) tensors, got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if not q.dtype == k.dtype == v.dtype or q.dtype not in SUPPORTED_DTYPES:
        dtypes = f"{q.dtype}/{k.dtype}/{v.dtype}"
        raise TypeError(f"flash_attention needs q, k, v all fp32, fp16 or bf16, got {dtypes}")
    if not q.device == k.device == v.device:
        raise ValueError(f"flash_attention needs q, k, v on one device, got {q.device}/{k.device}/{v.device}")
    if not (q.is_cuda or INTERPRETED):
        raise RuntimeError("flash_attention runs on CUDA tensors, or on CPU only under TRITON_INTERPRET=1")
    batch, heads, seq_q, head_dim = q.shape
    if k.shape != v.shape or k.shape[:2] != (batch, heads) or k.shape[3] != head_dim:
        raise ValueError(
            "flash_attention needs k and v shaped (batch, heads, seq_k, head_dim) matching "
            f"q {tuple(q.shape)}, got k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"flash_attention supports head_dim 1..{MAX_HEAD_DIM}, got {head_dim}")
    if seq_q == 0 or k.shape[2] == 0:
        raise ValueError("flash_attention needs at least one query and one key")
    if causal and seq_q > k.shape[2]:
        raise ValueError(
            "causal flash_attention needs seq_q <= seq_k (the mask is bottom-right aligned), "
            f"got {seq_q} > {k.shape[2]}"
        )


def _forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (out, lse in base 2 per row, max_logit per (batch, head))."""
    batch, heads, seq_q, head_dim = q.shape
    seq_k = k.shape[2]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse2 = torch.empty(batch, heads, seq_q, device=q.device, dtype=torch.float32)
    row_max = torch.empty_like(lse2)
    block_d = max(16, triton.next_power_of_2(head_dim))  # tl.dot needs every tile dim >= 16
    grid = lambda meta: (batch * heads, triton.cdiv(seq_q, meta["BLOCK_M"]))  # noqa: E731
    args = (
        q,
        k,
        v,
        out,
        lse2,
        row_max,
        *_strides(q),
        *_strides(k),
        *_strides(v),
        *_strides(out),
        heads,
        seq_q,
        seq_k,
        head_dim,
        scale * LOG2E,
    )
    _launch(
        _attention_forward_kernel,
        _attention_forward_tuned,
        grid,
        args,
        _INTERPRETER_FORWARD,
        CAUSAL=causal,
        BLOCK_D=block_d,
        **_kernel_options(q.dtype),
    )
    return out, lse2, row_max.amax(dim=-1)


def _backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse2: Tensor, causal: bool, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    batch, heads, seq_q, head_dim = q.shape
    seq_k = k.shape[2]
    block_d = max(16, triton.next_power_of_2(head_dim))
    grad_out = _head_dim_contiguous(grad_out)
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)

    delta = torch.empty_like(lse2)
    _attention_backward_delta_kernel[(batch * heads, triton.cdiv(seq_q, _DELTA_BLOCK_M))](
        out,
        grad_out,
        delta,
        *_strides(out),
        *_strides(grad_out),
        heads,
        seq_q,
        head_dim,
        BLOCK_M=_DELTA_BLOCK_M,
        BLOCK_D=block_d,
    )
    shared = (heads, seq_q, seq_k, head_dim, scale * LOG2E, scale)
    constexprs = dict(CAUSAL=causal, BLOCK_D=block_d, **_kernel_options(q.dtype))
    _launch(
        _attention_backward_dkdv_kernel,
        _attention_backward_dkdv_tuned,
        lambda meta: (batch * heads, triton.cdiv(seq_k, meta["BLOCK_N"])),
        (
            q,
            k,
            v,
            grad_out,
            dk,
            dv,
            lse2,
            delta,
            *_strides(q),
            *_strides(k),
            *_strides(v),
            *_strides(grad_out),
            *_strides(dk),
            *_strides(dv),
            *shared,
        ),
        _INTERPRETER_DKDV,
        **constexprs,
    )
    _launch(
        _attention_backward_dq_kernel,
        _attention_backward_dq_tuned,
        lambda meta: (batch * heads, triton.cdiv(seq_q, meta["BLOCK_M"])),
        (
            q,
            k,
            v,
            grad_out,
            dq,
            lse2,
            delta,
            *_strides(q),
            *_strides(k),
            *_strides(v),
            *_strides(grad_out),
            *_strides(dq),
            *shared,
        ),
        _INTERPRETER_DQ,
        **constexprs,
    )
    return dq, dk, dv


# --------------------------------------------------------------------------------------------
# The operator: torch.library custom ops, so torch.compile calls the kernels without a graph
# break and torch.func.vmap (the ensemble's member dimension) folds into the batch
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("proxy::flash_attention_forward", mutates_args=())
def _forward_op(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """(out, lse per row in base 2, max logit per (batch, head)) of contiguous-head-dim inputs."""
    return _forward(q, k, v, causal, scale)


@_forward_op.register_fake
def _forward_fake(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    batch, heads, seq_q, _ = q.shape
    return (
        torch.empty_like(q, memory_format=torch.contiguous_format),
        q.new_empty(batch, heads, seq_q, dtype=torch.float32),
        q.new_empty(batch, heads, dtype=torch.float32),
    )


@torch.library.custom_op("proxy::flash_attention_backward", mutates_args=())
def _backward_op(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse2: Tensor, causal: bool, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    return _backward(grad_out, q, k, v, out, lse2, causal, scale)


@_backward_op.register_fake
def _backward_fake(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse2: Tensor, causal: bool, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    return (
        torch.empty_like(q, memory_format=torch.contiguous_format),
        torch.empty_like(k, memory_format=torch.contiguous_format),
        torch.empty_like(v, memory_format=torch.contiguous_format),
    )


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, causal, scale = inputs
    out, lse2, max_logit = output
    ctx.save_for_backward(q, k, v, out, lse2)
    ctx.causal, ctx.scale = causal, scale
    ctx.mark_non_differentiable(lse2, max_logit)


def _backward_rule(ctx, grad_out: Tensor, _grad_lse2: Optional[Tensor], _grad_max_logit: Optional[Tensor]):
    q, k, v, out, lse2 = ctx.saved_tensors
    dq, dk, dv = _backward_op(_head_dim_contiguous(grad_out), q, k, v, out, lse2, ctx.causal, ctx.scale)
    return dq, dk, dv, None, None


_forward_op.register_autograd(_backward_rule, setup_context=_setup_context)


def _fold(info, in_dims: Sequence[Optional[int]], tensors: Sequence[Tensor]) -> list[Tensor]:
    """Under vmap: the mapped dim moved to the front (broadcast where a tensor is not mapped) and
    merged into the batch dim, (K, B, ...) -> (K * B, ...). Attention is independent per batch
    row, so the K members are K times as many rows of one launch."""
    folded = []
    for t, dim in zip(tensors, in_dims):
        t = t.movedim(dim, 0) if dim is not None else t.unsqueeze(0).expand(info.batch_size, *t.shape)
        folded.append(_head_dim_contiguous(t.reshape(-1, *t.shape[2:])))
    return folded


def _unfold(info, tensors: Sequence[Tensor]) -> tuple[Tensor, ...]:
    return tuple(t.reshape(info.batch_size, -1, *t.shape[1:]) for t in tensors)


@_forward_op.register_vmap
def _forward_vmap(info, in_dims, q, k, v, causal, scale):
    outputs = _forward_op(*_fold(info, in_dims[:3], (q, k, v)), causal, scale)
    return _unfold(info, outputs), (0, 0, 0)


@_backward_op.register_vmap
def _backward_vmap(info, in_dims, grad_out, q, k, v, out, lse2, causal, scale):
    outputs = _backward_op(*_fold(info, in_dims[:6], (grad_out, q, k, v, out, lse2)), causal, scale)
    return _unfold(info, outputs), (0, 0, 0)


def flash_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = True,
    scale: Optional[float] = None,
    return_lse: bool = False,
) -> tuple[Tensor, ...]:
    """Softmax attention; same signature and outputs as :func:`proxy.kernels.reference.attention`.

    q, k, v: (batch, heads, seq, head_dim), fp32 / fp16 / bf16 (under autocast: the autocast
    dtype), head_dim <= 128, any strides.
    Returns ``(out, max_logit)``: ``out`` like q (contiguous) and ``max_logit`` (batch, heads)
    fp32 without gradient, the largest scaled pre-softmax score over unmasked positions. With
    ``return_lse`` also the log-sum-exp of each query row's scores, (batch, heads, seq_q) fp32 in
    natural log (the kernel keeps it in base 2 for exp2; this is the one it hands out).
    """
    if torch.is_autocast_enabled(q.device.type):  # like SDPA: run in the autocast dtype
        q, k, v = (t.to(torch.get_autocast_dtype(q.device.type)) for t in (q, k, v))
    _check_inputs(q, k, v, causal)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    q, k, v = (_head_dim_contiguous(t) for t in (q, k, v))
    out, lse2, max_logit = _forward_op(q, k, v, causal, scale)
    return (out, max_logit, lse2 * LN2_FLOAT) if return_lse else (out, max_logit)
