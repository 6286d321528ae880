"""Checkpoint series, read tensor by tensor: a released model's spike (LLM360 K2-Spike, OLMo, Amber,
Pythia in safetensors) or a lab run's own checkpoints, measured with the same numbers.

A **series** is an ordered list of checkpoints of one model. A checkpoint is either a Hugging Face
folder (``config.json`` with ``model.safetensors``, or shards ``model-0000N-of-0000M.safetensors``
listed in ``model.safetensors.index.json``) or one of a proxy run's ``checkpoints/step_*.pt``.
Everything read is untrusted: safetensors only (a folder whose weights are pickle, e.g.
``pytorch_model.bin``, is refused, never opened), no link followed, no shard outside its folder, a
tensor whose shape contradicts ``config.json`` refused; each refusal is one line naming the file
(:class:`SeriesError`).

What is measured (:func:`measure`), memory bounded by a few tensors of the largest size (the read
is tensor-major: one tensor through every checkpoint, then the next):

- per tensor and checkpoint: its norm and RMS; between consecutive checkpoints the update
  ||dW||, ||dW|| / ||W|| and the cosine between consecutive updates (do updates line up before a
  spike?); for the embedding and the LM head, the rows that moved most;
- where a checkpoint holds Adam's state (a proxy checkpoint or kit state), per tensor: the RMS of
  the normalized step m_hat / (sqrt(v_hat) + eps) at each checkpoint (near 1 while gradients agree
  from step to step, small while they are noise), and between checkpoints exactly one step apart,
  RMS_t = sqrt(mean(g^2 / v_hat)) with g recovered from the two first moments (Wortsman et al.
  2023b: far above 1 when the gradient outgrew Adam's second moment, the predictor of a loss spike);
- per attention layer and checkpoint, a bound on the attention logit from the weights alone: with
  a pre-norm block the input of q and k is gamma * x_hat with ||x_hat|| = sqrt(d) (LayerNorm and
  RMSNorm alike), so for head h, |q.k| / sqrt(d_head) <= s(W_q^h diag gamma) s(W_k^h diag gamma)
  d / sqrt(d_head), s the spectral norm (RoPE rotates, it does not stretch). It is the quantity
  QK-norm exists to cap; a model with QK-norm gets none (its logits are capped by the norms).

Results are kept per tensor in ``<out>/series-cache/`` as they are computed, so an interrupted read
resumes where it stopped (the cache is dropped when the series is not the same files).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor

from proxy.records import StateFileError, StoredFileError, atomic_write_text, load_state, read_json, read_yaml

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth", "model.ckpt")
TOP_ROWS = 5  # embedding / LM-head rows reported per update


class SeriesError(ValueError):
    """A checkpoint series that cannot be read as one: one line naming the file."""


# --------------------------------------------------------------------------------------------
# What a checkpoint holds
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    """The model's shape, from config.json (or a proxy run's config.yaml)."""

    d_model: int
    n_heads: int
    n_kv_heads: int
    n_layers: int
    vocab: int
    head_dim: int
    d_ff: Optional[int] = None


@dataclass(frozen=True)
class Role:
    """What a tensor is: ``kind`` (embedding, head, q, k, v, qkv, o, mlp_in, mlp_gate, mlp_out,
    attn_norm, q_norm, k_norm, norm, other) and its layer (None outside the blocks)."""

    kind: str
    layer: Optional[int] = None

    @property
    def group(self) -> str:
        """The line a figure draws it on."""
        return {"q": "attention q/k", "k": "attention q/k", "qkv": "attention q/k/v", "v": "attention v/o"}.get(
            self.kind,
            "attention v/o"
            if self.kind == "o"
            else "mlp"
            if self.kind.startswith("mlp")
            else "norms"
            if "norm" in self.kind
            else self.kind,
        )


# name patterns of the layouts proxy reads: Hugging Face LLaMA (K2, Amber, LLaMA; OLMo 2 in HF),
# OLMo's own (hf_olmo), and proxy's GPT
_ROLES: tuple[tuple[re.Pattern, Callable[[re.Match], Role]], ...] = tuple(
    (re.compile(p), f)
    for p, f in (
        (r"^(model\.)?embed_tokens\.weight$", lambda m: Role("embedding")),
        (r"^(model\.transformer\.)?wte\.weight$", lambda m: Role("embedding")),
        (r"^embed\.weight$", lambda m: Role("embedding")),
        (r"^lm_head\.weight$", lambda m: Role("head")),
        (r"^model\.transformer\.ff_out\.weight$", lambda m: Role("head")),
        (r"layers\.(\d+)\.self_attn\.([qkvo])_proj\.weight$", lambda m: Role(m.group(2), int(m.group(1)))),
        (r"layers\.(\d+)\.self_attn\.([qk])_norm\.weight$", lambda m: Role(f"{m.group(2)}_norm", int(m.group(1)))),
        (r"layers\.(\d+)\.mlp\.gate_proj\.weight$", lambda m: Role("mlp_gate", int(m.group(1)))),
        (r"layers\.(\d+)\.mlp\.up_proj\.weight$", lambda m: Role("mlp_in", int(m.group(1)))),
        (r"layers\.(\d+)\.mlp\.down_proj\.weight$", lambda m: Role("mlp_out", int(m.group(1)))),
        (r"layers\.(\d+)\.input_layernorm\.weight$", lambda m: Role("attn_norm", int(m.group(1)))),
        (r"blocks\.(\d+)\.att_proj\.weight$", lambda m: Role("qkv", int(m.group(1)))),
        (r"blocks\.(\d+)\.attn_out\.weight$", lambda m: Role("o", int(m.group(1)))),
        (r"blocks\.(\d+)\.ff_proj\.weight$", lambda m: Role("mlp_in", int(m.group(1)))),
        (r"blocks\.(\d+)\.ff_out\.weight$", lambda m: Role("mlp_out", int(m.group(1)))),
        (r"blocks\.(\d+)\.attn_norm\.weight$", lambda m: Role("attn_norm", int(m.group(1)))),
        (r"blocks\.(\d+)\.([qk])_norm\.weight$", lambda m: Role(f"{m.group(2)}_norm", int(m.group(1)))),
        (r"blocks\.(\d+)\.attn\.qkv\.weight$", lambda m: Role("qkv", int(m.group(1)))),
        (r"blocks\.(\d+)\.attn\.proj\.weight$", lambda m: Role("o", int(m.group(1)))),
        (r"blocks\.(\d+)\.attn\.([qk])_norm\.weight$", lambda m: Role(f"{m.group(2)}_norm", int(m.group(1)))),
        (r"blocks\.(\d+)\.mlp\.fc_in\.weight$", lambda m: Role("mlp_in", int(m.group(1)))),
        (r"blocks\.(\d+)\.mlp\.fc_out\.weight$", lambda m: Role("mlp_out", int(m.group(1)))),
        (r"(layers|blocks)\.(\d+)\..*norm.*\.weight$", lambda m: Role("norm", int(m.group(2)))),
        (r"norm.*\.weight$", lambda m: Role("norm")),
    )
)


def role_of(name: str) -> Role:
    for pattern, make in _ROLES:
        m = pattern.search(name)
        if m:
            return make(m)
    return Role("other")


def expected_shape(role: Role, s: Shape) -> Optional[tuple[int, ...]]:
    """The shape config.json implies for a tensor of this role (None: not checked)."""
    q, kv = s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim
    shapes = {
        "embedding": (s.vocab, s.d_model),
        "head": (s.vocab, s.d_model),
        "q": (q, s.d_model),
        "k": (kv, s.d_model),
        "v": (kv, s.d_model),
        "qkv": (q + 2 * kv, s.d_model),
        "o": (s.d_model, q),
        "attn_norm": (s.d_model,),
    }
    if s.d_ff is not None:
        shapes.update({"mlp_gate": (s.d_ff, s.d_model), "mlp_out": (s.d_model, s.d_ff)})
    return shapes.get(role.kind)


@dataclass(frozen=True)
class AdamState:
    """One tensor's Adam moments at a checkpoint, and the step count they were taken at."""

    exp_avg: Tensor
    exp_avg_sq: Tensor
    step: int


@dataclass(frozen=True)
class AdamHyper:
    beta1: float
    beta2: float
    eps: float


@dataclass
class Checkpoint:
    """One checkpoint: its label, step (from its name), shape and where each tensor lies."""

    label: str
    path: Path
    step: Optional[int]
    shape: Shape
    files: dict[str, Path]  # tensor name -> the file holding it
    shapes: dict[str, tuple[int, ...]]
    nbytes: dict[str, int]
    # a proxy checkpoint's model weights, read whole and held for the whole measurement: a lab
    # series of N checkpoints of a P-parameter model holds 4 N P bytes (39 x 164k here; 20m runs
    # want tens of checkpoints at most)
    state: Optional[dict[str, Tensor]] = None
    # Adam's moments per tensor name, where the checkpoint holds them (proxy's own), and the betas
    adam: Optional[dict[str, AdamState]] = None
    adam_hyper: Optional[AdamHyper] = None
    # the model's config as read: config.json's object (a Hugging Face folder), the run's config
    # (a proxy checkpoint: config.yaml's tree; a kit: its Config); what the probe forward builds from
    config: Any = None
    _handles: dict[Path, Any] = field(default_factory=dict, repr=False)

    def read(self, name: str) -> Tensor:
        """The tensor in float32 (as stored, bf16 included, then converted)."""
        if self.state is not None:
            return self.state[name].detach().float()
        path = self.files[name]
        handle = self._handles.get(path)
        if handle is None:
            from safetensors import safe_open

            try:
                handle = self._handles[path] = safe_open(str(path), framework="pt")
            except Exception as exc:  # safetensors raises its own error types
                raise SeriesError(f"{path}: not a readable safetensors file ({_first_line(exc)})") from None
        return handle.get_tensor(name).float()

    def close(self) -> None:
        self._handles.clear()

    @property
    def total_bytes(self) -> int:
        return sum(self.nbytes.values())


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _regular_file(path: Path, folder: Path) -> Path:
    """``path`` if it is a regular file directly inside ``folder`` and not a link; else SeriesError."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        raise SeriesError(f"{path}: missing") from None
    if stat.S_ISLNK(info.st_mode):
        raise SeriesError(f"{path}: refused, a link (proxy reads only the files of the folder itself)")
    if not stat.S_ISREG(info.st_mode):
        raise SeriesError(f"{path}: refused, not a regular file")
    if path.parent.resolve() != folder.resolve():
        raise SeriesError(f"{path}: refused, outside {folder}")
    return path


def _int(config: dict, keys: Sequence[str], where: Path, default: Optional[int] = None) -> int:
    for key in keys:
        value = config.get(key)
        if value is not None:
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise SeriesError(f"{where}: {key}={value!r} must be a positive integer")
            return value
    if default is None:
        raise SeriesError(f"{where}: no {' / '.join(keys)}")
    return default


def shape_from_config(config: dict, where: Path) -> Shape:
    """A Shape from a Hugging Face config.json (LLaMA keys, or OLMo's own)."""
    d = _int(config, ("hidden_size", "d_model"), where)
    heads = _int(config, ("num_attention_heads", "n_heads"), where)
    kv = _int(config, ("num_key_value_heads", "n_kv_heads"), where, default=heads)
    layers = _int(config, ("num_hidden_layers", "n_layers"), where)
    vocab = _int(config, ("vocab_size", "embedding_size"), where)
    head_dim = _int(config, ("head_dim",), where, default=d // heads)
    d_ff = config.get("intermediate_size")
    return Shape(d, heads, kv, layers, vocab, head_dim, d_ff if isinstance(d_ff, int) and d_ff > 0 else None)


def _step_of(name: str) -> Optional[int]:
    found = re.findall(r"\d+", name)
    return int(found[-1]) if found else None


def open_hf(folder: Path) -> Checkpoint:
    """A Hugging Face checkpoint folder, its tensors listed (not read) from the safetensors headers."""
    config_path = _regular_file(folder / "config.json", folder)
    try:
        config = read_json(config_path, limit=1 << 20)
    except StoredFileError as exc:
        raise SeriesError(str(exc)) from None
    shape = shape_from_config(config, config_path)
    if (folder / INDEX).exists():
        index_path = _regular_file(folder / INDEX, folder)
        try:
            weight_map = read_json(index_path).get("weight_map")
        except StoredFileError as exc:
            raise SeriesError(str(exc)) from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise SeriesError(f"{index_path}: no weight_map of tensor name -> shard file")
        shards = sorted(set(weight_map.values()))
    elif (folder / SINGLE).exists():
        weight_map, shards = None, [SINGLE]
    else:
        pickled = [p for p in PICKLES if (folder / p).exists()] + sorted(p.name for p in folder.glob("*.bin"))
        if pickled:
            raise SeriesError(
                f"{folder / pickled[0]}: refused, a pickle checkpoint (proxy reads safetensors only; convert it, e.g. "
                "with transformers' save_pretrained(safe_serialization=True))"
            )
        raise SeriesError(f"{folder}: no {SINGLE} or {INDEX}")
    files: dict[str, Path] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    nbytes: dict[str, int] = {}
    from safetensors import safe_open

    for shard in shards:
        if "/" in shard or "\\" in shard or shard in (".", "..") or not shard.endswith(".safetensors"):
            raise SeriesError(f"{folder / (INDEX if weight_map else SINGLE)}: refused shard name {shard!r}")
        path = _regular_file(folder / shard, folder)
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    piece = f.get_slice(name)
                    shapes[name] = tuple(int(x) for x in piece.get_shape())
                    files[name] = path
                    nbytes[name] = math.prod(shapes[name]) * _dtype_bytes(piece.get_dtype())
        except SeriesError:
            raise
        except Exception as exc:
            raise SeriesError(f"{path}: not a readable safetensors file ({_first_line(exc)})") from None
    if weight_map is not None:
        for name, shard in weight_map.items():
            if files.get(name) != folder / shard:
                raise SeriesError(f"{folder / INDEX}: {name} is listed in {shard}, which does not hold it")
    _check_shapes(shapes, shape, files)
    return Checkpoint(folder.name, folder, _step_of(folder.name), shape, files, shapes, nbytes, config=config)


def _dtype_bytes(dtype: str) -> int:
    return {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}.get(
        dtype, 4
    )


def _check_shapes(shapes: dict[str, tuple[int, ...]], shape: Shape, files: dict[str, Path]) -> None:
    for name, got in shapes.items():
        want = expected_shape(role_of(name), shape)
        if want is not None and got != want:
            raise SeriesError(f"{files[name]}: {name} has shape {list(got)}, config.json implies {list(want)}")


def _in_memory(label: str, path: Path, step: Optional[int], model: dict, d: int, heads: int, layers: int) -> Checkpoint:
    """A checkpoint whose model state is already in memory (a proxy checkpoint or a kit state):
    its floating-point tensors, checked against the shape the config gives."""
    if "embed.weight" not in model:
        raise SeriesError(f"{path}: not a proxy model state (no embed.weight)")
    tensors = {k: v for k, v in model.items() if isinstance(v, Tensor) and v.is_floating_point()}
    shape = Shape(d, heads, heads, layers, int(model["embed.weight"].shape[0]), d // heads)
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    _check_shapes(shapes, shape, {k: path for k in shapes})
    nbytes = {k: v.numel() * v.element_size() for k, v in tensors.items()}
    return Checkpoint(label, path, step, shape, {k: path for k in shapes}, shapes, nbytes, tensors)


def open_proxy(path: Path) -> Checkpoint:
    """One of a proxy run's checkpoints (``<run>/checkpoints/step_*.pt``), with the run's config."""
    run_dir = path.parent.parent
    try:
        config = read_yaml(run_dir / "config.yaml")
        state = load_state(path)
    except (StoredFileError, StateFileError) as exc:
        raise SeriesError(str(exc)) from None
    model = state.get("model") if isinstance(state, dict) else None
    if not isinstance(model, dict) or "embed.weight" not in model:
        raise SeriesError(f"{path}: not a proxy checkpoint (no model state with embed.weight)")
    m = config.get("model") or {}
    d, heads, layers = int(m.get("d_model", 0)), int(m.get("n_heads", 0)), int(m.get("n_layers", 0))
    if min(d, heads, layers) <= 0:
        raise SeriesError(f"{run_dir / 'config.yaml'}: no model.d_model / n_heads / n_layers")
    ckpt = _in_memory(path.stem, path, _step_of(path.stem), model, d, heads, layers)
    ckpt.config = config
    _attach_adam(ckpt, config, state.get("optimizer"))
    return ckpt


def _attach_adam(ckpt: Checkpoint, config: Any, optimizer: Any) -> None:
    """Name ``optimizer`` (proxy.optim.AdamW's state dict, from the same untrusted file) by
    parameter and keep it on ``ckpt``: the parameter order is the one build_optimizer gives the
    run's model. A state that does not fit (another optimizer, shapes that differ from the
    weights) is left out, not guessed at; the weights are measured all the same."""
    if not isinstance(optimizer, dict) or not isinstance(optimizer.get("state"), dict):
        return
    groups = optimizer.get("param_groups")
    if not isinstance(groups, list) or not groups or not all(isinstance(g, dict) for g in groups):
        return
    from proxy.config import Config, ConfigError, to_config
    from proxy.model import build_model
    from proxy.optim import build_optimizer

    try:
        cfg = config if isinstance(config, Config) else to_config(config)
        net = build_model(cfg.model, ckpt.shape.vocab).to("meta")
        order = [p for g in build_optimizer(net, cfg.optim).param_groups for p in g["params"]]
    except (ConfigError, ValueError, TypeError, KeyError):
        return
    names = {id(p): n for n, p in net.named_parameters()}
    indices = [i for g in groups for i in g.get("params", [])]
    if len(indices) != len(order):
        return
    adam: dict[str, AdamState] = {}
    for index, param in zip(indices, order):
        entry = optimizer["state"].get(index)
        name = names.get(id(param))
        if not isinstance(entry, dict) or name is None or name not in ckpt.shapes:
            continue
        m, v, step = entry.get("exp_avg"), entry.get("exp_avg_sq"), entry.get("step")
        if not (isinstance(m, Tensor) and isinstance(v, Tensor)) or tuple(m.shape) != ckpt.shapes[name]:
            return
        if tuple(v.shape) != ckpt.shapes[name] or not isinstance(step, (int, float, Tensor)):
            return
        adam[name] = AdamState(m.detach().float(), v.detach().float(), int(step))
    betas = groups[0].get("betas")
    eps = groups[0].get("eps")
    if adam and isinstance(betas, (list, tuple)) and len(betas) == 2 and isinstance(eps, (int, float)):
        ckpt.adam, ckpt.adam_hyper = adam, AdamHyper(float(betas[0]), float(betas[1]), float(eps))


def open_kit(path: Path) -> list[Checkpoint]:
    """A spike kit (proxy/train/capture.py) as a series of its states: before, at the spike and
    after (those it has), each labelled with its step, so a lab spike gets the tables a released
    series gets."""
    from proxy.forensics.replay import STATE_FILES, KitError, load_kit

    try:
        kit = load_kit(path)
    except KitError as exc:
        raise SeriesError(str(exc)) from None
    m = kit.config.model
    found = []
    for name in (name for name in STATE_FILES if kit.has_state(name)):
        try:
            state = kit.state(name)
        except KitError as exc:
            raise SeriesError(str(exc)) from None
        step = kit.state_step(name)
        where = path / STATE_FILES[name]
        ckpt = _in_memory(f"{name} (step {step})", where, step, state["model"], m.d_model, m.n_heads, m.n_layers)
        ckpt.config = kit.config
        _attach_adam(ckpt, kit.config, state.get("optimizer"))
        found.append(ckpt)
    return found


def is_hf_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def find_series(paths: Sequence[Path]) -> list[Checkpoint]:
    """The checkpoints ``paths`` name, in order: each a checkpoint folder, a folder of checkpoint
    folders (ordered by the number in their names), a proxy run (its checkpoints/step_*.pt), or a
    spike kit (its before / at / after states)."""
    found: list[Checkpoint] = []
    for path in paths:
        if path.is_symlink():
            raise SeriesError(f"{path}: refused, a link")
        if is_hf_checkpoint(path):
            found.append(open_hf(path))
        elif (path / "kit.json").is_file():
            found += open_kit(path)
        elif (path / "checkpoints").is_dir():
            steps = sorted((path / "checkpoints").glob("step_*.pt"), key=lambda p: _step_of(p.stem) or 0)
            found += [open_proxy(p) for p in steps]
        elif path.is_dir():
            subs = [p for p in path.iterdir() if not p.is_symlink() and is_hf_checkpoint(p)]
            if not subs:
                raise SeriesError(f"{path}: no checkpoint (config.json with safetensors) in it or under it")
            found += [open_hf(p) for p in sorted(subs, key=lambda p: (_step_of(p.name) or 0, p.name))]
        else:
            raise SeriesError(f"{path}: not a folder")
    if len(found) < 2:
        raise SeriesError(f"a series needs >= 2 checkpoints, found {len(found)} in {', '.join(map(str, paths))}")
    first = found[0]
    for ckpt in found[1:]:
        if ckpt.shapes != first.shapes:
            differ = sorted(set(ckpt.shapes) ^ set(first.shapes)) or [
                n for n in ckpt.shapes if ckpt.shapes[n] != first.shapes[n]
            ]
            raise SeriesError(f"{ckpt.path}: not the same model as {first.path} (differs in {differ[0]})")
    return found


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------
def _cosine(a: Tensor, b: Tensor) -> float:
    na, nb = float(a.norm()), float(b.norm())
    return float((a * b).sum()) / (na * nb) if na > 0 and nb > 0 else math.nan


def tensor_series(name: str, checkpoints: Sequence[Checkpoint], rows: bool) -> dict[str, Any]:
    """One tensor through the series: norms, updates, cosines, and (``rows``) the rows that moved most."""
    out: dict[str, Any] = {"name": name, "norm": [], "rms": [], "update": [], "relative_update": [], "cosine": []}
    if rows:
        out["top_rows"] = []
    if all(c.adam is not None and name in c.adam for c in checkpoints):
        out["adam_step_rms"], out["adam_rms_t"] = adam_series(name, checkpoints)
    prev: Optional[Tensor] = None
    prev_delta: Optional[Tensor] = None
    for ckpt in checkpoints:
        w = ckpt.read(name)
        norm = float(w.norm())
        out["norm"].append(norm)
        out["rms"].append(norm / math.sqrt(max(1, w.numel())))
        if prev is not None:
            delta = w - prev
            size = float(delta.norm())
            out["update"].append(size)
            out["relative_update"].append(size / float(prev.norm()) if float(prev.norm()) > 0 else math.nan)
            out["cosine"].append(_cosine(delta, prev_delta) if prev_delta is not None else math.nan)
            if rows and delta.ndim == 2:
                moved = delta.norm(dim=1)
                k = min(TOP_ROWS, moved.numel())
                values, index = moved.topk(k)
                out["top_rows"].append([[int(i), round(float(v), 6)] for v, i in zip(values, index)])
            prev_delta = delta
        prev = w
    return out


def adam_series(name: str, checkpoints: Sequence[Checkpoint]) -> tuple[list[float], list[float]]:
    """Per checkpoint, the RMS of Adam's normalized step m_hat / (sqrt(v_hat) + eps); per transition,
    RMS_t = sqrt(mean(g^2 / v_hat)) where the two checkpoints are one step apart (g from the first
    moments: m_b = beta1 m_a + (1 - beta1) g; v_hat the second checkpoint's, floored at eps^2, as
    proxy.optim.AdamW measures it), nan elsewhere."""
    steps, rms_t = [], []
    prev: Optional[AdamState] = None
    for ckpt in checkpoints:
        assert ckpt.adam is not None and ckpt.adam_hyper is not None  # tensor_series checks it first
        h, a = ckpt.adam_hyper, ckpt.adam[name]
        if a.step <= 0:
            steps.append(math.nan)
        else:
            m_hat = a.exp_avg / (1 - h.beta1**a.step)
            v_hat = a.exp_avg_sq / (1 - h.beta2**a.step)
            steps.append(float((m_hat / (v_hat.sqrt() + h.eps)).pow(2).mean().sqrt()))
        if prev is not None:
            if a.step == prev.step + 1 and a.step > 0:
                g = (a.exp_avg - h.beta1 * prev.exp_avg) / (1 - h.beta1)
                v_hat = (a.exp_avg_sq / (1 - h.beta2**a.step)).clamp(min=h.eps * h.eps)
                rms_t.append(float((g * g / v_hat).mean().sqrt()))
            else:
                rms_t.append(math.nan)
        prev = a
    return steps, rms_t


def _split_qkv(w: Tensor, s: Shape) -> tuple[Tensor, Tensor]:
    q, kv = s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim
    return w[:q], w[q : q + kv]


def logit_bounds(q: Tensor, k: Tensor, gain: Optional[Tensor], s: Shape) -> list[float]:
    """Per head: s(W_q^h diag g) s(W_k^h diag g) d / sqrt(d_head) (the module docstring)."""
    if gain is not None:
        q, k = q * gain, k * gain
    qh = q.reshape(s.n_heads, s.head_dim, -1)
    kh = k.reshape(s.n_kv_heads, s.head_dim, -1)
    sq = torch.linalg.matrix_norm(qh, ord=2)
    sk = torch.linalg.matrix_norm(kh, ord=2)
    sk = sk.repeat_interleave(s.n_heads // s.n_kv_heads)  # grouped-query: heads share a k head
    return [float(x) for x in sq * sk * s.d_model / math.sqrt(s.head_dim)]


def layer_bounds(layer: int, checkpoints: Sequence[Checkpoint]) -> Optional[dict[str, Any]]:
    """The attention-logit bound per head of ``layer`` at each checkpoint; None where the model has
    QK-norm (the bound does not apply) or its q / k weights are not found."""
    names = {role_of(n): n for n in checkpoints[0].shapes}
    if Role("q_norm", layer) in names:
        return None
    gain_name = names.get(Role("attn_norm", layer))
    per_ckpt = []
    for ckpt in checkpoints:
        s = ckpt.shape
        if Role("qkv", layer) in names:
            q, k = _split_qkv(ckpt.read(names[Role("qkv", layer)]), s)
        elif Role("q", layer) in names and Role("k", layer) in names:
            q, k = ckpt.read(names[Role("q", layer)]), ckpt.read(names[Role("k", layer)])
        else:
            return None
        gain = ckpt.read(gain_name) if gain_name is not None else None
        per_ckpt.append(logit_bounds(q, k, gain, s))
    return {"layer": layer, "per_head": per_ckpt, "max": [max(x) for x in per_ckpt]}


@dataclass
class SeriesResult:
    checkpoints: list[dict[str, Any]]
    tensors: list[dict[str, Any]]
    bounds: list[dict[str, Any]]
    qk_norm: bool
    bytes_read: int
    resumed: int  # tensors taken from the cache


def fingerprint(checkpoints: Sequence[Checkpoint]) -> str:
    """What identifies the series' files: paths, sizes and modification times."""
    h = hashlib.sha256()
    for ckpt in checkpoints:
        for path in sorted(set(ckpt.files.values())):
            info = path.stat()
            h.update(f"{path.resolve()}|{info.st_size}|{info.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _work(checkpoints: Sequence[Checkpoint]) -> list[tuple[str, Any]]:
    """What to compute, in order: ('tensor', name) for every tensor, ('layer', i) for every layer."""
    names = sorted(checkpoints[0].shapes, key=lambda n: (role_of(n).layer if role_of(n).layer is not None else -1, n))
    layers = sorted({r.layer for r in map(role_of, names) if r.layer is not None})
    return [("tensor", n) for n in names] + [("layer", i) for i in layers]


def planned_bytes(checkpoints: Sequence[Checkpoint]) -> int:
    """Bytes a full read takes: every tensor of every checkpoint, plus q / k / gains again for the bounds."""
    total = sum(c.total_bytes for c in checkpoints)
    again = {"q", "k", "qkv", "attn_norm"}
    extra = sum(n for c in checkpoints for name, n in c.nbytes.items() if role_of(name).kind in again)
    return total + extra


def measure(
    checkpoints: Sequence[Checkpoint],
    cache: Optional[Path] = None,
    progress: Optional[Callable[[int], None]] = None,
) -> SeriesResult:
    """Every number of the module docstring; ``cache``: a folder that keeps each result as it is
    computed and is read back on the next call over the same files; ``progress(bytes)`` after each item."""
    key = fingerprint(checkpoints)
    done: dict[str, Any] = {}
    if cache is not None:
        manifest = cache / "manifest.json"
        if manifest.is_file() and not manifest.is_symlink():
            try:
                same = read_json(manifest).get("fingerprint") == key
            except StoredFileError:
                same = False
            if same:
                for path in cache.glob("item-*.json"):
                    if path.is_symlink():
                        continue
                    try:
                        item = read_json(path)
                    except StoredFileError:
                        continue  # a torn write: computed again
                    done[str(item.get("key"))] = item.get("value")
        cache.mkdir(parents=True, exist_ok=True)
        if not done:
            for old in cache.glob("item-*.json"):
                old.unlink()
            atomic_write_text(manifest, json.dumps({"fingerprint": key}) + "\n")
    tensors, bounds = [], []
    bytes_read, resumed = 0, 0
    qk_norm = any(role_of(n).kind == "q_norm" for n in checkpoints[0].shapes)
    for i, (kind, what) in enumerate(_work(checkpoints)):
        item_key = f"{kind}:{what}"
        if item_key in done:
            value = done[item_key]
            resumed += 1
        else:
            if kind == "tensor":
                role = role_of(what)
                value = tensor_series(what, checkpoints, rows=role.kind in ("embedding", "head"))
                cost = sum(c.nbytes[what] for c in checkpoints)
            else:
                value = layer_bounds(what, checkpoints)
                cost = (
                    sum(
                        c.nbytes[n]
                        for c in checkpoints
                        for n in c.nbytes
                        if role_of(n).layer == what and role_of(n).kind in ("q", "k", "qkv", "attn_norm")
                    )
                    if value is not None
                    else 0
                )
            bytes_read += cost
            if cache is not None:
                atomic_write_text(cache / f"item-{i:06d}.json", json.dumps({"key": item_key, "value": value}) + "\n")
            if progress is not None:
                progress(cost)
        if kind == "tensor":
            tensors.append(value)
        elif value is not None:
            bounds.append(value)
    for ckpt in checkpoints:
        ckpt.close()
    info = [{"label": c.label, "step": c.step, "path": str(c.path), "bytes": c.total_bytes} for c in checkpoints]
    return SeriesResult(info, tensors, bounds, qk_norm, bytes_read, resumed)


def iter_transitions(result: SeriesResult) -> Iterator[tuple[int, str]]:
    """(index of the update, 'a -> b') for each pair of consecutive checkpoints."""
    labels = [c["label"] for c in result.checkpoints]
    for i in range(len(labels) - 1):
        yield i, f"{labels[i]} -> {labels[i + 1]}"


__all__ = [
    "AdamHyper",
    "AdamState",
    "Checkpoint",
    "adam_series",
    "Role",
    "SeriesError",
    "SeriesResult",
    "Shape",
    "find_series",
    "iter_transitions",
    "logit_bounds",
    "measure",
    "open_hf",
    "open_proxy",
    "planned_bytes",
    "role_of",
]
