"""Growth exponents at initialization across widths: N(0, 0.02) init vs OLMo-0424's scaled init.

OLMo 2 (arXiv 2501.00656, section 3.2) measures how activations and gradients change in size
from the first to the last layer of a freshly initialized model,

    lambda = (1 / n_layers) * log(||v_last|| / ||v_first||),

across widths: its claim is about how lambda *scales with width* (the N(0, 0.02) init keeps it
steady as the model grows, the scaled init does not), not that lambda is 0. The number depends on
which vector v_first is, so both definitions are measured and reported side by side:

- ``embedding``: v_first is the embedding output, the stream entering the first block;
- ``block1``: v_first is the residual stream after the first block (protocol 1's only choice).

Each (layout, init, width, seed) is one fresh model, averaged over a few fixed batches of data;
rows are kept per seed so the verdict can give the width slope's spread. No training is needed,
so this is a script rather than a sweep, and it judges its own result (``verdict.py``'s at-init
criteria) when done:

    python experiments/init_growth/measure.py                 # lab: widths 64..1024, 3 seeds, ~8 min
    python experiments/init_growth/measure.py --widths 256 512 1024 2048 4096 --n-layers 12 --out DIR  # gpu

It writes ``growth_exponents_p2.csv``, ``growth_exponents_p2.md``, ``figures/growth_exponents_p2.png``
and ``verdict_at_init.{md,json}`` into ``--out`` (default: experiments/init_growth/results/protocol2).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional, Sequence

import torch
from matplotlib.figure import Figure

from proxy.config import DataConfig, Init, ModelConfig, Norm, NormPosition, QKNorm
from proxy.data import build_source
from proxy.model import build_model
from proxy.records import (
    GROWTH_ACTIVATION,
    GROWTH_ACTIVATION_FROM_EMBEDDING,
    GROWTH_GRADIENT,
    GROWTH_GRADIENT_FROM_EMBEDDING,
    atomic_write_text,
    save_figure,
)
from proxy.report.document import markdown_table
from proxy.train.diagnostics import growth_exponents
from proxy.verdict import load_script

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "protocol2"
CSV_NAME = "growth_exponents_p2.csv"
INITS = (Init.normal, Init.scaled)
# v_first per definition -> (activation key, gradient key) in diagnostics.growth_exponents' result
DEFINITIONS = {
    "embedding": (GROWTH_ACTIVATION_FROM_EMBEDDING, GROWTH_GRADIENT_FROM_EMBEDDING),
    "block1": (GROWTH_ACTIVATION, GROWTH_GRADIENT),
}
# the two block layouts measured: GPT-2 / Wortsman pre-LN (what the lab presets train), and OLMo 2's
# (RMSNorm on each sublayer's output, QK-norm), the architecture the paper's claim is about
ARCHS = {
    "pre_ln": dict(norm=Norm.layernorm, norm_position=NormPosition.pre, qk_norm=QKNorm.off),
    "olmo2": dict(norm=Norm.rmsnorm, norm_position=NormPosition.reordered, qk_norm=QKNorm.rmsnorm),
}


@dataclass
class GrowthSample:
    """lambda of one fresh model (one seed) under one definition of v_first."""

    arch: str
    init: str
    width: int
    n_layers: int
    n_heads: int
    seed: int
    definition: str  # a key of DEFINITIONS
    activation: float  # lambda of the residual stream
    gradient: float  # lambda of the loss gradient with respect to it


def measure(
    arch: str,
    init: Init,
    width: int,
    n_layers: int,
    head_dim: int,
    seed: int,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    vocab_size: int,
    device: torch.device,
) -> list[GrowthSample]:
    """lambda of one fresh model, averaged over ``batches``, under every definition."""
    if width % head_dim:
        raise ValueError(f"width {width} is not a multiple of the head dim {head_dim}")
    cfg = ModelConfig(
        name=f"d{width}",
        d_model=width,
        n_layers=n_layers,
        n_heads=width // head_dim,
        init=init,
        max_seq_len=max(x.shape[1] for x, _ in batches),
        **ARCHS[arch],
    )
    torch.manual_seed(seed)
    model = build_model(cfg, vocab_size).to(device)
    per_batch = [growth_exponents(model, x.to(device), y.to(device)) for x, y in batches]
    return [
        GrowthSample(
            arch=arch,
            init=init.value,
            width=width,
            n_layers=n_layers,
            n_heads=cfg.n_heads,
            seed=seed,
            definition=name,
            activation=statistics.fmean(g[act] for g in per_batch),
            gradient=statistics.fmean(g[grad] for g in per_batch),
        )
        for name, (act, grad) in DEFINITIONS.items()
    ]


_CASTS = {f.name: f.type for f in fields(GrowthSample)}


def read_samples(path: Path) -> list[GrowthSample]:
    """The rows of a growth_exponents_p2.csv (what verdict.py judges). ValueError naming the
    file for a column that is missing or does not parse."""
    cast = {"str": str, "int": int, "float": float}
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = set(_CASTS) - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: missing columns {sorted(missing)}")
        try:
            return [GrowthSample(**{k: cast[t](row[k]) for k, t in _CASTS.items()}) for row in reader]
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}, line {reader.line_num}: {e}") from None


def _mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):+.4f} ± {sd:.4f}"


def write_results(samples: list[GrowthSample], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=list(_CASTS))
    writer.writeheader()
    writer.writerows(asdict(s) for s in samples)
    atomic_write_text(out / CSV_NAME, table.getvalue())

    groups: dict[tuple, list[GrowthSample]] = {}
    for s in samples:
        groups.setdefault((s.definition, s.arch, s.init, s.width, s.n_layers), []).append(s)
    headers = ["v_first", "arch", "init", "width", "layers", "seeds", "λ activation (mean ± sd)", "λ gradient"]
    rows = [
        [
            definition,
            arch,
            init,
            width,
            n_layers,
            len(mine),
            _mean_sd([s.activation for s in mine]),
            _mean_sd([s.gradient for s in mine]),
        ]
        for (definition, arch, init, width, n_layers), mine in sorted(groups.items())
    ]
    atomic_write_text(out / "growth_exponents_p2.md", "\n".join(markdown_table(headers, rows)) + "\n")

    definitions = [d for d in DEFINITIONS if any(s.definition == d for s in samples)]
    fig = Figure(figsize=(9, 3.4 * len(definitions)), layout="constrained")
    axes = fig.subplots(len(definitions), 2, squeeze=False)
    styles = {"pre_ln": "--", "olmo2": "-"}
    for row, definition in zip(axes, definitions):
        for ax, key, title in zip(row, ("activation", "gradient"), ("activations", "gradients")):
            for i, init in enumerate(sorted({s.init for s in samples})):
                for arch in sorted({s.arch for s in samples}):
                    mine = {k: v for k, v in groups.items() if k[:3] == (definition, arch, init)}
                    if not mine:
                        continue
                    widths = sorted(k[3] for k in mine)
                    values = [[getattr(s, key) for s in mine[k]] for k in sorted(mine, key=lambda k: k[3])]
                    ax.errorbar(
                        widths,
                        [statistics.fmean(v) for v in values],
                        yerr=[statistics.stdev(v) if len(v) > 1 else 0.0 for v in values],
                        marker="o",
                        capsize=3,
                        color=f"C{i}",
                        ls=styles.get(arch, ":"),
                        label=f"{arch}, init={init}",
                    )
            ax.axhline(0.0, color="grey", lw=0.8, ls="--")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("width (d_model)")
            ax.set_ylabel("growth exponent λ")
            ax.set_title(f"{title} at init, v_first = {definition}", fontsize=10)
            ax.legend(fontsize=7)
    (out / "figures").mkdir(exist_ok=True)
    save_figure(fig, out / "figures" / "growth_exponents_p2.png", dpi=100)


def _verdict_module():
    """verdict.py beside this file (experiments/ is not a package, so load it by path)."""
    return load_script(HERE / "verdict.py")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    parser.add_argument("--archs", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    parser.add_argument("--n-layers", type=int, default=6)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--seeds", type=int, default=3, help="fresh models per (layout, init, width)")
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--judge-only", action="store_true", help=f"measure nothing: judge the {CSV_NAME} already in --out"
    )
    args = parser.parse_args(argv)
    if args.judge_only:
        try:
            samples = read_samples(args.out / CSV_NAME)
        except (OSError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return _write_verdict(samples, args.out, wall_time_s=None)
    if args.seeds < 1 or args.batches < 1 or args.n_layers < 2:
        print("error: --seeds and --batches must be >= 1 and --n-layers >= 2", file=sys.stderr)
        return 2
    uneven = [w for w in args.widths if w % args.head_dim]
    if uneven:  # checked before any model is built, so a typo costs no waiting
        print(f"error: widths {uneven} are not multiples of --head-dim {args.head_dim}", file=sys.stderr)
        return 2

    started = time.perf_counter()
    source = build_source(DataConfig())  # the synthetic default: what the lab presets train on
    batches = [source.batch("train", i, args.batch_size, args.seq_len) for i in range(args.batches)]
    device = torch.device(args.device)
    samples: list[GrowthSample] = []
    for arch, init, width in ((a, i, w) for a in args.archs for i in INITS for w in args.widths):
        for seed in range(args.seeds):
            mine = measure(arch, init, width, args.n_layers, args.head_dim, seed, batches, source.vocab_size, device)
            print(
                f"{arch:7s} init={init.value:7s} width={width:5d} seed={seed}  "
                + "  ".join(f"{s.definition}: act {s.activation:+.4f} grad {s.gradient:+.4f}" for s in mine),
                flush=True,
            )
            samples += mine
    write_results(samples, args.out)
    print(f"wrote {args.out / CSV_NAME}")
    return _write_verdict(samples, args.out, wall_time_s=round(time.perf_counter() - started, 1))


def _write_verdict(samples: list[GrowthSample], out: Path, wall_time_s: Optional[float]) -> int:
    verdict = _verdict_module().judge_at_init(samples, source=str(out / CSV_NAME))
    if wall_time_s is not None:
        verdict.numbers["wall_time_s"] = wall_time_s
    atomic_write_text(out / "verdict_at_init.md", verdict.to_markdown())
    atomic_write_text(out / "verdict_at_init.json", json.dumps(verdict.to_json(), indent=2, default=str) + "\n")
    print(f"{verdict.label} (at init): {out / 'verdict_at_init.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
