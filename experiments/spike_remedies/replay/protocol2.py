"""PaLM's replay and K2's restart, protocol 2: on loss spikes (the loss-spike organism).

Protocol 1 (study.py) judged PaLM's replay on grad-norm spikes, the only spikes the lab had then.
The loss-spike organism (experiments/loss_spikes: the tiny model on a deterministic language,
constant LR 1e-2, beta2 0.99, no clipping) has loss spikes in every seed: the held-out loss sits near
1e-3 nats and jumps to 1-7. This protocol asks the sources' questions of those spikes.

Sources:
- PaLM (arXiv 2204.02311) §5.1: the batches surrounding a spike, trained on from an earlier
  checkpoint, did not spike ("spikes come from a batch meeting a particular parameter state");
  restarting ~100 steps before the spike and skipping 200-500 batches prevented recurrence.
- LLM360 K2 (65B): after a spike the run restarted from an earlier checkpoint and spiked again later
  (the first spike after checkpoint 160, restart from 160; a second spike after 186).

Design (``conf/experiment/spike_remedies/replay_lab.yaml``): the organism's spiking arm as five
single runs, seeds 20-24 (fresh), 2000 steps, capture on probe/loss keeping the last 50 states.
Per run, the studied spike is its first large loss spike: the first excursion of probe/loss (the
loss-spike study's definition, experiments/loss_spikes/verdict.py) peaking >= LARGE = 0.1 nats; its
kit is the earliest whose step N lies in [the excursion's crossing - 8, its peak]. Every replay
restarts from the kit's earliest state, the start of step N - 50 (a checkpoint 50 steps back; PaLM
went ~100 steps back, the organism's spikes build over ~10), with the trainer's own step and no
remedy, and measures the held-out loss (the run's probe batch) at the start of every step and after
the last:

- ``same`` (control): the run's own batches for HORIZON = 250 steps (through N + 199);
- ``earlier`` (PaLM's ablation): the batches surrounding the spike, those of steps N - 10 ... N + 8
  (the spike's build-up and the spike), fed first, so they meet a state 40 steps older than they
  met in the run; then the run's batches of N + 9 ... N + 16 (8 steps: the 1-8 steps a spike lags
  its cause);
- ``skip`` (PaLM's remedy): batches SKIP = 500 positions further on in the data stream (PaLM
  skipped 200-500), for HORIZON steps;
- ``nudged`` (K2's restart with the same data): the run's batches for HORIZON steps, from the same
  state with every weight moved one unit in the last place (float32 nextafter, a fair coin per
  element for the direction, generator seed 0): the difference a restart on hardware with
  non-deterministic reductions makes. On a deterministic CPU an unnudged restart is ``same``.

A replay **spikes** when its held-out loss reaches LARGE at any measured point.

Design checks (decided first; a failure is NOT TESTABLE AT THIS SCALE):
D1. >= 4 of the 5 seeds give a studied spike whose restart state is in the low-noise phase
    (held-out loss < 0.01 nats at step N - 50, the loss-spike study's LOW_NOISE).
D2. Mechanics: every ``same`` replay reproduces its run bitwise: train loss, grad norm and probe
    loss at each of its steps equal to what the run logged.
Criteria (each on the kits of D1, as a proportion with its Wilson 95 % interval):
PaLM  C1. The surrounding batches from the earlier state do not spike, in more than half of the kits.
      C2. Rollback + skip does not spike within the HORIZON steps, in more than half of the kits.
K2    C3. The restart with the same data (nudged) spikes again within the HORIZON, in more than half
      of the kits.
Reported beside them: each replay's first step at LARGE relative to N (the run's crossing), and the
chance that a run in its low-noise phase spikes within HORIZON steps at the rate the five runs'
large excursions show after their studied spike (each run's later large excursions per step).

``python experiments/spike_remedies/replay/protocol2.py RUNS... [--out DIR]`` writes verdict.md,
verdict.json, replays.csv and a figure.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from proxy.analysis import wilson_interval
from proxy.forensics import (
    Kit,
    KitError,
    Replay,
    fresh_batches,
    held_out_batch,
    held_out_loss,
    load_kit,
    replay,
    restore,
)
from proxy.records import GRAD_NORM, PROBE_LOSS, TRAIN_LOSS, Run, atomic_write_text, find_runs, load_run, write_json
from proxy.report.document import markdown_table
from proxy.train.capture import find_kits
from proxy.verdict import Verdict, load_script

SPIKES = load_script(Path(__file__).resolve().parents[2] / "loss_spikes" / "verdict.py")
LARGE = SPIKES.LARGE  # 0.1 nats
LOW_NOISE = SPIKES.LOW_NOISE  # 0.01 nats
BACK = 50  # the restart state: the start of step N - BACK
HORIZON = 250  # steps replayed by same, skip and nudged
SURROUND = (10, 8)  # PaLM's ablation feeds the batches of steps N - 10 ... N + 8 ...
TAIL = 8  # ... then the run's next 8
SKIP = 500  # rollback + skip: the stream this many positions further on
MATCH_BEFORE = 8  # the kit's step may sit this far before the excursion's crossing
MIN_KITS = 4
SEEDS = (20, 21, 22, 23, 24)
PALM = (
    "PaLM (arXiv 2204.02311) §5.1: the batches surrounding a spike, trained on from an earlier "
    "checkpoint, did not spike; restarting ~100 steps earlier and skipping 200-500 batches "
    "prevented recurrence"
)
K2 = "LLM360 K2 (65B): restarted from a checkpoint before a loss spike (160), the run spiked again later (after 186)"
WOULD_TEST = (
    "more organism runs (seeds 25+) until 4 studied spikes restart from the low-noise phase, "
    "or a lease-sized GPU run at 20m with capture on probe/loss (loss_spikes/lease)"
)


@dataclass
class KitReplays:
    """One studied spike and its four replays: for each, the first step whose held-out loss
    reached LARGE (None: it did not) and the largest held-out loss."""

    run: str
    seed: int
    kit: str
    crossing: int  # the excursion's crossing step (the run's)
    peak_step: int
    peak: float
    kit_step: int  # N
    restart_step: int  # N - BACK
    restart_loss: float  # held-out loss at the restart state
    same_bitwise: bool
    first: dict[str, Optional[int]] = field(default_factory=dict)
    peaks: dict[str, float] = field(default_factory=dict)
    later_large: int = 0  # the run's large excursions after the studied one
    later_steps: int = 0  # the steps it ran after the studied one
    series: dict[str, list[tuple[int, float]]] = field(default_factory=dict, repr=False)  # for the figure

    def spiked(self, variant: str) -> bool:
        return self.first.get(variant) is not None


def studied_spike(run: Run) -> Optional[tuple[object, Path]]:
    """The run's first large excursion and its kit, or None."""
    large = [e for e in SPIKES.excursions(run) if e.peak >= LARGE]
    if not large:
        return None
    first = large[0]
    kits = sorted(find_kits(run.path), key=lambda p: int(p.name.split("_")[-1]))
    for path in kits:
        n = int(path.name.split("_")[-1])
        if first.step - MATCH_BEFORE <= n <= first.peak_step:
            return first, path
    return first, Path()


def nudge(model: torch.nn.Module, seed: int = 0) -> None:
    """Move every floating-point weight one unit in its last place, up or down by a fair coin."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            up = torch.rand(p.shape, generator=gen) < 0.5
            toward = torch.where(up, torch.full_like(p, math.inf), torch.full_like(p, -math.inf))
            p.copy_(torch.nextafter(p, toward))


def _measured(r: Replay, probe: tuple[torch.Tensor, torch.Tensor]) -> list[tuple[int, float]]:
    """(step, held-out loss at its start) for every replayed step, and the final state's after."""
    assert r.training is not None
    points = list(zip(r.steps, r.probe_losses))
    points.append((r.steps[-1] + 1, held_out_loss(r.training, probe)))
    return points


def _first_large(points: list[tuple[int, float]]) -> Optional[int]:
    return next((s for s, v in points if not math.isfinite(v) or v >= LARGE), None)


def _bitwise(run: Run, r: Replay) -> bool:
    """Each replayed step's train loss, grad norm and probe loss equal to what the run logged (the
    steps the run took: a replay may go on past the run's end)."""
    logged = {key: dict(zip(*run.series(key))) for key in (TRAIN_LOSS, GRAD_NORM, PROBE_LOSS)}
    compared = 0
    for step, *values in zip(r.steps, r.losses, r.grad_norms, r.probe_losses):
        if step not in logged[TRAIN_LOSS]:
            continue
        compared += 1
        if any(logged[key].get(step) != value for key, value in zip((TRAIN_LOSS, GRAD_NORM, PROBE_LOSS), values)):
            return False
    return compared > 0


def replay_spike(run: Run, excursion, path: Path) -> KitReplays:
    kit: Kit = load_kit(path)
    n = kit.step
    start = kit.state_step("before")
    probe = held_out_batch(kit, int(run.config_value("train.probe_batches") or 1))
    horizon = list(range(start, start + HORIZON))

    def stream(steps: Sequence[int], offset: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
        batches = fresh_batches(kit, steps, offset)
        if batches is None:
            raise KitError(f"{path}: the run's data stream cannot be rebuilt here")
        return batches

    same = replay(kit, stream(horizon), variant="same", probe=probe)
    surrounding = list(range(n - SURROUND[0], n + SURROUND[1] + 1))
    tail = list(range(n + SURROUND[1] + 1, n + SURROUND[1] + 1 + TAIL))
    earlier = replay(kit, stream(surrounding) + stream(tail), variant="earlier", probe=probe)
    skip = replay(kit, stream(horizon, SKIP), variant="skip", probe=probe)
    t = restore(kit, "before")
    nudge(t.model)
    nudged = replay(kit, stream(horizon), variant="nudged", probe=probe, training=t)

    steps, values = run.series(PROBE_LOSS)
    after = [e for e in SPIKES.excursions(run) if e.peak >= LARGE and e.step > excursion.peak_step]
    result = KitReplays(
        run=run.path.name,
        seed=int(run.config_value("train.seed") or 0),
        kit=path.name,
        crossing=excursion.step,
        peak_step=excursion.peak_step,
        peak=excursion.peak,
        kit_step=n,
        restart_step=start,
        restart_loss=same.probe_losses[0],
        same_bitwise=_bitwise(run, same),
        later_large=len(after),
        later_steps=max(0, (steps[-1] if steps else 0) - excursion.peak_step),
    )
    for r in (same, earlier, skip, nudged):
        points = _measured(r, probe)
        first = _first_large(points)
        result.first[r.variant] = None if first is None else first - excursion.step
        result.peaks[r.variant] = max(v for _, v in points)
        result.series[r.variant] = points
    return result


def _share(flags: list[bool]) -> str:
    k, n = sum(flags), len(flags)
    lo, hi = wilson_interval(k, n)
    return f"{k} of {n} (Wilson 95% [{lo:.2f}, {hi:.2f}])"


def _design(v: Verdict, results: list[KitReplays], studied: dict[int, str]) -> list[KitReplays]:
    """The design checks on a verdict; the kits the criteria are judged on."""
    usable = [r for r in results if r.restart_loss < LOW_NOISE]
    v.design(
        f">= {MIN_KITS} of the {len(SEEDS)} seeds give a large loss spike (>= {LARGE} nats) with a kit whose "
        f"restart state ({BACK} steps back) is in the low-noise phase (held-out loss < {LOW_NOISE})",
        len({r.seed for r in usable}) >= MIN_KITS,
        f"usable: seeds {sorted(r.seed for r in usable)}; "
        + "; ".join(f"seed {s}: {why}" for s, why in sorted(studied.items())),
        WOULD_TEST,
    )
    v.design(
        "mechanics: every 'same' replay reproduces its run bitwise (train loss, grad norm, probe loss)",
        bool(results) and all(r.same_bitwise for r in results),
        f"{sum(r.same_bitwise for r in results)} of {len(results)} replays",
        "a replay that reproduces the run (same torch, same threads, CPU)",
    )
    return usable


def judge(results: list[KitReplays], studied: dict[int, str]) -> tuple[Verdict, Verdict]:
    """(PaLM's verdict, K2's verdict): the shared design checks, then each source's claims."""
    palm = Verdict(finding="spike_remedies/replay, protocol 2 (loss spikes): PaLM", source=PALM)
    k2 = Verdict(finding="spike_remedies/replay, protocol 2 (loss spikes): K2", source=K2)
    usable = _design(palm, results, studied)
    _design(k2, results, studied)
    if palm.testable:
        earlier = [not r.spiked("earlier") for r in usable]
        palm.check(
            f"PaLM's ablation: the batches surrounding the spike (steps N-{SURROUND[0]}..N+{SURROUND[1]}), fed to the "
            f"state {BACK} steps back, do not spike, in more than half of the kits",
            2 * sum(earlier) > len(earlier),
            f"no spike in {_share(earlier)}",
        )
        skip = [not r.spiked("skip") for r in usable]
        palm.check(
            f"PaLM's remedy: rollback {BACK} steps + skip {SKIP} batches does not spike within {HORIZON} steps, "
            "in more than half of the kits",
            2 * sum(skip) > len(skip),
            f"no spike in {_share(skip)}",
        )
    if k2.testable:
        nudged = [r.spiked("nudged") for r in usable]
        k2.check(
            f"K2's restart: from the state {BACK} steps back with the same data (weights one ulp apart), the run "
            f"spikes again within {HORIZON} steps, in more than half of the kits",
            2 * sum(nudged) > len(nudged),
            f"spiked again in {_share(nudged)}",
        )
    for v in (palm, k2):
        v.numbers["first step at >= 0.1 nats, relative to the run's crossing"] = {
            f"seed {r.seed}": {k: r.first.get(k) for k in ("same", "earlier", "skip", "nudged")} for r in results
        }
        v.numbers["peak held-out loss per replay (nats)"] = {
            f"seed {r.seed}": {k: round(p, 4) for k, p in r.peaks.items()} for r in results
        }
        later, steps = sum(r.later_large for r in results), sum(r.later_steps for r in results)
        rate = later / steps if steps else math.nan
        v.numbers[f"chance of a large spike within {HORIZON} steps at the runs' later rate"] = (
            f"{1 - (1 - rate) ** HORIZON:.2f} ({later} large excursions in {steps} steps after the studied ones)"
            if steps
            else "n/a"
        )
    return palm, k2


def figure(results: list[KitReplays], path: Path) -> None:
    """One panel per studied spike: the held-out loss of each replay against the step, the run's
    crossing marked, the LARGE bar drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from proxy.report.figures import plain_log_ticks

    fig, axes = plt.subplots(len(results), 1, figsize=(8, 2.2 * len(results)), sharex=False, squeeze=False)
    styles = {
        "same": ("black", "-"),
        "earlier": ("tab:blue", "-"),
        "skip": ("tab:green", "-"),
        "nudged": ("tab:red", "--"),
    }
    for ax, r in zip(axes[:, 0], results):
        for variant, points in r.series.items():
            colour, line = styles[variant]
            ax.plot(
                [s for s, _ in points], [max(v, 1e-6) for _, v in points], color=colour, ls=line, lw=1, label=variant
            )
        ax.axhline(LARGE, color="grey", lw=0.6, ls=":")
        ax.axvline(r.crossing, color="grey", lw=0.6)
        ax.set_yscale("log")
        ax.set_ylabel("held-out loss")
        ax.set_title(f"seed {r.seed}: restart at {r.restart_step}, the run crossed at {r.crossing}", fontsize=9)
    axes[0, 0].legend(fontsize=7, ncol=4)
    axes[-1, 0].set_xlabel("step")
    plain_log_ticks(fig)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="the replay_lab sweep (or its run folders)")
    parser.add_argument("--out", type=Path, default=None, help="where verdict.md/json and replays.csv go")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the runs were recorded with one thread: bitwise replays need the same
    results: list[KitReplays] = []
    studied: dict[int, str] = {}
    try:
        for run_dir in find_runs(args.runs):
            run = load_run(run_dir)
            seed = int(run.config_value("train.seed") or 0)
            found = studied_spike(run)
            if found is None:
                studied[seed] = "no large loss spike"
                continue
            excursion, path = found
            if path == Path():
                studied[seed] = f"no kit for the large spike at {excursion.step}"
                continue
            results.append(replay_spike(run, excursion, path))
            r = results[-1]
            studied[seed] = f"spike at {r.crossing} (peak {r.peak:.2f}), kit {r.kit_step}"
            print(f"seed {seed}: {studied[seed]}; first >= {LARGE}: {r.first}; bitwise {r.same_bitwise}")
    except KitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    palm, k2 = judge(results, studied)
    out = args.out or args.runs[0]
    out.mkdir(parents=True, exist_ok=True)
    rows = [
        [r.seed, r.crossing, r.peak_step, f"{r.peak:.2f}", r.kit_step, r.restart_step, f"{r.restart_loss:.2g}"]
        + [r.first.get(k) for k in ("same", "earlier", "skip", "nudged")]
        for r in results
    ]
    table = markdown_table(
        ["seed", "crossing", "peak step", "peak", "kit N", "restart", "held-out loss at restart"]
        + [f"{k}: first >= {LARGE}" for k in ("same", "earlier", "skip", "nudged")],
        rows,
    )
    atomic_write_text(out / "verdict.md", palm.to_markdown() + "\n" + k2.to_markdown() + "\n" + "\n".join(table))
    write_json(out / "verdict.json", {"palm": palm.to_json(), "k2": k2.to_json()})
    buffer = io.StringIO(newline="")
    fields = [k for k in asdict(results[0]) if k != "series"] if results else ["run"]
    writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(asdict(r) for r in results)
    if results:
        figure(results, out / "replays.png")
    atomic_write_text(out / "replays.csv", buffer.getvalue())
    print(f"PaLM: {palm.label}; K2: {k2.label}: {out / 'verdict.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
