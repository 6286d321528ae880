"""The device check: every question a GPU must answer, in one run of at most 8 minutes.

    python -m benchmarks.gpu_check [--out DIR] [--parts 1 2 3 4 5]     # on the GPU
    python -m benchmarks.gpu_check --dry-run --out /tmp/check           # on a CPU, tiny shapes

GPU time is rare (about 15 minutes on one H200 when a session is lent one), so this one script
answers everything the CPU cannot, each part in its own process under its own time cap (a hang
or a broken CUDA context in one part leaves the others' results), and writes its results after
every part: ``gpu-check-<device>-<date>.json`` and ``.md`` in benchmarks/results/ (or --out).

    1 correctness   flash attention fwd+bwd against the fp32 reference at T 1k-8k, D 64/128,
                    causal, bf16 and fp16, and the max-logit statistic; fused CE and linear-CE
                    at V 32k/50k/128k with z-loss and ignore_index; the tests/ kernel suite on
                    CUDA (TRITON_INTERPRET=0)
    2 kernel speed  attention fwd+bwd against SDPA's flash backend (target >= 1.0x); CE and
                    linear-CE time and peak memory against F.cross_entropy eager / compiled and
                    Liger-Kernel (targets: peak memory <= 1/4 of torch's, time <= Liger's)
    3 end to end    the 124m preset at seq 1024, bf16: tokens/s and MFU per attention / loss
                    backend, compiled (target >= 40% MFU), and the cost of the diagnostics
                    (target <= 5%)
    4 sweep         K=8 LRs vectorized in one process against 8 runs one after another, on
                    1m / 5m / 20m (target >= 4x)
    5 a finding     a shrunken GPU preset end to end: proxy-train -> proxy-verdict

``--dry-run`` runs the same parts on the CPU with tiny shapes, the kernels under the Triton
interpreter and the targets not judged: the test suite runs it, so the script cannot crash on
its first contact with a GPU for any reason a CPU can show.

On the device image (its own torch and triton; no hydra-core, omegaconf or Liger): carry the
wheels that ``benchmarks/gpu_wheels.sh`` downloads and install the project with --no-deps
(the README's "Running the device check" says the one command).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

# part: (name, what it answers, cap in seconds on a GPU, cap on a CPU dry run)
PARTS = {
    1: ("correctness", "kernels against the references at real shapes; the kernel tests on CUDA", 90, 240),
    2: ("kernel speed", "attention and cross-entropy against SDPA, torch and Liger", 110, 240),
    3: ("end to end", "the 124m preset: tokens/s, MFU, the cost of the diagnostics", 110, 240),
    4: ("vectorized sweep", "K=8 LRs in one process against 8 runs one after another", 110, 240),
    5: ("a finding end to end", "a shrunken GPU preset: train, report, verdict", 60, 240),
}


# ============================================================================================
# Settings: the GPU's shapes, or a CPU's tiny ones
# ============================================================================================
@dataclass(frozen=True)
class Setting:
    dry_run: bool
    partial: Optional[Path] = None  # where checks are written as they are made

    @property
    def device(self) -> torch.device:
        return torch.device("cpu" if self.dry_run else "cuda")

    @property
    def dtypes(self) -> list[torch.dtype]:
        # the interpreter's bf16 arithmetic is wrong (the kernels upcast it), so a CPU checks fp16
        return [torch.float16] if self.dry_run else [torch.bfloat16, torch.float16]

    @property
    def attention_shapes(self) -> list[tuple[int, int]]:  # (seq, head_dim)
        return [(40, 16)] if self.dry_run else [(1024, 64), (4096, 128), (8192, 128)]

    @property
    def vocabs(self) -> list[int]:
        return [300] if self.dry_run else [32768, 50304, 128256]

    @property
    def rows(self) -> int:
        return 24 if self.dry_run else 4096

    @property
    def hidden(self) -> int:
        return 16 if self.dry_run else 2048


def _name(dtype: torch.dtype) -> str:
    return str(dtype).split(".")[-1]


def rel_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """||ours - ref|| / ||ref|| in float64 (NaN anywhere: inf)."""
    a, b = ours.detach().double(), ref.detach().double()
    if not torch.isfinite(a).all():
        return math.inf
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


class Checks:
    """What a part measured against what it should be; each check is written to the part's result
    file as soon as it is made, so a part stopped at its cap keeps what it had measured."""

    def __init__(self, setting: Setting):
        self.setting, self.items = setting, []

    def add(self, name: str, measured: Any, target: str, passed: Optional[bool]) -> None:
        judged = None if self.setting.dry_run else (None if passed is None else bool(passed))
        self.items.append({"check": name, "measured": measured, "target": target, "passed": judged})
        if self.setting.partial is not None:
            self.setting.partial.write_text(json.dumps({"status": "partial", "checks": self.items}, default=str))


# ============================================================================================
# Part 1: correctness on real shapes
# ============================================================================================
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 4e-3}  # relative L2 error of outputs; grads x2


def part_correctness(s: Setting) -> dict[str, Any]:
    from proxy.kernels import reference
    from proxy.kernels.flash_attention import flash_attention
    from proxy.kernels.fused_cross_entropy import fused_cross_entropy, fused_linear_cross_entropy

    checks, rows = Checks(s), []
    gen = torch.Generator().manual_seed(0)
    for dtype in s.dtypes:
        tol = TOLERANCE[dtype]
        for seq, head_dim in s.attention_shapes:
            shape = (1, 4 if s.dry_run else 8, seq, head_dim)
            q, k, v = (torch.randn(shape, generator=gen).to(s.device, dtype).requires_grad_() for _ in range(3))
            grad_out = torch.randn(shape, generator=gen).to(s.device, dtype)
            out, max_logit = flash_attention(q, k, v)
            out.backward(grad_out)
            ref_in = [t.detach().float().requires_grad_() for t in (q, k, v)]
            out_ref, max_ref = reference.attention(*ref_in)
            out_ref.backward(grad_out.float())
            errors = {"out": rel_error(out, out_ref), "max_logit": rel_error(max_logit, max_ref)}
            errors.update({f"d{n}": rel_error(t.grad, r.grad) for n, t, r in zip("qkv", (q, k, v), ref_in)})
            rows.append({"op": "attention", "dtype": _name(dtype), "seq": seq, "head_dim": head_dim,
                         **errors})
            worst_grad = max(errors["dq"], errors["dk"], errors["dv"])
            checks.add(f"attention {_name(dtype)} T={seq} D={head_dim}: out / grads rel err",
                       f"{errors['out']:.2e} / {worst_grad:.2e}", f"<= {tol:g} / {2 * tol:g}",
                       errors["out"] <= tol and worst_grad <= 2 * tol)
            checks.add(f"attention {_name(dtype)} T={seq} D={head_dim}: max logit rel err", f"{errors['max_logit']:.2e}",
                       "<= 1e-3 (the statistic of the same inputs)", errors["max_logit"] <= 1e-3)
            del q, k, v, out, out_ref, ref_in
        for vocab in s.vocabs:
            labels = torch.randint(0, vocab, (s.rows,), generator=gen)
            labels[::10] = -100
            labels = labels.to(s.device)
            logits = (3 * torch.randn(s.rows, vocab, generator=gen)).to(s.device, dtype).requires_grad_()
            ce, z_term, stats = fused_cross_entropy(logits * 1, labels, z_loss=1e-4)
            (ce + z_term).backward()
            ref_logits = logits.detach().float().requires_grad_()
            ce_ref, z_ref, stats_ref = reference.cross_entropy(ref_logits, labels, z_loss=1e-4)
            (ce_ref + z_ref).backward()
            errors = {"ce": rel_error(ce, ce_ref), "z": rel_error(z_term, z_ref),
                      "grad": rel_error(logits.grad, ref_logits.grad)}
            errors.update({k: rel_error(stats[k], stats_ref[k]) for k in stats})
            rows.append({"op": "cross_entropy", "dtype": _name(dtype), "vocab": vocab, **errors})
            worst = max(errors["ce"], errors["z"], errors["lse_mean"])
            checks.add(f"fused CE {_name(dtype)} V={vocab}: loss, z, lse / grad rel err", f"{worst:.2e} / {errors['grad']:.2e}",
                       "<= 1e-5 / <= 1e-2 (fp32 math on the same logits)", worst <= 1e-5 and errors["grad"] <= 1e-2)
            del logits, ref_logits
            hidden = torch.randn(s.rows, s.hidden, generator=gen).to(s.device, dtype).requires_grad_()
            weight = (0.02 * torch.randn(vocab, s.hidden, generator=gen)).to(s.device, dtype).requires_grad_()
            ce, z_term, _ = fused_linear_cross_entropy(hidden, weight, labels, z_loss=1e-4)
            (ce + z_term).backward()
            ref_h, ref_w = (t.detach().float().requires_grad_() for t in (hidden, weight))
            ce_ref, z_ref, _ = reference.linear_cross_entropy(ref_h, ref_w, labels, z_loss=1e-4)
            (ce_ref + z_ref).backward()
            errors = {"ce": rel_error(ce, ce_ref), "grad_hidden": rel_error(hidden.grad, ref_h.grad),
                      "grad_weight": rel_error(weight.grad, ref_w.grad)}
            rows.append({"op": "linear_cross_entropy", "dtype": _name(dtype), "vocab": vocab, **errors})
            worst_grad = max(errors["grad_hidden"], errors["grad_weight"])
            checks.add(f"fused linear CE {_name(dtype)} V={vocab}: loss / grads rel err",
                       f"{errors['ce']:.2e} / {worst_grad:.2e}", f"<= {tol:g} / {2 * tol:g} (the logits in {_name(dtype)})",
                       errors["ce"] <= tol and worst_grad <= 2 * tol)
            del hidden, weight, ref_h, ref_w
            if s.device.type == "cuda":
                torch.cuda.empty_cache()
    suite = _kernel_test_suite(s)
    checks.add("tests/ kernel suite on the device", suite["summary"], "all pass", suite["returncode"] == 0
               if suite.get("returncode") is not None else None)
    return {"checks": checks.items, "errors": rows, "kernel_tests": suite}


def _kernel_test_suite(s: Setting) -> dict[str, Any]:
    if s.dry_run:  # on a CPU the suite runs (interpreted) in the project's own tests
        return {"summary": "skipped: the CPU test suite runs these tests under the interpreter", "returncode": None}
    env = {**os.environ, "PROXY_KERNEL_DEVICE": "cuda", "TRITON_INTERPRET": "0", "PROXY_TRITON_TUNING": "quick"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "tests/test_kernels_attention.py",
           "tests/test_kernels_cross_entropy.py"]
    try:
        out, err, code = run_in_group(cmd, env, timeout=45)
    except subprocess.TimeoutExpired as exc:
        return {"summary": f"timeout after {exc.timeout} s", "returncode": -1}
    lines = [ln for ln in out.splitlines() if ln.strip()]
    return {"summary": lines[-1] if lines else err[-300:], "returncode": code,
            "failures": [ln for ln in lines if ln.startswith("FAILED")][:20]}


def run_in_group(cmd: list[str], env: dict[str, str], timeout: float) -> tuple[str, str, int]:
    """Run a command in its own process group; on timeout the whole group is killed (a pytest or
    proxy-train and its workers), then TimeoutExpired is raised."""
    import signal

    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise subprocess.TimeoutExpired(cmd, timeout, out, err) from None
    return out, err, proc.returncode


# ============================================================================================
# Part 2: kernel speed and memory against the baselines
# ============================================================================================
def part_kernel_speed(s: Setting) -> dict[str, Any]:
    from proxy.kernels import bench

    checks = Checks(s)
    dtype = torch.float32 if s.dry_run else torch.bfloat16
    device = str(s.device)
    attention = []
    shapes = [(32, 16)] if s.dry_run else [(1024, 64), (4096, 64), (4096, 128), (8192, 128)]
    for seq, head_dim in shapes:
        row = bench.bench_attention(seq, head_dim, device=device, dtype=dtype, tokens=64 if s.dry_run else 16384,
                                    width=32 if s.dry_run else 2048)
        attention.append(row)
        ours, sdpa = row["results"]["triton"].get("ms"), row["results"]["sdpa_flash"].get("ms")
        ratio = sdpa / ours if ours and sdpa else None
        checks.add(f"attention fwd+bwd T={seq} D={head_dim}: throughput vs SDPA flash",
                   None if ratio is None else f"{ratio:.2f}x", ">= 1.0x", ratio is not None and ratio >= 1.0)
    losses = {"cross_entropy": [], "linear_cross_entropy": []}
    plan = [(16, 300, False)] if s.dry_run else [(8192, 32768, False), (8192, 128256, True)]
    liger_installed = bench.liger_losses()[0] is not None
    for tokens, vocab, use_compile in plan:
        for name, fn in (("cross_entropy", bench.bench_cross_entropy),
                         ("linear_cross_entropy", bench.bench_linear_cross_entropy)):
            kwargs = dict(device=device, dtype=dtype) | ({"hidden_dim": 16} if s.dry_run and name.startswith("linear") else {})
            row = fn(tokens, vocab, use_compile, **kwargs)
            losses[name].append(row)
            r = row["results"]
            ours, eager = r["triton"], r["torch_eager"]
            if ours.get("peak_mib") is not None and eager.get("peak_mib"):
                share = ours["peak_mib"] / eager["peak_mib"]
                checks.add(f"{name} N={tokens} V={vocab}: peak memory vs torch eager", f"{share:.2f}", "<= 0.25",
                           share <= 0.25)
            if "liger" in r and r["liger"].get("ms") and ours.get("ms"):
                ratio = ours["ms"] / r["liger"]["ms"]
                checks.add(f"{name} N={tokens} V={vocab}: time vs Liger", f"{ratio:.2f}x", "<= 1.0x", ratio <= 1.0)
            elif not liger_installed:
                checks.add(f"{name} N={tokens} V={vocab}: time vs Liger", "Liger not installed", "<= 1.0x", None)
    return {"checks": checks.items, "attention": attention, **losses, "liger_installed": liger_installed}


# ============================================================================================
# Part 3: end to end on the 124m preset
# ============================================================================================
def _model_preset(name: str) -> dict[str, Any]:
    from omegaconf import OmegaConf

    preset = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "model" / f"{name}.yaml"))
    return {k: v for k, v in preset.items() if k != "approx_params"}


def _train_rate(cfg_dict: dict[str, Any], steps: int, warmup: int, logging: bool) -> dict[str, float]:
    """Tokens/s and MFU of the trainer's own step (proxy.train.Trainer.train_step), on batches
    drawn beforehand: the synthetic language is sampled on the CPU, and here only the GPU's
    work is timed (a real corpus streams from a memmap, near free)."""
    from proxy.config import to_config
    from proxy.train import RunInfo, Trainer
    from proxy.train.diagnostics import peak_flops

    cfg = to_config(cfg_dict)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        trainer = Trainer(cfg, RunInfo(Path(tmp), "gpu-check"))
        drawn = [trainer.batch("train", i) for i in range(4)]
        trainer.batch = lambda split, index: drawn[index % len(drawn)]
        for step in range(warmup):
            trainer.train_step(step, logging_step=logging)
        _sync(trainer.device)
        start = time.perf_counter()
        for step in range(warmup, warmup + steps):
            trainer.train_step(step, logging_step=logging)
        _sync(trainer.device)
        elapsed = time.perf_counter() - start
        rate = steps * trainer.tokens_per_step / elapsed
        peak = peak_flops(trainer.device)
        flops = trainer.model.flops_per_token(cfg.train.seq_len)
        result = {"tokens_per_s": round(rate, 1), "step_ms": round(1e3 * elapsed / steps, 2),
                  "mfu": round(rate * flops / peak, 4) if peak else None}
        del trainer
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def part_end_to_end(s: Setting) -> dict[str, Any]:
    from proxy.config import Config, as_dict

    checks = Checks(s)
    base = as_dict(Config())
    base["model"].update(_model_preset("tiny" if s.dry_run else "124m"))
    if not s.dry_run:  # a GPT-2-sized vocabulary, so the loss backends have their real work to do
        base["model"]["vocab_size"] = 50304
    base["train"].update(seq_len=16 if s.dry_run else 1024, batch_size=2 if s.dry_run else 16,
                         device=str(s.device), dtype="fp32" if s.dry_run else "bf16", progress=False,
                         steps=10_000, compile="false")
    if s.dry_run:  # the interpreter runs each kernel program in Python: a small vocabulary
        base["data"]["synthetic"].update(vocab_size=64)
    steps, warmup = (1, 1) if s.dry_run else (12, 3)
    runs = []

    def run(label: str, attention: str, loss_impl: str, compile_: bool, logging: bool) -> dict[str, Any]:
        cfg = json.loads(json.dumps(base))
        cfg["model"].update(attention=attention, loss_impl=loss_impl)
        cfg["train"]["compile"] = "true" if compile_ else "false"
        row = {"run": label, "attention": attention, "loss_impl": loss_impl, "compile": compile_,
               "diagnostics": logging, **_train_rate(cfg, steps, warmup, logging)}
        runs.append(row)
        return row

    eager = {}
    for attention, loss_impl in (("sdpa", "torch"), ("triton", "torch"), ("triton", "triton"),
                                 ("triton", "fused_linear")):
        eager[(attention, loss_impl)] = run(f"eager {attention}/{loss_impl}", attention, loss_impl, False, False)
    diag = run("eager triton/torch, diagnostics every step", "triton", "torch", False, True)
    plain = eager[("triton", "torch")]
    cost = 1.0 - diag["tokens_per_s"] / plain["tokens_per_s"]
    checks.add("diagnostics on every step: throughput cost", f"{100 * cost:.1f}%", "<= 5%", cost <= 0.05)
    compiled = run("compiled triton/torch", "triton", "torch", not s.dry_run, False)
    mfu = compiled["mfu"]
    checks.add("124m, seq 1024, bf16, compiled: MFU", None if mfu is None else f"{100 * mfu:.1f}%", ">= 40%",
               None if mfu is None else mfu >= 0.40)
    for (attention, loss_impl), row in eager.items():
        checks.add(f"eager {attention}/{loss_impl}: tokens/s", row["tokens_per_s"], "recorded", None)
    return {"checks": checks.items, "runs": runs, "model": "tiny" if s.dry_run else "124m"}


# ============================================================================================
# Part 4: the vectorized sweep
# ============================================================================================
def part_vectorized_sweep(s: Setting) -> dict[str, Any]:
    from benchmarks import ensemble_speed

    checks = Checks(s)
    args = argparse.Namespace(steps=3 if s.dry_run else 30, batch_size=2 if s.dry_run else 16,
                              seq_len=16 if s.dry_run else 256, members=2 if s.dry_run else 8, reps=1,
                              device=str(s.device))
    rows = []
    # untimed: the kernels' autotuning and the first CUDA launches would land on whichever mode
    # ran first (the sequential runs) and inflate the speedup
    warm = argparse.Namespace(**{**vars(args), "steps": 2, "members": 2})
    ensemble_speed.measure("tiny" if s.dry_run else "1m", warm, s.device, compile_=False)
    for size in (["tiny"] if s.dry_run else ["1m", "5m", "20m"]):
        row = ensemble_speed.measure(size, args, s.device, compile_=False)
        rows.append(row)
        checks.add(f"{size}: K={args.members} vectorized vs sequential (end to end)", f"{row['speedup']:.2f}x", ">= 4x",
                   row["speedup"] >= 4.0)
    # the GPU presets run their ensembles compiled (the CUDA default): that it runs, and its rate
    compiled_cfg = ensemble_speed.base_config("tiny" if s.dry_run else "5m", args, compile_=not s.dry_run)
    with tempfile.TemporaryDirectory(prefix="gpu-check-ensemble-") as tmp:
        timer, losses = ensemble_speed.time_vectorized(compiled_cfg, ensemble_speed.lr_grid(args.members), Path(tmp),
                                                       s.device)
    finite = all(math.isfinite(v) for v in losses)
    checks.add(f"{'tiny' if s.dry_run else '5m'}: a compiled K={args.members} ensemble trains",
               f"{timer.wall:.0f} s, final losses finite: {finite}", "runs, finite", finite)
    return {"checks": checks.items, "sizes": rows, "settings": vars(args),
            "compiled_ensemble_s": round(timer.wall, 1)}


# ============================================================================================
# Part 5: one finding's GPU preset, shrunk, end to end
# ============================================================================================
def part_finding(s: Setting) -> dict[str, Any]:
    checks = Checks(s)
    finding, preset = "attention_logit_growth", "attention_logit_growth_lab" if s.dry_run else "attention_logit_growth_gpu"
    with tempfile.TemporaryDirectory(prefix="gpu-check-finding-") as tmp:
        sweep = Path(tmp) / "sweep"
        shrink = (["train.steps=4", "train.eval_every=2", "train.batch_size=2", "train.seq_len=16",
                   "model.qk_norm=off,layernorm", "optim.lr=1e-2,1e-1"] if s.dry_run else
                  ["model=1m", "train.steps=60", "train.eval_every=30", "train.compile=false",
                   "model.qk_norm=off,layernorm", "sweep.lrs=[1e-2,3e-1]"])
        env = {**os.environ, "WANDB_MODE": "disabled"}
        start = time.perf_counter()
        cap = PARTS[5][3 if s.dry_run else 2]
        _, train_err, train_code = run_in_group(
            [sys.executable, "-m", "proxy.train", "-m", f"+experiment={preset}", *shrink, "train.progress=false",
             f"hydra.sweep.dir={sweep}"], env, timeout=cap - 25)  # leaves the verdict its time
        train_s = time.perf_counter() - start
        checks.add("proxy-train -m (shrunken preset)", f"exit {train_code} in {train_s:.0f} s", "exit 0",
                   train_code == 0)
        verdict_out, verdict_err, verdict_code = run_in_group(
            [sys.executable, "-m", "proxy.verdict", f"experiments/{finding}", str(sweep)], env, timeout=20)
        written = (sweep / "report" / "verdict.md").is_file() and (sweep / "report" / "report.html").is_file()
        checks.add("proxy-verdict: report and verdict written", f"exit {verdict_code}, files {written}",
                   "exit 0 and both files", verdict_code == 0 and written)
        head = verdict_out.splitlines()[0] if verdict_out.strip() else ""
        return {"checks": checks.items, "preset": preset, "overrides": shrink, "verdict_headline": head,
                "train_stderr_tail": train_err[-1500:], "verdict_stderr_tail": verdict_err[-1500:]}


QUICK_TUNING_PARTS = (1, 5)  # PROXY_TRITON_TUNING=quick: proxy/kernels/flash_attention.py

PART_FUNCTIONS: dict[int, Callable[[Setting], dict[str, Any]]] = {
    1: part_correctness, 2: part_kernel_speed, 3: part_end_to_end, 4: part_vectorized_sweep, 5: part_finding,
}


# ============================================================================================
# The run: one process per part, results written after each
# ============================================================================================
def versions() -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "cuda": torch.version.cuda, "platform": platform.platform()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
        info["driver_capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    else:
        info["device"] = f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
    return info


def run_part(number: int, dry_run: bool, result_path: Path) -> int:
    """In the child process: one part, its JSON written whatever happens (and each check as it
    is made, for the parent to read if the part runs past its cap)."""
    started = time.perf_counter()
    try:
        result = {"status": "ok", **PART_FUNCTIONS[number](Setting(dry_run, partial=result_path))}
    except Exception as exc:  # the part failed: say how, and let the parent go on
        result = {"status": "failed", "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    result["seconds"] = round(time.perf_counter() - started, 1)
    result_path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0 if result["status"] == "ok" else 1


def launch_part(number: int, dry_run: bool) -> dict[str, Any]:
    name, _, gpu_cap, cpu_cap = PARTS[number]
    cap = cpu_cap if dry_run else gpu_cap
    env = dict(os.environ)
    env["TRITON_INTERPRET"] = "1" if dry_run else "0"
    env.setdefault("WANDB_MODE", "disabled")
    if number in QUICK_TUNING_PARTS:  # correctness, not speed: one kernel config, no autotuning
        env["PROXY_TRITON_TUNING"] = "quick"
    with tempfile.TemporaryDirectory(prefix="gpu-check-part-") as tmp:
        result_path = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--part", str(number), "--result", str(result_path)]
        cmd += ["--dry-run"] if dry_run else []
        started = time.perf_counter()
        try:
            _, stderr, code = run_in_group(cmd, env, timeout=cap)
        except subprocess.TimeoutExpired as exc:
            stderr = exc.stderr or ""
            result = {"status": "timeout", "error": f"over its cap of {cap} s", "stderr_tail": stderr[-2000:]}
            if result_path.exists():  # the checks the part had made before its cap
                result["partial"] = json.loads(result_path.read_text())
            return {"part": number, "name": name, "cap_s": cap, "seconds": round(time.perf_counter() - started, 1),
                    **result}
        result = json.loads(result_path.read_text()) if result_path.exists() else {}
        if result.get("status") not in ("ok", "failed"):
            result = {**result, "status": "crashed", "error": f"exit {code} before the part finished"}
        if result.get("status") != "ok":
            result["stderr_tail"] = stderr[-2000:]
    return {"part": number, "name": name, "cap_s": cap, **result}


def to_markdown(record: dict[str, Any]) -> str:
    v = record["versions"]
    lines = [f"# Device check: {v['device']}", "",
             f"{record['date']}; torch {v['torch']}, triton {v['triton']}, CUDA {v['cuda']}, "
             f"Python {v['python']}{'; DRY RUN on a CPU (targets not judged)' if record['dry_run'] else ''}. "
             f"Command: `{record['command']}`; {record['seconds']:.0f} s in all.", ""]
    for part in record["parts"]:
        lines += [f"## {part['part']}. {part['name']}: {part['status']} ({part.get('seconds', '?')} s of "
                  f"{part['cap_s']} s)", ""]
        if part["status"] != "ok":
            lines += [f"> {part.get('error', '')}", ""]
        checks = part.get("checks") or part.get("partial", {}).get("checks") or []
        if checks:
            lines += ["| check | measured | target | holds |", "|---|---|---|---|"]
            for c in checks:
                holds = {True: "yes", False: "**no**", None: "-"}[c["passed"]]
                lines.append(f"| {c['check']} | {c['measured']} | {c['target']} | {holds} |")
            lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="on a CPU, tiny shapes, targets not judged")
    parser.add_argument("--out", type=Path, default=None, help="folder for the JSON and markdown "
                        "(default benchmarks/results)")
    parser.add_argument("--parts", type=int, nargs="+", default=list(PARTS), choices=list(PARTS))
    parser.add_argument("--part", type=int, choices=list(PARTS), help=argparse.SUPPRESS)  # the child
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.part:
        return run_part(args.part, args.dry_run, args.result)
    if not args.dry_run and not torch.cuda.is_available():
        print("benchmarks.gpu_check: no CUDA device here; --dry-run checks the script on a CPU", file=sys.stderr)
        return 2

    started = time.perf_counter()
    info = versions()
    stem = re.sub(r"[^A-Za-z0-9]+", "-", info["device"]).strip("-").lower()
    date = dt.date.today().isoformat()
    out = args.out or RESULTS
    out.mkdir(parents=True, exist_ok=True)
    paths = (out / f"gpu-check-{stem}-{date}.json", out / f"gpu-check-{stem}-{date}.md")
    record = {"date": dt.datetime.now().isoformat(timespec="seconds"), "dry_run": args.dry_run, "versions": info,
              "command": " ".join(["python -m benchmarks.gpu_check", *(argv if argv is not None else sys.argv[1:])]),
              "parts": [], "seconds": 0.0}
    for number in args.parts:
        print(f"part {number} ({PARTS[number][0]}) ...", flush=True)
        part = launch_part(number, args.dry_run)
        record["parts"].append(part)
        record["seconds"] = round(time.perf_counter() - started, 1)
        paths[0].write_text(json.dumps(record, indent=2, default=str) + "\n")  # after every part
        paths[1].write_text(to_markdown(record))
        failed = [c["check"] for c in part.get("checks", []) if c["passed"] is False]
        print(f"part {number}: {part['status']} in {part.get('seconds', '?')} s"
              + (f"; {len(failed)} targets missed" if failed else ""), flush=True)
    print(paths[1].read_text())
    print(f"wrote {paths[0]} and {paths[1]}")
    return 0 if all(p["status"] == "ok" for p in record["parts"]) else 1


if __name__ == "__main__":
    sys.exit(main())
