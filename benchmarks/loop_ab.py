"""The training loop's CPU speed, this tree against another checkout of proxy, rounds interleaved.

    python -m benchmarks.loop_ab /path/to/other/checkout [--rounds 3] [--steps 100] [--remedy skip_step]

Each measurement runs in its own process with that tree first on ``sys.path`` (one thread,
OMP_NUM_THREADS=1), alternating A and B so drift in the machine's load falls on both: a standalone
tiny run's non-logging steps (``Trainer.train_step``) and a 4-member LR sweep end to end
(``train_ensemble``: building, evaluation, logging every 10 steps, checkpoints). Prints tokens/s
per round and the median ratio B/A. ``--remedy`` runs both with that ``remedy.kind``, the
standalone run then end to end (``train``, as the sweep), since a remedy records its events in
the run's ledger. Timings belong here, never in pass/fail tests.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MEASURE = """
import json, sys, tempfile, time
from pathlib import Path
import torch
torch.set_num_threads(1)
from proxy.config import Config, as_dict, to_config
from proxy.train import RunInfo, Trainer, train, train_ensemble
steps, remedy = int(sys.argv[1]), sys.argv[2]

def cfg(**train):
    c = as_dict(Config())
    c["train"].update(batch_size=16, seq_len=128, progress=False, **train)
    c["remedy"]["kind"] = remedy
    return c

rates = {}
with tempfile.TemporaryDirectory() as tmp:
    if remedy == "none":  # the bare steps
        trainer = Trainer(to_config(cfg()), RunInfo(Path(tmp) / "one", "ab"))
        for s in range(5):
            trainer.train_step(s, logging_step=False)
        start = time.perf_counter()
        for s in range(5, 5 + steps):
            trainer.train_step(s, logging_step=False)
        rates["single"] = steps * 16 * 128 / (time.perf_counter() - start)
        trainer.ledger.release()
    else:  # a remedy records its events in the run's ledger: the run end to end
        start = time.perf_counter()
        train(cfg(steps=steps, eval_every=1000, log_every=10), Path(tmp) / "one")
        rates["single_run"] = steps * 16 * 128 / (time.perf_counter() - start)
    sweep = cfg(steps=steps, eval_every=1000, log_every=10)
    sweep["sweep"]["lrs"] = [1e-3, 3e-3, 1e-2, 3e-2]
    start = time.perf_counter()
    train_ensemble(sweep, Path(tmp) / "sweep")
    rates["ensemble4"] = 4 * steps * 16 * 128 / (time.perf_counter() - start)
print(json.dumps(rates))
"""


def measure(tree: Path, steps: int, remedy: str = "none") -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    command = [sys.executable, "-c", MEASURE, str(steps), remedy]
    out = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("other", type=Path, help="another checkout of proxy (A); this tree is B")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--remedy", default="none", help="remedy.kind of both runs (none, skip_step, zclip, ...)")
    args = parser.parse_args()
    trees = {"A": args.other.resolve(), "B": ROOT}
    seen: dict[str, list[dict[str, float]]] = {"A": [], "B": []}
    for round_ in range(args.rounds):
        for name, tree in trees.items():
            seen[name].append(measure(tree, args.steps, args.remedy))
            print(f"round {round_ + 1} {name}: " + ", ".join(f"{k} {v:,.0f} tok/s" for k, v in seen[name][-1].items()))
    for key in seen["A"][0]:
        ratio = statistics.median(b[key] / a[key] for a, b in zip(seen["A"], seen["B"]))
        print(f"{key}: B/A median {ratio:.3f}")


if __name__ == "__main__":
    main()
