"""Where and how a run runs, and the rules every run ends by: device, precision, compile, the
divergence rule, the summary fields, the progress bar. Shared by the standalone trainer and the
ensemble so the two cannot disagree.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import multiprocessing
import signal
import subprocess
import sys
import threading
from typing import Any, Callable, ContextManager, Literal, Optional, Sequence

import torch
from torch import Tensor

from proxy.config import CUDA_GRAPH_MODES, Config, ConfigError, LossImpl, TrainConfig
from proxy.model import attention_backend
from proxy.records import (
    ATTN_MAX_LOGIT,
    ATTN_MAX_LOGIT_PEAK,
    GRAD_NORM,
    LR,
    OUTPUT_LOGIT_MEAN,
    TOKENS_PER_S,
    TRAIN_LOSS,
    VAL_LOSS,
)
from proxy.train.diagnostics import RARE_BELOW, class_counts, token_classes

log = logging.getLogger("proxy.train")


# --------------------------------------------------------------------------------------------
# Devices and precision
# --------------------------------------------------------------------------------------------
def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and local_rank:
        name = f"cuda:{local_rank}"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name} but no CUDA device is available")
    return device


def autocast_for(cfg: Config, device: torch.device) -> Callable[[], ContextManager]:
    dtype = cfg.train.dtype
    if dtype == "auto":
        dtype = "bf16" if device.type == "cuda" else "fp32"
    if dtype in ("fp32", "fp64"):
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


def param_dtype(cfg: Config) -> torch.dtype:
    """The dtype of the parameters and the optimizer state: float64 under train.dtype=fp64,
    else float32 (bf16 is autocast: the parameters stay fp32)."""
    return torch.float64 if cfg.train.dtype == "fp64" else torch.float32


def wants_compile(cfg: Config, device: torch.device) -> bool:
    choice = str(cfg.train.compile).lower()
    return device.type == "cuda" if choice == "auto" else choice == "true"


def uses_cuda_graphs(cfg: Config, device: torch.device) -> bool:
    """Whether the run's compiled step captures CUDA graphs (train.compile_mode on a GPU)."""
    return wants_compile(cfg, device) and device.type == "cuda" and cfg.train.compile_mode in CUDA_GRAPH_MODES


def compiled(fn: Callable[..., Any], cfg: Config) -> Callable[..., Any]:
    """``fn`` under torch.compile in the run's ``train.compile_mode``."""
    return torch.compile(fn, mode=cfg.train.compile_mode)


def cuda_graph_skips() -> int:
    """How many compiled graphs inductor left out of CUDA graphs in this process (each skip is
    logged with its reason under TORCH_LOGS=perf_hints); 0 before anything compiled."""
    from torch._dynamo.utils import counters  # torch's own counter; private, read defensively

    inductor: Any = counters.get("inductor") or {}
    return int(inductor.get("cudagraph_skips", 0))


def backends(cfg: Config, device: torch.device) -> dict[str, Any]:
    """What a run on ``device`` actually uses where the config says ``auto`` (the run record
    keeps it: summary.json ``backends``), compiled with its mode. How many graphs fell back from CUDA
    graphs is known only once they compiled: the summary's ``cuda_graph_skips`` at the end."""
    m = cfg.model
    dtype = cfg.train.dtype if cfg.train.dtype != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    out: dict[str, Any] = {
        "attention": attention_backend(m.attention, device.type, m.d_model // m.n_heads).value,
        "loss_impl": LossImpl(m.loss_impl).value,
        "dtype": dtype,
        "compile": wants_compile(cfg, device),
    }
    if out["compile"]:
        out["compile_mode"] = cfg.train.compile_mode
    return out


def mark_token_classes(model, source, cfg: Config) -> Optional[dict[str, Any]]:
    """Tell the model which token ids the run will never, rarely or often see (from the source's
    token probabilities and the run's training tokens); returns the counts for the run record."""
    probabilities = source.token_probabilities()
    if probabilities is None:
        return None
    codes = token_classes(probabilities, cfg.train.steps * cfg.train.batch_size * cfg.train.seq_len)
    model.set_token_classes(codes)
    return {**class_counts(codes), "rare_means": f"< {RARE_BELOW:g} expected occurrences in the run"}


# --------------------------------------------------------------------------------------------
# How a run ends
# --------------------------------------------------------------------------------------------
class Diverged(Exception):
    def __init__(self, step: int, reason: str):
        super().__init__(reason)
        self.step, self.reason = step, reason


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived; the loop stops at the next step boundary (see StopSignals)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


class StopSignals:
    """While a run trains, SIGINT (Ctrl-C) and SIGTERM (``kill``, a scheduler's preemption) ask
    the loop to stop at the next step boundary, where the state is whole: the trainer writes a
    checkpoint, marks the run ``interrupted`` and ``train.resume=true`` continues it. A second
    signal stops at once (KeyboardInterrupt: status stays ``running``, like a kill -9).

    ``check()`` between steps raises :class:`Interrupted`. Outside the main thread (signal
    handlers cannot be set there) it does nothing.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopping now")
        self.signum = signum
        log.warning("%s: stopping after this step (send it again to stop at once)", signal.Signals(signum).name)

    def check(self) -> None:
        if self.signum is not None:
            raise Interrupted(self.signum)

    def __exit__(self, *exc: Any) -> Literal[False]:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        return False


@functools.lru_cache(maxsize=1)
def code_version() -> dict[str, Any]:
    """The proxy source a run trains with, for its summary (``code``): the git commit of the
    checkout proxy is imported from and whether its training code (proxy/, conf/) had uncommitted
    changes; ``{}`` where proxy is not a git checkout (an installed package, a copied tree). One
    ``git`` call per process."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]

    def git(*args: str) -> Optional[str]:
        try:
            done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if not commit:
        return {}
    status = git("status", "--porcelain", "--untracked-files=no", "--", "proxy", "conf")
    return {"commit": commit, "dirty": bool(status)} if status is not None else {"commit": commit}


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """A host tensor on ``device`` without making the host wait for the device: a copy from
    pageable memory synchronises the CUDA stream, one from pinned memory does not (the caching
    host allocator keeps the buffer until the copy is done)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def values_on(values: Sequence[float | bool], device: torch.device, dtype: Optional[torch.dtype] = None) -> Tensor:
    """A short per-member list (LRs, bounds, masks) as a tensor on ``device``, through :func:`to_device`."""
    return to_device(torch.tensor(list(values), dtype=dtype), device)


def divergence_reason(loss: float, grad_norm: float, loss_at_init: Optional[float], t: TrainConfig) -> Optional[str]:
    """Why a step counts as diverged under the ``train.diverge_*`` rules, or None."""
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        return f"non-finite {'loss' if not math.isfinite(loss) else 'grad norm'}"
    if t.diverge_loss > 0 and loss > t.diverge_loss:
        return f"train loss {loss:.3g} > train.diverge_loss={t.diverge_loss}"
    if t.diverge_factor > 0 and loss_at_init and loss > t.diverge_factor * loss_at_init:
        return f"train loss {loss:.3g} > {t.diverge_factor} x loss at init"
    return None


def divergence_bound(t: TrainConfig, loss_at_init: Optional[float]) -> float:
    """The train loss above which :func:`divergence_reason` fires (nan: only non-finite)."""
    bounds = [t.diverge_loss] if t.diverge_loss > 0 else []
    bounds += [t.diverge_factor * loss_at_init] if t.diverge_factor > 0 and loss_at_init else []
    return min(bounds, default=math.nan)


def summary_fields(
    status: str,
    steps: int,
    tokens: int,
    wall_time_s: float,
    recent_losses: list[float],
    stats_seen: dict[str, float],
    previous_best: Optional[float],
    diverged_at: Optional[int] = None,
    final_val: Optional[float] = None,
) -> dict[str, Any]:
    """The summary.json fields every finished run has (standalone or an ensemble member)."""
    losses = [v for v in recent_losses if math.isfinite(v)]
    fields = dict(
        status=status,
        steps_completed=steps,
        tokens=tokens,
        wall_time_s=wall_time_s,
        final_train_loss=sum(losses) / len(losses) if losses else None,
        final_val_loss=final_val,
        diverged_at_step=diverged_at,
        error=None,
        max_attn_logit_peak=stats_seen.get(ATTN_MAX_LOGIT_PEAK),
        max_attn_logit_final=stats_seen.get(ATTN_MAX_LOGIT),
        output_logit_mean_final=stats_seen.get(OUTPUT_LOGIT_MEAN),
    )
    if final_val is not None:
        fields["best_val_loss"] = final_val if previous_best is None else min(previous_best, final_val)
    return fields


# --------------------------------------------------------------------------------------------
# Progress bar
# --------------------------------------------------------------------------------------------
def progress_wanted(setting: str | bool) -> bool:
    """``train.progress``: true | false | auto, a bar where stderr is a terminal and this process
    is not a worker of a parallel launcher (joblib), whose bars would overwrite each other."""
    choice = str(setting).lower()
    if choice == "auto":
        return _stderr_is_terminal() and multiprocessing.parent_process() is None
    return choice == "true"


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed streams
        return False


class ProgressBar:
    """A tqdm bar on stderr with the run's latest numbers: train loss, val loss, tokens/s, LR,
    grad norm. While it is open, log lines meant for the console are written above it
    (``tqdm.write``) rather than through it."""

    FIELDS = ("loss", "val", "tok/s", "lr", "gnorm")  # shown first, in this order

    def __init__(self, total: int, name: str, initial: int):
        from tqdm.auto import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        self._redirect: Optional[ContextManager] = None
        if any(_is_console_handler(h) for h in logging.getLogger().handlers):
            self._redirect = logging_redirect_tqdm()
            self._redirect.__enter__()
        self.bar = tqdm(desc=name[:40], initial=initial, total=total, dynamic_ncols=True, leave=False, disable=False)
        self.fields: dict[str, str] = {}

    @property
    def n(self) -> int:
        return self.bar.n

    @n.setter
    def n(self, value: int) -> None:
        self.bar.n = value

    def set_postfix(self, refresh: bool = True, **fields: str) -> None:
        """Set some of the fields shown after the bar (the others keep their values)."""
        self.fields.update(fields)
        ordered = {k: self.fields[k] for k in self.FIELDS if k in self.fields}
        ordered.update((k, v) for k, v in self.fields.items() if k not in ordered)
        self.bar.set_postfix(ordered, refresh=refresh)

    def show(self, row: dict[str, Any]) -> None:
        """The numbers of a log row (a train row, or an eval's ``{val/loss: ...}``)."""
        fields = {}
        if TRAIN_LOSS in row:
            fields["loss"] = f"{row[TRAIN_LOSS]:.3f}"
        if VAL_LOSS in row:
            fields["val"] = f"{row[VAL_LOSS]:.3f}"
        if TOKENS_PER_S in row:
            fields["tok/s"] = _si(row[TOKENS_PER_S])
        if LR in row:
            fields["lr"] = f"{row[LR]:.2e}"
        if GRAD_NORM in row:
            fields["gnorm"] = f"{row[GRAD_NORM]:.2f}"
        self.set_postfix(refresh=False, **fields)

    def refresh(self) -> None:
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()
        if self._redirect is not None:
            self._redirect.__exit__(None, None, None)
            self._redirect = None


def _is_console_handler(handler: logging.Handler) -> bool:
    return isinstance(handler, logging.StreamHandler) and getattr(handler, "stream", None) in (sys.stdout, sys.stderr)


def _si(value: float) -> str:
    """12345.6 -> '12.3k' (a rate at a glance)."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.1f}{suffix}"
    return f"{value:.0f}"


def progress_bar(total: int, setting: str | bool, name: str, initial: int) -> Optional[ProgressBar]:
    """The run's bar, or None where ``train.progress`` (``setting``) says none (see
    :func:`progress_wanted`)."""
    if not progress_wanted(setting):
        return None
    return ProgressBar(total, name, initial)


def show_row(progress: Optional[ProgressBar], row: dict[str, Any]) -> None:
    if progress is not None:
        progress.show(row)
