"""Speed and memory of the Triton kernels against the PyTorch (and Liger) baselines, on one GPU.

    python -m proxy.kernels.bench [--quick] [--out PATH] [--no-compile]

Attention: causal fwd and fwd+bwd time and TFLOP/s against SDPA's flash backend, bf16, 16k tokens
per batch at width 2048 (batch = 16384 / T, heads = 2048 / head_dim).
Cross-entropy: fwd+bwd time and peak extra memory over materialised bf16 logits, and for the
LM head fused with the loss (hidden dim 4096), against F.cross_entropy eager and compiled and
Liger-Kernel when it is installed. Our kernels also compute the z-loss (1e-4) and the logit
statistics; the torch baselines are plain cross-entropy on fp32-upcast logits, as training
code usually writes it, plus the compiled reference with exactly our outputs.

Results go to a table on stdout and to JSON (default benchmarks/results/kernels-<device>-<date>.json)
with the device, date and versions. Without CUDA it says so, smoke-tests the references on CPU
and exits 0. The functions take a device, a dtype and sizes, so the device check
(benchmarks/gpu_check/) reuses them, and its dry run takes them on a CPU at tiny sizes.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from proxy.kernels import reference
from proxy.records import atomic_write_text

Z_LOSS = 1e-4
ATTENTION_TOKENS, ATTENTION_WIDTH = 16384, 2048
HEAD_HIDDEN_DIM = 4096
FULL_GRID = {
    "attention_seq": [512, 1024, 2048, 4096, 8192],
    "attention_head_dim": [64, 128],
    "vocab": [32768, 50257, 128256],
    "tokens": [4096, 8192, 16384, 32768],
}
QUICK_GRID = {
    "attention_seq": [1024, 4096],
    "attention_head_dim": [64, 128],
    "vocab": [32768, 128256],
    "tokens": [4096, 16384],
}


# --------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------
def time_ms(fn: Callable[[], object], device: torch.device, repeats: int = 3) -> float:
    """Median milliseconds of ``fn``: triton.testing.do_bench on a GPU, a plain timer elsewhere."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, return_mode="median")
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def measure(step: Callable[[], None], inputs: list[Tensor]) -> dict:
    """Median ms of ``step`` and, on a GPU, its peak memory beyond the inputs."""
    device = inputs[0].device
    if device.type != "cuda":
        step()  # warm-up
        for t in inputs:
            t.grad = None

        def step_and_clear() -> None:
            step()
            for t in inputs:
                t.grad = None

        ms = time_ms(step_and_clear, device)
        return {"ms": round(ms, 4), "peak_mib": None}
    import triton.testing

    try:
        step()  # warm-up: autotuning, torch.compile
        for t in inputs:
            t.grad = None
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
        ms = triton.testing.do_bench(step, grad_to_none=inputs, return_mode="median")
        return {"ms": round(ms, 4), "peak_mib": round(peak_mib, 1)}
    except torch.cuda.OutOfMemoryError:
        return {"ms": None, "peak_mib": None, "error": "out of memory"}
    except Exception as error:  # one failing baseline must not end the benchmark
        message = (str(error).splitlines() or [""])[0][:200]
        return {"ms": None, "peak_mib": None, "error": f"{type(error).__name__}: {message}"}
    finally:
        for t in inputs:
            t.grad = None
        torch.cuda.empty_cache()


def backward_step(loss_fn: Callable[[], Tensor]) -> Callable[[], None]:
    return lambda: loss_fn().backward()


def compiled(fn: Callable) -> Callable:
    return torch.compile(fn, dynamic=False)


def liger_losses():
    """Liger-Kernel's CE and fused linear CE classes, or (None, None) when they cannot be imported;
    then ``liger_losses.reason`` says why. Any exception, not only ImportError: a Liger built for
    another triton or torch can fail its import in other ways, and a missing baseline must not end
    the benchmark (or the device check's part 2)."""
    try:
        from liger_kernel.transformers.cross_entropy import LigerCrossEntropyLoss
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
    except Exception as error:
        first_line = (str(error).splitlines() or [""])[0][:200]
        liger_losses.reason = f"{type(error).__name__}: {first_line}"
        return None, None
    liger_losses.reason = None
    return LigerCrossEntropyLoss, LigerFusedLinearCrossEntropyLoss


def first(output) -> Tensor:
    """Liger returns (loss, z_loss) in some versions and a bare loss in others."""
    return output[0] if isinstance(output, tuple) else output


# --------------------------------------------------------------------------------------------
# Benchmarks
# --------------------------------------------------------------------------------------------
def bench_attention(
    seq: int,
    head_dim: int,
    device: str = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    tokens: int = ATTENTION_TOKENS,
    width: int = ATTENTION_WIDTH,
) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from proxy.kernels.flash_attention import flash_attention

    dev = torch.device(device)
    batch, heads = max(1, tokens // seq), max(1, width // head_dim)
    shape = (batch, heads, seq, head_dim)
    q, k, v = (torch.randn(shape, device=dev, dtype=dtype, requires_grad=True) for _ in range(3))
    grad_out = torch.randn(shape, device=dev, dtype=dtype)

    def sdpa_flash() -> Tensor:
        backend = SDPBackend.FLASH_ATTENTION if dev.type == "cuda" else SDPBackend.MATH
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def forward_backward(forward: Callable[[], Tensor]) -> Callable[[], None]:
        return lambda: forward().backward(grad_out)

    implementations: dict[str, Callable[[], Tensor]] = {
        "triton": lambda: flash_attention(q, k, v)[0],
        "sdpa_flash": sdpa_flash,
    }
    forward_flops = 4 * batch * heads * seq * seq * head_dim / 2  # causal: half the score matrix
    results: dict[str, dict] = {}
    row = {"seq": seq, "head_dim": head_dim, "batch": batch, "heads": heads, "results": results}
    for name, forward in implementations.items():
        result = measure(forward_backward(forward), [q, k, v])
        if result["ms"] is not None:
            with torch.no_grad():
                result["forward_ms"] = round(time_ms(forward, dev), 4)
            result["forward_tflops"] = round(forward_flops / result["forward_ms"] / 1e9, 1)
            result["tflops"] = round(3.5 * forward_flops / result["ms"] / 1e9, 1)  # bwd ~ 2.5x fwd
        results[name] = result
    with torch.no_grad():
        row["max_abs_diff_vs_sdpa"] = (implementations["triton"]() - sdpa_flash()).abs().max().item()
    return row


def bench_cross_entropy(
    tokens: int, vocab: int, use_compile: bool, device: str = "cuda", dtype: torch.dtype = torch.bfloat16
) -> dict:
    from proxy.kernels.fused_cross_entropy import fused_cross_entropy

    logits = torch.randn(tokens, vocab, device=device, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, vocab, (tokens,), device=device)

    def ours() -> Tensor:
        ce, z_term, _ = fused_cross_entropy(logits, labels, z_loss=Z_LOSS)
        return ce + z_term

    def torch_plain(x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(x.float(), y)

    def torch_reference(x: Tensor, y: Tensor) -> Tensor:
        ce, z_term, _ = reference.cross_entropy(x, y, z_loss=Z_LOSS)
        return ce + z_term

    implementations = {"triton": ours, "torch_eager": lambda: torch_plain(logits, labels)}
    if use_compile:
        plain, exact = compiled(torch_plain), compiled(torch_reference)
        implementations["torch_compile"] = lambda: plain(logits, labels)
        implementations["torch_compile_reference"] = lambda: exact(logits, labels)
    liger_ce, _ = liger_losses()
    if liger_ce is not None:
        liger = liger_ce(lse_square_scale=Z_LOSS)
        implementations["liger"] = lambda: first(liger(logits, labels))
    results: dict[str, dict] = {}
    row = {"tokens": tokens, "vocab": vocab, "results": results}
    for name, loss_fn in implementations.items():
        results[name] = measure(backward_step(loss_fn), [logits])
    return row


def bench_linear_cross_entropy(
    tokens: int,
    vocab: int,
    use_compile: bool,
    device: str = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    hidden_dim: int = HEAD_HIDDEN_DIM,
) -> dict:
    from proxy.kernels.fused_cross_entropy import fused_linear_cross_entropy

    hidden = torch.randn(tokens, hidden_dim, device=device, dtype=dtype, requires_grad=True)
    weight = 0.02 * torch.randn(vocab, hidden_dim, device=device, dtype=dtype)
    weight.requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), device=device)

    def ours() -> Tensor:
        ce, z_term, _ = fused_linear_cross_entropy(hidden, weight, labels, z_loss=Z_LOSS)
        return ce + z_term

    def torch_plain(h: Tensor, w: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(F.linear(h, w).float(), y)

    implementations = {"triton": ours, "torch_eager": lambda: torch_plain(hidden, weight, labels)}
    if use_compile:
        plain = compiled(torch_plain)
        implementations["torch_compile"] = lambda: plain(hidden, weight, labels)
    _, liger_linear = liger_losses()
    if liger_linear is not None:
        liger = liger_linear(lse_square_scale=Z_LOSS)
        implementations["liger"] = lambda: first(liger(weight, hidden, labels))
    results: dict[str, dict] = {}
    row = {"tokens": tokens, "vocab": vocab, "hidden_dim": hidden_dim, "results": results}
    for name, loss_fn in implementations.items():
        results[name] = measure(backward_step(loss_fn), [hidden, weight])
    return row


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------
def _cell(result: dict, key: str) -> str:
    value = result.get(key)
    return result.get("error", "-")[:12] if value is None else f"{value:g}"


def print_table(title: str, rows: list[dict], shape_keys: list[str], value_keys: list[str]) -> None:
    names = sorted({name for row in rows for name in row["results"]}, key=lambda n: (n != "triton", n))
    header = shape_keys + [f"{name}:{key}" for name in names for key in value_keys]
    print(f"\n{title}")
    print("  ".join(f"{h:>14}" for h in header))
    for row in rows:
        cells = [str(row[k]) for k in shape_keys]
        cells += [_cell(row["results"].get(name, {}), key) for name in names for key in value_keys]
        print("  ".join(f"{c:>14}" for c in cells))


def default_output_path() -> Path:
    device = re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name()).strip("-")
    return Path("benchmarks/results") / f"kernels-{device}-{dt.date.today().isoformat()}.json"


def cpu_smoke() -> None:
    """A few milliseconds of the references, so a CPU run still checks its install."""
    q = torch.randn(1, 2, 16, 16)
    out, max_logit = reference.attention(q, q, q)
    logits = torch.randn(8, 32)
    ce, z_term, stats = reference.cross_entropy(logits, torch.arange(8), z_loss=Z_LOSS)
    values = (out.sum(), max_logit.max(), ce, z_term, *stats.values())
    finite = all(math.isfinite(v.item()) for v in values)
    print(f"CPU smoke of proxy/kernels/reference.py: {'ok' if finite else 'NON-FINITE OUTPUT'}")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m proxy.kernels.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a reduced grid (a few minutes)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/...)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print("proxy.kernels.bench needs a CUDA GPU and found none: nothing benchmarked.")
        cpu_smoke()
        return 0

    import triton

    grid = QUICK_GRID if args.quick else FULL_GRID
    record = {
        "device": torch.cuda.get_device_name(),
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "quick": args.quick,
        "dtype": "bfloat16",
        "z_loss": Z_LOSS,
        "liger_installed": liger_losses()[0] is not None,
        "attention": [],
        "cross_entropy": [],
        "linear_cross_entropy": [],
    }
    for head_dim in grid["attention_head_dim"]:
        for seq in grid["attention_seq"]:
            record["attention"].append(bench_attention(seq, head_dim))
    use_compile = not args.no_compile
    for vocab in grid["vocab"]:
        for tokens in grid["tokens"]:
            record["cross_entropy"].append(bench_cross_entropy(tokens, vocab, use_compile))
            record["linear_cross_entropy"].append(bench_linear_cross_entropy(tokens, vocab, use_compile))

    print(f"{record['device']}  torch {record['torch']}  triton {record['triton']}")
    loss_shape, loss_values = ["tokens", "vocab"], ["ms", "peak_mib"]
    attention_shape = ["seq", "head_dim"]
    print_table("attention fwd+bwd (bf16, causal)", record["attention"], attention_shape, ["ms", "tflops"])
    print_table("cross-entropy fwd+bwd", record["cross_entropy"], loss_shape, loss_values)
    print_table("linear + cross-entropy fwd+bwd", record["linear_cross_entropy"], loss_shape, loss_values)

    out = args.out or default_output_path()
    atomic_write_text(out, json.dumps(record, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
