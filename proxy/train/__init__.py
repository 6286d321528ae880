"""Training: the loop, what it measures, what it writes, and what it does about spikes.

    cli.py            proxy-train (Hydra): composes the config, routes to a run or an ensemble
    trainer.py        the loop of one run (Trainer, train())
    step.py           one optimizer step, shared with the spike-kit replay (proxy/forensics)
    ledger.py         one run's bookkeeping: records, wandb, checkpoints (standalone and members)
    runtime.py        device, precision, compile; the divergence rule and summary fields
    remedies.py       skip-step, rollback, ZClip behind one Remedy interface; the spike detector
    observer.py       what may watch the loop; capture.py: spike kits, the one observer so far
    diagnostics.py    what is measured (attention / output statistics, grad and update RMS, ...)
    tracking.py       the sinks: wandb, TensorBoard, the log (train.log's key lines)
    sweep_status.py   a multirun's progress line (runs done of N, ETA)
    distributed.py    torchrun / SLURM data parallelism
    ensemble.py       a whole sweep in one process: K members vectorized (ensemble_optim.py)
    estimate.py       the device time of a run or preset, printed before it starts

Imports go one way: cli -> trainer, ensemble -> ledger, runtime; trainer -> step, ledger, capture
-> remedies, runtime.
"""

from proxy.train.ensemble import train_ensemble
from proxy.train.trainer import RunInfo, Trainer, train

__all__ = ["RunInfo", "Trainer", "train", "train_ensemble"]
