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
from typing import Iterable, Optional

import numpy as np
import torch
from torch import Tensor, nn

from proxy.model import GPT, TOKEN_CLASSES, ModelOutput
from proxy.records import (ATTN_MAX_LOGIT, GRAD_RMS, GROWTH_ACTIVATION, GROWTH_ACTIVATION_FROM_EMBEDDING,
                           GROWTH_GRADIENT, GROWTH_GRADIENT_FROM_EMBEDDING, MFU, OUTPUT, PARAM_NORM, TOKENS_PER_S,
                           UPDATE_RMS, attn_layer_key)


# --------------------------------------------------------------------------------------------
# By-products of the forward pass
# --------------------------------------------------------------------------------------------
def forward_stats(out: ModelOutput) -> dict[str, float]:
    """Max attention logit per layer (and over layers) and the output-logit statistics."""
    stats: dict[str, float] = {}
    per_layer = [m for m in out.attn_max_logits if m is not None]
    if per_layer:
        # one device->host copy for all layers
        maxima = torch.stack([m.float().amax() for m in per_layer]).tolist()
        for i, value in enumerate(maxima):
            stats[attn_layer_key(i)] = value
        stats[ATTN_MAX_LOGIT] = max(maxima)
    for name, value in out.output_stats.items():
        value = float(value)
        if not math.isnan(value):  # NaN: no label counted in this batch (e.g. all masked), nothing to report
            stats[OUTPUT + name] = value
    return stats


# --------------------------------------------------------------------------------------------
# Per-parameter measures (logging steps only)
# --------------------------------------------------------------------------------------------
def _rms(t: Tensor) -> Tensor:
    return t.float().pow(2).mean().sqrt()


def grad_stats(model: nn.Module) -> dict[str, float]:
    """RMS of each parameter's gradient, before clipping (what Adam's epsilon is compared with)."""
    names, values = [], []
    for name, p in model.named_parameters():
        if p.grad is not None:
            names.append(name)
            values.append(_rms(p.grad))
    if not values:
        return {}
    return {GRAD_RMS + n: v for n, v in zip(names, torch.stack(values).tolist())}


class UpdateTracker:
    """Measures each parameter's update RMS divided by its learning rate.

    ``before()`` copies the parameters; ``after()`` compares. The ratio is the size of the Adam
    update direction itself (about 1 for a healthy Adam step, much smaller when the gradient RMS
    falls toward epsilon; Wortsman et al. section 3.4). Parameter norms come along for free.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.model = model
        self.lr_of: dict[int, float] = {}
        self.optimizer = optimizer
        self._before: Optional[dict[str, Tensor]] = None

    def before(self) -> None:
        self._before = {n: p.detach().clone() for n, p in self.model.named_parameters()}

    def after(self) -> dict[str, float]:
        if self._before is None:
            return {}
        lr_of = {id(p): g["lr"] for g in self.optimizer.param_groups for p in g["params"]}
        names, updates, norms = [], [], []
        for name, p in self.model.named_parameters():
            lr = lr_of.get(id(p), 0.0)
            names.append(name)
            delta = p.detach() - self._before[name]
            updates.append(_rms(delta) / lr if lr > 0 else torch.zeros((), device=p.device))
            norms.append(p.detach().float().norm())
        self._before = None
        update_values = torch.stack(updates).tolist()
        norm_values = torch.stack(norms).tolist()
        stats = {UPDATE_RMS + n: v for n, v in zip(names, update_values)}
        stats.update({PARAM_NORM + n: v for n, v in zip(names, norm_values)})
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
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def peak_flops(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


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

    result = {GROWTH_ACTIVATION: exponent(first, last), GROWTH_GRADIENT: exponent(first.grad, last.grad),
              GROWTH_ACTIVATION_FROM_EMBEDDING: exponent(embedded, last),
              GROWTH_GRADIENT_FROM_EMBEDDING: exponent(embedded.grad, last.grad)}
    model.zero_grad(set_to_none=True)
    return result


def is_finite(*values: float) -> bool:
    return all(math.isfinite(v) for v in values)


def global_norm(tensors: Iterable[Tensor]) -> float:
    norms = [t.float().norm() for t in tensors]
    return torch.stack(norms).norm().item() if norms else 0.0
