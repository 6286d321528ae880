"""The Triton flash-attention kernel against proxy/kernels/reference.py, run by the Triton interpreter.

Shapes are small (each inner-loop step of the interpreter costs milliseconds) but cross several
query and key tiles (the interpreter uses 32-row query and 16-key tiles), include tails that do
not fill a tile, padded head dims (48) and the model's strided q/k/v layout.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from einops import rearrange

from proxy import kernels
from proxy.kernels import reference
from proxy.kernels.flash_attention import flash_attention
from tests.kernels.device import DEVICE

TOLERANCE = {  # (atol, rtol) for outputs and gradients of unit-scale inputs
    torch.float32: (2e-5, 1e-4),
    torch.float16: (4e-3, 1e-2),
}


def packed_qkv(batch: int, heads: int, seq: int, head_dim: int, dtype: torch.dtype, seed: int = 0):
    """A leaf (batch, seq, 3*heads*head_dim) tensor and strided q, k, v views, as model.py makes them."""
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(batch, seq, 3 * heads * head_dim, generator=gen).to(DEVICE, dtype).requires_grad_()
    q, k, v = rearrange(qkv, "b t (three h d) -> three b h t d", three=3, h=heads)
    return qkv, q, k, v


def reference_fp32(q, k, v, **kwargs):
    return reference.attention(q.float(), k.float(), v.float(), **kwargs)


@pytest.mark.parametrize(
    "batch,heads,seq,head_dim,dtype",
    [
        (1, 2, 1, 16, torch.float32),  # a single query: only the diagonal is visible
        (2, 1, 17, 32, torch.float16),  # tails of both tile sizes
        (1, 2, 50, 48, torch.float32),  # head dim padded 48 -> 64
        (1, 1, 77, 16, torch.float16),  # three query tiles, five key tiles
    ],
)
def test_forward_and_gradients_match_reference(batch, heads, seq, head_dim, dtype):
    atol, rtol = TOLERANCE[dtype]
    qkv, q, k, v = packed_qkv(batch, heads, seq, head_dim, dtype)
    out, max_logit = flash_attention(q, k, v)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    out.backward(grad_out)
    grad = qkv.grad.clone()

    qkv_ref = qkv.detach().float().requires_grad_()
    q_ref, k_ref, v_ref = rearrange(qkv_ref, "b t (three h d) -> three b h t d", three=3, h=heads)
    out_ref, max_logit_ref = reference.attention(q_ref, k_ref, v_ref)
    out_ref.backward(grad_out.float())

    assert out.dtype == dtype and out.shape == q.shape
    assert max_logit.dtype == torch.float32 and max_logit.shape == (batch, heads)
    assert not max_logit.requires_grad
    torch.testing.assert_close(out.float(), out_ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(max_logit, max_logit_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad.float(), qkv_ref.grad, atol=5 * atol, rtol=5 * rtol)


def test_causal_edge_rows():
    """Row 0 sees only key 0; a future key never leaks into an earlier row's output or max."""
    _, q, k, v = packed_qkv(1, 1, 40, 16, torch.float32)
    q, k, v = (t.detach().clone() for t in (q, k, v))
    # The largest score of all, q_0 . k_39, is masked: the max logit must not see it.
    q[..., 0, :] = 5.0
    k[..., 39, :] = 5.0
    out, max_logit = flash_attention(q, k, v)
    _, max_logit_ref = reference.attention(q, k, v)
    full_scores = (q @ k.transpose(-1, -2)) / 4.0
    assert max_logit.item() < full_scores.max().item()
    torch.testing.assert_close(max_logit, max_logit_ref, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(out[..., 0, :], v[..., 0, :])

    k2, v2 = k.clone(), v.clone()
    k2[..., 33:, :] += 10.0
    v2[..., 33:, :] -= 10.0
    out2, _ = flash_attention(q, k2, v2)
    torch.testing.assert_close(out2[..., :33, :], out[..., :33, :], atol=0.0, rtol=0.0)
    assert not torch.allclose(out2[..., 33:, :], out[..., 33:, :])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_huge_logits_stay_finite_and_max_logit_is_exact(dtype):
    """q and k scaled by 100 with head dim 16: logits of ~1e4, the regime where runs diverge."""
    gen = torch.Generator().manual_seed(2)
    q, k = ((100 * torch.randn(1, 2, 50, 16, generator=gen).to(DEVICE)).to(dtype).requires_grad_() for _ in range(2))
    v = torch.randn(1, 2, 50, 16, generator=gen).to(DEVICE, dtype).requires_grad_()
    out, max_logit = flash_attention(q, k, v)
    grad_out = torch.randn(out.shape, generator=gen).to(DEVICE, dtype)
    out.backward(grad_out)

    q_ref, k_ref, v_ref = (t.detach().float().requires_grad_() for t in (q, k, v))
    out_ref, max_logit_ref = reference.attention(q_ref, k_ref, v_ref)
    out_ref.backward(grad_out.float())

    assert max_logit.min().item() > 1e4
    torch.testing.assert_close(max_logit, max_logit_ref, atol=0.0, rtol=1e-6)
    assert torch.isfinite(out).all()
    # A relative rounding error of 1e-7 in a 1e4 logit moves its softmax weight by 1e-3.
    torch.testing.assert_close(out.float(), out_ref, atol=2e-3, rtol=0.0)
    for tensor in (q, k, v):
        assert torch.isfinite(tensor.grad).all()
    torch.testing.assert_close(v.grad.float(), v_ref.grad, atol=1e-2, rtol=1e-2)
    # The softmax is one-hot, so dq and dk are ~0; what remains is rounding of dp - delta
    # (terms of size |dO| |v| |k| scale ~ 1e3), which must stay at that rounding level.
    for tensor, ref in ((q, q_ref), (k, k_ref)):
        assert (tensor.grad.float() - ref.grad).abs().max().item() < 1e3 * 1e-3


@pytest.mark.parametrize("causal", [True, False])
def test_fewer_queries_than_keys(causal):
    """Bottom-right causal alignment (query i sees keys <= i + seq_k - seq_q), as the reference."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 1, 20, 16, generator=gen).to(DEVICE).requires_grad_()
    k, v = (torch.randn(1, 1, 45, 16, generator=gen).to(DEVICE).requires_grad_() for _ in range(2))
    out, max_logit = flash_attention(q, k, v, causal=causal, scale=0.3)
    out.sum().backward()
    q_ref, k_ref, v_ref = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out_ref, max_logit_ref = reference.attention(q_ref, k_ref, v_ref, causal=causal, scale=0.3)
    out_ref.sum().backward()
    torch.testing.assert_close(out, out_ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(max_logit, max_logit_ref)
    for tensor, ref in ((q, q_ref), (k, k_ref), (v, v_ref)):
        torch.testing.assert_close(tensor.grad, ref.grad, atol=1e-4, rtol=1e-4)


def test_bad_inputs_raise_one_clear_error():
    q = torch.randn(1, 1, 8, 16).to(DEVICE)
    with pytest.raises(ValueError, match="head_dim"):
        wide = torch.randn(1, 1, 8, 160).to(DEVICE)
        flash_attention(wide, wide, wide)
    with pytest.raises(TypeError, match="fp32, fp16 or bf16"):
        flash_attention(q, q.half(), q)
    with pytest.raises(ValueError, match="seq_q <= seq_k"):
        flash_attention(q, q[:, :, :4], q[:, :, :4])
    with pytest.raises(ValueError, match="batch, heads, seq, head_dim"):
        flash_attention(q[0], q[0], q[0])


def test_dispatch_takes_the_triton_path(monkeypatch):
    """kernels.attention(use_triton=True) runs the kernel under the interpreter, not the reference."""
    module = importlib.import_module("proxy.kernels.flash_attention")
    calls = []

    def spy(*args, **kwargs):
        calls.append(1)
        return flash_attention(*args, **kwargs)

    def reference_must_not_run(*args, **kwargs):
        raise AssertionError("the reference ran instead of the Triton kernel")

    monkeypatch.setattr(module, "flash_attention", spy)
    monkeypatch.setattr(reference, "attention", reference_must_not_run)
    _, q, k, v = packed_qkv(1, 2, 9, 16, torch.float32)
    for _ in range(2):  # a second call: the submodule import must not shadow kernels.attention
        out, max_logit = kernels.attention(q, k, v, causal=True, use_triton=True)
    assert len(calls) == 2
    monkeypatch.undo()
    out_ref, max_logit_ref = reference.attention(q, k, v)
    torch.testing.assert_close(out, out_ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(max_logit, max_logit_ref)


def test_the_lse_handed_out_is_in_natural_log():
    gen = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(2, 2, 40, 16, generator=gen).to(DEVICE) for _ in range(3))
    _, max_logit, lse = flash_attention(q, k, v, return_lse=True)
    _, max_ref, lse_ref = reference.attention(q, k, v, return_lse=True)
    assert lse.shape == (2, 2, 40) and lse.dtype == torch.float32
    torch.testing.assert_close(lse, lse_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(max_logit, max_ref, atol=1e-5, rtol=1e-5)
    assert (lse.amax(-1) <= max_logit + math.log(40) + 1e-5).all()  # lse <= max + ln(keys)
