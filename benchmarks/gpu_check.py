"""The device check: every question a GPU must answer, in one run of under 9 minutes (525 s of caps).

    python -m benchmarks.gpu_check [--out DIR] [--parts 1 2 3 4 5] [--cap PART=SECONDS ...]  # GPU
    python -m benchmarks.gpu_check --dry-run --out /tmp/check                                 # CPU

GPU time is rare (about 15 minutes on one H200 when a session is lent one), so this one script
answers everything the CPU cannot, each part in its own process under its own time cap (a hang
or a broken CUDA context in one part leaves the others' results; the caps sum to 525 s, which
leaves a lease time to rerun one part), and writes its results after every part:
``gpu-check-<device>-<date>-<HHMMSS>[-parts-N]`` ``.json`` and ``.md`` in benchmarks/results/ (or
--out). A part records each check, table row and phase time as it is made, so a part that raises
or runs past its cap keeps what it had measured, and its phase times say how to set ``--cap``
for a second try.

    1 correctness   flash attention fwd+bwd against the fp32 reference at T 1k-8k, D 64/128,
                    causal, bf16 and fp16, and the max-logit statistic; fused CE and linear-CE
                    at V 32k/50k/128k with z-loss and ignore_index; the tests/ kernel suite on
                    CUDA (TRITON_INTERPRET=0)
    2 kernel speed  attention fwd+bwd against SDPA's flash backend (target >= 1.0x); CE and
                    linear-CE time and peak memory against F.cross_entropy eager / compiled and
                    Liger-Kernel (targets: peak memory <= 1/4 of torch's, time <= Liger's)
    3 end to end    the 124m preset at seq 1024, bf16: tokens/s and MFU per attention / loss
                    backend (eager; triton/torch also compiled, target >= 40% MFU), and the cost
                    of the diagnostics, on vs off in the same trainer (target <= 5%)
    4 sweep         K=8 LRs vectorized in one process against 8 runs one after another, on
                    1m / 5m / 20m, each size warmed up untimed first (target >= 4x)
    5 a finding     a shrunken GPU preset end to end: proxy-train -> proxy-verdict

``--dry-run`` runs the same parts on the CPU with tiny shapes, the kernels under the Triton
interpreter and the targets not judged: the test suite runs it, so the script cannot crash on
its first contact with a GPU for any reason a CPU can show.

On the device image (its own torch and triton; no hydra-core, omegaconf or Liger): carry the
wheels that ``benchmarks/gpu_wheels.sh`` downloads and put the project on PYTHONPATH (the
README's "Running the device check" gives the device tool's call and what to rerun).

Processes: each part leads its own process group (in the parent's session, so whatever cleans
up after the command reaches it too); everything a part starts (pytest, proxy-train,
proxy-verdict and their workers) stays in that group, and the parent kills the whole group when
the part ends, runs past its cap, or the parent itself exits or is sent SIGTERM / SIGINT.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from proxy.records import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

# part: (name, what it answers, cap in seconds on a GPU, cap on a CPU dry run). The GPU caps sum
# to 525 s, set from the first H200 run (2026-12-04, cold caches: part 1 took 69 s, part 4 about
# 125 s, part 5 43 s with proxy-train cut at 20 s): with the parent's start and the wheels' install
# the whole check stays inside 10 minutes, and a 15-minute lease keeps a few minutes to rerun one
# part. Part 2 compiles every autotuning candidate of the attention kernels (two head dims), part 3
# compiles the 124m model. The phase times each part records are what a second try sets --cap from.
PARTS = {
    1: ("correctness", "kernels against the references at real shapes; the kernel tests on CUDA", 85, 240),
    2: ("kernel speed", "attention and cross-entropy against SDPA, torch and Liger", 110, 240),
    3: ("end to end", "the 124m preset: tokens/s, MFU, the cost of the diagnostics", 100, 240),
    4: ("vectorized sweep", "K=8 LRs in one process against 8 runs one after another", 150, 240),
    5: ("a finding end to end", "a shrunken GPU preset: train, report, verdict", 80, 240),
}


# ============================================================================================
# Settings: the GPU's shapes, or a CPU's tiny ones
# ============================================================================================
@dataclass(frozen=True)
class Setting:
    dry_run: bool
    deadline: Optional[float] = None  # time.time() at which the parent kills this part

    @property
    def device(self) -> torch.device:
        return torch.device("cpu" if self.dry_run else "cuda")

    def time_left(self) -> float:
        """Seconds until the part's cap: nested commands get at most this, so the part can still
        record that they ran out of time instead of being killed with them."""
        return math.inf if self.deadline is None else self.deadline - time.time()

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


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Whole or not at all: a part killed mid-write must not leave the parent unreadable JSON."""
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


class Recorder:
    """Everything a part measures: its checks (measured against a target), table rows, notes, and
    the seconds each phase took. Each is written to the part's result file the moment it is
    recorded, so a part that raises (run_part) or runs past its cap (launch_part) keeps all of it,
    and the file says which phase was running when the cap came."""

    def __init__(self, setting: Setting, path: Optional[Path] = None):
        self.setting, self.path = setting, path
        self.data: dict[str, Any] = {"checks": [], "phases": [], "notes": []}

    def check(self, name: str, measured: Any, target: str, passed: Optional[bool]) -> None:
        judged = None if self.setting.dry_run or passed is None else bool(passed)
        self.data["checks"].append({"check": name, "measured": measured, "target": target, "passed": judged})
        self.save()

    def row(self, table: str, row: dict[str, Any]) -> dict[str, Any]:
        self.data.setdefault(table, []).append(row)
        self.save()
        return row

    def set(self, **values: Any) -> None:
        self.data.update(values)
        self.save()

    def note(self, text: str) -> None:
        self.data["notes"].append(text)
        self.save()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Times a stretch of the part; the file names it as running until it ends."""
        self.set(running=name)
        start, raised = time.perf_counter(), True
        try:
            yield
            raised = False
        finally:
            self.data["phases"].append(
                {
                    "phase": name,
                    "seconds": round(time.perf_counter() - start, 1),
                    **({"raised": True} if raised else {}),
                }
            )
            self.data.pop("running", None)
            self.save()

    def save(self) -> None:
        if self.path is not None:
            _write_json(self.path, {"status": "partial", **self.data})


# ============================================================================================
# Processes: every descendant of a part dies with it
# ============================================================================================
_LIVE_GROUPS: set[int] = set()  # in the parent: the process group of the part running now


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):  # nothing left in it
        pass


def kill_live_groups() -> None:
    for pgid in list(_LIVE_GROUPS):
        _kill_group(pgid)
        _LIVE_GROUPS.discard(pgid)


def _descendants(pid: int) -> list[int]:
    """pid's children, their children, ..., from /proc/<pid>/stat (Linux; elsewhere none found).
    /proc/<pid>/task/*/children would be simpler but not every kernel has it (gVisor lacks it)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:  # the name, field 2, is in parentheses and may hold spaces: state and ppid follow it
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):  # it exited meanwhile
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def _kill_tree(proc: subprocess.Popen) -> None:
    for pid in [*_descendants(proc.pid), proc.pid]:  # listed before any dies: none is reparented yet
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _new_group() -> dict[str, Any]:
    """Popen arguments for a new process group in this session (not a new session: the device
    tool, like a terminal, ends what a command leaves behind unless it left the session)."""
    return {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}


def run_capped(cmd: list[str], env: dict[str, str], timeout: float, own_group: bool = False) -> tuple[str, str, int]:
    """Run a command; past ``timeout`` kill it and everything it started, then raise TimeoutExpired.

    own_group=True is the parent starting a part: the part leads a new process group, everything
    it starts stays in that group, and the group is killed whenever the part ends (its leftovers
    too) or the parent leaves (main's signal handlers and finally). own_group=False is a part
    starting pytest, proxy-train or proxy-verdict: the command stays in the part's group, so the
    part's cap reaches it, and its own timeout kills it and its descendants."""
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **(_new_group() if own_group else {}),
    )
    if own_group:
        _LIVE_GROUPS.add(proc.pid)
    try:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            if own_group:
                _kill_group(proc.pid)
            else:
                _kill_tree(proc)
            out, err = _drain(proc)
            raise subprocess.TimeoutExpired(cmd, timeout, out, err) from None
    finally:
        if own_group:
            _kill_group(proc.pid)
            _LIVE_GROUPS.discard(proc.pid)
    return out, err, proc.returncode


def _drain(proc: subprocess.Popen) -> tuple[str, str]:
    """The output of a killed command; empty if something that escaped the kill holds its pipes."""
    try:
        return proc.communicate(timeout=5)
    except subprocess.TimeoutExpired:
        proc.wait()
        return "", ""


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
        with rec.phase(f"attention {_name(dtype)}"):
            for seq, head_dim in s.attention_shapes:
                _check_attention(s, rec, gen, dtype, seq, head_dim)
        with rec.phase(f"cross-entropy {_name(dtype)}"):
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
    rec.row("errors", {"op": "attention", "dtype": _name(dtype), "seq": seq, "head_dim": head_dim, **errors})
    worst_grad = max(errors["dq"], errors["dk"], errors["dv"])
    label = f"attention {_name(dtype)} T={seq} D={head_dim}"
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

    tol, name, loss_scale = TOLERANCE[dtype], _name(dtype), LOSS_SCALE[dtype]
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
        "tests/test_kernels_attention.py",
        "tests/test_kernels_cross_entropy.py",
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
    preset = f"{finding}_lab" if s.dry_run else f"{finding}_gpu"
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


# ============================================================================================
# The run: one process per part, results written after each
# ============================================================================================
def versions() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "platform": platform.platform(),
    }
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


def run_part(number: int, dry_run: bool, result_path: Path, deadline: Optional[float] = None) -> int:
    """In the child process: one part, its JSON written whatever happens. A part that raises keeps
    every check, row and phase time it had recorded, beside the error."""
    started = time.perf_counter()
    rec = Recorder(Setting(dry_run, deadline), result_path)
    try:
        PART_FUNCTIONS[number](rec.setting, rec)
        result = {"status": "ok", **rec.data}
    except Exception as exc:  # the part failed: say how, keep what it measured, let the parent go on
        result = {
            "status": "failed",
            **rec.data,
            "error": f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc(),
        }
    result["in_process_s"] = round(time.perf_counter() - started, 1)
    _write_json(result_path, result)
    return 0 if result["status"] == "ok" else 1


def launch_part(number: int, dry_run: bool, cap: Optional[float] = None) -> dict[str, Any]:
    """In the parent: one part in its own process (and process group) under its cap."""
    name, _, gpu_cap, cpu_cap = PARTS[number]
    cap = cap if cap is not None else (cpu_cap if dry_run else gpu_cap)
    env = dict(os.environ)
    env["TRITON_INTERPRET"] = "1" if dry_run else "0"
    env.setdefault("WANDB_MODE", "disabled")
    if number in QUICK_TUNING_PARTS:  # correctness, not speed: one kernel config, no autotuning
        env["PROXY_TRITON_TUNING"] = "quick"
    with tempfile.TemporaryDirectory(prefix="gpu-check-part-") as tmp:
        result_path = Path(tmp) / "result.json"
        started = time.time()
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.gpu_check",
            "--part",
            str(number),
            "--result",
            str(result_path),
            "--deadline",
            f"{started + cap:.3f}",
        ] + (["--dry-run"] if dry_run else [])
        try:
            _, stderr, code = run_capped(cmd, env, timeout=cap, own_group=True)
            timed_out = False
        except subprocess.TimeoutExpired as exc:
            stderr, code, timed_out = exc.stderr or "", None, True
        result = _read_json(result_path)  # what the part recorded, however far it got
    seconds = round(time.time() - started, 1)
    running = result.pop("running", None)  # the phase the part was in when it stopped, if unfinished
    during = f", during phase '{running}'" if running else ""
    if timed_out:
        result.update(status="timeout", error=f"over its cap of {cap:g} s{during}")
    elif result.get("status") not in ("ok", "failed"):
        result.update(status="crashed", error=f"exit {code} before the part finished{during}")
    if result["status"] != "ok":
        result["stderr_tail"] = stderr[-2000:]
    return {"part": number, "name": name, "cap_s": cap, "seconds": seconds, **result}


def result_stem(device: str, when: dt.datetime, parts: list[int]) -> str:
    """gpu-check-<device>-<date>-<HHMMSS>[-parts-N-M]: a rerun of some parts on the same day
    writes beside the full record, never over it."""
    name = re.sub(r"[^A-Za-z0-9]+", "-", device).strip("-").lower()
    tag = "" if sorted(parts) == sorted(PARTS) else "-parts-" + "-".join(map(str, parts))
    return f"gpu-check-{name}-{when:%Y-%m-%d-%H%M%S}{tag}"


def plan_line(parts: list[int], caps: dict[int, float]) -> str:
    total = sum(caps[p] for p in parts)
    return (
        f"plan: parts {' '.join(map(str, parts))} under caps "
        f"{' + '.join(f'{caps[p]:g}' for p in parts)} = {total:g} s (each part's process start included), "
        f"results written after each part; a part over its cap is killed and recorded, the rest go on. "
        f"Rerun one alone: --parts N [--cap N=SECONDS]"
    )


def to_markdown(record: dict[str, Any]) -> str:
    v = record["versions"]
    lines = [
        f"# Device check: {v['device']}",
        "",
        f"{record['date']}; torch {v['torch']}, triton {v['triton']}, CUDA {v['cuda']}, "
        f"Python {v['python']}{'; DRY RUN on a CPU (targets not judged)' if record['dry_run'] else ''}. "
        f"Command: `{record['command']}`; {record['seconds']:.0f} s in all.",
        "",
    ]
    for part in record["parts"]:
        lines += _part_markdown(part)
    return "\n".join(lines) + "\n"


def _part_markdown(part: dict[str, Any]) -> list[str]:
    lines = [
        f"## {part['part']}. {part['name']}: {part['status']} ({part.get('seconds', '?')} s of {part['cap_s']:g} s)",
        "",
    ]
    if part["status"] != "ok":
        lines += [f"> {part.get('error', '')}", ""]
    if part.get("phases"):
        lines += [
            "Phases: "
            + ", ".join(
                f"{p['phase']} {p['seconds']} s" + (" (raised)" if p.get("raised") else "") for p in part["phases"]
            )
            + ".",
            "",
        ]
    lines += [f"- {note}" for note in part.get("notes", [])] + ([""] if part.get("notes") else [])
    if part.get("checks"):
        lines += ["| check | measured | target | holds |", "|---|---|---|---|"]
        for c in part["checks"]:
            holds = {True: "yes", False: "**no**", None: "-"}[c["passed"]]
            lines.append(f"| {c['check']} | {c['measured']} | {c['target']} | {holds} |")
        lines.append("")
    return lines


def _cap(text: str) -> tuple[int, float]:
    part, _, seconds = text.partition("=")
    if int(part) not in PARTS or not seconds:
        raise argparse.ArgumentTypeError(f"--cap wants PART=SECONDS with PART in {list(PARTS)}, not {text!r}")
    return int(part), float(seconds)


@contextmanager
def _parts_die_with_us() -> Iterator[None]:
    """SIGTERM, SIGINT or SIGHUP to the parent, or its exit however it comes, kills the running
    part's process group: no part outlives the check to hold the GPU during a rerun."""

    def on_signal(signum: int, _frame: Any) -> None:
        kill_live_groups()
        raise SystemExit(128 + signum)

    wanted = [signal.SIGTERM, signal.SIGINT] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])
    previous = {}
    for sig in wanted:
        try:
            previous[sig] = signal.signal(sig, on_signal)
        except ValueError:  # not the main thread: leave the handlers alone
            pass
    try:
        yield
    finally:
        kill_live_groups()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="on a CPU, tiny shapes, targets not judged")
    parser.add_argument(
        "--out", type=Path, default=None, help="folder for the JSON and markdown (default benchmarks/results)"
    )
    parser.add_argument("--parts", type=int, nargs="+", default=list(PARTS), choices=list(PARTS))
    parser.add_argument(
        "--cap",
        type=_cap,
        action="append",
        default=[],
        metavar="PART=SECONDS",
        help="another time cap for a part (a second try, from the first one's phase times)",
    )
    parser.add_argument("--part", type=int, choices=list(PARTS), help=argparse.SUPPRESS)  # the child
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.part:
        return run_part(args.part, args.dry_run, args.result, args.deadline)
    if not args.dry_run and not torch.cuda.is_available():
        print("benchmarks.gpu_check: no CUDA device here; --dry-run checks the script on a CPU", file=sys.stderr)
        return 2

    started = time.perf_counter()
    caps = {n: float(part[3 if args.dry_run else 2]) for n, part in PARTS.items()} | dict(args.cap)
    print(plan_line(args.parts, caps), flush=True)
    info = versions()
    out = args.out or RESULTS
    out.mkdir(parents=True, exist_ok=True)
    stem = result_stem(info["device"], dt.datetime.now(), args.parts)
    paths = (out / f"{stem}.json", out / f"{stem}.md")
    record = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "dry_run": args.dry_run,
        "versions": info,
        "command": " ".join(["python -m benchmarks.gpu_check", *(argv if argv is not None else sys.argv[1:])]),
        "caps_s": {str(n): caps[n] for n in args.parts},
        "parts": [],
        "seconds": 0.0,
    }
    with _parts_die_with_us():
        for number in args.parts:
            print(f"part {number} ({PARTS[number][0]}, cap {caps[number]:g} s) ...", flush=True)
            part = launch_part(number, args.dry_run, caps[number])
            record["parts"].append(part)
            record["seconds"] = round(time.perf_counter() - started, 1)
            _write_json(paths[0], record)  # after every part
            atomic_write_text(paths[1], to_markdown(record))
            missed = [c["check"] for c in part.get("checks", []) if c["passed"] is False]
            print(
                f"part {number}: {part['status']} in {part['seconds']} s"
                + (f"; {len(missed)} targets missed" if missed else ""),
                flush=True,
            )
    print(paths[1].read_text())
    print(f"wrote {paths[0]} and {paths[1]}")
    return 0 if all(p["status"] == "ok" for p in record["parts"]) else 1


if __name__ == "__main__":
    sys.exit(main())
