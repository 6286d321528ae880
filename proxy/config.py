"""Typed configuration for proxy.

Every knob a run has lives in one of the dataclasses below. They are registered with Hydra's
ConfigStore as the schema of ``conf/config.yaml``, so a misspelt key or a value of the wrong type
fails at start-up with the key named. Cross-field checks (d_model divisible by n_heads, a positive
LR, ...) live in ``validate`` and raise ``ConfigError`` with one line that names the key.

Choices are Enums: OmegaConf rejects an unknown name and lists the allowed ones.
"""

from __future__ import annotations

import dataclasses
import math
import os
import secrets
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Optional, cast

from omegaconf import MISSING, DictConfig, OmegaConf

from proxy.analysis import run_dirname
from proxy.records.files import StoredFileError, UnsafePathError, check_plain

# the Hydra config tree (conf/ beside the package; PROXY_CONF_DIR points elsewhere)
CONF_DIR = os.environ.get("PROXY_CONF_DIR", str(Path(__file__).resolve().parents[1] / "conf"))


class ConfigError(ValueError):
    """A configuration that cannot run. The message names the offending key."""


# --------------------------------------------------------------------------------------------
# Choices
# --------------------------------------------------------------------------------------------
class QKNorm(str, Enum):
    off = "off"
    layernorm = "layernorm"
    rmsnorm = "rmsnorm"


class Norm(str, Enum):
    layernorm = "layernorm"
    rmsnorm = "rmsnorm"


class NormPosition(str, Enum):
    pre = "pre"  # x + Attn(Norm(x))  (GPT-2, Wortsman et al.)
    reordered = "reordered"  # x + Norm(Attn(x))  (OLMo 2)


class MLPKind(str, Enum):
    gelu = "gelu"
    swiglu = "swiglu"


class Init(str, Enum):
    normal = "normal"  # N(0, 0.02) truncated at 3 sigma (OLMo 2)
    scaled = "scaled"  # OLMo-0424 "mitchell" init
    fan_in = "fan_in"  # truncated normal 1/sqrt(fan_in), embeddings 1/sqrt(d) (Wortsman et al.)


class Attention(str, Enum):
    auto = "auto"  # triton on CUDA (sdpa where the kernel cannot run), naive elsewhere
    naive = "naive"  # materialises the scores: exact statistics every step
    sdpa = "sdpa"  # torch scaled_dot_product_attention; statistics on logging steps
    triton = "triton"  # proxy/kernels/flash_attention.py: flash attention that returns the max logit


class LossImpl(str, Enum):
    torch = "torch"  # logits materialised, plain PyTorch (proxy/kernels/reference.py)
    triton = "triton"  # fused cross-entropy kernel over materialised logits
    fused_linear = "fused_linear"  # LM head x CE in chunks, logits never materialised


class WeightDecayMode(str, Enum):
    coupled = "coupled"  # torch AdamW: theta -= lr * (update + wd * theta)
    independent = "independent"  # theta -= lr * update + (lr / lr_peak) * wd * theta


class Schedule(str, Enum):
    cosine = "cosine"
    linear = "linear"
    constant = "constant"
    wsd = "wsd"


class Cooldown(str, Enum):
    linear = "linear"
    sqrt = "sqrt"  # 1 - sqrt(progress)


class RemedyKind(str, Enum):
    none = "none"
    skip_step = "skip_step"  # skip the update on a loss / grad-norm spike (OLMo-core, llm.c)
    rollback = "rollback"  # restore an earlier snapshot, skip batches (PaLM)
    zclip = "zclip"  # z-score adaptive gradient clipping (Kumar et al. 2025)


class SnapshotStorage(str, Enum):
    memory = "memory"  # CPU copies of model + optimizer: fast, lost on a crash
    disk = "disk"  # <run_dir>/rollback/step_*.pt: for models whose copies do not fit in RAM


class SpikeBaseline(str, Enum):
    trend = "trend"  # residuals of a local log-linear trend, robust scale: sees spikes early in a run
    mean = "mean"  # mean + sigma * std of the window (OLMo-core's SkipStepOptimizer, as published)


class CaptureTrigger(str, Enum):
    any = "any"  # a spike in the loss or in the grad norm
    loss = "loss"
    grad_norm = "grad_norm"
    # probe/loss (train.probe_every): the loss of one fixed held-out sample, where a loss spike is
    # told from batch noise (proxy/spikes.py); the kit's step N is the first whose start state shows it
    probe = "probe"


class DataSource(str, Enum):
    synthetic = "synthetic"
    memmap = "memmap"
    text = "text"


class SpanSource(str, Enum):
    random = "random"  # distinct random tokens
    data = "data"  # a span taken from the same row


class FilterMode(str, Enum):
    mask = "mask"  # labels of the repeated stretch set to ignore_index (OLMo 2's loader)
    drop = "drop"  # the row replaced by a fresh draw (masked whole if that is dirty too)


class WandbMode(str, Enum):
    disabled = "disabled"
    offline = "offline"
    online = "online"


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    name: str = "tiny"
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    d_ff: Optional[int] = None  # None: 4 * d_model (gelu) or the 8/3 * d_model rounding (swiglu)
    vocab_size: Optional[int] = None  # None: taken from the data source
    max_seq_len: int = 1024
    mlp: MLPKind = MLPKind.gelu
    norm: Norm = Norm.layernorm
    norm_eps: float = 1e-6
    norm_position: NormPosition = NormPosition.pre
    qk_norm: QKNorm = QKNorm.off
    tie_embeddings: bool = False
    rope_theta: float = 10000.0
    init: Init = Init.normal
    init_std: Optional[float] = None  # std of the `normal` scheme (None: 0.02)
    init_gain: float = 1.0  # multiplies every scheme's std (a knob for init-scale studies)
    attention: Attention = Attention.auto
    loss_impl: LossImpl = LossImpl.torch
    # documentation only: the non-embedding parameter count the preset was sized for
    approx_params: Optional[str] = None


@dataclass
class LossConfig:
    z_loss: float = 0.0  # coefficient of mean(logsumexp(logits)^2); Wortsman et al. use 1e-4
    ignore_index: int = -100


@dataclass
class OptimConfig:
    lr: float = 3e-3  # peak learning rate
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.0
    weight_decay_mode: WeightDecayMode = WeightDecayMode.coupled
    decay_embeddings: bool = False  # OLMo 2: no weight decay on embeddings
    decay_norms: bool = False
    grad_clip: float = 1.0  # global norm; 0 disables clipping
    # StableAdamW (Wortsman et al. 2023b): per tensor, the step's LR over max(1, RMS_t), RMS_t =
    # sqrt(mean(g^2 / v_hat)): AdaFactor-style update clipping, where Adam's second moment lags
    update_clip: bool = False
    mup: bool = False  # muParam (simple): per-layer LR x base_fan_in / fan_in
    mup_base_fan_in: int = 64


@dataclass
class ScheduleConfig:
    name: Schedule = Schedule.cosine
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1  # final LR = min_lr_ratio * peak (cosine, linear, wsd)
    decay_fraction: float = 0.2  # wsd: fraction of steps spent in the cooldown
    cooldown: Cooldown = Cooldown.sqrt  # wsd cooldown shape


@dataclass
class DetectorConfig:
    """The online spike detector (proxy/spikes.py: SpikeDetector), the one definition of "this
    step's loss or grad norm is a spike" that the remedies (``remedy.detector``), spike capture
    (``capture.detector``) and a run's loss-spike count use. It looks at the last ``window``
    accepted values once ``min_history`` are in. baseline=trend (default): value > the local
    log-linear trend of the last 32 values + sigma robust residual scales (MAD), so the steep early
    descent does not hide a spike; baseline=mean: value > mean + sigma * std (OLMo-core's
    SkipStepOptimizer: 6 sigma over 128 steps, as published)."""

    baseline: SpikeBaseline = SpikeBaseline.trend
    sigma: float = 6.0
    window: int = 128
    min_history: int = 20


@dataclass
class RemedyConfig:
    """What the trainer does about a spike (proxy/train/remedies.py). One remedy per run."""

    kind: RemedyKind = RemedyKind.none
    detector: DetectorConfig = field(default_factory=DetectorConfig)  # what skip_step and rollback call a spike
    # a run whose remedy skips this many steps in a row (skip_step, or rollback without an old
    # enough snapshot) ends as diverged: the remedy has not saved it; 0 = never. Raise it above
    # the length of a known bad stretch, or a detector that catches every bad batch trips it.
    max_consecutive_skips: int = 50
    # rollback: a snapshot every `rollback_every` steps, the last `rollback_keep` kept (in memory
    # or on disk); a spike at step t restores the newest snapshot from step <= t - rollback_min_age
    # and skips `rollback_skip_batches` batches of data from the snapshot's position (never fewer
    # than needed to get past the batch that spiked: no batch is read twice); at most
    # `rollback_max` rollbacks per run. Defaults sized for lab runs of a few hundred steps: PaLM
    # went ~100 steps back and skipped 200-500 batches of a 255k-step run; going 10 back and
    # skipping 20 costs a lab run little. Further back recomputes more (and early in a run can
    # undo most of it); a shorter skip can resume inside a longer stretch of bad data (README,
    # "Spike remedies": raise both for stretches, as experiments/spike_remedies shows)
    rollback_storage: SnapshotStorage = SnapshotStorage.memory
    rollback_every: int = 10
    rollback_keep: int = 3
    rollback_min_age: int = 10
    rollback_skip_batches: int = 20
    rollback_max: int = 5
    # zclip: EMA (alpha) of grad-norm mean and variance, clip when z > zclip_z after
    # zclip_warmup steps; optim.grad_clip stays on as a hard cap
    zclip_alpha: float = 0.97
    zclip_z: float = 2.5
    zclip_warmup: int = 25


@dataclass
class CaptureConfig:
    """Spike capture (proxy/train/capture.py): when a spike is detected at step N, save a study kit
    to ``<run_dir>/spike_kits/step_<N>/`` that ``proxy-inspect`` dissects (proxy/forensics/dissect.py).

    A kit holds the model + optimizer state at the start of steps N - steps_before, N and
    N + steps_after, the train batches in between and the detector's numbers. Keeping it costs a
    ring of steps_before + 1 state copies in CPU memory (one copy per step, buffers reused) and,
    on disk, three states per kit, at most max_kits kits per run. Capture only watches: the run
    goes on (or the configured remedy acts) exactly as without it.
    """

    enabled: bool = False
    trigger: CaptureTrigger = CaptureTrigger.any
    detector: DetectorConfig = field(default_factory=DetectorConfig)  # what capture calls a spike
    steps_before: int = 4  # K: the kit's earliest state is from the start of step N - K
    steps_after: int = 2  # the "after" state is from the start of step N + steps_after
    max_kits: int = 2  # per run; later spikes are counted in the last kit's kit.json


@dataclass
class SyntheticConfig:
    """A seeded Zipfian sparse HMM (proxy/data/synthetic.py). At these defaults: unigram entropy 5.36,
    bigram 3.58, Bayes-optimal loss 3.12 nats/token (``python -m proxy.data`` prints them)."""

    seed: int = 1234
    vocab_size: int = 512
    n_states: int = 64  # hidden states
    zipf_exponent: float = 1.5  # emission and transition weights ~ rank^-zipf_exponent
    emissions_per_state: int = 24  # sparse support of each state's emission distribution
    transitions_per_state: int = 4  # sparse support of each state's transition distribution
    # A deterministic sub-language mixed in (issue 30: a near-zero-noise part inside a loss that stays
    # high): this share of the rows, train and val alike, walk a fixed cycle through
    # `sublanguage_tokens` token ids of their own (after vocab_size) from a random start. 0: none.
    sublanguage_fraction: float = 0.0
    sublanguage_tokens: int = 64
    # Rare tokens inside the HMM (issue 30: rows of the embedding whose Adam second moment decays
    # while they are absent): every state emits, with probability `rare_rate`, one of `rare_tokens`
    # token ids of their own (after vocab_size), uniformly; still an HMM, so its figures stay exact.
    rare_rate: float = 0.0
    rare_tokens: int = 64


@dataclass
class InjectionConfig:
    """Plant runs of a repeated n-gram in train batches (OLMo 2: documents with 32+ repeats of a
    1-13 token n-gram cause grad-norm spikes). Applied at steps [start_step, end_step)."""

    enabled: bool = False
    min_period: int = 1  # n-gram length range
    max_period: int = 13
    repeats: int = 32  # copies per planted run (periods whose run does not fit seq_len+1 are skipped)
    fraction: float = 0.1  # chance that a train row gets a run
    start_step: Optional[int] = None  # None: from the start
    end_step: Optional[int] = None  # None: to the end
    every: int = 1  # only every n-th step of the window (start_step, start_step + n, ...): >1 gives
    #                 isolated poison batches rather than a stretch of bad data
    span: SpanSource = SpanSource.random


@dataclass
class NgramFilterConfig:
    """Find runs of min_repeats+ copies of a min_period..max_period token span in train batches."""

    enabled: bool = False
    mode: FilterMode = FilterMode.mask
    min_period: int = 1
    max_period: int = 13
    min_repeats: int = 32


@dataclass
class DataConfig:
    source: DataSource = DataSource.synthetic
    path: Optional[str] = None  # memmap: a .bin file (or folder with train.bin/val.bin); text: a .txt/folder
    dtype: str = "auto"  # memmap token dtype: auto (meta.json's, else uint16) | uint16 | uint32
    tokenizer: str = "byte"  # text: byte | bpe (trained at load) | path to a tokenizers json
    bpe_vocab_size: int = 4096  # text with tokenizer=bpe
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    val_fraction: float = 0.05  # memmap/text without a val file: tail held out for validation
    seed: int = 0  # the batch stream: batch i of a split is a pure function of (seed, split, i)
    inject: InjectionConfig = field(default_factory=InjectionConfig)
    ngram_filter: NgramFilterConfig = field(default_factory=NgramFilterConfig)


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # the torch.compile modes that capture CUDA graphs


@dataclass
class TrainConfig:
    steps: int = 300
    batch_size: int = 16
    seq_len: int = 128
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # auto (fp32 on CPU, bf16 autocast on CUDA) | fp32 | bf16 | fp64 (parameters, optimizer state and
    # every computation in float64: the control that tells a precision artefact from a dynamical one)
    dtype: str = "auto"
    compile: str = "auto"  # auto (on for CUDA) | true | false
    # torch.compile's mode where compiled: default | reduce-overhead (CUDA graphs: the launch
    # overhead of small models) | max-autotune | max-autotune-no-cudagraphs; the summary's
    # cuda_graph_skips counts the run's graphs that fell back to plain launches
    compile_mode: str = "default"
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 8
    ckpt_every: int = 0  # 0: only the final checkpoint
    keep_checkpoints: int = 2
    save_final: bool = True
    resume: bool = False  # continue the run in out_dir (its stored config; proxy/train/resume.py)
    # a resume may change only where / how the run executes (resume.RESUME_MAY_CHANGE); true lets
    # it change anything else too, and the summary records what it changed (resume_override)
    resume_override: bool = False
    diverge_loss: float = 0.0  # >0: a train loss above this ends the run as diverged
    diverge_factor: float = 3.0  # a train loss above factor * loss-at-init also counts
    # the diverge_* rule is judged at every step on the device and read back on logging steps (no
    # host sync in between; proxy/train/watch.py); true reads every step back (rollback, a spike
    # capture and data parallelism do so themselves; skip-step and ZClip decide on the device)
    check_every_step: bool = False
    # a progress bar (tokens/s, latest val loss) on stderr: auto = where stderr is a terminal
    # (and not in a worker process of a parallel launcher) | true | false
    progress: str = "auto"
    stats_every: int = 0  # 0: attention/output statistics every log step
    # the loss of one fixed held-out sample (the first probe_batches eval batches, the same every
    # time, no optimizer touched), every probe_every steps (0: never): probe/loss, the series in
    # which a loss spike (rise and recovery) is told from noise and from a collapse (proxy/spikes.py)
    probe_every: int = 0
    probe_batches: int = 8


@dataclass
class SweepConfig:
    """Train several runs in one process as a vectorized ensemble (proxy/train/ensemble.py).

    Members are the grid lrs x seeds x weight_decays; an empty list means the single value of
    optim.lr / train.seed / optim.weight_decay. All members see the same batches. With every
    list empty (the default) a run is an ordinary single run.
    """

    lrs: list[float] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    weight_decays: list[float] = field(default_factory=list)


@dataclass
class WandbConfig:
    mode: WandbMode = WandbMode.disabled
    project: str = "proxy"
    entity: Optional[str] = None
    group: Optional[str] = None  # None: the Hydra sweep id (all jobs of a multirun share it)
    tags: list[str] = field(default_factory=list)


@dataclass
class TensorBoardConfig:
    """TensorBoard event files in ``<run_dir>/tensorboard`` (proxy/train/tracking.py): the keys and
    step axis of metrics.jsonl. Needs the ``tensorboard`` package (``pip install 'proxy[tensorboard]'``);
    view with ``tensorboard --logdir runs``."""

    enabled: bool = False


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    remedy: RemedyConfig = field(default_factory=RemedyConfig)
    capture: CaptureConfig = field(default_factory=CaptureConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    tensorboard: TensorBoardConfig = field(default_factory=TensorBoardConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    run_name: Optional[str] = None  # None: derived from the command-line overrides
    out_dir: Optional[str] = None  # None: Hydra's run dir (or ./runs/<name> outside Hydra)
    # free-form tag of an experiment preset, carried into the run record for the report
    experiment: Optional[str] = None


# registered at import: Hydra resolves a job's directory (conf/config.yaml, hydra.sweep.subdir)
# in the process that runs the job (a joblib worker, a SLURM task), which imports this module
# with the task function
OmegaConf.register_new_resolver("proxy_dirname", lambda overrides: run_dirname(list(overrides)), replace=True)
# 4 random hex digits, drawn once per config (cached like Hydra's ${now:...}): unique run dirs
OmegaConf.register_new_resolver("proxy_uid", lambda: secrets.token_hex(2), use_cache=True, replace=True)


def register_configs() -> None:
    """Register the schema so conf/config.yaml is checked against it."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="proxy_schema", node=Config)


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------
def _positive(value: float, key: str, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{key}={value} must be {bound}")


def _validate_detector(d: DetectorConfig, key: str) -> None:
    _positive(d.sigma, f"{key}.sigma")
    if not 2 <= d.min_history <= d.window:
        raise ConfigError(f"{key}.min_history={d.min_history} must be in [2, {key}.window={d.window}]")


def _validate_remedy(r: RemedyConfig) -> None:
    _validate_detector(r.detector, "remedy.detector")
    for key in ("rollback_every", "rollback_keep"):
        _positive(getattr(r, key), f"remedy.{key}")
    for key in ("rollback_min_age", "rollback_skip_batches", "rollback_max", "zclip_warmup", "max_consecutive_skips"):
        _positive(getattr(r, key), f"remedy.{key}", allow_zero=True)
    # right after a snapshot the oldest kept one is (keep - 1) * every steps back
    reach = (r.rollback_keep - 1) * r.rollback_every
    if reach < r.rollback_min_age:
        raise ConfigError(
            f"remedy.rollback_min_age={r.rollback_min_age} exceeds (rollback_keep - 1) x "
            f"rollback_every = {reach}: no kept snapshot would be old enough"
        )
    if not 0.0 < r.zclip_alpha < 1.0:
        raise ConfigError(f"remedy.zclip_alpha={r.zclip_alpha} must be in (0, 1)")
    _positive(r.zclip_z, "remedy.zclip_z")


def _validate_capture(c: CaptureConfig) -> None:
    _validate_detector(c.detector, "capture.detector")
    for key in ("steps_before", "steps_after", "max_kits"):
        _positive(getattr(c, key), f"capture.{key}")


def _validate_sweep(sw: SweepConfig) -> None:
    for key in ("lrs", "seeds", "weight_decays"):
        values = list(getattr(sw, key))
        if len(set(values)) != len(values):
            raise ConfigError(f"sweep.{key}={values} has repeated values")
    for lr in sw.lrs:
        _positive(lr, "sweep.lrs entry")
    for wd in sw.weight_decays:
        _positive(wd, "sweep.weight_decays entry", allow_zero=True)


def _finite(value: Any, key: str) -> None:
    """ConfigError naming the key of any NaN or infinite number (``optim.lr=inf`` would train
    and be reported as a run at an LR no plot can place)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}={value} must be a finite number")
    if dataclasses.is_dataclass(value):
        for f in dataclasses.fields(value):
            _finite(getattr(value, f.name), f"{key}.{f.name}" if key else f.name)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _finite(item, f"{key}[{i}]")


def validate(cfg: Config) -> Config:
    """Cross-field checks that types alone cannot express. Raises ConfigError naming the key."""
    _finite(cfg, "")
    m, o, s, t = cfg.model, cfg.optim, cfg.schedule, cfg.train
    for key in ("d_model", "n_layers", "n_heads", "max_seq_len"):
        _positive(getattr(m, key), f"model.{key}")
    if m.d_model % m.n_heads:
        raise ConfigError(f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}")
    if (m.d_model // m.n_heads) % 2:
        raise ConfigError(f"model head dim d_model/n_heads={m.d_model // m.n_heads} must be even for RoPE")
    if m.d_ff is not None:
        _positive(m.d_ff, "model.d_ff")
    if m.init_std is not None:
        _positive(m.init_std, "model.init_std")
    _positive(m.init_gain, "model.init_gain")
    _positive(o.lr, "optim.lr")
    _positive(o.eps, "optim.eps")
    _positive(o.weight_decay, "optim.weight_decay", allow_zero=True)
    _positive(o.grad_clip, "optim.grad_clip", allow_zero=True)
    for key in ("beta1", "beta2"):
        if not 0.0 <= getattr(o, key) < 1.0:
            raise ConfigError(f"optim.{key}={getattr(o, key)} must be in [0, 1)")
    _positive(cfg.loss.z_loss, "loss.z_loss", allow_zero=True)
    _positive(s.warmup_steps, "schedule.warmup_steps", allow_zero=True)
    if not 0.0 <= s.min_lr_ratio <= 1.0:
        raise ConfigError(f"schedule.min_lr_ratio={s.min_lr_ratio} must be in [0, 1]")
    if not 0.0 < s.decay_fraction <= 1.0:
        raise ConfigError(f"schedule.decay_fraction={s.decay_fraction} must be in (0, 1]")
    _validate_remedy(cfg.remedy)
    _validate_sweep(cfg.sweep)
    _validate_capture(cfg.capture)
    if cfg.capture.enabled and CaptureTrigger(cfg.capture.trigger) == CaptureTrigger.probe and t.probe_every != 1:
        raise ConfigError(
            f"capture.trigger=probe watches probe/loss at every step: set train.probe_every=1 (it is {t.probe_every})"
        )
    for key in ("steps", "batch_size", "seq_len", "log_every", "eval_every", "eval_batches"):
        _positive(getattr(t, key), f"train.{key}")
    _positive(t.probe_every, "train.probe_every", allow_zero=True)
    _positive(t.probe_batches, "train.probe_batches")
    if t.seq_len > m.max_seq_len:
        raise ConfigError(f"train.seq_len={t.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
    if t.dtype not in ("auto", "fp32", "bf16", "fp64"):
        raise ConfigError(f"train.dtype={t.dtype!r} must be one of auto, fp32, bf16, fp64")
    if str(t.compile).lower() not in ("auto", "true", "false"):
        raise ConfigError(f"train.compile={t.compile!r} must be auto, true or false")
    if t.compile_mode not in COMPILE_MODES:
        raise ConfigError(f"train.compile_mode={t.compile_mode!r} must be one of {', '.join(COMPILE_MODES)}")
    if not (t.device in ("auto", "cpu", "cuda") or t.device.startswith("cuda:")):
        raise ConfigError(f"train.device={t.device!r} must be auto, cpu, cuda or cuda:N")
    if t.resume_override and not t.resume:
        raise ConfigError("train.resume_override=true needs train.resume=true: it lets a resume change the config")
    if str(t.progress).lower() not in ("auto", "true", "false"):
        raise ConfigError(f"train.progress={t.progress!r} must be auto, true or false")
    if cfg.data.dtype not in ("auto", "uint16", "uint32"):
        raise ConfigError(f"data.dtype={cfg.data.dtype!r} must be auto, uint16 or uint32")
    if cfg.data.source != DataSource.synthetic and not cfg.data.path:
        raise ConfigError(f"data.path is required for data.source={cfg.data.source.value}")
    return cfg


def schema_keys(schema: Optional[type] = None, prefix: str = "") -> list[str]:
    """Every dotted key of the schema (sections and leaves): what a command line may set."""
    schema = schema or Config
    keys = []
    for f in dataclasses.fields(schema):
        key = f"{prefix}{f.name}"
        keys.append(key)
        kind = _field_dataclass(schema, f.name)
        if kind is not None:
            keys += schema_keys(kind, key + ".")
    return keys


def _field_dataclass(schema: type, name: str) -> Optional[type]:
    import typing

    hint = typing.get_type_hints(schema)[name]
    return hint if dataclasses.is_dataclass(hint) and isinstance(hint, type) else None


def unknown_keys(tree: Any, schema: Optional[type] = None, prefix: str = "") -> list[str]:
    """The dotted keys of ``tree`` the schema does not have (a ``+optim.lrr=...`` typo)."""
    schema = schema or Config
    if not isinstance(tree, dict):
        return []
    names = {f.name for f in dataclasses.fields(schema)}
    found = []
    for key, value in tree.items():
        if key not in names:
            found.append(f"{prefix}{key}")
            continue
        kind = _field_dataclass(schema, str(key))
        if kind is not None:
            found += unknown_keys(value, kind, f"{prefix}{key}.")
    return found


def did_you_mean(key: str) -> str:
    """`` (did you mean optim.lr?)`` for the schema key closest to ``key``, or nothing."""
    import difflib

    close = difflib.get_close_matches(key, schema_keys(), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


# keys an older proxy wrote, and where they live now: a stored config (a run dir, a checkpoint,
# a kit) is read with them moved; a command line that uses one is told the new name
RENAMED_KEYS = {
    **{f"remedy.spike_{k}": f"remedy.detector.{k}" for k in ("baseline", "sigma", "window", "min_history")},
    **{f"capture.{k}": f"capture.detector.{k}" for k in ("baseline", "sigma", "window", "min_history")},
}


def renamed(tree: dict[str, Any]) -> dict[str, Any]:
    """A stored config tree with :data:`RENAMED_KEYS` moved to their new place (a copy; the new
    key wins where both are present)."""
    import copy

    tree = copy.deepcopy(tree)
    for old, new in RENAMED_KEYS.items():
        *head, leaf = old.split(".")
        parent = tree
        for part in head:
            parent = parent.get(part) if isinstance(parent, dict) else None  # type: ignore[assignment]
        if not isinstance(parent, dict) or leaf not in parent:
            continue
        value = parent.pop(leaf)
        *new_head, new_leaf = new.split(".")
        node = tree
        for part in new_head:
            node = node.setdefault(part, {}) if isinstance(node, dict) else node
        if isinstance(node, dict):
            node.setdefault(new_leaf, value)
    return tree


def to_config(cfg: Any) -> Config:
    """Turn a DictConfig (from Hydra) or a plain dict into a validated ``Config``. A key the
    schema does not have is refused in one line, with the closest key it does have."""
    from omegaconf.errors import OmegaConfBaseException

    if not isinstance(cfg, Config):
        tree = OmegaConf.to_container(cfg, resolve=False) if isinstance(cfg, DictConfig) else cfg
        unknown = unknown_keys(tree)
        if unknown and unknown[0] in RENAMED_KEYS:
            raise ConfigError(f"{unknown[0]} is now {RENAMED_KEYS[unknown[0]]} (renamed in proxy 2026-12)")
        if unknown:
            raise ConfigError(
                f"unknown key {unknown[0]}{did_you_mean(unknown[0])}: proxy's schema has no such "
                "key, and a run would silently ignore it"
            )
    try:
        if isinstance(cfg, Config):
            obj = cfg
        else:
            merged = OmegaConf.merge(OmegaConf.structured(Config), cfg)
            # merged onto the structured Config, so to_object builds a Config instance
            obj = cast(Config, OmegaConf.to_object(merged))
    except OmegaConfBaseException as exc:  # unknown key, wrong type, bad enum value
        raise ConfigError(_one_line(exc)) from None
    return validate(obj)


def stored_config(tree: Any, where: str | Path) -> Config:
    """A config read back from a file (a run's config.yaml, a checkpoint, a spike kit): plain
    data only, no ``${...}`` interpolation resolved (a copied run dir must not make proxy read
    an environment variable or a file), then validated like a typed one. ConfigError, one line
    naming ``where`` and the key, otherwise."""
    try:
        check_plain(tree, str(where))
    except (StoredFileError, UnsafePathError) as exc:
        raise ConfigError(str(exc)) from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{where}: the config is a {type(tree).__name__}, not a mapping")
    try:
        return to_config(renamed(tree))
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def type_errors(tree: Any, schema: Optional[type] = None, key: str = "") -> Optional[str]:
    """Where a stored config (a run dir's config.yaml, as plain data) holds a value of another
    type than today's schema declares for its key: ``"train.seed holds a dict, not an int"``, or
    None. Keys the schema does not know (a run of an older proxy) are not checked."""
    import types
    import typing

    schema = schema or Config
    if not isinstance(tree, dict):
        return f"{key or 'the config'} holds a {type(tree).__name__}, not a mapping"
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        if f.name not in tree:
            continue
        value, expected, here = tree[f.name], hints[f.name], f"{key}.{f.name}" if key else f.name
        options = (
            [a for a in typing.get_args(expected) if a is not type(None)]
            if typing.get_origin(expected) in (typing.Union, types.UnionType)
            else [expected]
        )
        if value is None and len(options) < len(typing.get_args(expected) or [0, 0]):
            continue  # Optional[...] holding None
        kind = typing.get_origin(options[0]) or options[0]
        if isinstance(kind, type) and dataclasses.is_dataclass(kind):
            found = type_errors(value, kind, here)
            if found:
                return found
            continue
        ok = {
            bool: lambda v: isinstance(v, bool),
            int: lambda v: isinstance(v, int) and not isinstance(v, bool),
            float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
            str: lambda v: isinstance(v, str),
            list: lambda v: isinstance(v, list),
            dict: lambda v: isinstance(v, dict),
        }
        if isinstance(kind, type) and issubclass(kind, Enum):
            good = isinstance(value, str) and value in {m.value for m in kind}
        else:
            good = any(ok.get(typing.get_origin(o) or o, lambda v: True)(value) for o in options)
        if not good:
            return f"{here} holds {type(value).__name__} {str(value)[:40]!r}, not {getattr(kind, '__name__', kind)}"
    return None


def _one_line(exc: Exception) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    head = lines[0] if lines else type(exc).__name__
    key = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("full_key:")), None)
    return f"{head} (key: {key})" if key and key not in head else head


def as_dict(cfg: Config) -> dict:
    """Plain nested dict with Enums as their names (JSON/YAML friendly)."""

    def convert(value: Any) -> Any:
        if isinstance(value, Enum):
            return value.value
        if dataclasses.is_dataclass(value):
            return {f.name: convert(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [convert(v) for v in value]
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        return value

    return convert(cfg)


def from_dict(data: dict | DictConfig) -> Config:
    return to_config(OmegaConf.create(data) if isinstance(data, dict) else data)


__all__ = [
    "Attention",
    "CaptureConfig",
    "CaptureTrigger",
    "Config",
    "ConfigError",
    "DataConfig",
    "DataSource",
    "FilterMode",
    "InjectionConfig",
    "SnapshotStorage",
    "NgramFilterConfig",
    "SpanSource",
    "Init",
    "LossConfig",
    "LossImpl",
    "MISSING",
    "MLPKind",
    "ModelConfig",
    "Norm",
    "NormPosition",
    "OptimConfig",
    "QKNorm",
    "RemedyConfig",
    "RemedyKind",
    "Schedule",
    "ScheduleConfig",
    "SweepConfig",
    "SyntheticConfig",
    "TensorBoardConfig",
    "TrainConfig",
    "WandbConfig",
    "WandbMode",
    "WeightDecayMode",
    "as_dict",
    "from_dict",
    "register_configs",
    "did_you_mean",
    "schema_keys",
    "stored_config",
    "to_config",
    "type_errors",
    "unknown_keys",
    "validate",
]
