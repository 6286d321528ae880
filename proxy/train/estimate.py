"""How long will it take? A run's device time, estimated before it starts.

    python -m proxy.train.estimate +experiment=attention_logit_growth/gpu [overrides ...] [--gpu H200]

prints each job of the preset's sweep and the total; ``proxy-train`` prints a run's own estimate
as it starts. The model is deliberately simple, and says so:

    step time = max(FLOPs of the step / (peak x MFU),  launch floor)
    FLOPs     = 6 N_train + attention per token (PaLM appendix B), x K members of an ensemble,
                plus the forward passes of the evaluations (2 N per token)
    MFU       = 40% for a model that fills the GPU (>= 50M parameters), falling with size to 5% at
                1M (small matrices leave the tensor cores idle); halved without compile
    floor     = kernel launches per step: ~0.1 ms per layer and parameter tensor, 3x without compile
    + a logging step's host sync and statistics: ~5 ms each (every train.log_every steps)
    + the probes' forward passes (train.probe_every), as the evaluations'
    + startup (building, first compilation: ~20 s, +40 s compiled; ``fixed_s``, which a calibration
      of the step rate leaves alone)

These are leads, not measurements. The device check (benchmarks/gpu_check/ parts 3 and 4) on an
H200 (2026-12-04) measured 124m at 39.4 % MFU compiled and 24.2 % eager (this model: 40 %, 20 %);
eager 1m-20m models trained at 0.5-0.6x the modelled rate alone and 0.3-0.45x as 8-member
ensembles (the floor below is too low for them). Their compiled rate is not measured yet; calibrate
the floor on it when a device check records it.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from typing import Optional, Sequence

from proxy.config import CONF_DIR, Config
from proxy.data.synthetic import language_vocab
from proxy.train.diagnostics import peak_flops_of

STARTUP_S = 20.0
COMPILE_S = 40.0
SLOWEST_H100 = 756e12  # H100 PCIe, dense bf16 (proxy.train.diagnostics.PEAK_FLOPS)
LAUNCH_S_PER_TENSOR = 1e-4  # one fused kernel launch per parameter tensor and step, roughly
LOG_S_PER_STEP = 5e-3  # a logging step: one host sync and the statistics' small kernels (a lead)


def mfu_for(n_params: float, compiled: bool) -> float:
    """An assumed model FLOPs utilisation: 40% at >= 50M parameters, 5% at 1M, log-linear between."""
    low, high = math.log(1e6), math.log(5e7)
    share = min(1.0, max(0.0, (math.log(max(n_params, 1.0)) - low) / (high - low)))
    mfu = 0.05 + share * (0.40 - 0.05)
    return mfu if compiled else mfu / 2


@dataclass
class Estimate:
    seconds: float
    tokens: int
    flops: float
    mfu: float
    step_s: float
    members: int
    fixed_s: float = 0.0  # startup and first compilation, in ``seconds``

    def describe(self) -> str:
        minutes = self.seconds / 60
        return (
            f"~{minutes:.1f} min ({self.tokens / 1e6:.1f}M tokens x {self.members} member(s), "
            f"{self.step_s * 1e3:.1f} ms/step at an assumed {100 * self.mfu:.0f}% MFU)"
        )


def non_embedding_params(cfg: Config) -> int:
    m = cfg.model
    return 12 * m.n_layers * m.d_model**2


def estimate(
    cfg: Config,
    gpu: str = "H200",
    vocab_size: Optional[int] = None,
    members: Optional[int] = None,
    compiled: Optional[bool] = None,
) -> Estimate:
    """The device time of one run (or one ensemble: K members at once) of ``cfg`` on ``gpu``."""
    m, t = cfg.model, cfg.train
    synthetic = language_vocab(cfg.data.synthetic)
    vocab = vocab_size or m.vocab_size or (synthetic if cfg.data.source == "synthetic" else 50304)
    k = members or max(1, len(cfg.sweep.lrs or [0]) * len(cfg.sweep.seeds or [0]) * len(cfg.sweep.weight_decays or [0]))
    compiled = (str(t.compile).lower() != "false") if compiled is None else compiled
    n = non_embedding_params(cfg)
    per_token = 6 * (n + vocab * m.d_model) + 12 * m.n_layers * m.d_model * t.seq_len / 2
    tokens_per_step = t.batch_size * t.seq_len
    evals = t.steps // t.eval_every + 1
    peak = peak_flops_of(gpu) or SLOWEST_H100  # a card not listed: a lead, not a measurement
    mfu = mfu_for(n, compiled)
    step_flops = k * tokens_per_step * per_token
    probes = t.steps // t.probe_every if t.probe_every else 0
    eval_flops = (evals * t.eval_batches + probes * t.probe_batches) * step_flops / 3  # forward only
    tensors = 4 + 8 * m.n_layers  # parameter tensors: launches per step scale with them
    floor = tensors * LAUNCH_S_PER_TENSOR * (1 if compiled else 3)
    step_s = max(step_flops / (peak * mfu), floor)
    logged = t.steps // t.log_every + 1
    fixed = STARTUP_S + (COMPILE_S if compiled else 0.0)
    seconds = t.steps * step_s + logged * LOG_S_PER_STEP + eval_flops / (peak * mfu) + fixed
    flops = t.steps * step_flops + eval_flops
    return Estimate(seconds, k * t.steps * tokens_per_step, flops, mfu, step_s, k, fixed)


def announce(cfg: Config) -> Optional[str]:
    """The line proxy-train prints as a run starts on a GPU (None elsewhere: the model is a GPU's)."""
    import torch

    if not torch.cuda.is_available() or cfg.train.device == "cpu":
        return None
    gpu = torch.cuda.get_device_name()
    return f"estimated device time on {gpu}: {estimate(cfg, gpu).describe()}"


# --------------------------------------------------------------------------------------------
# A whole preset: its sweep's jobs
# --------------------------------------------------------------------------------------------
def sweep_jobs(overrides: Sequence[str]) -> list[list[str]]:
    """The job override lists of ``overrides`` and the preset's ``hydra.sweeper.params``, as
    Hydra's basic sweeper would expand them (command-line values win)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from proxy.config import register_configs

    GlobalHydra.instance().clear()
    register_configs()
    parser = OverridesParser.create()
    # composing needs one value per key: a swept key (model.d_model=512,1024) takes part in the
    # expansion below, not in the composition that reads the preset's own sweeper params
    fixed = [
        o for o, parsed in zip(overrides, parser.parse_overrides(list(overrides))) if not parsed.is_sweep_override()
    ]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=fixed, return_hydra_config=True)
    params = dict(cfg.hydra.sweeper.params or {})
    given = {o.split("=", 1)[0].lstrip("+~"): o for o in overrides}
    lines = [f"{key}={value}" for key, value in params.items() if key.lstrip("+~") not in given]
    lines += [o for o in overrides]
    axes = []
    for override in parser.parse_overrides(lines):
        key = override.get_key_element()
        values = (
            list(override.sweep_string_iterator())
            if override.is_sweep_override()
            else [override.get_value_element_as_str()]
        )
        axes.append([f"{key}={v}" for v in values])
    jobs: list[list[str]] = [[]]
    for axis in axes:
        jobs = [job + [choice] for job in jobs for choice in axis]
    return jobs


def job_config(job: Sequence[str]) -> Config:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from proxy.config import register_configs, to_config

    GlobalHydra.instance().clear()
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return to_config(compose(config_name="config", overrides=list(job)))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m proxy.train.estimate", description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="as for proxy-train -m, e.g. +experiment=<preset>")
    parser.add_argument("--gpu", default="H200", help="a GPU name, as in proxy.train.diagnostics.PEAK_FLOPS")
    args = parser.parse_args(argv)
    total = 0.0
    jobs = sweep_jobs(args.overrides)
    for job in jobs:
        est = estimate(job_config(job), args.gpu)
        total += est.seconds
        print(f"{est.seconds / 60:7.1f} min  {','.join(o for o in job if not o.startswith('+experiment'))}")
    print(
        f"{total / 60:7.1f} min  in all: {len(jobs)} job(s) one after another on one {args.gpu} (estimate; "
        "benchmarks/gpu_check/ measures the real rates)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
