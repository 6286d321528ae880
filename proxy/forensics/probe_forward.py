"""A forward pass on probe tokens through each checkpoint of a series, streamed layer by layer
(``proxy-inspect --forward``).

series.py bounds the attention logit from the weights alone; the bound is loose. A forward pass on
tokens measures what the model does: per layer, the largest |attention logit| the probe meets (its
growth precedes attention-entropy collapse and the loss spike: Dehghani et al. 2023, Wortsman et al.
2023), per head, and the RMS of the residual stream after the layer; at the output, log Z (the
log-sum-exp of the logits, which z-loss holds near 0 and whose drift is output-logit divergence),
the mean largest logit, and the probe's next-token loss (meaningful when the probe is real text).

Memory is one layer's weights plus the probe's activations: a layer's tensors are read
(``Checkpoint.read``, float32), the layer runs on the whole probe, and they are dropped before the
next layer is read, so a 65B checkpoint (K2) runs on a 32 GB laptop. The math is our own, held to
transformers' LlamaForCausalLM and Olmo2ForCausalLM by golden numbers in the tests:

- Hugging Face LLaMA (K2, Amber, LLaMA without rope scaling): pre-norm RMSNorm, RoPE in the
  rotate-half convention, grouped-query attention, SwiGLU MLP, tied or untied LM head;
- OLMo 2 in Hugging Face's layout: an RMSNorm over the whole projected q and k before RoPE, each
  sublayer's output normed before the residual add, no input norm;
- a proxy checkpoint or kit state: proxy's own model (lab models are small), built from the run's
  config; the attention logits are read off the q and k its rotary embedding returns.

Anything else a config or a tensor asks for (rope scaling, biases, another activation or
architecture) is refused in one line naming the file, never computed approximately.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from proxy.config import Attention, Config, ConfigError, LossImpl, stored_config
from proxy.forensics.series import Checkpoint, SeriesError, _first_line, _regular_file, fingerprint
from proxy.model import build_model
from proxy.records import StoredFileError, UnsafePathError, atomic_write_text, read_json, read_untrusted

PROBE_SHAPE = (4, 256)  # sequences x tokens, cut to the model's context
QUERY_BLOCK = 128  # attention scores for this many query rows at a time: (batch, heads, rows, seq)
OUTPUT_BLOCK = 256  # output logits for this many positions at a time: (positions, vocab)
IDS_MAX_BYTES = 64 << 20
TEXT_MAX_BYTES = 16 << 20
TOKENIZER_MAX_BYTES = 64 << 20
FORWARD_VERSION = 1  # in the cache key: a change of what is computed drops cached results
SUPPORTED = {"LlamaForCausalLM": "llama", "Olmo2ForCausalLM": "olmo2"}
EMBEDDING, FINAL_NORM, LM_HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"
ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
LAYER_TENSORS = {  # per layer, the tensors (``model.layers.N.<name>.weight``) each layout runs on
    "llama": (*ATTENTION, *MLP, "input_layernorm", "post_attention_layernorm"),
    "olmo2": (*ATTENTION, "self_attn.q_norm", "self_attn.k_norm", *MLP, "post_attention_layernorm",
              "post_feedforward_layernorm"),
}  # fmt: skip


# --------------------------------------------------------------------------------------------
# What comes out
# --------------------------------------------------------------------------------------------
@dataclass
class LayerStats:
    max_abs_logit: float  # max |q.k| / sqrt(head_dim) over causal positions, heads, batch
    max_logit: float  # the signed max: what training logs as attn/max_logit/layer_N
    head_max_abs_logit: list[float]
    residual_rms: float  # RMS of the residual stream after the layer


@dataclass
class ProbeResult:
    """One checkpoint's forward on the probe: per layer (lists indexed by layer), then the output."""

    label: str
    source: str  # what the tokens are: "random ids (seed 0)", "ids from FILE", "text from FILE"
    shape: list[int]  # [sequences, tokens]
    attn_max_abs_logit: list[float]
    attn_max_logit: list[float]
    attn_head_max_abs_logit: list[list[float]]
    residual_rms: list[float]
    log_z_mean: float  # log Z = logsumexp of the output logits, per position
    log_z_max: float
    output_max_logit_mean: float  # the largest output logit, averaged over positions
    loss: float  # cross-entropy of each position's next token (nan with one token per sequence)
    logits: Optional[Tensor] = field(default=None, repr=False, compare=False)  # keep_logits only

    def as_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "logits"}


@dataclass(frozen=True)
class Probe:
    tokens: Tensor  # (sequences, tokens) int64
    source: str


# --------------------------------------------------------------------------------------------
# The math: norms, rotary embeddings, attention, MLP (Hugging Face's conventions)
# --------------------------------------------------------------------------------------------
def rms_norm(x: Tensor, gain: Tensor, eps: float) -> Tensor:
    return gain * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rope_tables(head_dim: int, seq_len: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos and sin, (seq, head_dim), computed in float32 as transformers does: each frequency
    appears twice, once for each half of the head (rotate-half, not interleaved pairs)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = torch.arange(seq_len).float()[:, None] * inv_freq[None, :]
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos(), angles.sin()


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x2, x1); x: (batch, heads, seq, head_dim)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def causal_attention(
    q: Tensor, k: Tensor, v: Optional[Tensor], scale: float
) -> tuple[Optional[Tensor], Tensor, Tensor]:
    """Softmax attention of each position over itself and the earlier ones, in blocks of query rows
    so no (seq x seq) matrix of all heads is held, and per head the largest and the smallest logit
    q.k * scale over those positions. q, k, v: (batch, heads, seq, head_dim); v None: logits only."""
    _, heads, seq_len, _ = q.shape
    out = torch.empty_like(q) if v is not None else None
    highest = torch.full((heads,), -math.inf)
    lowest = torch.full((heads,), math.inf)
    for start in range(0, seq_len, QUERY_BLOCK):
        stop = min(start + QUERY_BLOCK, seq_len)
        scores = torch.matmul(q[:, :, start:stop], k[:, :, :stop].transpose(-1, -2)) * scale
        future = torch.arange(stop)[None, :] > torch.arange(start, stop)[:, None]  # key after query
        highest = torch.maximum(highest, scores.masked_fill(future, -math.inf).amax(dim=(0, 2, 3)))
        lowest = torch.minimum(lowest, scores.masked_fill(future, math.inf).amin(dim=(0, 2, 3)))
        if out is not None and v is not None:
            out[:, :, start:stop] = torch.softmax(scores.masked_fill(future, -math.inf), dim=-1) @ v[:, :, :stop]
    return out, highest, lowest


def layer_stats(highest: Tensor, lowest: Tensor, residual: Tensor) -> LayerStats:
    per_head = torch.maximum(highest, -lowest)
    return LayerStats(
        float(per_head.max()), float(highest.max()), [float(x) for x in per_head], float(residual.pow(2).mean().sqrt())
    )


# --------------------------------------------------------------------------------------------
# Hugging Face layouts: what config.json and the tensors say, checked once
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    kind: str  # llama | olmo2
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    eps: float
    rope_theta: float
    tied: bool  # the LM head is the embedding
    context: Optional[int]  # max_position_embeddings


def hf_config(ckpt: Checkpoint) -> dict[str, Any]:
    """config.json of a Hugging Face checkpoint (as open_hf read it, or read now)."""
    if isinstance(ckpt.config, dict):
        return ckpt.config
    path = _regular_file(ckpt.path / "config.json", ckpt.path)
    try:
        return read_json(path, limit=1 << 20)
    except (StoredFileError, UnsafePathError) as exc:
        raise SeriesError(str(exc)) from None


def _positive(config: dict[str, Any], key: str, default: float, where: Path) -> float:
    value = config.get(key, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise SeriesError(f"{where}: {key}={value!r} must be a positive number")
    return float(value)


def hf_layout(ckpt: Checkpoint, config: dict[str, Any]) -> Layout:
    """The layout of a Hugging Face checkpoint, from its tensor names and config.json; SeriesError
    (one line naming the file) for anything the forward does not compute exactly as transformers."""
    where = ckpt.path / "config.json"

    def refuse(what: str) -> SeriesError:
        return SeriesError(f"{where}: {what}: not supported by the probe forward (it would be silently wrong)")

    names = set(ckpt.shapes)
    if any(n.startswith("model.transformer.") for n in names):
        raise refuse("OLMo's own layout (hf_olmo; convert it to Hugging Face's Olmo2ForCausalLM)")
    biases = sorted(n for n in names if n.endswith(".bias"))
    if biases:
        raise SeriesError(f"{ckpt.files[biases[0]]}: {biases[0]}: bias tensors are not supported by the probe forward")
    kind = "olmo2" if "model.layers.0.post_feedforward_layernorm.weight" in names else "llama"
    architectures = config.get("architectures")
    if architectures is not None:
        if not isinstance(architectures, list) or len(architectures) != 1 or architectures[0] not in SUPPORTED:
            raise refuse(f"architectures={architectures!r} (the forward runs {' and '.join(SUPPORTED)})")
        if SUPPORTED[architectures[0]] != kind:
            raise refuse(f"architectures={architectures!r} with the tensors of the {kind} layout")
    if config.get("hidden_act", "silu") != "silu":
        raise refuse(f"hidden_act={config.get('hidden_act')!r} (SwiGLU takes silu)")
    for key in ("attention_bias", "mlp_bias", "rope_scaling"):
        if config.get(key) not in (None, False):
            raise refuse(f"{key}={config[key]!r}")
    if config.get("partial_rotary_factor", 1.0) not in (None, 1, 1.0):
        raise refuse(f"partial_rotary_factor={config['partial_rotary_factor']!r}")
    theta = _positive(config, "rope_theta", 10000.0, where)
    rope = config.get("rope_parameters")  # transformers >= 5 writes rope_theta here
    if rope is not None:
        if not isinstance(rope, dict) or rope.get("rope_type", "default") != "default":
            raise refuse(f"rope_parameters={rope!r} (only the default rope)")
        theta = _positive(rope, "rope_theta", theta, where)
    eps = _positive(config, "rms_norm_eps", 1e-5 if kind == "olmo2" else 1e-6, where)
    context = config.get("max_position_embeddings")
    s = ckpt.shape
    if s.head_dim % 2 or s.n_heads % s.n_kv_heads:
        raise refuse(f"head_dim={s.head_dim} with {s.n_heads} heads over {s.n_kv_heads} key/value heads")
    tied = config.get("tie_word_embeddings") is True or LM_HEAD not in names

    # every tensor the layout runs on, in the shape it needs; no tensor it would ignore
    q, kv, d_ff = (
        s.n_heads * s.head_dim,
        s.n_kv_heads * s.head_dim,
        ckpt.shapes.get("model.layers.0.mlp.up_proj.weight"),
    )
    d_ff_rows = d_ff[0] if d_ff else 0
    per_layer = {
        "self_attn.q_proj": (q, s.d_model),
        "self_attn.k_proj": (kv, s.d_model),
        "self_attn.v_proj": (kv, s.d_model),
        "self_attn.o_proj": (s.d_model, q),
        "self_attn.q_norm": (q,),
        "self_attn.k_norm": (kv,),
        "mlp.gate_proj": (d_ff_rows, s.d_model),
        "mlp.up_proj": (d_ff_rows, s.d_model),
        "mlp.down_proj": (s.d_model, d_ff_rows),
        "input_layernorm": (s.d_model,),
        "post_attention_layernorm": (s.d_model,),
        "post_feedforward_layernorm": (s.d_model,),
    }
    want = {EMBEDDING: (s.vocab, s.d_model), FINAL_NORM: (s.d_model,)}
    if LM_HEAD in names:
        want[LM_HEAD] = (s.vocab, s.d_model)
    for i in range(s.n_layers):
        want.update({f"model.layers.{i}.{t}.weight": per_layer[t] for t in LAYER_TENSORS[kind]})
    for name, shape in want.items():
        if name not in names:
            raise SeriesError(f"{ckpt.path}: no tensor {name} (the {kind} layout runs on it)")
        if ckpt.shapes[name] != shape:
            raise SeriesError(f"{ckpt.files[name]}: {name} has shape {list(ckpt.shapes[name])}, expected {list(shape)}")
    # old LLaMA checkpoints saved the rotary buffer; it is a function of the config
    extra = sorted(n for n in names - set(want) if not n.endswith("rotary_emb.inv_freq"))
    if extra:
        raise SeriesError(f"{ckpt.files[extra[0]]}: {extra[0]}: a tensor the {kind} layout does not use (refused)")
    return Layout(
        kind,
        s.n_layers,
        s.n_heads,
        s.n_kv_heads,
        s.head_dim,
        eps,
        theta,
        tied,
        context if isinstance(context, int) and not isinstance(context, bool) and context > 0 else None,
    )


# --------------------------------------------------------------------------------------------
# The streamed forward of a Hugging Face checkpoint
# --------------------------------------------------------------------------------------------
def self_attention(
    x: Tensor, w: dict[str, Tensor], lay: Layout, cos: Tensor, sin: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    q = x @ w["self_attn.q_proj"].T
    k = x @ w["self_attn.k_proj"].T
    v = x @ w["self_attn.v_proj"].T
    if lay.kind == "olmo2":  # QK-norm over all heads of q (and of k) at once, before RoPE
        q, k = rms_norm(q, w["self_attn.q_norm"], lay.eps), rms_norm(k, w["self_attn.k_norm"], lay.eps)
    q = rearrange(q, "b t (h d) -> b h t d", d=lay.head_dim)
    k = rearrange(k, "b t (h d) -> b h t d", d=lay.head_dim)
    v = rearrange(v, "b t (h d) -> b h t d", d=lay.head_dim)
    q, k = rotate(q, cos, sin), rotate(k, cos, sin)
    group = lay.n_heads // lay.n_kv_heads  # grouped-query attention: key/value head j serves heads j*g .. j*g+g-1
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    out, highest, lowest = causal_attention(q, k, v, lay.head_dim**-0.5)
    assert out is not None
    return rearrange(out, "b h t d -> b t (h d)") @ w["self_attn.o_proj"].T, highest, lowest


def swiglu(x: Tensor, w: dict[str, Tensor]) -> Tensor:
    return (F.silu(x @ w["mlp.gate_proj"].T) * (x @ w["mlp.up_proj"].T)) @ w["mlp.down_proj"].T


def block(x: Tensor, w: dict[str, Tensor], lay: Layout, cos: Tensor, sin: Tensor) -> tuple[Tensor, LayerStats]:
    if lay.kind == "olmo2":  # h = x + Norm(Attn(x)); out = h + Norm(MLP(h))
        a, highest, lowest = self_attention(x, w, lay, cos, sin)
        h = x + rms_norm(a, w["post_attention_layernorm"], lay.eps)
        out = h + rms_norm(swiglu(h, w), w["post_feedforward_layernorm"], lay.eps)
    else:  # LLaMA, pre-norm: h = x + Attn(Norm(x)); out = h + MLP(Norm(h))
        a, highest, lowest = self_attention(rms_norm(x, w["input_layernorm"], lay.eps), w, lay, cos, sin)
        h = x + a
        out = h + swiglu(rms_norm(h, w["post_attention_layernorm"], lay.eps), w)
    return out, layer_stats(highest, lowest, out)


def _hf_forward(
    ckpt: Checkpoint, lay: Layout, tokens: Tensor, progress: Callable[[int], None]
) -> tuple[list[LayerStats], Tensor, Tensor]:
    """Per layer stats, the final normed hidden state and the LM head, one layer's weights held at a time."""
    embedding = ckpt.read(EMBEDDING)
    x = embedding[tokens]  # (batch, seq, d_model)
    if not lay.tied:
        del embedding  # a 128k-token vocabulary is GBs: not held through the layers
    cos, sin = rope_tables(lay.head_dim, tokens.shape[1], lay.rope_theta)
    layers = []
    for i in range(lay.n_layers):
        w = {t: ckpt.read(f"model.layers.{i}.{t}.weight") for t in LAYER_TENSORS[lay.kind]}
        x, stats = block(x, w, lay, cos, sin)
        del w
        layers.append(stats)
        progress(1)
    x = rms_norm(x, ckpt.read(FINAL_NORM), lay.eps)
    return layers, x, embedding if lay.tied else ckpt.read(LM_HEAD)


# --------------------------------------------------------------------------------------------
# A proxy checkpoint: proxy's own model, whole
# --------------------------------------------------------------------------------------------
def proxy_config(ckpt: Checkpoint, config: Any) -> Config:
    if isinstance(config, Config):
        return config
    if config is None:
        raise SeriesError(f"{ckpt.path}: no run config to build the model from")
    try:
        return stored_config(config, ckpt.path)
    except ConfigError as exc:
        raise SeriesError(str(exc)) from None


def _proxy_forward(
    ckpt: Checkpoint, cfg: Config, tokens: Tensor, progress: Callable[[int], None]
) -> tuple[list[LayerStats], Tensor, Tensor]:
    """proxy's model with the checkpoint's weights, on the exact attention (naive) path; q and k are
    taken as its rotary embedding returns them (each block rotates q, then k), the residual stream
    as each block returns it."""
    model_cfg = dataclasses.replace(cfg.model, attention=Attention.naive, loss_impl=LossImpl.torch)
    assert ckpt.state is not None
    with torch.random.fork_rng(devices=[]):  # the init draws are overwritten: leave the caller's RNG as it was
        model = build_model(model_cfg, ckpt.shape.vocab)
    try:
        model.load_state_dict(ckpt.state)
    except RuntimeError as exc:
        raise SeriesError(
            f"{ckpt.path}: the weights do not fit the model its config builds ({_first_line(exc)})"
        ) from None
    model.eval()
    rotated: list[Tensor] = []
    residual: list[Tensor] = []
    final: list[Tensor] = []
    hooks = [
        model.rotary.register_forward_hook(lambda m, i, o: rotated.append(o)),
        model.final_norm.register_forward_hook(lambda m, i, o: final.append(o)),
        *(b.register_forward_hook(lambda m, i, o: residual.append(o[0])) for b in model.blocks),
    ]
    try:
        model(tokens)
    finally:
        for hook in hooks:
            hook.remove()
    scale = 1.0 / math.sqrt(model_cfg.d_model // model_cfg.n_heads)
    layers = []
    for i, x in enumerate(residual):
        _, highest, lowest = causal_attention(rotated[2 * i].float(), rotated[2 * i + 1].float(), None, scale)
        layers.append(layer_stats(highest, lowest, x.float()))
    progress(len(layers))
    return layers, final[0].float(), model.lm_head.weight.detach().float()


# --------------------------------------------------------------------------------------------
# The output: log Z, the largest logit, the loss
# --------------------------------------------------------------------------------------------
def output_stats(
    hidden: Tensor, head: Tensor, tokens: Tensor, keep_logits: bool
) -> tuple[dict[str, float], Optional[Tensor]]:
    """log Z per position (mean, max), the mean largest logit and the next-token loss, with the
    logits made for OUTPUT_BLOCK positions at a time (a 128k vocabulary times 1k positions is 0.5 GB)."""
    batch, seq_len, d_model = hidden.shape
    flat = hidden.reshape(-1, d_model)
    # each position's next token; -1 at the last position of a sequence, which has none
    targets = torch.cat([tokens[:, 1:], tokens.new_full((batch, 1), -1)], dim=1).reshape(-1)
    log_z, top, nll, kept = [], [], [], []
    for start in range(0, flat.shape[0], OUTPUT_BLOCK):
        logits = flat[start : start + OUTPUT_BLOCK] @ head.T
        lse = torch.logsumexp(logits, dim=-1)
        target = targets[start : start + OUTPUT_BLOCK]
        has_next = target >= 0
        picked = logits.gather(1, target.clamp(min=0)[:, None])[:, 0]
        log_z.append(lse)
        top.append(logits.amax(dim=-1))
        nll.append((lse - picked)[has_next])
        if keep_logits:
            kept.append(logits)
    lse_all, losses = torch.cat(log_z), torch.cat(nll)
    stats = {
        "log_z_mean": float(lse_all.mean()),
        "log_z_max": float(lse_all.max()),
        "output_max_logit_mean": float(torch.cat(top).mean()),
        "loss": float(losses.mean()) if losses.numel() else math.nan,
    }
    return stats, torch.cat(kept).reshape(batch, seq_len, -1) if keep_logits else None


# --------------------------------------------------------------------------------------------
# The forward of one checkpoint, and of a series
# --------------------------------------------------------------------------------------------
def context_of(ckpt: Checkpoint, config: Any = None) -> Optional[int]:
    """The longest sequence the model takes (checking that the forward supports it)."""
    config = ckpt.config if config is None else config
    if ckpt.state is not None:
        return proxy_config(ckpt, config).model.max_seq_len
    return hf_layout(ckpt, config if isinstance(config, dict) else hf_config(ckpt)).context


def probe_forward(
    ckpt: Checkpoint,
    tokens: Tensor,
    config: Any = None,
    *,
    source: str = "ids given",
    progress: Optional[Callable[[int], None]] = None,
    keep_logits: bool = False,
) -> ProbeResult:
    """The forward of ``tokens`` (sequences, tokens) through ``ckpt``; ``config``: config.json's object
    or the run's config (default: the one the checkpoint was opened with); ``progress(layers)`` as
    layers are done; ``keep_logits``: the output logits too (tests)."""
    config = ckpt.config if config is None else config
    if tokens.ndim != 2 or tokens.dtype != torch.int64 or tokens.numel() == 0:
        raise SeriesError(f"{ckpt.path}: probe tokens must be a non-empty (sequences, tokens) int64 tensor")
    if int(tokens.min()) < 0 or int(tokens.max()) >= ckpt.shape.vocab:
        bad = int(tokens.max()) if int(tokens.max()) >= ckpt.shape.vocab else int(tokens.min())
        raise SeriesError(f"{ckpt.path}: probe token id {bad} is outside the vocabulary of {ckpt.shape.vocab} ids")
    context = context_of(ckpt, config)
    if context is not None and tokens.shape[1] > context:
        raise SeriesError(f"{ckpt.path}: probe of {tokens.shape[1]} tokens, longer than the model's {context}")
    step = progress or (lambda n: None)
    with torch.no_grad():
        if ckpt.state is not None:
            layers, hidden, head = _proxy_forward(ckpt, proxy_config(ckpt, config), tokens, step)
        else:
            lay = hf_layout(ckpt, config if isinstance(config, dict) else hf_config(ckpt))
            layers, hidden, head = _hf_forward(ckpt, lay, tokens, step)
        outputs, logits = output_stats(hidden, head, tokens, keep_logits)
    ckpt.close()
    return ProbeResult(
        label=ckpt.label,
        source=source,
        shape=list(tokens.shape),
        attn_max_abs_logit=[s.max_abs_logit for s in layers],
        attn_max_logit=[s.max_logit for s in layers],
        attn_head_max_abs_logit=[s.head_max_abs_logit for s in layers],
        residual_rms=[s.residual_rms for s in layers],
        logits=logits,
        **outputs,
    )


def probe_series(
    checkpoints: Sequence[Checkpoint],
    probe: Probe,
    cache: Optional[Path] = None,
    progress: Optional[Callable[[int], None]] = None,
) -> tuple[list[ProbeResult], int]:
    """Each checkpoint's forward on the same probe, in order, and how many came from ``cache`` (the
    series cache folder: each result is kept there as ``forward-<i>.json`` as it is computed, keyed
    by the checkpoint's files and the probe's tokens, so an interrupted read resumes)."""
    tokens = probe.tokens.contiguous()
    digest = hashlib.sha256(f"{list(tokens.shape)}|".encode() + tokens.numpy().tobytes()).hexdigest()[:16]
    results, resumed = [], 0
    for i, ckpt in enumerate(checkpoints):
        key = f"{FORWARD_VERSION}|{fingerprint([ckpt])}|{digest}|{probe.source}"
        path = cache / f"forward-{i:04d}.json" if cache is not None else None
        cached = _cached(path, key)
        if cached is not None:
            results.append(cached)
            resumed += 1
            if progress is not None:
                progress(ckpt.shape.n_layers)
            continue
        result = probe_forward(ckpt, tokens, source=probe.source, progress=progress)
        if path is not None:
            atomic_write_text(path, json.dumps({"key": key, "value": result.as_json()}) + "\n")
        results.append(result)
    return results, resumed


def _cached(path: Optional[Path], key: str) -> Optional[ProbeResult]:
    if path is None or not path.is_file() or path.is_symlink():
        return None
    try:
        item = read_json(path)
        return ProbeResult(**item["value"]) if item.get("key") == key else None
    except (StoredFileError, UnsafePathError, KeyError, TypeError):
        return None  # a torn or foreign file: computed again


# --------------------------------------------------------------------------------------------
# Probe tokens
# --------------------------------------------------------------------------------------------
def probe_tokens(
    ckpt: Checkpoint, source: Optional[Path], n_seq: int = PROBE_SHAPE[0], seq_len: int = PROBE_SHAPE[1], seed: int = 0
) -> Probe:
    """``n_seq`` sequences of ``seq_len`` tokens (cut to the model's context): from ``source``, a JSON
    file of token ids (a list of ints, or a list of lists) or a UTF-8 text file tokenized with the
    checkpoint folder's tokenizer.json; without one, seeded uniform random ids over the vocabulary
    (logits on random ids compare checkpoints with each other, not with training)."""
    context = context_of(ckpt)  # also refuses a layout the forward does not run, before any reading
    seq_len = min(seq_len, context) if context is not None else seq_len
    if n_seq < 1 or seq_len < 2:
        raise SeriesError(f"a probe needs >= 1 sequence of >= 2 tokens, asked for {n_seq} x {seq_len}")
    vocab = ckpt.shape.vocab
    if source is None:
        g = torch.Generator().manual_seed(seed)
        return Probe(torch.randint(0, vocab, (n_seq, seq_len), generator=g), f"random ids (seed {seed})")
    path = _regular_file(Path(source), Path(source).parent)
    if path.suffix == ".json":
        rows, what = _ids_from_json(path), "ids"
    else:
        rows, what = [_ids_from_text(path, ckpt, n_seq * seq_len)], "text"
    bad = next((x for row in rows for x in row if not 0 <= x < vocab), None)
    if bad is not None:
        raise SeriesError(f"{path}: token id {bad} is outside the vocabulary of {vocab} ids")
    # consecutive windows of seq_len tokens; a probe shorter than one window: its rows, cut to the shortest
    windows = [row[i : i + seq_len] for row in rows for i in range(0, len(row) - seq_len + 1, seq_len)][:n_seq]
    if not windows:
        shortest = min(len(row) for row in rows)
        windows = [row[:shortest] for row in rows[:n_seq]]
    if len(windows[0]) < 2:
        raise SeriesError(f"{path}: a probe needs sequences of >= 2 tokens")
    return Probe(torch.tensor(windows, dtype=torch.int64), f"{what} from {path}")


def _read(path: Path, limit: int) -> bytes:
    try:
        return read_untrusted(path, limit)
    except (StoredFileError, UnsafePathError) as exc:
        raise SeriesError(str(exc)) from None
    except OSError as exc:
        raise SeriesError(f"{path}: cannot be read ({exc.strerror})") from None


def _ids_from_json(path: Path) -> list[list[int]]:
    try:
        value = json.loads(_read(path, IDS_MAX_BYTES))
    except (ValueError, RecursionError) as exc:
        raise SeriesError(f"{path}: not valid JSON ({_first_line(exc)})") from None
    rows = value if isinstance(value, list) and value and all(isinstance(r, list) for r in value) else [value]

    def is_id(x: Any) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    if not all(isinstance(r, list) and r and all(is_id(x) for x in r) for r in rows):
        raise SeriesError(f"{path}: not a list of token ids (ints), nor a list of such lists")
    return rows


def _ids_from_text(path: Path, ckpt: Checkpoint, wanted: int) -> list[int]:
    try:
        text = _read(path, TEXT_MAX_BYTES).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SeriesError(f"{path}: not UTF-8 text ({_first_line(exc)})") from None
    if not ckpt.path.is_dir():
        raise SeriesError(f"{path}: a text probe needs a checkpoint folder with tokenizer.json; give token ids (.json)")
    tokenizer_path = _regular_file(ckpt.path / "tokenizer.json", ckpt.path)
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_str(_read(tokenizer_path, TOKENIZER_MAX_BYTES).decode("utf-8"))
    except Exception as exc:  # tokenizers raises its own exception types (and bad UTF-8 lands here too)
        raise SeriesError(
            f"{tokenizer_path}: not a tokenizer.json the tokenizers package reads ({_first_line(exc)})"
        ) from None
    # no more text than the probe can use: ~4 characters a token, with a wide margin
    return tokenizer.encode(text[: 64 * wanted]).ids


__all__ = [
    "PROBE_SHAPE",
    "Layout",
    "Probe",
    "ProbeResult",
    "causal_attention",
    "hf_layout",
    "probe_forward",
    "probe_series",
    "probe_tokens",
    "rope_tables",
    "rotate",
]
