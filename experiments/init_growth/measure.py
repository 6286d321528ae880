"""Growth exponents at initialization across widths: N(0, 0.02) init vs OLMo-0424's scaled init.

OLMo 2 (arXiv 2501.00656, section 3.2) measures how activations and gradients change in size
from the first to the last layer of a freshly initialized model,

    lambda = (1 / n_layers) * log(||v_last|| / ||v_first||),

and asks that lambda stay near 0 at every width: a model whose residual stream (or gradient)
grows or shrinks layer by layer at init tends to train less stably, and a lambda that drifts with
width means the recipe will not carry over to the big model. No training is needed, so this is a
script rather than a sweep:

    python experiments/init_growth/measure.py                      # lab: widths 64..512, seconds
    python experiments/init_growth/measure.py --widths 256 512 1024 2048 4096 --n-layers 12  # gpu

It writes ``growth_exponents.csv``, ``growth_exponents.md`` and ``figures/growth_exponents.png``
into ``--out`` (default: experiments/init_growth/results). ``verdict.py`` reads the CSV.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from matplotlib.figure import Figure

from proxy.config import DataConfig, Init, ModelConfig, Norm, NormPosition, QKNorm
from proxy.data import build_source
from proxy.model import build_model
from proxy.records import GROWTH_ACTIVATION, GROWTH_GRADIENT
from proxy.train.diagnostics import growth_exponents

RESULTS = Path(__file__).resolve().parent / "results"
CSV_NAME = "growth_exponents.csv"
INITS = (Init.normal, Init.scaled)
# the two block layouts measured: GPT-2 / Wortsman pre-LN (what the lab presets train), and OLMo 2's
# (RMSNorm on each sublayer's output, QK-norm), the architecture the paper's claim is about
ARCHS = {
    "pre_ln": dict(norm=Norm.layernorm, norm_position=NormPosition.pre, qk_norm=QKNorm.off),
    "olmo2": dict(norm=Norm.rmsnorm, norm_position=NormPosition.reordered, qk_norm=QKNorm.rmsnorm),
}


@dataclass
class GrowthRow:
    arch: str
    init: str
    width: int
    n_layers: int
    n_heads: int
    activation: float  # mean over seeds of lambda for the residual stream
    gradient: float  # ... and for the gradient of the loss with respect to it
    activation_std: float  # spread over seeds (0 with one seed)
    gradient_std: float
    seeds: int


def measure(arch: str, init: Init, width: int, n_layers: int, head_dim: int,
            batches: Sequence[tuple[torch.Tensor, torch.Tensor]], vocab_size: int, seeds: Sequence[int],
            device: torch.device) -> GrowthRow:
    """Average lambda over ``seeds`` fresh models and over ``batches`` of data."""
    if width % head_dim:
        raise ValueError(f"width {width} is not a multiple of the head dim {head_dim}")
    cfg = ModelConfig(name=f"d{width}", d_model=width, n_layers=n_layers, n_heads=width // head_dim,
                      init=init, max_seq_len=max(x.shape[1] for x, _ in batches), **ARCHS[arch])
    act, grad = [], []
    for seed in seeds:
        torch.manual_seed(seed)
        model = build_model(cfg, vocab_size).to(device)
        per_batch = [growth_exponents(model, x.to(device), y.to(device)) for x, y in batches]
        act.append(statistics.fmean(g[GROWTH_ACTIVATION] for g in per_batch))
        grad.append(statistics.fmean(g[GROWTH_GRADIENT] for g in per_batch))

    def spread(values: list[float]) -> float:
        return statistics.stdev(values) if len(values) > 1 else 0.0

    return GrowthRow(arch=arch, init=init.value, width=width, n_layers=n_layers, n_heads=cfg.n_heads,
                     activation=statistics.fmean(act), gradient=statistics.fmean(grad),
                     activation_std=spread(act), gradient_std=spread(grad), seeds=len(seeds))


def read_rows(path: Path) -> list[GrowthRow]:
    """The rows of a growth_exponents.csv (what verdict.py judges)."""
    with path.open() as f:
        return [GrowthRow(arch=r["arch"], init=r["init"], width=int(r["width"]), n_layers=int(r["n_layers"]),
                          n_heads=int(r["n_heads"]), activation=float(r["activation"]),
                          gradient=float(r["gradient"]), activation_std=float(r["activation_std"]),
                          gradient_std=float(r["gradient_std"]), seeds=int(r["seeds"]))
                for r in csv.DictReader(f)]


def write_results(rows: list[GrowthRow], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with (out / CSV_NAME).open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)

    lines = ["| arch | init | width | layers | lambda activation | lambda gradient |", "|---|---|---|---|---|---|"]
    lines += [f"| {r.arch} | {r.init} | {r.width} | {r.n_layers} | {r.activation:+.4f} ± {r.activation_std:.4f} "
              f"| {r.gradient:+.4f} ± {r.gradient_std:.4f} |" for r in rows]
    (out / "growth_exponents.md").write_text("\n".join(lines) + "\n")

    fig = Figure(figsize=(9, 3.6), layout="constrained")
    styles = {"pre_ln": "--", "olmo2": "-"}
    for ax, key, title in zip(fig.subplots(1, 2), ("activation", "gradient"), ("activations", "gradients")):
        for i, init in enumerate(sorted({r.init for r in rows})):
            for arch in sorted({r.arch for r in rows}):
                mine = [r for r in rows if r.init == init and r.arch == arch]
                ax.errorbar([r.width for r in mine], [getattr(r, key) for r in mine],
                            yerr=[getattr(r, f"{key}_std") for r in mine], marker="o", capsize=3,
                            color=f"C{i}", ls=styles.get(arch, ":"), label=f"{arch}, init={init}")
        ax.axhline(0.0, color="grey", lw=0.8, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("width (d_model)")
        ax.set_ylabel("growth exponent λ")
        ax.set_title(f"{title} at initialization")
        ax.legend(fontsize=7)
    (out / "figures").mkdir(exist_ok=True)
    fig.savefig(out / "figures" / "growth_exponents.png", dpi=100)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256, 512])
    parser.add_argument("--archs", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    parser.add_argument("--n-layers", type=int, default=6)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--seeds", type=int, default=2, help="fresh models per (init, width)")
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.batches < 1 or args.n_layers < 2:
        print("error: --seeds and --batches must be >= 1 and --n-layers >= 2", file=sys.stderr)
        return 2
    uneven = [w for w in args.widths if w % args.head_dim]
    if uneven:  # checked before any model is built, so a typo costs no waiting
        print(f"error: widths {uneven} are not multiples of --head-dim {args.head_dim}", file=sys.stderr)
        return 2

    source = build_source(DataConfig())  # the synthetic default: what the lab presets train on
    batches = [source.batch("train", i, args.batch_size, args.seq_len) for i in range(args.batches)]
    device = torch.device(args.device)
    rows: list[GrowthRow] = []
    for arch, init, width in ((a, i, w) for a in args.archs for i in INITS for w in args.widths):
        row = measure(arch, init, width, args.n_layers, args.head_dim, batches, source.vocab_size,
                      range(args.seeds), device)
        print(f"{arch:7s} init={row.init:7s} width={width:5d}  lambda_act={row.activation:+.4f}  "
              f"lambda_grad={row.gradient:+.4f}", flush=True)
        rows.append(row)
    write_results(rows, args.out)
    print(f"wrote {args.out / CSV_NAME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
