"""The device check's five parts, each run in its own process by the supervisor
(benchmarks/gpu_check/supervisor.py): what each answers is in benchmarks/gpu_check/__init__.py."""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from benchmarks.gpu_check.processes import run_capped
from benchmarks.gpu_check.recorder import ROOT, Recorder, Setting, dtype_name, rel_error

# ============================================================================================
# Part 1: correctness on real shapes
# ============================================================================================
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 4e-3}  # relative L2 error of outputs; grads x2
# fp16 training backpropagates a scaled loss (GradScaler starts at 2^16): at unit scale a mean over
# 8192 rows puts fp16 gradients below its normal range (6e-5), so the check scales as training does
# (the first H200 run, 2026-12-04, checked at unit scale).
LOSS_SCALE = {torch.bfloat16: 1.0, torch.float16: 2.0**16}


def _randn(
    s: Setting, gen: torch.Generator, *shape: int, dtype: torch.dtype, scale: float = 1.0, grad: bool = False
) -> torch.Tensor:
    """Drawn on the device (~2.7e9 normals in all: a CPU would spend tens of seconds of the cap)."""
    t = torch.randn(shape, generator=gen, device=s.device).mul_(scale).to(dtype)
    return t.requires_grad_() if grad else t


def part_correctness(s: Setting, rec: Recorder) -> None:
    gen = torch.Generator(device=s.device).manual_seed(0)
    for dtype in s.dtypes:
        with rec.phase(f"attention {dtype_name(dtype)}"):
            for seq, head_dim in s.attention_shapes:
                _check_attention(s, rec, gen, dtype, seq, head_dim)
        with rec.phase(f"cross-entropy {dtype_name(dtype)}"):
            for vocab in s.vocabs:
                _check_cross_entropy(s, rec, gen, dtype, vocab)
    with rec.phase("kernel test suite"):
        suite = _kernel_test_suite(s)
    rec.set(kernel_tests=suite)
    rec.check(
        "tests/ kernel suite on the device",
        suite["summary"],
        "all pass",
        None if suite.get("returncode") is None else suite["returncode"] == 0,
    )


def _check_attention(
    s: Setting, rec: Recorder, gen: torch.Generator, dtype: torch.dtype, seq: int, head_dim: int
) -> None:
    from proxy.kernels import reference
    from proxy.kernels.flash_attention import flash_attention

    tol, shape = TOLERANCE[dtype], (1, 4 if s.dry_run else 8, seq, head_dim)
    q, k, v = (_randn(s, gen, *shape, dtype=dtype, grad=True) for _ in range(3))
    grad_out = _randn(s, gen, *shape, dtype=dtype)
    out, max_logit = flash_attention(q, k, v)
    out.backward(grad_out)
    ref_in = [t.detach().float().requires_grad_() for t in (q, k, v)]
    out_ref, max_ref = reference.attention(*ref_in)
    out_ref.backward(grad_out.float())
    errors = {"out": rel_error(out, out_ref), "max_logit": rel_error(max_logit, max_ref)}
    errors.update({f"d{n}": rel_error(t.grad, r.grad) for n, t, r in zip("qkv", (q, k, v), ref_in)})
    rec.row("errors", {"op": "attention", "dtype": dtype_name(dtype), "seq": seq, "head_dim": head_dim, **errors})
    worst_grad = max(errors["dq"], errors["dk"], errors["dv"])
    label = f"attention {dtype_name(dtype)} T={seq} D={head_dim}"
    rec.check(
        f"{label}: out / grads rel err",
        f"{errors['out']:.2e} / {worst_grad:.2e}",
        f"<= {tol:g} / {2 * tol:g}",
        errors["out"] <= tol and worst_grad <= 2 * tol,
    )
    rec.check(
        f"{label}: max logit rel err",
        f"{errors['max_logit']:.2e}",
        "<= 1e-3 (the statistic of the same inputs)",
        errors["max_logit"] <= 1e-3,
    )


def _check_cross_entropy(s: Setting, rec: Recorder, gen: torch.Generator, dtype: torch.dtype, vocab: int) -> None:
    from proxy.kernels import reference
    from proxy.kernels.fused_cross_entropy import fused_cross_entropy, fused_linear_cross_entropy

    tol, name, loss_scale = TOLERANCE[dtype], dtype_name(dtype), LOSS_SCALE[dtype]
    scaled = f", loss scale 2^{math.log2(loss_scale):.0f}" if loss_scale != 1 else ""
    labels = torch.randint(0, vocab, (s.rows,), generator=gen, device=s.device)
    labels[::10] = -100
    logits = _randn(s, gen, s.rows, vocab, dtype=dtype, scale=3.0, grad=True)
    ce, z_term, stats = fused_cross_entropy(logits * 1, labels, z_loss=1e-4)  # * 1: not a leaf's data
    (loss_scale * (ce + z_term)).backward()
    ref_logits = logits.detach().float().requires_grad_()
    ce_ref, z_ref, stats_ref = reference.cross_entropy(ref_logits, labels, z_loss=1e-4)
    (ce_ref + z_ref).backward()
    errors = {
        "ce": rel_error(ce, ce_ref),
        "z": rel_error(z_term, z_ref),
        "grad": rel_error(logits.grad.double() / loss_scale, ref_logits.grad),
    }
    errors.update({k: rel_error(stats[k], stats_ref[k]) for k in stats})
    rec.row("errors", {"op": "cross_entropy", "dtype": name, "vocab": vocab, **errors})
    worst = max(errors["ce"], errors["z"], errors["lse_mean"])
    rec.check(
        f"fused CE {name} V={vocab}: loss, z, lse / grad rel err",
        f"{worst:.2e} / {errors['grad']:.2e}",
        f"<= 1e-5 / <= 1e-2 (fp32 math on the same logits{scaled})",
        worst <= 1e-5 and errors["grad"] <= 1e-2,
    )
    del logits, ref_logits

    hidden = _randn(s, gen, s.rows, s.hidden, dtype=dtype, grad=True)
    weight = _randn(s, gen, vocab, s.hidden, dtype=dtype, scale=0.02, grad=True)
    ce, z_term, _ = fused_linear_cross_entropy(hidden, weight, labels, z_loss=1e-4)
    (loss_scale * (ce + z_term)).backward()
    ref_h, ref_w = (t.detach().float().requires_grad_() for t in (hidden, weight))
    ce_ref, z_ref, _ = reference.linear_cross_entropy(ref_h, ref_w, labels, z_loss=1e-4)
    (ce_ref + z_ref).backward()
    errors = {
        "ce": rel_error(ce, ce_ref),
        "grad_hidden": rel_error(hidden.grad.double() / loss_scale, ref_h.grad),
        "grad_weight": rel_error(weight.grad.double() / loss_scale, ref_w.grad),
    }
    rec.row("errors", {"op": "linear_cross_entropy", "dtype": name, "vocab": vocab, **errors})
    worst_grad = max(errors["grad_hidden"], errors["grad_weight"])
    rec.check(
        f"fused linear CE {name} V={vocab}: loss / grads rel err",
        f"{errors['ce']:.2e} / {worst_grad:.2e}",
        f"<= {tol:g} / {2 * tol:g} (the logits in {name}{scaled})",
        errors["ce"] <= tol and worst_grad <= 2 * tol,
    )
    del hidden, weight, ref_h, ref_w
    if s.device.type == "cuda":
        torch.cuda.empty_cache()


def _kernel_test_suite(s: Setting) -> dict[str, Any]:
    if s.dry_run:  # on a CPU the suite runs (interpreted) in the project's own tests
        return {"summary": "skipped: the CPU test suite runs these tests under the interpreter", "returncode": None}
    timeout = s.time_left() - 3  # what the part's cap leaves, less the time to record the outcome
    if timeout < 10:
        return {"summary": f"skipped: {s.time_left():.0f} s left of the part's cap", "returncode": None}
    env = {**os.environ, "PROXY_KERNEL_DEVICE": "cuda", "TRITON_INTERPRET": "0", "PROXY_TRITON_TUNING": "quick"}
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-x",
        "-p",
        "no:cacheprovider",
        "tests/kernels/test_flash_attention.py",
        "tests/kernels/test_fused_cross_entropy.py",
    ]
    try:
        out, err, code = run_capped(cmd, env, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        return {"summary": f"timeout after {exc.timeout:.0f} s (the rest of the part's cap)", "returncode": -1}
    lines = [ln for ln in out.splitlines() if ln.strip()]
    return {
        "summary": lines[-1] if lines else err[-300:],
        "returncode": code,
        "failures": [ln for ln in lines if ln.startswith("FAILED")][:20],
    }


# ============================================================================================
# Part 2: kernel speed and memory against the baselines
# ============================================================================================
def part_kernel_speed(s: Setting, rec: Recorder) -> None:
    from proxy.kernels import bench

    dtype = torch.float32 if s.dry_run else torch.bfloat16
    with rec.phase("attention"):  # the first shape of each head dim compiles the autotuning candidates
        for seq, head_dim in [(32, 16)] if s.dry_run else [(1024, 64), (4096, 64), (4096, 128), (8192, 128)]:
            _bench_attention(s, rec, bench, dtype, seq, head_dim)
    liger = bench.liger_losses()[0] is not None
    # liger_losses catches any failure of Liger's import (a triton it does not support, say) and keeps why
    liger_reason = None if liger else getattr(bench.liger_losses, "reason", None) or "not installed"
    rec.set(liger_installed=liger, liger_unavailable=liger_reason)
    plan = [(16, 300, False)] if s.dry_run else [(8192, 32768, False), (8192, 128256, True)]
    for tokens, vocab, use_compile in plan:
        with rec.phase(f"cross-entropy N={tokens} V={vocab}{' (+ torch.compile baselines)' if use_compile else ''}"):
            for name, fn in (
                ("cross_entropy", bench.bench_cross_entropy),
                ("linear_cross_entropy", bench.bench_linear_cross_entropy),
            ):
                kwargs = {"device": str(s.device), "dtype": dtype}
                if s.dry_run and name.startswith("linear"):
                    kwargs["hidden_dim"] = 16
                row = rec.row(name, fn(tokens, vocab, use_compile, **kwargs))
                _judge_loss(rec, name, row, liger_reason)


def _bench_attention(s: Setting, rec: Recorder, bench: Any, dtype: torch.dtype, seq: int, head_dim: int) -> None:
    row = rec.row(
        "attention",
        bench.bench_attention(
            seq,
            head_dim,
            device=str(s.device),
            dtype=dtype,
            tokens=64 if s.dry_run else 16384,
            width=32 if s.dry_run else 2048,
        ),
    )
    ours, sdpa = row["results"]["triton"].get("ms"), row["results"]["sdpa_flash"].get("ms")
    ratio = sdpa / ours if ours and sdpa else None
    rec.check(
        f"attention fwd+bwd T={seq} D={head_dim}: throughput vs SDPA flash",
        None if ratio is None else f"{ratio:.2f}x",
        ">= 1.0x",
        ratio is not None and ratio >= 1.0,
    )


def _judge_loss(rec: Recorder, name: str, row: dict[str, Any], liger_reason: Optional[str]) -> None:
    r, label = row["results"], f"{name} N={row['tokens']} V={row['vocab']}"
    ours, eager = r["triton"], r["torch_eager"]
    if ours.get("peak_mib") is not None and eager.get("peak_mib"):
        share = ours["peak_mib"] / eager["peak_mib"]
        rec.check(f"{label}: peak memory vs torch eager", f"{share:.2f}", "<= 0.25", share <= 0.25)
    if r.get("liger", {}).get("ms") and ours.get("ms"):
        ratio = ours["ms"] / r["liger"]["ms"]
        rec.check(f"{label}: time vs Liger", f"{ratio:.2f}x", "<= 1.0x", ratio <= 1.0)
    elif liger_reason is not None:
        rec.check(f"{label}: time vs Liger", f"Liger unavailable: {liger_reason}", "<= 1.0x", None)


# ============================================================================================
# Part 3: end to end on the 124m preset
# ============================================================================================
E2E_STEPS, E2E_WARMUP = 12, 3  # timed steps and untimed warm-up steps per mode (diagnostics off / on)


def _model_preset(name: str) -> dict[str, Any]:
    from omegaconf import OmegaConf

    preset = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "model" / f"{name}.yaml"))
    return {k: v for k, v in preset.items() if k != "approx_params"}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_steps(trainer: Any, first: int, steps: int, warmup: int, logging: bool) -> dict[str, Any]:
    """Tokens/s and MFU of ``steps`` train steps after ``warmup`` untimed ones (autotuning, and
    under compile the graph this mode needs: a logging step returns statistics, another graph)."""
    from proxy.train.diagnostics import peak_flops

    start = time.perf_counter()
    for step in range(first, first + warmup):
        trainer.train_step(step, logging_step=logging)
    _sync(trainer.device)
    warmup_s = time.perf_counter() - start
    start = time.perf_counter()
    for step in range(first + warmup, first + warmup + steps):
        trainer.train_step(step, logging_step=logging)
    _sync(trainer.device)
    elapsed = time.perf_counter() - start
    rate = steps * trainer.tokens_per_step / elapsed
    peak, flops = peak_flops(trainer.device), trainer.model.flops_per_token(trainer.cfg.train.seq_len)
    return {
        "tokens_per_s": round(rate, 1),
        "step_ms": round(1e3 * elapsed / steps, 2),
        "mfu": round(rate * flops / peak, 4) if peak else None,
        "warmup_s": round(warmup_s, 1),
    }


def _train_rates(s: Setting, cfg_dict: dict[str, Any], steps: int, warmup: int, diagnostics: bool) -> dict[str, Any]:
    """The trainer's own step (proxy.train.Trainer.train_step) with diagnostics off, then, with
    ``diagnostics``, on at every step, in the same trainer (one build, one compile of the plain
    graph): the two rates differ by the diagnostics alone. Batches are drawn beforehand (the
    synthetic language is sampled on the CPU; a real corpus streams from a memmap, near free)."""
    from proxy.config import to_config
    from proxy.train import RunInfo, Trainer

    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        start = time.perf_counter()
        trainer = Trainer(to_config(cfg_dict), RunInfo(Path(tmp), "gpu-check"))
        drawn = [trainer.batch("train", i) for i in range(4)]
        trainer.batch = lambda split, index: drawn[index % len(drawn)]
        row: dict[str, Any] = {"build_s": round(time.perf_counter() - start, 1)}
        row.update(_time_steps(trainer, 0, steps, warmup, logging=False))
        if diagnostics:
            row.update(_diagnostics_rate(s, trainer, steps, warmup, row))
        del trainer
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def _diagnostics_rate(s: Setting, trainer: Any, steps: int, warmup: int, off: dict[str, Any]) -> dict[str, Any]:
    # under compile the logging graph is a second compile, about as long as the first (the plain
    # warm-up's seconds): measured only if that fits in what is left of the cap
    if s.time_left() < 1.5 * off["warmup_s"] + 10:
        return {
            "diagnostics": f"not measured: {s.time_left():.0f} s left of the part's cap, and the "
            f"diagnostics-off warm-up took {off['warmup_s']:.0f} s"
        }
    on = _time_steps(trainer, warmup + steps, steps, warmup, logging=True)
    return {
        "diag_tokens_per_s": on["tokens_per_s"],
        "diag_step_ms": on["step_ms"],
        "diag_warmup_s": on["warmup_s"],
        "diagnostics_cost": round(1.0 - on["tokens_per_s"] / off["tokens_per_s"], 4),
    }


def _end_to_end_config(s: Setting) -> dict[str, Any]:
    from proxy.config import Config, as_dict

    base = as_dict(Config())
    base["model"].update(_model_preset("tiny" if s.dry_run else "124m"))
    if not s.dry_run:  # a GPT-2-sized vocabulary, so the loss backends have their real work to do
        base["model"]["vocab_size"] = 50304
    base["train"].update(
        seq_len=16 if s.dry_run else 1024,
        batch_size=2 if s.dry_run else 16,
        device=str(s.device),
        dtype="fp32" if s.dry_run else "bf16",
        progress=False,
        steps=10_000,
        compile="false",
    )
    if s.dry_run:  # the interpreter runs each kernel program in Python: a small vocabulary
        base["data"]["synthetic"].update(vocab_size=64)
    return base


def part_end_to_end(s: Setting, rec: Recorder) -> None:
    base = _end_to_end_config(s)
    steps, warmup = (1, 1) if s.dry_run else (E2E_STEPS, E2E_WARMUP)
    compiled = not s.dry_run  # a CPU dry run compiles nothing: its "compiled" run is eager too
    eager = [("triton", "torch"), ("sdpa", "torch"), ("triton", "triton"), ("triton", "fused_linear")]
    rec.set(
        model="tiny" if s.dry_run else "124m",
        eager_backends=[f"{a}/{loss}" for a, loss in eager],
        compiled_backends=["triton/torch"] if compiled else [],
    )
    rec.note(
        "compiled (torch.compile): "
        + (
            "triton/torch only, the CUDA default; sdpa/torch, triton/triton and "
            "triton/fused_linear ran eager (a compile of the 124m model per backend would not fit the cap)"
            if compiled
            else "none (dry run on a CPU: every run eager)"
        )
    )
    rec.note(
        f"diagnostics cost: in one trainer, {steps} timed steps with logging_step=False, then {steps} with "
        f"logging_step=True at every step (grad stats, update tracker, forward statistics), each after its "
        f"own {warmup} untimed warm-up steps (under compile the logging graph compiles in its warm-up); "
        f"cost = 1 - on / off tokens/s; measured for eager triton/torch, and for compiled triton/torch "
        f"when the rest of the cap allows its second compile"
    )

    def run(attention: str, loss_impl: str, compile_: bool, diagnostics: bool, label: str = "") -> None:
        label = label or f"{'compiled' if compile_ else 'eager'} {attention}/{loss_impl}"
        cfg = json.loads(json.dumps(base))
        cfg["model"].update(attention=attention, loss_impl=loss_impl)
        cfg["train"]["compile"] = "true" if compile_ else "false"
        with rec.phase(label):
            row = rec.row(
                "runs",
                {
                    "run": label,
                    "attention": attention,
                    "loss_impl": loss_impl,
                    "compile": compile_,
                    **_train_rates(s, cfg, steps, warmup, diagnostics),
                },
            )
        _judge_run(rec, label, row, compile_, diagnostics)

    for i, (attention, loss_impl) in enumerate(eager):  # cheap first: each check lands as its run ends
        run(attention, loss_impl, False, diagnostics=i == 0)
    run(
        "triton",
        "torch",
        compiled,
        diagnostics=True,
        label="" if compiled else "eager triton/torch, standing in for compiled",
    )


def _judge_run(rec: Recorder, label: str, row: dict[str, Any], compile_: bool, diagnostics: bool) -> None:
    mfu = row["mfu"]
    rate = f"{row['tokens_per_s']:.0f} tokens/s, MFU {'-' if mfu is None else f'{100 * mfu:.1f}%'}"
    if compile_:
        rec.check(f"{label}: tokens/s, MFU", rate, ">= 40% MFU", None if mfu is None else mfu >= 0.40)
    else:
        rec.check(f"{label}: tokens/s, MFU", rate, "recorded (eager)", None)
    if "diagnostics_cost" in row:
        cost = row["diagnostics_cost"]
        rec.check(f"{label}: diagnostics at every step, throughput cost", f"{100 * cost:.1f}%", "<= 5%", cost <= 0.05)
    elif diagnostics:
        rec.check(f"{label}: diagnostics at every step, throughput cost", row.get("diagnostics"), "<= 5%", None)


# ============================================================================================
# Part 4: the vectorized sweep
# ============================================================================================
def part_vectorized_sweep(s: Setting, rec: Recorder) -> None:
    from benchmarks import ensemble_speed

    args = argparse.Namespace(
        steps=3 if s.dry_run else 30,
        batch_size=2 if s.dry_run else 16,
        seq_len=16 if s.dry_run else 256,
        members=2 if s.dry_run else 8,
        reps=1,
        device=str(s.device),
    )
    warm = argparse.Namespace(**{**vars(args), "steps": 2, "members": 2})
    rec.set(settings=vars(args))
    for size in ["tiny"] if s.dry_run else ["1m", "5m", "20m"]:
        # untimed, per size: Triton autotunes per head dim (1m: 32; 5m, 20m: 64) and the first
        # launches of new shapes cost; timed, that would land on the sequential runs (they run
        # first) and inflate the speedup
        with rec.phase(f"{size} warm-up"):
            ensemble_speed.measure(size, warm, s.device, compile_=False)
        with rec.phase(f"{size} timed"):
            row = rec.row("sizes", ensemble_speed.measure(size, args, s.device, compile_=False))
        rec.check(
            f"{size}: K={args.members} vectorized vs sequential (end to end)",
            f"{row['speedup']:.2f}x",
            ">= 4x",
            row["speedup"] >= 4.0,
        )
    _compiled_ensemble(s, rec, ensemble_speed, args)


def _compiled_ensemble(s: Setting, rec: Recorder, ensemble_speed: Any, args: argparse.Namespace) -> None:
    """The GPU presets run their ensembles compiled (the CUDA default): that it runs, and its time
    (the compile included)."""
    size = "tiny" if s.dry_run else "5m"
    label = f"{size}: a compiled K={args.members} ensemble trains"
    if s.time_left() < 20:
        rec.check(label, f"not run: {s.time_left():.0f} s left of the part's cap", "runs, finite", None)
        return
    cfg = ensemble_speed.base_config(size, args, compile_=not s.dry_run)
    with rec.phase(f"{size} compiled ensemble"), tempfile.TemporaryDirectory(prefix="gpu-check-ensemble-") as tmp:
        timer, losses = ensemble_speed.time_vectorized(cfg, ensemble_speed.lr_grid(args.members), Path(tmp), s.device)
        # the loop's rate after compilation: what proxy/train/estimate.py's compiled small-model
        # floor should be calibrated on (the first run, 2026-12-04, recorded only the wall time)
        loop_rate = ensemble_speed.loop_tokens_per_s(Path(tmp), ensemble_speed.lr_grid(args.members), ensemble=True)
    finite = all(math.isfinite(v) for v in losses)
    rec.set(compiled_ensemble_s=round(timer.wall, 1), compiled_ensemble_loop_tokens_per_s=round(loop_rate))
    rec.check(
        label,
        f"{timer.wall:.0f} s ({loop_rate:,.0f} tokens/s in the loop), final losses finite: {finite}",
        "runs, finite",
        finite,
    )


# ============================================================================================
# Part 5: one finding's GPU preset, shrunk, end to end
# ============================================================================================
VERDICT_S = 20  # the part's cap keeps this much of itself for proxy-verdict


def part_finding(s: Setting, rec: Recorder) -> None:
    finding = "attention_logit_growth"
    preset = f"{finding}/lab" if s.dry_run else f"{finding}/gpu"
    shrink = (
        [
            "train.steps=4",
            "train.eval_every=2",
            "train.batch_size=2",
            "train.seq_len=16",
            "model.qk_norm=off,layernorm",
            "sweep.lrs=[1e-2,1e-1]",
            "sweep.seeds=[0]",
        ]
        if s.dry_run
        else [
            "model=1m",
            "train.steps=60",
            "train.eval_every=30",
            "train.compile=false",
            "model.qk_norm=off,layernorm",
            "sweep.lrs=[1e-2,3e-1]",
            "sweep.seeds=[0]",
        ]
    )
    rec.set(preset=preset, overrides=shrink)
    env = {**os.environ, "WANDB_MODE": "disabled"}
    with tempfile.TemporaryDirectory(prefix="gpu-check-finding-") as tmp:
        sweep = Path(tmp) / "sweep"
        train = [
            sys.executable,
            "-m",
            "proxy.train",
            "-m",
            f"+experiment={preset}",
            *shrink,
            "train.progress=false",
            f"hydra.sweep.dir={sweep}",
        ]
        with rec.phase("proxy-train"):
            code, _, err = _run_step(train, env, s.time_left() - VERDICT_S)
        rec.set(train_stderr_tail=err[-1500:])
        rec.check(
            "proxy-train -m (shrunken preset)",
            f"{_outcome(code)} in {rec.data['phases'][-1]['seconds']:.0f} s",
            "exit 0",
            code == 0,
        )
        with rec.phase("proxy-verdict"):
            code, out, err = _run_step(
                [sys.executable, "-m", "proxy.verdict", f"experiments/{finding}", str(sweep)], env, s.time_left() - 2
            )
        written = (sweep / "report" / "verdict.md").is_file() and (sweep / "report" / "report.html").is_file()
        rec.set(verdict_headline=out.splitlines()[0] if out.strip() else "", verdict_stderr_tail=err[-1500:])
        rec.check(
            "proxy-verdict: report and verdict written",
            f"{_outcome(code)}, files {written}",
            "exit 0 and both files",
            code == 0 and written,
        )


def _run_step(cmd: list[str], env: dict[str, str], timeout: float) -> tuple[Optional[int], str, str]:
    """(exit code, stdout, stderr) of a command given what is left of the part's cap; exit code
    None when it ran out of that time, or had none to start with."""
    if timeout < 5:
        return None, "", f"not run: {timeout:.0f} s left of the part's cap"
    try:
        out, err, code = run_capped(cmd, env, timeout)
    except subprocess.TimeoutExpired as exc:
        return None, exc.stdout or "", f"{exc.stderr or ''}\ntimeout after {timeout:.0f} s (the rest of the part's cap)"
    return code, out, err


def _outcome(code: Optional[int]) -> str:
    return "out of time" if code is None else f"exit {code}"


QUICK_TUNING_PARTS = (1, 5)  # PROXY_TRITON_TUNING=quick: proxy/kernels/flash_attention.py

PART_FUNCTIONS: dict[int, Callable[[Setting, Recorder], None]] = {
    1: part_correctness,
    2: part_kernel_speed,
    3: part_end_to_end,
    4: part_vectorized_sweep,
    5: part_finding,
}
