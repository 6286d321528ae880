"""Training: the loop, what it measures, what it writes, and what it does about spikes.

    cli.py            proxy-train (Hydra): composes the config, routes to a run or a sweep
    trainer.py        the one loop: a run is K >= 1 members (Trainer, train(), train_ensemble())
    engine.py         the step engines it drives: one model (K = 1), or K stacked (ensemble.py)
    step.py           one optimizer step of one model, shared with the spike-kit replay (proxy/forensics)
    ledger.py         one run's bookkeeping: records, wandb, checkpoints (standalone and members)
    runtime.py        device, precision, compile; the divergence rule and summary fields
    remedies.py       skip-step, rollback, ZClip behind one Remedy interface; the spike detector
    observer.py       what may watch the loop; capture.py: spike kits, the one observer so far
    diagnostics.py    what is measured (attention / output statistics, grad and update RMS, ...)
    tracking.py       the sinks: wandb, TensorBoard, the log (train.log's key lines)
    sweep_status.py   a multirun's progress line (runs done of N, ETA)
    distributed.py    torchrun / SLURM data parallelism
    ensemble.py       a sweep's members as one engine: vmapped forward, stacked AdamW (ensemble_optim.py)
    estimate.py       the device time of a run or preset, printed before it starts

Imports go one way: cli -> trainer -> engine, ensemble -> step, remedies; trainer -> ledger,
capture -> remedies, runtime.
"""

from proxy.train.trainer import RunInfo, Trainer, train, train_ensemble

__all__ = ["RunInfo", "Trainer", "train", "train_ensemble"]
