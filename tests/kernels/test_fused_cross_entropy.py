"""The Triton cross-entropy kernels against proxy/kernels/reference.py, run by the Triton interpreter.

V = 300 spans three 128-wide interpreter vocab blocks with a masked tail, so the online
log-sum-exp is exercised across blocks. Losses are weighted (ce + 2 z, 3 (ce + z)) so a gradient
that ignored the incoming gradient or mixed up the two outputs would fail.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from proxy import kernels
from proxy.kernels import reference
from proxy.kernels.fused_cross_entropy import fused_cross_entropy, fused_linear_cross_entropy
from tests.kernels.device import DEVICE

N_ROWS, VOCAB, HIDDEN = 24, 300, 32
Z_LOSS = 1e-2
IGNORE = -100


def make_labels(seed: int = 0) -> torch.Tensor:
    labels = torch.randint(0, VOCAB, (N_ROWS,), generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    labels[::5] = IGNORE
    labels[1] = VOCAB - 1  # the last column, inside the masked tail block
    return labels


def make_logits(dtype: torch.dtype) -> torch.Tensor:
    logits = 3 * torch.randn(N_ROWS, VOCAB, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    logits[2] += 1e4  # lse ~ 1e4: the online log-sum-exp must not overflow
    logits[3] -= 50.0  # very negative logits, the output-divergence symptom
    return logits.to(dtype)


def assert_stats_close(stats, stats_ref, atol: float = 1e-5):
    assert set(stats) == {"logit_mean", "logit_max", "lse_mean", "lse_max"}
    for name in stats:
        assert not stats[name].requires_grad
        torch.testing.assert_close(stats[name], stats_ref[name], atol=atol, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cross_entropy_matches_reference(dtype):
    source = make_logits(dtype).requires_grad_()
    labels = make_labels()
    ce, z_term, stats = fused_cross_entropy(source * 1, labels, z_loss=Z_LOSS)  # an intermediate
    (ce + 2 * z_term).backward()

    source_ref = source.detach().float().requires_grad_()
    ce_ref, z_ref, stats_ref = reference.cross_entropy(source_ref, labels, z_loss=Z_LOSS)
    (ce_ref + 2 * z_ref).backward()

    torch.testing.assert_close(ce, ce_ref)
    torch.testing.assert_close(z_term, z_ref)
    assert_stats_close(stats, stats_ref)
    assert source.grad.dtype == dtype
    grad_atol = 1e-4 if dtype == torch.float16 else 1e-6
    torch.testing.assert_close(source.grad.float(), source_ref.grad, atol=grad_atol, rtol=1e-3)
    assert (source.grad[::5] == 0).all()  # ignored rows get no gradient


def test_gradient_reuses_intermediate_logits_but_never_a_leaf():
    labels = make_labels()
    leaf = make_logits(torch.float32).requires_grad_()
    before = leaf.detach().clone()
    ce, z_term, _ = fused_cross_entropy(leaf, labels, z_loss=Z_LOSS)
    (ce + z_term).backward()
    assert torch.equal(leaf.detach(), before)

    logits = leaf.detach().clone().requires_grad_() * 1.0
    ce, z_term, _ = fused_cross_entropy(logits, labels, z_loss=Z_LOSS)
    (ce + z_term).backward()
    torch.testing.assert_close(logits.detach(), leaf.grad)  # the gradient now lives in the logits


def test_overwritten_logits_needed_elsewhere_fail_loudly():
    """tanh saves its output for backward; reusing those logits must raise, not corrupt grads."""
    logits = make_logits(torch.float32).requires_grad_().tanh()
    ce, _, _ = fused_cross_entropy(logits, make_labels())
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        ce.backward()


def test_all_labels_ignored_gives_zero_loss_and_gradient():
    source = make_logits(torch.float32).requires_grad_()
    labels = torch.full((N_ROWS,), IGNORE).to(DEVICE)
    ce, z_term, stats = fused_cross_entropy(source * 1, labels, z_loss=Z_LOSS)
    (ce + z_term).backward()
    _, _, stats_ref = reference.cross_entropy(source.detach(), labels, z_loss=Z_LOSS)
    assert ce.item() == 0.0 and z_term.item() == 0.0
    assert (source.grad == 0).all()
    # no row counts: no largest logit or log Z to report (NaN, which the metrics leave out), not -inf
    maxima = ("logit_max", "lse_max")
    for key in maxima:
        assert stats[key].isnan() and stats_ref[key].isnan()
    zero = torch.tensor(0.0, device=DEVICE)
    assert_stats_close(
        {k: (zero if k in maxima else v) for k, v in stats.items()},
        {k: (zero if k in maxima else v) for k, v in stats_ref.items()},
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_linear_cross_entropy_matches_reference(dtype):
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(N_ROWS, HIDDEN, generator=gen).to(DEVICE, dtype).requires_grad_()
    weight = (0.3 * torch.randn(VOCAB, HIDDEN, generator=gen).to(DEVICE)).to(dtype).requires_grad_()
    labels = make_labels(seed=3)
    # chunk_size 7 does not divide 24 rows: the last chunk has 3.
    ce, z_term, stats = fused_linear_cross_entropy(hidden, weight, labels, z_loss=Z_LOSS, chunk_size=7)
    (3 * (ce + z_term)).backward()

    hidden_ref, weight_ref = (t.detach().float().requires_grad_() for t in (hidden, weight))
    ce_ref, z_ref, stats_ref = reference.linear_cross_entropy(hidden_ref, weight_ref, labels, z_loss=Z_LOSS)
    (3 * (ce_ref + z_ref)).backward()

    # fp16: the logits themselves are fp16 products, as in the reference run in fp16.
    atol = 2e-3 if dtype == torch.float16 else 1e-5
    torch.testing.assert_close(ce, ce_ref, atol=atol, rtol=1e-4)
    torch.testing.assert_close(z_term, z_ref, atol=atol, rtol=1e-4)
    assert_stats_close(stats, stats_ref, atol=atol)
    assert hidden.grad.dtype == dtype and weight.grad.dtype == dtype
    grad_atol = 1e-3 if dtype == torch.float16 else 1e-6
    torch.testing.assert_close(hidden.grad.float(), hidden_ref.grad, atol=grad_atol, rtol=1e-3)
    torch.testing.assert_close(weight.grad.float(), weight_ref.grad, atol=grad_atol, rtol=1e-3)


def test_linear_cross_entropy_without_grad_and_with_default_chunks():
    gen = torch.Generator().manual_seed(4)
    hidden = torch.randn(N_ROWS, HIDDEN, generator=gen).to(DEVICE).requires_grad_()
    weight = torch.randn(VOCAB, HIDDEN, generator=gen).to(DEVICE).requires_grad_()
    labels = make_labels()
    with torch.no_grad():
        ce, z_term, stats = fused_linear_cross_entropy(hidden, weight, labels, z_loss=Z_LOSS)
    ce_ref, z_ref, stats_ref = reference.linear_cross_entropy(hidden.detach(), weight.detach(), labels, z_loss=Z_LOSS)
    assert not ce.requires_grad
    torch.testing.assert_close(ce, ce_ref)
    torch.testing.assert_close(z_term, z_ref)
    assert_stats_close(stats, stats_ref, atol=1e-4)


def test_linear_cross_entropy_refuses_what_its_forward_gradient_cannot_serve():
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(N_ROWS, HIDDEN, generator=gen).to(DEVICE).requires_grad_()
    weight = torch.randn(VOCAB, HIDDEN, generator=gen).to(DEVICE).requires_grad_()
    ce, z_term, _ = fused_linear_cross_entropy(hidden, weight, make_labels(), z_loss=Z_LOSS, chunk_size=16)
    with pytest.raises(RuntimeError, match="ce \\+ z_term"):
        ce.backward(retain_graph=True)  # z_term receives no gradient, ce does

    ce, z_term, _ = fused_linear_cross_entropy(hidden, weight, make_labels(), chunk_size=16)
    ce.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward pass"):
        ce.backward()


def test_bad_inputs_raise_one_clear_error():
    logits = make_logits(torch.float32)
    labels = make_labels()
    labels[0] = VOCAB
    with pytest.raises(ValueError, match="outside the vocabulary"):
        fused_cross_entropy(logits, labels)
    with pytest.raises(ValueError, match="labels must be shaped"):
        fused_cross_entropy(logits, make_labels()[:-1])
    hidden, weight = torch.randn(4, 8).to(DEVICE), torch.randn(10, 8).to(DEVICE)
    zeros = torch.zeros(4, dtype=torch.long).to(DEVICE)
    with pytest.raises(ValueError, match="chunk_size"):
        fused_linear_cross_entropy(hidden, weight, zeros, chunk_size=0)
    with pytest.raises(TypeError, match="cast one or use autocast"):
        fused_linear_cross_entropy(hidden, weight.double(), zeros)


def test_dispatch_takes_the_triton_path(monkeypatch):
    """kernels.cross_entropy / linear_cross_entropy(use_triton=True) run the kernels, not the reference."""
    module = importlib.import_module("proxy.kernels.fused_cross_entropy")
    calls = []

    def spy(fn):
        def wrapped(*args, **kwargs):
            calls.append(fn.__name__)
            return fn(*args, **kwargs)

        return wrapped

    def reference_must_not_run(*args, **kwargs):
        raise AssertionError("the reference ran instead of the Triton kernel")

    monkeypatch.setattr(module, "fused_cross_entropy", spy(fused_cross_entropy))
    monkeypatch.setattr(module, "fused_linear_cross_entropy", spy(fused_linear_cross_entropy))
    monkeypatch.setattr(reference, "cross_entropy", reference_must_not_run)
    monkeypatch.setattr(reference, "linear_cross_entropy", reference_must_not_run)
    hidden, weight, labels = torch.randn(8, 16).to(DEVICE), torch.randn(40, 16).to(DEVICE), torch.arange(8).to(DEVICE)
    ce, _, _ = kernels.cross_entropy(hidden @ weight.t(), labels, use_triton=True)
    ce_linear, _, _ = kernels.linear_cross_entropy(hidden, weight, labels, use_triton=True)
    ce_again, _, _ = kernels.cross_entropy(hidden @ weight.t(), labels, use_triton=True)
    assert calls == ["fused_cross_entropy", "fused_linear_cross_entropy", "fused_cross_entropy"]
    monkeypatch.undo()
    ce_ref, _, _ = reference.cross_entropy(hidden @ weight.t(), labels)
    for value in (ce, ce_linear, ce_again):
        torch.testing.assert_close(value, ce_ref, atol=1e-5, rtol=1e-5)


def test_the_gradient_never_overwrites_the_callers_data():
    """In place only into an intermediate with rows of its own: a view of a leaf keeps its data,
    an expanded row (stride 0) gets the right gradient (and no race on a GPU)."""
    leaf = make_logits(torch.float32).reshape(-1).clone().requires_grad_()
    labels = make_labels(seed=5)
    kept = leaf.detach().clone()
    ce, z_term, _ = fused_cross_entropy(leaf.view(N_ROWS, VOCAB), labels, z_loss=Z_LOSS)
    (ce + z_term).backward()
    assert torch.equal(leaf.detach(), kept)  # the leaf's data is untouched
    ref_leaf = kept.clone().requires_grad_()
    ce_ref, z_ref, _ = reference.cross_entropy(ref_leaf.view(N_ROWS, VOCAB), labels, z_loss=Z_LOSS)
    (ce_ref + z_ref).backward()
    torch.testing.assert_close(leaf.grad, ref_leaf.grad, atol=1e-6, rtol=1e-5)

    row = (3 * torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(6)).to(DEVICE)).requires_grad_()
    ce, z_term, _ = fused_cross_entropy(row.expand(N_ROWS, VOCAB), labels, z_loss=Z_LOSS)
    (ce + z_term).backward()
    ref_row = row.detach().clone().requires_grad_()
    ce_ref, z_ref, _ = reference.cross_entropy(ref_row.expand(N_ROWS, VOCAB), labels, z_loss=Z_LOSS)
    (ce_ref + z_ref).backward()
    torch.testing.assert_close(ce, ce_ref, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(row.grad, ref_row.grad, atol=1e-6, rtol=1e-5)


def test_linear_cross_entropy_in_fp16_takes_a_loss_scale():
    """fp16 training backpropagates a scaled loss (GradScaler starts at 2^16, above fp16's largest
    value, 65504): the op must apply that scale in fp32, and must not form p / N in fp16 in the
    forward, where it underflows (below 6e-8) before the scale arrives. Before the fix this gave
    NaN here; the underflow itself needs N x V > 3e7 to cost much (the first H200 run: 1-2 % error in
    grad_hidden at N = 8192, V = 32k-128k), beyond the interpreter, so benchmarks/gpu_check/
    measures it on the device. Output rows share a direction, as they come to in training."""
    n_rows, vocab, hidden_dim = 128, 1024, 16
    gen = torch.Generator().manual_seed(5)
    shared = torch.randn(hidden_dim, generator=gen)
    weight = (shared + 0.3 * torch.randn(vocab, hidden_dim, generator=gen)).to(DEVICE, torch.float16).requires_grad_()
    hidden = (1.5 * torch.randn(n_rows, hidden_dim, generator=gen)).to(DEVICE, torch.float16).requires_grad_()
    labels = torch.randint(0, vocab, (n_rows,), generator=gen).to(DEVICE)
    scale = 2.0**16
    ce, z_term, _ = fused_linear_cross_entropy(hidden, weight, labels, z_loss=Z_LOSS)
    (scale * (ce + z_term)).backward()

    hidden_ref, weight_ref = (t.detach().float().requires_grad_() for t in (hidden, weight))
    ce_ref, z_ref, _ = reference.linear_cross_entropy(hidden_ref, weight_ref, labels, z_loss=Z_LOSS)
    (ce_ref + z_ref).backward()

    def rel_error(ours, ref):
        return float((ours.double() / scale - ref.double()).norm() / ref.double().norm())

    assert hidden.grad.dtype == weight.grad.dtype == torch.float16
    assert rel_error(hidden.grad, hidden_ref.grad) < 1e-3
    assert rel_error(weight.grad, weight_ref.grad) < 1e-3
