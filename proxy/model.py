"""A decoder-only Transformer with the switches the stability literature turns.

Read top to bottom: norms -> rotary embeddings -> attention -> MLP -> block -> GPT -> init.

The defaults follow Wortsman et al. (2023): pre-norm, no biases, RoPE, a 4x GELU MLP, untied
embeddings, 1/sqrt(d_head) attention scale. Every deviation studied in the papers is a config
switch (proxy/config.py: ModelConfig):

- ``qk_norm``: off | layernorm | rmsnorm, per head on q and k before RoPE and the scores;
- ``norm_position``: pre (x + Attn(Norm(x))) | reordered (OLMo 2: x + Norm(Attn(x)));
- ``init``: normal (0.02, truncated) | scaled (OLMo-0424) | fan_in (Wortsman et al.);
- ``attention``: auto | naive (exact statistics) | sdpa | triton (flash kernel that returns max
  logits); ``auto`` is triton on CUDA and naive on a CPU (:func:`attention_backend`);
- ``loss_impl``: torch | triton | fused_linear.

The forward pass returns the losses and, when asked, the instability statistics that come out
of attention and the loss as by-products (the max attention logit per layer and head; the output
logit mean / max and the log-sum-exp log Z), so diagnostics cost no extra pass; and the mechanism
of output-logit divergence (Wortsman et al. 3.1.2): the norm of the LM head's mean row, and the
mean logit of never / rarely / frequently seen tokens (:meth:`GPT.set_token_classes`).
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from proxy import kernels
from proxy.config import Attention, ConfigError, Init, LossImpl, MLPKind, ModelConfig, Norm, NormPosition, QKNorm


# --------------------------------------------------------------------------------------------
# Norms (no biases anywhere in the model)
# --------------------------------------------------------------------------------------------
def make_norm(kind: Norm | QKNorm, dim: int, eps: float) -> nn.Module:
    # the config enums are str subclasses, so plain strings work too
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps, bias=False)
    if kind == "rmsnorm":
        return nn.RMSNorm(dim, eps=eps)
    raise ConfigError(f"unknown norm {kind!r}")


# --------------------------------------------------------------------------------------------
# Rotary position embeddings
# --------------------------------------------------------------------------------------------
class Rotary(nn.Module):
    """Rotates pairs (x[i], x[i + d/2]) of each head by position-dependent angles."""

    cos: Tensor  # buffers, registered in __init__
    sin: Tensor

    def __init__(self, head_dim: int, max_seq_len: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
        # not saved in checkpoints: they are a function of the config
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:  # x: (batch, heads, seq, head_dim)
        seq_len = x.shape[-2]
        cos, sin = self.cos[:seq_len].to(x.dtype), self.sin[:seq_len].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


# --------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def max_attention_logit(q: Tensor, k: Tensor, scale: float, block: int = 256) -> Tensor:
    """Max causal attention logit per (batch, head), in query blocks so no full score matrix.

    Used on logging steps by the sdpa path, whose kernel does not expose the statistic.
    """
    seq_len = q.shape[-2]
    best = torch.full(q.shape[:2], float("-inf"), device=q.device, dtype=torch.float32)
    positions = torch.arange(seq_len, device=q.device)
    for start in range(0, seq_len, block):
        stop = min(start + block, seq_len)
        scores = torch.matmul(q[..., start:stop, :].float(), k[..., :stop, :].float().transpose(-1, -2))
        causal = positions[:stop][None, :] <= positions[start:stop][:, None]
        scores = scores.masked_fill(~causal, float("-inf")) * scale
        best = torch.maximum(best, scores.amax(dim=(-2, -1)))
    return best


MAX_TRITON_HEAD_DIM = 128  # proxy/kernels/flash_attention.py


def attention_backend(choice: Attention, device_type: str, head_dim: int) -> Attention:
    """What ``model.attention`` runs as on a device: ``auto`` is the fast path that still reports
    the max logit every step where there is one (the Triton kernel on CUDA; SDPA, with the
    statistic on logging steps, where the kernel cannot run), and the exact reference elsewhere."""
    choice = Attention(choice)
    if choice != Attention.auto:
        return choice
    if device_type != "cuda":
        return Attention.naive
    triton_ok = importlib.util.find_spec("triton") is not None and head_dim <= MAX_TRITON_HEAD_DIM
    return Attention.triton if triton_ok else Attention.sdpa


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.backend = cfg.attention
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.q_norm: Optional[nn.Module] = None
        self.k_norm: Optional[nn.Module] = None
        if cfg.qk_norm != QKNorm.off:  # per head: normalises each head's d_head vector
            self.q_norm = make_norm(cfg.qk_norm, self.head_dim, cfg.norm_eps)
            self.k_norm = make_norm(cfg.qk_norm, self.head_dim, cfg.norm_eps)

    def forward(self, x: Tensor, rotary: Rotary, collect_stats: bool) -> tuple[Tensor, Optional[Tensor]]:
        q, k, v = rearrange(self.qkv(x), "b t (three h d) -> three b h t d", three=3, h=self.n_heads)
        if self.q_norm is not None and self.k_norm is not None:  # both set, or neither
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rotary(q), rotary(k)

        max_logit = None
        backend = attention_backend(self.backend, q.device.type, self.head_dim)
        if backend == Attention.sdpa:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
            if collect_stats:
                max_logit = max_attention_logit(q, k, self.scale)
        else:  # naive (reference) and triton both return the max logit with the output
            out, max_logit = kernels.attention(
                q, k, v, causal=True, scale=self.scale, use_triton=backend == Attention.triton
            )
        out = rearrange(out, "b h t d -> b t (h d)")
        return self.proj(out), max_logit


# --------------------------------------------------------------------------------------------
# MLP
# --------------------------------------------------------------------------------------------
def mlp_width(cfg: ModelConfig) -> int:
    if cfg.d_ff is not None:
        return cfg.d_ff
    if cfg.mlp == MLPKind.swiglu:  # keep the parameter count of a 4x GELU MLP
        return 16 * math.ceil(8 * cfg.d_model / 3 / 16)
    return 4 * cfg.d_model


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind = cfg.mlp
        self.d_ff = mlp_width(cfg)
        n_in = 2 * self.d_ff if self.kind == MLPKind.swiglu else self.d_ff
        self.fc_in = nn.Linear(cfg.d_model, n_in, bias=False)
        self.fc_out = nn.Linear(self.d_ff, cfg.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc_in(x)
        if self.kind == MLPKind.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h)
        return self.fc_out(h)


# --------------------------------------------------------------------------------------------
# Block
# --------------------------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.reordered = cfg.norm_position == NormPosition.reordered
        self.attn_norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.mlp_norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, rotary: Rotary, collect_stats: bool) -> tuple[Tensor, Optional[Tensor]]:
        if self.reordered:  # OLMo 2: h = x + Norm(Attn(x)); out = h + Norm(MLP(h))
            a, max_logit = self.attn(x, rotary, collect_stats)
            h = x + self.attn_norm(a)
            return h + self.mlp_norm(self.mlp(h)), max_logit
        a, max_logit = self.attn(self.attn_norm(x), rotary, collect_stats)
        h = x + a
        return h + self.mlp(self.mlp_norm(h)), max_logit


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------
@dataclass
class ModelOutput:
    loss: Optional[Tensor] = None  # what backward() is called on: ce_loss + z_loss
    ce_loss: Optional[Tensor] = None
    z_loss: Optional[Tensor] = None
    logits: Optional[Tensor] = None  # None on the fused-linear path (never materialised)
    # per layer, (batch, heads) fp32, detached; filled when collect_stats (or always on naive/triton)
    attn_max_logits: list[Optional[Tensor]] = field(default_factory=list)
    # logit_mean, logit_max, lse_mean over the non-ignored positions (detached scalars)
    output_stats: dict[str, Tensor] = field(default_factory=dict)


TOKEN_CLASSES = ("never", "rare", "frequent")  # codes 0, 1, 2 of set_token_classes


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.token_classes: list[str] = []  # the classes set_token_classes gave members
        self.embed = nn.Embedding(vocab_size, cfg.d_model)
        self.rotary = Rotary(cfg.d_model // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.final_norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        init_weights(self, cfg)

    def forward(
        self,
        idx: Tensor,
        labels: Optional[Tensor] = None,
        *,
        z_loss: float = 0.0,
        ignore_index: int = -100,
        collect_stats: bool = False,
    ) -> ModelOutput:
        if idx.shape[1] > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {idx.shape[1]} exceeds model.max_seq_len={self.cfg.max_seq_len}")
        x = self.embed(idx)
        out = ModelOutput()
        for block in self.blocks:
            x, max_logit = block(x, self.rotary, collect_stats)
            out.attn_max_logits.append(max_logit)
        x = self.final_norm(x)
        row_stats = self._output_row_stats(x) if collect_stats else {}

        if labels is None:
            out.logits = self.lm_head(x)
            return out
        flat_labels = rearrange(labels, "b t -> (b t)")
        if self.cfg.loss_impl == LossImpl.fused_linear:
            ce, z, stats = kernels.linear_cross_entropy(
                rearrange(x, "b t d -> (b t) d"),
                self.lm_head.weight,
                flat_labels,
                z_loss=z_loss,
                ignore_index=ignore_index,
                use_triton=True,
            )
        else:
            out.logits = self.lm_head(x)
            ce, z, stats = kernels.cross_entropy(
                rearrange(out.logits, "b t v -> (b t) v"),
                flat_labels,
                z_loss=z_loss,
                ignore_index=ignore_index,
                use_triton=self.cfg.loss_impl == LossImpl.triton,
                stats=collect_stats,
            )
        out.loss, out.ce_loss, out.z_loss, out.output_stats = ce + z, ce, z, {**stats, **row_stats}
        return out

    # -- the LM head's rows: where output-logit divergence lives -------------------------------
    def set_token_classes(self, codes: Sequence[int]) -> None:
        """Mark each token id never (0), rare (1) or frequent (2) in the training data; the
        statistics then report each class's mean logit (output/logit_mean_<class>)."""
        code_of = torch.as_tensor(codes, dtype=torch.long).reshape(-1)
        if code_of.numel() < self.vocab_size:  # ids beyond the data's vocabulary never occur
            code_of = torch.cat([code_of, code_of.new_zeros(self.vocab_size - code_of.numel())])
        device = self.lm_head.weight.device
        self.token_classes = []
        for code, name in enumerate(TOKEN_CLASSES):
            ids = torch.nonzero(code_of[: self.vocab_size] == code).reshape(-1).to(device)
            if ids.numel():
                self.register_buffer(f"token_class_{name}", ids, persistent=False)
                self.token_classes.append(name)

    @torch.no_grad()
    def _output_row_stats(self, hidden: Tensor) -> dict[str, Tensor]:
        """||mean row of the LM head|| (a shared row shifts every logit alike), and the mean logit
        of each token class over the batch: mean_t(h_t) . w_i is token i's mean logit."""
        weight = self.lm_head.weight.float()
        stats = {"mean_row_norm": weight.mean(dim=0).norm()}
        if self.token_classes:
            mean_logits = hidden.float().mean(dim=(0, 1)) @ weight.t()  # (vocab,)
            for name in self.token_classes:
                stats[f"logit_mean_{name}"] = mean_logits[getattr(self, f"token_class_{name}")].mean()
        return stats

    # -- sizes -------------------------------------------------------------------------------
    def n_params(self, non_embedding: bool = False) -> int:
        params = {id(p): p for p in self.parameters()}  # tied weights count once
        if non_embedding:
            params.pop(id(self.embed.weight), None)
            params.pop(id(self.lm_head.weight), None)
        return sum(p.numel() for p in params.values())

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6N for the matmuls plus the attention scores (PaLM appendix B)."""
        n = self.n_params(non_embedding=True) + self.lm_head.weight.numel()
        attn = 12 * self.cfg.n_layers * self.cfg.d_model * seq_len / 2  # causal: half the scores
        return 6 * n + attn


# --------------------------------------------------------------------------------------------
# Initialization
# --------------------------------------------------------------------------------------------
def _trunc_normal_(w: Tensor, std: float) -> None:
    nn.init.trunc_normal_(w, mean=0.0, std=std, a=-3 * std, b=3 * std)


def init_std_for(name: str, shape: tuple[int, ...], cfg: ModelConfig) -> float:
    """The standard deviation each init scheme gives the parameter ``name`` (before ``init_gain``).

    normal  (OLMo 2):     every weight N(0, init_std=0.02), truncated at 3 sigma.
    scaled  (OLMo-0424):  embeddings and input projections (qkv, fc_in, lm_head) 1/sqrt(d_model);
                          attention out 1/sqrt(2 d_model (l+1)); MLP out 1/sqrt(2 d_ff (l+1)).
    fan_in  (Wortsman):   linear weights 1/sqrt(fan_in); embeddings 1/sqrt(d_model).
    """
    d = cfg.d_model
    if cfg.init == Init.normal:
        return cfg.init_std if cfg.init_std is not None else 0.02
    if cfg.init == Init.fan_in:
        return 1.0 / math.sqrt(d if name == "embed.weight" else shape[1])
    # scaled
    if name.startswith("blocks."):
        layer = int(name.split(".")[1])
        if name.endswith("attn.proj.weight"):
            return 1.0 / math.sqrt(2 * d * (layer + 1))
        if name.endswith("mlp.fc_out.weight"):
            return 1.0 / math.sqrt(2 * shape[1] * (layer + 1))
    return 1.0 / math.sqrt(d)


def init_weights(model: GPT, cfg: ModelConfig) -> None:
    gain = cfg.init_gain
    for name, p in model.named_parameters():
        if p.ndim == 1:  # norm gains start at one
            nn.init.ones_(p)
        else:
            _trunc_normal_(p.data, gain * init_std_for(name, tuple(p.shape), cfg))


def build_model(cfg: ModelConfig, vocab_size: int) -> GPT:
    if cfg.vocab_size is not None and cfg.vocab_size < vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.vocab_size} is smaller than the data's vocabulary ({vocab_size})")
    return GPT(cfg, cfg.vocab_size or vocab_size)
