"""Curvature at a training state: the sharpness and Adam's preconditioned sharpness.

Edge of stability (Cohen et al. 2021, 2022). Gradient descent with step size eta is stable on a
quadratic only while the top Hessian eigenvalue (the *sharpness*) stays below 2/eta, and full-batch
GD drives the sharpness up to that bound and hovers there. Adam is preconditioned GD with momentum::

    theta <- theta - eta * P^-1 m_hat,     P = diag(sqrt(v_hat) + eps) / s

(``s`` the parameter group's LR scale, 1 without muP), and the same argument applied to P^-1 H,
with heavy-ball momentum beta1, gives the bound (2 + 2 beta1) / ((1 - beta1) eta) = 38/eta at
beta1 = 0.9 on the *preconditioned sharpness* lambda_max(P^-1 H). (Writing P with the LR folded in,
P' = P / eta, the same statement reads lambda_max(P'^-1 H) < 38.) A spike that comes with a
sharpness far past these bounds is an optimizer instability; one well below them is not.

Both eigenvalues come from Hessian-vector products by double backward (never the Hessian
itself) and Lanczos with full reorthogonalisation: its top Ritz value converges to the largest
(algebraic) eigenvalue in a few tens of products, and is exact once the iterations reach the
dimension. P^-1 H is not symmetric, so we run Lanczos on the similar symmetric matrix
P^-1/2 H P^-1/2, which has the same eigenvalues.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

MatVec = Callable[[Tensor], Tensor]  # flat float64 vector -> flat float64 vector


def stability_thresholds(lr: float, beta1: float = 0.9) -> dict[str, float]:
    """The edge-of-stability bounds: ``gd`` = 2/lr (sharpness), ``adam`` = (2+2b1)/((1-b1) lr)
    (preconditioned sharpness; 38/lr at beta1 = 0.9)."""
    if lr <= 0 or not 0 <= beta1 < 1:
        raise ValueError(f"stability_thresholds: need lr > 0 and 0 <= beta1 < 1, got {lr}, {beta1}")
    return {"gd": 2.0 / lr, "adam": (2.0 + 2.0 * beta1) / ((1.0 - beta1) * lr)}


# --------------------------------------------------------------------------------------------
# Hessian-vector products
# --------------------------------------------------------------------------------------------
def _flatten(tensors: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1).to(torch.float64) for t in tensors])


def _unflatten(flat: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    out, offset = [], 0
    for t in like:
        n = t.numel()
        out.append(flat[offset : offset + n].view_as(t).to(t.dtype))
        offset += n
    return out


def hessian_matvec(loss: Tensor, params: Sequence[Tensor]) -> MatVec:
    """v -> H v for the Hessian of ``loss`` with respect to ``params``, on flat vectors.

    The gradient graph is built once (``create_graph``) and differentiated again per product;
    parameters the loss does not depend on contribute zero rows.
    """
    params = list(params)
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    pairs = [(g, p) for g, p in zip(grads, params) if g is not None]
    used = {id(p) for _, p in pairs}

    def matvec(v: Tensor) -> Tensor:
        vs = _unflatten(v, params)
        hv = torch.autograd.grad(
            [g for g, _ in pairs],
            [p for _, p in pairs],
            grad_outputs=[vi for vi, p in zip(vs, params) if id(p) in used],
            retain_graph=True,
            allow_unused=True,
        )
        it = iter(hv)
        full = []
        for p in params:
            h = next(it) if id(p) in used else None
            full.append(torch.zeros_like(p) if h is None else h)
        return _flatten(full)

    return matvec


def preconditioned(matvec: MatVec, precond: Tensor) -> MatVec:
    """v -> P^-1/2 H P^-1/2 v for a positive diagonal ``precond`` (flat): the symmetric form of
    P^-1 H, with the same eigenvalues."""
    scale = precond.to(torch.float64).rsqrt()
    return lambda v: scale * matvec(scale * v)


# --------------------------------------------------------------------------------------------
# Lanczos
# --------------------------------------------------------------------------------------------
@dataclass
class Spectrum:
    top: float  # the largest Ritz value: the estimate of lambda_max
    bottom: float  # the smallest Ritz value (a negative one means a non-convex direction)
    ritz: list[float]  # all Ritz values, ascending
    iterations: int


def lanczos(
    matvec: MatVec, dim: int, iterations: int = 20, seed: int = 0, device: torch.device | str = "cpu"
) -> Spectrum:
    """Extreme eigenvalues of a symmetric operator from ``iterations`` products (float64).

    Full reorthogonalisation keeps the Krylov basis orthogonal, so no ghost copies of the top
    eigenvalue appear; the basis costs ``iterations * dim`` numbers. Stops early when the Krylov
    space is exhausted (then the Ritz values are exact eigenvalues).
    """
    if dim < 1 or iterations < 1:
        raise ValueError(f"lanczos: need dim >= 1 and iterations >= 1, got {dim}, {iterations}")
    steps = min(iterations, dim)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(dim, generator=generator, dtype=torch.float64).to(device)
    q /= q.norm()
    basis, alphas, betas = [q], [], []
    for k in range(steps):
        w = matvec(basis[k])
        alpha = torch.dot(w, basis[k])
        alphas.append(alpha)
        q_mat = torch.stack(basis)
        for _ in range(2):  # twice is enough (Kahan's "twice is enough")
            w = w - q_mat.T @ (q_mat @ w)
        beta = w.norm()
        if k == steps - 1 or beta <= 1e-10 * max(1.0, abs(float(alpha))):
            break
        betas.append(beta)
        basis.append(w / beta)
    n = len(alphas)
    t = torch.diag(torch.stack(alphas))
    if n > 1:
        off = torch.stack(betas[: n - 1])
        t = t + torch.diag(off, 1) + torch.diag(off, -1)
    ritz = torch.linalg.eigvalsh(t.cpu()).tolist()
    return Spectrum(top=ritz[-1], bottom=ritz[0], ritz=ritz, iterations=n)


# --------------------------------------------------------------------------------------------
# At a model state
# --------------------------------------------------------------------------------------------
@dataclass
class Sharpness:
    sharpness: float  # lambda_max(H)
    preconditioned: float  # lambda_max(P^-1 H), P = diag(sqrt(v_hat) + eps) / lr_scale
    lr: float  # the base LR eta of the step
    gd_threshold: float  # 2 / eta
    adam_threshold: float  # (2 + 2 beta1) / ((1 - beta1) eta)
    iterations: int

    @property
    def gd_ratio(self) -> float:
        return self.sharpness / self.gd_threshold

    @property
    def adam_ratio(self) -> float:
        return self.preconditioned / self.adam_threshold


def sharpness(
    loss: Tensor,
    params: Sequence[Tensor],
    precond: Tensor,
    lr: float,
    beta1: float,
    iterations: int = 20,
    seed: int = 0,
) -> Sharpness:
    """Sharpness and preconditioned sharpness of ``loss`` at ``params``, with their thresholds.

    ``precond`` is P flattened in the order of ``params`` (see :func:`adam_preconditioner`).
    """
    params = list(params)
    dim = sum(p.numel() for p in params)
    device = params[0].device
    hvp = hessian_matvec(loss, params)
    plain = lanczos(hvp, dim, iterations, seed, device)
    adam = lanczos(preconditioned(hvp, precond.to(device)), dim, iterations, seed, device)
    bounds = stability_thresholds(lr, beta1)
    return Sharpness(plain.top, adam.top, lr, bounds["gd"], bounds["adam"], max(plain.iterations, adam.iterations))


def adam_preconditioner(
    optimizer: torch.optim.Optimizer, params: Sequence[Tensor], mask_unseen: bool = False
) -> Tensor:
    """P = (sqrt(v_hat) + eps) / lr_scale per coordinate, flat in the order of ``params``.

    v_hat is the bias-corrected second moment held by the optimizer; lr_scale the group's muP
    factor (1.0 otherwise), so that eta * P^-1 is each coordinate's actual step. A parameter
    without optimizer state yet gets P = eps (Adam's first step is sign-like).

    ``mask_unseen``: a coordinate whose v is exactly 0 (it has never had a gradient: the embedding
    row of a token the run has not read) gets P = inf, i.e. it is left out of P^-1 H. Adam does
    not move such a coordinate, but its P = eps would let any curvature there (a held-out batch
    may hold the token) dominate lambda_max(P^-1 H) by a factor ~1/eps.
    """
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    pieces = []
    for p in params:
        group = group_of[id(p)]
        eps, (_, beta2) = group["eps"], group["betas"]
        state = optimizer.state.get(p, {})
        if "exp_avg_sq" in state:
            v_hat = state["exp_avg_sq"].double() / (1 - beta2 ** int(state["step"]))
            denom = v_hat.sqrt() + eps
            if mask_unseen:
                denom = torch.where(v_hat == 0, torch.full_like(denom, math.inf), denom)
        else:
            denom = torch.full(p.shape, eps, dtype=torch.float64, device=p.device)
        pieces.append((denom / group.get("lr_scale", 1.0)).reshape(-1))
    return torch.cat(pieces)


__all__ = [
    "Sharpness",
    "Spectrum",
    "adam_preconditioner",
    "hessian_matvec",
    "lanczos",
    "preconditioned",
    "sharpness",
    "stability_thresholds",
]
