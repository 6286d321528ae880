"""Trainer throughput: tokens/s of whole training steps (forward, backward, clip, AdamW), eager vs
torch.compile, for a few model presets.

    python -m benchmarks.trainer_speed [--models tiny 5m] [--steps 30] [--out FILE]

Timed with the real Trainer.train_step on non-logging steps (the common case), after warm-up
steps that absorb compilation. Prints a table and writes JSON with the device, date and versions.
Timings belong here, never in pass/fail tests.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
from omegaconf import OmegaConf

from proxy.config import Config, as_dict, to_config
from proxy.records import atomic_write_text
from proxy.train import RunInfo, Trainer

ROOT = Path(__file__).resolve().parents[1]


def config_for(model: str, compile_: bool, batch: int, seq_len: int, device: str, attention: str = "auto") -> Config:
    preset = OmegaConf.load(ROOT / "conf" / "model" / f"{model}.yaml")
    base = as_dict(Config())
    base["model"].update(OmegaConf.to_container(preset))
    base["model"]["attention"] = attention
    base["train"].update(
        batch_size=batch,
        seq_len=seq_len,
        compile=str(compile_).lower(),
        progress=False,
        device=device,
        save_final=False,
    )
    return to_config(OmegaConf.create(base))


def measure(cfg: Config, steps: int, warmup: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, RunInfo(Path(tmp), "bench"))
        trainer.loss_at_init = None
        for step in range(warmup):
            trainer.train_step(step, logging_step=False)
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for step in range(warmup, warmup + steps):
            trainer.train_step(step, logging_step=False)
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        trainer.ledger.release()
    return steps * cfg.train.batch_size * cfg.train.seq_len / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "5m"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = "cpu" if device == "auto" else device
    rows = []
    print(f"{'model':>6} {'params':>10} {'mode':>8} {'tokens/s':>10}")
    for model in args.models:
        for compile_ in (False, True):
            cfg = config_for(model, compile_, args.batch_size, args.seq_len, device)
            rate = measure(cfg, args.steps, args.warmup)
            mode = "compile" if compile_ else "eager"
            rows.append(
                {
                    "model": model,
                    "mode": mode,
                    "tokens_per_s": rate,
                    "batch_size": args.batch_size,
                    "seq_len": args.seq_len,
                }
            )
            print(f"{model:>6} {cfg.model.approx_params.split()[0]:>10} {mode:>8} {rate:>10.0f}")
    info = {
        "device": torch.cuda.get_device_name()
        if device.startswith("cuda")
        else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "date": date.today().isoformat(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "results": rows,
    }
    out = (
        Path(args.out)
        if args.out
        else ROOT
        / "benchmarks"
        / "results"
        / f"trainer-{'cuda' if device.startswith('cuda') else 'cpu'}-{info['date']}.json"
    )
    atomic_write_text(out, json.dumps(info, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
