"""PaLM's replay ablation on the spike kits of LR-provoked spikes (PaLM, arXiv 2204.02311, §5.1).

PaLM: "we took the batches of data that were surrounding the spike, and then trained on those same
data batches starting from a different, earlier checkpoint. In these cases, we did not see a
spike" -- spikes come from a batch meeting a particular parameter state, not from bad data alone;
and restarting ~100 steps earlier while skipping 200-500 batches prevented their recurrence.

Each kit (proxy/train/capture.py; written by the clipping sub-study's runs, which capture with
``steps_before`` K) holds the state from the start of step N - K, the batches N - K ... N + after,
and the detector's threshold at the spike. Three replays from that state, with the trainer's own
step (proxy/forensics/replay.py):

- ``same``: the recorded batches in order -- the control; on CPU it must reproduce the run bitwise;
- ``earlier`` (PaLM's ablation): only the batches surrounding the spike (steps N - SURROUND ... end),
  so they meet a state K - SURROUND steps older than they did in the run;
- ``skip`` (PaLM's remedy, rollback + skip): fresh batches from further on in the data stream
  (``SKIP_OFFSET`` positions) for the whole window.

A replay **re-spikes** when any replayed step's trigger value (the kit's: loss or grad norm; both
for a divergence) exceeds the kit's threshold or is not finite. Criteria, written before the run:

1. Mechanics: every ``same`` replay re-spikes and reproduces the recorded losses and grad norms
   bitwise.
2. The design shows enough spikes: >= 6 kits from >= 3 seeds.
3. PaLM's ablation: the spike's own batches from the earlier state re-spike in fewer than half of
   the kits pooled, and in at most half of them in every seed with kits (the claim: spikes are
   batch x state, not data).
4. PaLM's remedy: rollback + skip re-spikes in fewer than half of the kits pooled, and in at most
   half in every seed.

``python experiments/spike_remedies/replay/study.py RUNS... [--out DIR]`` finds every kit under
RUNS (arms of the clipping sub-study: by default ``fixed``, the arm with the usual clipping), runs
the replays and writes ``verdict.md``/``verdict.json`` and ``replays.csv``.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import sys
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

from proxy.analysis import override_value
from proxy.forensics import Kit, KitError, fresh_batches, load_kit, replay
from proxy.records import KITS_DIR, atomic_write_text, load_run, write_json
from proxy.report.document import markdown_table
from proxy.verdict import Verdict

SURROUND = 2  # the "batches surrounding the spike": N - SURROUND ... the end of the kit
SKIP_OFFSET = 10_000  # fresh batches for rollback + skip, this many positions on
MIN_KITS, MIN_SEEDS = 6, 3
SOURCE = (
    "PaLM (arXiv 2204.02311) §5.1: the batches surrounding a spike, trained on from an earlier "
    "checkpoint, did not spike; restarting earlier and skipping batches prevented recurrence"
)


@dataclass
class KitReplays:
    kit: str
    arm: str
    lr: float
    seed: int
    step: int
    trigger: str
    threshold: float
    older_by: int  # how many steps older the state is that the surrounding batches meet in `earlier`
    same_bitwise: bool
    same: bool  # re-spiked
    earlier: Optional[bool]
    skip: Optional[bool]
    peak_same: float
    peak_earlier: float
    peak_skip: float


def _series(kit: Kit, r) -> list[float]:
    if kit.trigger == "grad_norm":
        return r.grad_norms
    if kit.trigger == "loss":
        return r.losses
    return r.losses + r.grad_norms  # a divergence: either


def respikes(kit: Kit, r) -> tuple[bool, float]:
    """(re-spiked, peak of the trigger series) of a replay against the kit's threshold."""
    values = _series(kit, r)
    if any(not math.isfinite(v) for v in r.losses + r.grad_norms):
        return True, math.inf
    threshold = float(kit.meta["threshold"])
    peak = max(values, default=math.nan)
    return math.isfinite(threshold) and peak > threshold, peak


def _bitwise(kit: Kit, r) -> bool:
    pairs = []
    for step, loss, grad_norm in zip(r.steps, r.losses, r.grad_norms):
        row = kit.recorded(step)
        if row is not None:
            pairs.append((row["loss"], loss))
            if row.get("event") != "diverged":
                pairs.append((row["grad_norm"], grad_norm))
    return bool(pairs) and all(a == b or (math.isnan(a) and math.isnan(b)) for a, b in pairs)


def replay_kit(path: Path) -> KitReplays:
    kit = load_kit(path)
    run = load_run(path.parent.parent)
    start = kit.state_step("before")
    steps = [s for s in kit.steps if s >= start]
    same = replay(kit, variant="same")
    surrounding = [kit.batch(s) for s in steps if s >= kit.step - SURROUND]
    earlier = (
        replay(kit, surrounding, variant="earlier", until=start + len(surrounding) - 1)
        if len(surrounding) < len(steps)
        else None
    )
    fresh = fresh_batches(kit, steps, SKIP_OFFSET)
    skip = replay(kit, fresh, variant="skip") if fresh is not None else None
    s_same, p_same = respikes(kit, same)
    s_earlier, p_earlier = respikes(kit, earlier) if earlier is not None else (None, math.nan)
    s_skip, p_skip = respikes(kit, skip) if skip is not None else (None, math.nan)
    return KitReplays(
        kit=str(path),
        arm=str(override_value(run.overrides, "clip") or "?"),
        lr=float(run.config_value("optim.lr") or math.nan),
        seed=int(run.config_value("train.seed") or 0),
        step=kit.step,
        trigger=kit.trigger,
        threshold=float(kit.meta["threshold"]),
        older_by=(kit.step - SURROUND) - start,
        same_bitwise=_bitwise(kit, same),
        same=s_same,
        earlier=s_earlier,
        skip=s_skip,
        peak_same=p_same,
        peak_earlier=p_earlier,
        peak_skip=p_skip,
    )


def find_kit_dirs(roots: Sequence[Path]) -> list[Path]:
    return sorted({p.parent for root in roots for p in Path(root).glob(f"**/{KITS_DIR}/step_*/kit.json")})


def _rate(flags: list[Optional[bool]]) -> tuple[int, int]:
    known = [f for f in flags if f is not None]
    return sum(known), len(known)


def judge(results: list[KitReplays]) -> Verdict:
    v = Verdict(finding="spike_remedies/replay", source=SOURCE)
    seeds = sorted({r.seed for r in results})
    v.check(
        "mechanics: every 'same' replay re-spikes and matches the run bitwise",
        bool(results) and all(r.same and r.same_bitwise for r in results),
        f"{sum(r.same and r.same_bitwise for r in results)} of {len(results)} kits",
    )
    v.check(
        f"enough spikes: >= {MIN_KITS} kits from >= {MIN_SEEDS} seeds",
        len(results) >= MIN_KITS and len(seeds) >= MIN_SEEDS,
        f"{len(results)} kits, seeds {seeds}",
    )
    for name, claim in (
        (
            "earlier",
            "PaLM's ablation: the surrounding batches from an earlier state re-spike "
            "in fewer than half of the kits (at most half per seed)",
        ),
        ("skip", "PaLM's remedy: rollback + skip re-spikes in fewer than half of the kits (at most half per seed)"),
    ):
        pooled = _rate([getattr(r, name) for r in results])
        per_seed = {s: _rate([getattr(r, name) for r in results if r.seed == s]) for s in seeds}
        ok = pooled[1] > 0 and 2 * pooled[0] < pooled[1] and all(2 * k <= n for k, n in per_seed.values() if n)
        v.check(
            claim,
            ok,
            f"{pooled[0]} of {pooled[1]} re-spiked; per seed "
            + ", ".join(f"{s}: {k}/{n}" for s, (k, n) in per_seed.items()),
        )
        v.numbers[f"respike_rate/{name}"] = f"{pooled[0]}/{pooled[1]}"
    by_arm = defaultdict(list)
    for r in results:
        by_arm[(r.arm, r.lr)].append(r)
    v.numbers["kits_per_arm_and_lr"] = {f"{a}/lr={lr:g}": len(rs) for (a, lr), rs in sorted(by_arm.items())}
    v.numbers["steps_older_in_earlier"] = sorted({r.older_by for r in results})
    return v


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="sweep or run directories holding spike kits")
    parser.add_argument("--arms", default="fixed", help="comma-separated +clip arms whose kits count (default fixed)")
    parser.add_argument("--out", type=Path, default=None, help="where verdict.md/json and replays.csv go")
    args = parser.parse_args(argv)
    arms = set(args.arms.split(","))
    results = []
    try:
        for path in find_kit_dirs(args.runs):
            run = load_run(path.parent.parent)
            if str(override_value(run.overrides, "clip")) not in arms:
                continue
            results.append(replay_kit(path))
            r = results[-1]
            print(f"{path}: same {r.same} (bitwise {r.same_bitwise}), earlier {r.earlier}, skip {r.skip}")
    except KitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    verdict = judge(results)
    out = args.out or args.runs[0]
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(
        out / "verdict.md",
        verdict.to_markdown()
        + "\n"
        + "\n".join(
            markdown_table(
                ["kit", "arm", "LR", "seed", "step", "trigger", "older by", "same", "earlier", "skip"],
                [
                    [Path(r.kit).name, r.arm, r.lr, r.seed, r.step, r.trigger, r.older_by, r.same, r.earlier, r.skip]
                    for r in results
                ],
            )
        ),
    )
    write_json(out / "verdict.json", verdict.to_json())
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=list(asdict(results[0])) if results else ["kit"])
    writer.writeheader()
    writer.writerows(asdict(r) for r in results)
    atomic_write_text(out / "replays.csv", table.getvalue())
    print(f"{verdict.label}: {out / 'verdict.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
