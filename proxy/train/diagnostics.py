"""What is measured during training, in one place the loop calls.

Every function returns a flat ``{key: float}`` dict with the metric keys of the run-record contract
(proxy/records.py): ``attn/max_logit/layer_<i>``, ``output/logit_mean``, ``grad_rms/<param>``,
``update_rms/<param>``, ``param_norm/<param>``, ``perf/tokens_per_s`` ... The loop merges them into
one row per logged step; the sinks (metrics.jsonl, wandb, progress bar) never compute anything.

Cheap statistics come out of the forward pass as by-products (proxy/model.py: ModelOutput). The
per-parameter measures (grad RMS, update RMS, norms) touch every parameter, so the loop calls
them only on logging steps.
"""

from __future__ import annotations

import math
import time
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from proxy.model import GPT, TOKEN_CLASSES, ModelOutput
from proxy.records import (
    ADAM_RMS,
    ADAM_RMS_MAX,
    ATTN_MAX_LOGIT,
    GRAD_RMS,
    GROWTH_ACTIVATION,
    GROWTH_ACTIVATION_FROM_EMBEDDING,
    GROWTH_GRADIENT,
    GROWTH_GRADIENT_FROM_EMBEDDING,
    MFU,
    OUTPUT,
    PARAM_NORM,
    TOKENS_PER_S,
    UPDATE_RMS,
    attn_layer_key,
)


# --------------------------------------------------------------------------------------------
# By-products of the forward pass
# --------------------------------------------------------------------------------------------
def forward_stats(out: ModelOutput) -> dict[str, float]:
    """Max attention logit per layer (and over layers) and the output-logit statistics."""
    stats: dict[str, float] = {}
    per_layer = [m.float().amax() for m in out.attn_max_logits if m is not None]
    names = list(out.output_stats)
    tensors = per_layer + [torch.as_tensor(out.output_stats[n], dtype=torch.float32) for n in names]
    if not tensors:
        return stats
    device = tensors[0].device
    values = torch.stack([t.to(device).float().reshape(()) for t in tensors]).tolist()  # one device->host copy
    maxima, output = values[: len(per_layer)], values[len(per_layer) :]
    for i, value in enumerate(maxima):
        stats[attn_layer_key(i)] = value
    if maxima:
        stats[ATTN_MAX_LOGIT] = max(maxima)
    for name, value in zip(names, output):
        if not math.isnan(value):  # NaN: no label counted in this batch (e.g. all masked), nothing to report
            stats[OUTPUT + name] = value
    return stats


# --------------------------------------------------------------------------------------------
# Per-parameter measures (logging steps only)
# --------------------------------------------------------------------------------------------
# Each measure is one multi-tensor kernel over all parameters (torch._foreach_norm) and one
# device->host copy, the arithmetic per parameter then done on the host: per-parameter reductions
# launched ~10 kernels per parameter, and on an H200 at 124m those launches were the whole cost of
# the diagnostics (8.7 % eager, 15.9 % compiled at every step; device check, 2026-12-04).
def _fp32(tensors: list[Tensor]) -> list[Tensor]:
    return [t if t.dtype == torch.float32 else t.float() for t in tensors]


def _norms(tensors: list[Tensor]) -> list[float]:
    """The L2 norm of each tensor, in fp32, with one kernel launch and one sync."""
    if not tensors:
        return []
    return torch.stack(torch._foreach_norm(_fp32(tensors))).tolist()


def _rms(norm: float, numel: int) -> float:
    return norm / math.sqrt(numel) if numel else 0.0


def grad_stats(model: nn.Module) -> dict[str, float]:
    """RMS of each parameter's gradient, before clipping (what Adam's epsilon is compared with)."""
    named = [(n, p.grad) for n, p in model.named_parameters() if p.grad is not None]
    norms = _norms([g for _, g in named])
    return {GRAD_RMS + n: _rms(norm, g.numel()) for (n, g), norm in zip(named, norms)}


class UpdateTracker:
    """Measures each parameter's update RMS divided by its learning rate.

    ``before()`` copies the parameters; ``after()`` compares. The ratio is the size of the Adam
    update direction itself (about 1 for a healthy Adam step, much smaller when the gradient RMS
    falls toward epsilon; Wortsman et al. section 3.4). Parameter norms come along for free.
    The copies live in buffers kept between logging steps (one multi-tensor copy each time).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.model = model
        self.optimizer = optimizer
        self._buffers: Optional[list[Tensor]] = None
        self._armed = False

    def before(self) -> None:
        params = [p.detach() for p in self.model.parameters()]
        if (
            self._buffers is None
            or [b.shape for b in self._buffers] != [p.shape for p in params]
            or any(b.dtype != p.dtype or b.device != p.device for b, p in zip(self._buffers, params))
        ):
            self._buffers = [torch.empty_like(p) for p in params]
        torch._foreach_copy_(self._buffers, params)
        self._armed = True

    def after(self) -> dict[str, float]:
        if not self._armed or self._buffers is None:
            return {}
        self._armed = False
        lr_of = {id(p): g["lr"] for g in self.optimizer.param_groups for p in g["params"]}
        named = list(self.model.named_parameters())
        params = [p.detach() for _, p in named]
        torch._foreach_sub_(self._buffers, params)  # before - after: the update's norm, no new memory
        values = _norms(self._buffers + params)
        update_norms, param_norms = values[: len(params)], values[len(params) :]
        stats: dict[str, float] = {}
        for (name, p), update in zip(named, update_norms):
            lr = lr_of.get(id(p), 0.0)
            stats[UPDATE_RMS + name] = _rms(update, p.numel()) / lr if lr > 0 else 0.0
        stats.update({PARAM_NORM + name: norm for (name, _), norm in zip(named, param_norms)})
        stats.update(adam_rms(self.optimizer, named))
        return stats


def adam_rms(optimizer: Any, named: Sequence[tuple[str, Tensor]]) -> dict[str, float]:
    """Each parameter's RMS_t of the last step (``adam_rms/<name>``) and the largest
    (``optim/adam_rms_max``), where the optimizer measured them (proxy.optim.AdamW with
    ``measure_rms``): Wortsman et al. 2023b's predictor of a loss spike 1-8 steps ahead."""
    last = getattr(optimizer, "last_rms", {})
    measured = [(name, last[id(p)]) for name, p in named if id(p) in last]
    if not measured:
        return {}
    values = torch.stack([r.float() for _, r in measured]).tolist()  # one sync
    stats = {ADAM_RMS + name: value for (name, _), value in zip(measured, values)}
    stats[ADAM_RMS_MAX] = max(values)
    last.clear()  # what the next logging step reads is that step's
    return stats


# --------------------------------------------------------------------------------------------
# Token classes (output-logit divergence lives in the rows of rarely seen tokens)
# --------------------------------------------------------------------------------------------
RARE_BELOW = 10.0  # expected occurrences in a run's training tokens below which a token is rare


def token_classes(probabilities: np.ndarray, train_tokens: int, rare_below: float = RARE_BELOW) -> np.ndarray:
    """0 never (probability 0), 1 rare (fewer than ``rare_below`` expected occurrences in the
    ``train_tokens`` the run will see), 2 frequent: proxy.model.GPT.set_token_classes's codes."""
    expected = np.asarray(probabilities, dtype=np.float64) * train_tokens
    codes = np.full(expected.shape, 2, dtype=np.int64)
    codes[expected < rare_below] = 1
    codes[expected == 0] = 0
    return codes


def class_counts(codes: np.ndarray) -> dict[str, int]:
    return {name: int((codes == i).sum()) for i, name in enumerate(TOKEN_CLASSES)}


# --------------------------------------------------------------------------------------------
# Throughput
# --------------------------------------------------------------------------------------------
# dense bf16 peak FLOP/s, for MFU (spec-sheet numbers, SXM parts)
# Dense bf16 tensor-core peaks from NVIDIA's data sheets (the sparsity figures halved), matched in
# this order against the name the driver reports (case ignored): the PCIe and NVL cards before
# the SXM part whose name is the bare model ("NVIDIA H100 80GB HBM3"). A card not listed has no
# peak: its MFU is not reported rather than guessed.
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIE", 756e12),
    ("H100 NVL", 835e12),
    ("H200 NVL", 835e12),
    ("H100", 989e12),  # SXM
    ("H200", 989e12),  # SXM
    ("A100", 312e12),
    ("L40S", 362e12),
    ("A10", 125e12),
)


def peak_flops_of(name: str) -> Optional[float]:
    """The dense bf16 peak of the GPU a driver names ``name``; None for a card not listed."""
    upper = name.upper()
    return next((flops for pattern, flops in PEAK_FLOPS if pattern in upper), None)


def peak_flops(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    return peak_flops_of(torch.cuda.get_device_name(device))


class Throughput:
    """Tokens per second (and MFU on known GPUs) between two logging steps."""

    def __init__(self, flops_per_token: float, device: torch.device):
        self.flops_per_token = flops_per_token
        self.peak = peak_flops(device)
        self.device = device
        self._t = time.perf_counter()
        self._tokens = 0

    def add(self, tokens: int) -> None:
        self._tokens += tokens

    def read(self) -> dict[str, float]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        elapsed, tokens = now - self._t, self._tokens
        self._t, self._tokens = now, 0
        if elapsed <= 0 or tokens == 0:
            return {}
        rate = tokens / elapsed
        stats = {TOKENS_PER_S: rate}
        if self.peak:
            stats[MFU] = rate * self.flops_per_token / self.peak
        return stats


# --------------------------------------------------------------------------------------------
# Growth exponents at initialization (OLMo 2 section 3.2)
# --------------------------------------------------------------------------------------------
def growth_exponents(model: GPT, idx: Tensor, labels: Tensor) -> dict[str, float]:
    """lambda = (1/n_layers) * log(||v_last|| / ||v_first||) for activations and gradients.

    v_last is the residual stream after the last block; v_first, in two definitions that give
    different numbers (report both): the residual stream after the first block (``growth/...``)
    and the embedding output, the stream entering the first block (``growth/..._from_embedding``).
    Norms are averaged over documents and positions; for gradients, the gradient of the loss with
    respect to those same activations. lambda near 0: neither grows nor shrinks with depth.
    """
    outputs: list[Tensor] = []

    def keep(_module, _inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden.retain_grad()
        outputs.append(hidden)

    handles = [model.embed.register_forward_hook(keep)]
    handles += [block.register_forward_hook(keep) for block in model.blocks]
    try:
        model.zero_grad(set_to_none=True)
        out = model(idx, labels)
        out.loss.backward()
    finally:
        for h in handles:
            h.remove()
    embedded, first, last = outputs[0], outputs[1], outputs[-1]
    n_layers = len(model.blocks)

    def mean_norm(t: Tensor) -> float:
        return t.float().norm(dim=-1).mean().item()

    def exponent(a: Tensor, b: Tensor) -> float:
        return math.log(mean_norm(b) / mean_norm(a)) / n_layers

    # the hooks retained the gradients of activations the loss depends on: backward filled them
    embedded_grad, first_grad, last_grad = embedded.grad, first.grad, last.grad
    assert embedded_grad is not None and first_grad is not None and last_grad is not None
    result = {
        GROWTH_ACTIVATION: exponent(first, last),
        GROWTH_GRADIENT: exponent(first_grad, last_grad),
        GROWTH_ACTIVATION_FROM_EMBEDDING: exponent(embedded, last),
        GROWTH_GRADIENT_FROM_EMBEDDING: exponent(embedded_grad, last_grad),
    }
    model.zero_grad(set_to_none=True)
    return result


def is_finite(*values: float) -> bool:
    return all(math.isfinite(v) for v in values)


def global_norm(tensors: Iterable[Tensor]) -> float:
    norms = [t.float().norm() for t in tensors]
    return torch.stack(norms).norm().item() if norms else 0.0
