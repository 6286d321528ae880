"""``proxy-inspect KIT [KIT ...]``: dissect spike kits (proxy/forensics/dissect.py) and write each
one's report (proxy/forensics/dissect_report.py). ``proxy-inspect --series DIR [DIR ...]`` (or DIRs
that hold Hugging Face checkpoints, found without the flag): measure a checkpoint series
(proxy/forensics/series.py) and write its report (proxy/forensics/series_report.py); with ``--forward``,
also a forward pass of probe tokens through every checkpoint, streamed layer by layer
(proxy/forensics/probe_forward.py)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from proxy.config import ConfigError
from proxy.data import DataError
from proxy.forensics.dissect import OUT_DIR, inspect_kit, ngram_settings
from proxy.forensics.dissect_report import summary_lines, write_report
from proxy.forensics.probe_forward import PROBE_SHAPE
from proxy.forensics.replay import (
    KitError,
    find_kits,
    load_kit,
)
from proxy.forensics.series import is_hf_checkpoint
from proxy.records import UnsafePathError, output_dir, terminal_text

_DESCRIPTION = (
    "Dissect a spike kit: proxy-inspect KIT (or a run directory: every kit in it). Measure a checkpoint series: "
    "proxy-inspect --series CKPT CKPT ... (Hugging Face safetensors folders, a folder of them, or a proxy run's "
    "checkpoints)."
)
SERIES_OUT = "inspect-series"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``proxy-inspect KIT [KIT ...]``: a kit directory, or a run directory (all its kits)."""
    parser = argparse.ArgumentParser(prog="proxy-inspect", description=_DESCRIPTION)
    parser.add_argument("paths", nargs="+", help="spike kit or run directory")
    parser.add_argument("--out", help="report directory (default: <kit>/inspect; one kit only)")
    parser.add_argument("--device", default="cpu", help="cpu (bitwise replays of CPU runs) or cuda")
    parser.add_argument("--no-replay", action="store_true", help="skip the replays")
    parser.add_argument(
        "--lanczos-iters", type=int, default=20, help="Hessian-vector products per eigenvalue; 0 skips the curvature"
    )
    parser.add_argument(
        "--edge",
        action="store_true",
        help="Adam's edge of stability over every step "
        "from the pre-spike state to the spike (two Lanczos runs per step; edge.png)",
    )
    parser.add_argument(
        "--edge-batches",
        type=int,
        default=0,
        help="with --edge: the eigenvalues of the loss over "
        "the run's first N held-out batches, the same at every step (default 0: each step's batch)",
    )
    parser.add_argument(
        "--ngram-repeats",
        type=int,
        default=None,
        help="min repeats for a repeated n-gram (default: from the kit's config)",
    )
    parser.add_argument(
        "--data",
        default=None,
        metavar="PATH",
        help="the text file or memmap folder a text/memmap run was trained on (a kit's own "
        "data.path is never read): needed for the replays on fresh batches",
    )
    parser.add_argument(
        "--series",
        action="store_true",
        help="read the paths as one checkpoint series (found without the flag where they hold Hugging Face "
        "checkpoints; needed for a proxy run's checkpoints/)",
    )
    parser.add_argument("--mark", nargs="*", default=(), metavar="CKPT", help="checkpoints to mark in the figures")
    parser.add_argument(
        "--forward",
        action="store_true",
        help="series: a forward pass of probe tokens through every checkpoint, one layer's weights in memory at a "
        "time: max |attention logit| per layer, log Z and the probe's loss (implies --series)",
    )
    parser.add_argument(
        "--probe",
        metavar="FILE",
        help="with --forward: the probe, token ids (.json: a list of ints or of lists) or UTF-8 text (any other "
        "name; tokenized with the checkpoint's tokenizer.json); default: seeded random ids",
    )
    parser.add_argument(
        "--probe-shape",
        type=_probe_shape,
        default=PROBE_SHAPE,
        metavar="N,T",
        help=f"with --forward: N sequences of T tokens (default {PROBE_SHAPE[0]},{PROBE_SHAPE[1]}; T is cut to the "
        "model's context)",
    )
    parser.add_argument("--probe-seed", type=int, default=0, help="with --forward: the seed of the random ids")
    args = parser.parse_args(argv)
    if args.probe and not args.forward:
        parser.error("--probe needs --forward")
    if args.series or args.forward or all(_holds_hf(Path(p)) for p in args.paths):
        return _series(args)
    try:
        found = [(Path(p), k) for p in args.paths for k in _kits_at(Path(p))]
        kits = [k for _, k in found]
        if args.out and len(kits) > 1:
            raise KitError(f"--out takes one kit, {len(kits)} found")
        if args.lanczos_iters < 0:
            raise KitError(f"--lanczos-iters={args.lanczos_iters} must be >= 0")
        if args.edge and args.lanczos_iters == 0:
            raise KitError("--edge needs the curvature: --lanczos-iters must be >= 1")
        if args.edge_batches < 0 or (args.edge_batches and not args.edge):
            raise KitError(f"--edge-batches={args.edge_batches} must be >= 0, and needs --edge")
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise KitError(f"--device {args.device}: no CUDA device is available")
    except (KitError, ConfigError, DataError, OSError, UnsafePathError) as exc:
        print(f"error: {terminal_text(exc)}", file=sys.stderr)
        return 2
    failed = 0
    for named, path in found:  # one kit that cannot be inspected does not stop the others
        try:
            _inspect_one(args, named, path)
        except (KitError, ConfigError, DataError, OSError, UnsafePathError) as exc:
            print(f"error: {terminal_text(exc)}", file=sys.stderr)
            failed += 1
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as exc:  # a kit proxy did not write
            print(terminal_text(f"error: {path}: cannot be inspected ({type(exc).__name__}: {exc})"), file=sys.stderr)
            failed += 1
    return 2 if failed else 0


def _inspect_one(args: argparse.Namespace, named: Path, path: Path) -> None:
    # every folder from the one named down to the report must be real: no output through a link
    out = (
        Path(args.out)
        if args.out
        else output_dir(named, *path.relative_to(named).parts, OUT_DIR, what="the inspection")
    )
    kit = load_kit(path)
    kit.data_path = args.data
    ngram = ngram_settings(kit)
    if args.ngram_repeats is not None:
        ngram["min_repeats"] = args.ngram_repeats
    insp = inspect_kit(
        kit, args.device, not args.no_replay, args.lanczos_iters, ngram, edge=args.edge, edge_batches=args.edge_batches
    )
    report = write_report(insp, out)
    print(terminal_text(f"{path}: report -> {report}"))
    for line in summary_lines(insp):
        print(f"  {terminal_text(line)}")


def _probe_shape(text: str) -> tuple[int, int]:
    """``N,T`` as two positive ints (argparse's type)."""
    parts = text.split(",")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r} is not N,T (two positive integers)")
    return int(parts[0]), int(parts[1])


def _holds_hf(path: Path) -> bool:
    """A Hugging Face checkpoint folder, or a folder of them."""
    if is_hf_checkpoint(path):
        return True
    return path.is_dir() and not find_kits(path) and any(is_hf_checkpoint(p) for p in path.iterdir() if p.is_dir())


def _series(args: argparse.Namespace) -> int:
    """Measure one checkpoint series; its report in --out (default: <first path>/inspect-series)."""
    from tqdm import tqdm

    from proxy.forensics.probe_forward import probe_series, probe_tokens
    from proxy.forensics.series import SeriesError, find_series, measure, planned_bytes
    from proxy.forensics.series_report import summary_lines as series_lines
    from proxy.forensics.series_report import write_series_report

    paths = [Path(p) for p in args.paths]
    try:
        checkpoints = find_series(paths)
        probe = None
        if args.forward:  # the probe first: a layout the forward does not run is refused before any reading
            n_seq, seq_len = args.probe_shape
            source = Path(args.probe) if args.probe else None
            probe = probe_tokens(checkpoints[0], source, n_seq, seq_len, args.probe_seed)
        out = output_dir(args.out, what="the series report") if args.out else output_dir(paths[0], SERIES_OUT)
        cache = output_dir(out, "series-cache", what="the series cache")
        total = planned_bytes(checkpoints)
        print(
            f"{len(checkpoints)} checkpoints, {len(checkpoints[0].shapes)} tensors each: reading up to "
            f"{total / 1e9:.2f} GB (q / k / gains twice, for the logit bounds); done items resume from {cache}",
            file=sys.stderr,
        )
        started = time.perf_counter()
        with tqdm(total=total, unit="B", unit_scale=True, disable=None, desc="series") as bar:
            result = measure(checkpoints, cache, progress=bar.update)
        seconds = time.perf_counter() - started
        forward, forward_resumed = None, 0
        if probe is not None:
            layers = sum(c.shape.n_layers for c in checkpoints)
            shape = "x".join(map(str, probe.tokens.shape))
            print(f"probe forward: {probe.source}, {shape} tokens, layer by layer", file=sys.stderr)
            with tqdm(total=layers, unit="layer", disable=None, desc="forward") as bar:
                forward, forward_resumed = probe_series(checkpoints, probe, cache, progress=bar.update)
        report = write_series_report(result, out, args.mark, forward=forward)
    except (SeriesError, OSError, UnsafePathError) as exc:
        print(f"error: {terminal_text(exc)}", file=sys.stderr)
        return 2
    rate = result.bytes_read / seconds / 1e6 if seconds > 0 and result.bytes_read else 0.0
    resumed = f", {result.resumed} items from the cache" if result.resumed else ""
    if forward_resumed:
        resumed += f", {forward_resumed} probe forwards from the cache"
    print(
        terminal_text(
            f"series: report -> {report} ({result.bytes_read / 1e9:.2f} GB read in {seconds:.1f} s, "
            f"{rate:.0f} MB/s{resumed})"
        )
    )
    for line in series_lines(result, forward=forward):
        print(f"  {terminal_text(line)}")
    return 0


def _kits_at(path: Path) -> list[Path]:
    if not path.exists():
        raise KitError(f"no such path: {path}")
    kits = find_kits(path)
    if not kits:
        raise KitError(f"{path} holds no spike kit (no kit.json, no spike_kits/step_*/)")
    return kits


if __name__ == "__main__":
    sys.exit(main())
