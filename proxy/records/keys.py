"""The names of the run-dir contract: files and folders, statuses, metric keys, event kinds.

Writers and readers use these constants, never the strings (proxy/records/__init__.py has the
layout of a run directory).
"""

from __future__ import annotations

import re as _re

# --------------------------------------------------------------------------------------------
# Names in a run directory
# --------------------------------------------------------------------------------------------
SUMMARY = "summary.json"
METRICS = "metrics.jsonl"
CONFIG = "config.yaml"
CHECKPOINTS = "checkpoints"
ROLLBACK_DIR = "rollback"
KITS_DIR = "spike_kits"
TOKENIZER_FILE = "tokenizer.json"
TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"  # wandb's offline files (wandb.mode=offline|online)
ERROR_FILE = "error.txt"
START_ERROR_FILE = "start_error.txt"
LOCK_FILE = ".lock"
STATE_NAME = _re.compile(r"step_(\d{7})\.pt")  # checkpoints/ and rollback/ file names

# summary.json "status": running -> completed | diverged | failed | interrupted. "unknown" is
# what a reader says of a run dir whose summary.json is missing or unreadable.
RUNNING, COMPLETED, STATUS_DIVERGED, FAILED, INTERRUPTED = "running", "completed", "diverged", "failed", "interrupted"
UNKNOWN = "unknown"
UNREADABLE = "unreadable"  # a reader: a run dir whose files are not what proxy writes (Run.error says why)
STATUSES = (RUNNING, COMPLETED, STATUS_DIVERGED, FAILED, INTERRUPTED)

# --------------------------------------------------------------------------------------------
# Metric keys (metrics.jsonl rows, wandb). A trailing "/" or "_" marks a prefix: the full key
# appends a parameter name, a layer index or a statistic.
# --------------------------------------------------------------------------------------------
STEP = "step"  # every row: the optimizer step it belongs to
EVENT = "event"  # event rows: their kind (below)
TOKENS = "tokens"
TRAIN_LOSS = "train/loss"  # cross-entropy of the step's batch (mean over ranks)
TRAIN_Z_LOSS = "train/z_loss"
TRAIN_TOTAL_LOSS = "train/total_loss"  # what backward() saw: ce + z-loss
VAL_LOSS = "val/loss"
PROBE_LOSS = "probe/loss"  # the loss of one fixed held-out sample, every train.probe_every steps
LR = "optim/lr"  # the base (peak-scaled) LR of the step
GRAD_NORM = "optim/grad_norm"  # global norm before clipping
ATTN_MAX_LOGIT = "attn/max_logit"  # max over layers
ATTN_MAX_LOGIT_LAYER = "attn/max_logit/layer_"  # + layer index
ATTN_MAX_LOGIT_PEAK = "attn/max_logit_peak"  # not a metric: the ledger's running peak (summary: max_attn_logit_peak)
OUTPUT = "output/"  # + a statistic of the output logits:
OUTPUT_LOGIT_MEAN = "output/logit_mean"
OUTPUT_LOGIT_MAX = "output/logit_max"
OUTPUT_LSE_MEAN = "output/lse_mean"  # mean log Z over positions
OUTPUT_LSE_MAX = "output/lse_max"  # max log Z over positions
OUTPUT_MEAN_ROW_NORM = "output/mean_row_norm"  # ||mean over the vocabulary of the LM head's rows||
OUTPUT_LOGIT_MEAN_BY_CLASS = "output/logit_mean_"  # + never | rare | frequent (token classes)
GRAD_RMS = "grad_rms/"  # + parameter name; before clipping
UPDATE_RMS = "update_rms/"  # + parameter name; RMS of the applied update / its LR
PARAM_NORM = "param_norm/"  # + parameter name
ADAM_RMS = "adam_rms/"  # + parameter name: RMS_t = sqrt(mean(g^2 / v_hat)) of the step (Wortsman et al. 2023b)
ADAM_RMS_MAX = "optim/adam_rms_max"  # the largest RMS_t over the parameters
TOKENS_PER_S = "perf/tokens_per_s"
MFU = "perf/mfu"
ENSEMBLE_TOKENS_PER_S = "perf/ensemble_tokens_per_s"  # an ensemble's members together
DATA_INJECTED_FRAC = "data/injected_frac"
DATA_INJECTED_ROWS = "data/injected_rows"
DATA_MASKED_TOKENS = "data/masked_tokens"
DATA_DROPPED_ROWS = "data/dropped_rows"
GROWTH_ACTIVATION = "growth/activation"  # OLMo 2 growth exponents (diagnostics.growth_exponents),
GROWTH_GRADIENT = "growth/gradient"  # from the first block's output to the last block's
GROWTH_ACTIVATION_FROM_EMBEDDING = "growth/activation_from_embedding"  # ... from the embedding output
GROWTH_GRADIENT_FROM_EMBEDDING = "growth/gradient_from_embedding"
REMEDY = "remedy/"  # wandb only: + event kind, 1 at the step a remedy acted
WANDB_STEP = "trainer/step"  # wandb only: the x-axis of every chart

# what only an ensemble member writes, beside everything a standalone run writes: metric keys,
# and summary fields (its place in the ensemble)
ENSEMBLE_ONLY_KEYS = (ENSEMBLE_TOKENS_PER_S,)
ENSEMBLE_ONLY_FIELDS = ("ensemble",)


def attn_layer_key(layer: int) -> str:
    return f"{ATTN_MAX_LOGIT_LAYER}{layer}"


# --------------------------------------------------------------------------------------------
# Event kinds (event rows of metrics.jsonl)
# --------------------------------------------------------------------------------------------
DIVERGED = "diverged"  # the run stopped: a divergence rule fired (field: reason)
SKIP_STEP = "skip_step"  # a remedy dropped the step's update
ROLLBACK = "rollback"  # a remedy restored a snapshot (fields: restore_step, data_position)
ZCLIP = "zclip"  # a remedy clipped the gradients (fields: z, clipped_to)
SPIKE_KIT = "spike_kit"  # spike capture saved a kit (field: path, relative to the run dir)
