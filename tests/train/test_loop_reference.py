"""Standalone runs are what they were: the records of four CPU runs, committed before the training
loop was rewritten as one loop for one run or K members (issue 28), checked value for value.

The references were written by ``python -m tests.train.test_loop_reference --write`` (one thread,
torch's CPU build) and hold metrics.jsonl and summary.json less what a clock or a path sets
(timestamps, wall time, tokens/s, the run's name). Bit for bit holds on the machine that wrote
them (same torch version, CPU capability and thread count: meta.json); elsewhere the rounding of
the kernels differs, and the check falls back to a relative 1e-5.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from proxy.train import train
from tests.train.test_trainer import tiny_cfg

DATA = Path(__file__).resolve().parents[1] / "fixtures" / "loop_reference"
VOLATILE_SUMMARY = ("started_at", "updated_at", "wall_time_s", "run_name", "threads", "code")
VOLATILE_PREFIX = ("perf/",)


def _hair_trigger(kind: str, **extra: Any) -> dict:
    return dict(kind=kind, detector=dict(sigma=0.5, window=5, min_history=3), **extra)


CASES: dict[str, dict] = {
    "plain": tiny_cfg(train=dict(steps=24, log_every=1, eval_every=8, ckpt_every=12), loss=dict(z_loss=1e-4)),
    "skip_step": tiny_cfg(remedy=_hair_trigger("skip_step"), train=dict(steps=30, log_every=2)),
    "rollback": tiny_cfg(
        remedy=_hair_trigger(
            "rollback", rollback_every=5, rollback_keep=3, rollback_min_age=5, rollback_skip_batches=7, rollback_max=2
        ),
        train=dict(steps=30, log_every=1),
    ),
    "zclip": tiny_cfg(remedy=dict(kind="zclip", zclip_z=0.1, zclip_warmup=3), train=dict(steps=20, log_every=1)),
}


def machine() -> dict[str, Any]:
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": 1}


def record_of(run_dir: Path) -> dict[str, Any]:
    """What a reference holds of a run: its rows (less timing) and summary (less clock and name)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [{k: v for k, v in row.items() if not k.startswith(VOLATILE_PREFIX)} for row in rows]
    summary = json.loads((run_dir / "summary.json").read_text())
    summary = {k: v for k, v in summary.items() if k not in VOLATILE_SUMMARY}
    return {"rows": rows, "summary": summary}


def run_case(name: str, run_dir: Path) -> dict[str, Any]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(CASES[name], run_dir)
    finally:
        torch.set_num_threads(threads)
    return record_of(run_dir)


def _close(a: Any, b: Any, rel: float) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], rel) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y, rel) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=rel, abs_tol=1e-12)
    return a == b


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_standalone_run_keeps_its_committed_record(tmp_path, name):
    reference = json.loads((DATA / f"{name}.json").read_text())
    got = run_case(name, tmp_path / name)
    if reference["machine"] == machine():
        assert [list(r.items()) for r in got["rows"]] == [list(r.items()) for r in reference["rows"]]  # key order too
        assert got["summary"] == reference["summary"]
    else:
        assert _close(got, {"rows": reference["rows"], "summary": reference["summary"]}, rel=1e-5)


def write_references() -> None:
    import tempfile

    DATA.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name in sorted(CASES):
            record = run_case(name, Path(tmp) / name)
            (DATA / f"{name}.json").write_text(json.dumps({"machine": machine(), **record}, indent=1) + "\n")
            print(f"{name}: {len(record['rows'])} rows")


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python -m tests.train.test_loop_reference --write")
    write_references()
