"""The run directory against hostile files, torn writes, full disks, signals and two writers.

Each test plants one fault and checks the outcome: no payload runs, no file outside the run dir
is touched, what was already written stays byte for byte, and the status and the one-line
message say what happened."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from proxy.config import ConfigError, to_config
from proxy.data import DataError, build_source
from proxy.records import (
    ERROR_FILE,
    START_ERROR_FILE,
    RunDirBusy,
    RunDirError,
    RunLock,
    StateFileError,
    UnsafePathError,
    checkpoints,
    find_runs,
    load_run,
)
from proxy.report import build_report
from proxy.train import train
from proxy.train.ledger import RunDirTaken
from proxy.train.remedies import Rollback
from tests.train.test_trainer import tiny_cfg

ROOT = Path(__file__).resolve().parents[2]


class Payload:
    """Unpickling this runs code: it writes a marker file. weights_only loading must refuse it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant_payload(path: Path, marker: Path) -> None:
    torch.save({"model": Payload(marker)}, path)


def snapshot_of(run_dir: Path) -> dict[str, bytes]:
    """Every file under the run dir (but the lock and start errors), by path: to compare before/after."""
    return {
        str(p.relative_to(run_dir)): p.read_bytes()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and p.name not in (".lock", START_ERROR_FILE)
    }


def cli(*args: str, cwd: Path, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": ""}
    return subprocess.run(
        [sys.executable, "-m", "proxy.train", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        **kw,
    )


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [ln for ln in result.stderr.splitlines() if ln.strip()]


@pytest.fixture
def completed_run(tmp_path) -> Path:
    """A finished tiny run with checkpoints at steps 10 and 20."""
    run_dir = tmp_path / "done"
    train(tiny_cfg(train=dict(ckpt_every=10, keep_checkpoints=5)), run_dir)
    return run_dir


def resume_cfg(**sections) -> dict:
    cfg = tiny_cfg(train=dict(ckpt_every=10, keep_checkpoints=5, resume=True), **sections)
    return cfg


# ============================================================================================
# Security
# ============================================================================================
def test_a_planted_pickle_in_rollback_snapshots_never_runs(tmp_path):
    from proxy.config import DetectorConfig, RemedyConfig
    from proxy.model import build_model
    from proxy.optim import build_optimizer

    cfg = RemedyConfig(
        kind="rollback",
        rollback_storage="disk",
        rollback_every=2,
        rollback_keep=3,
        rollback_min_age=2,
        detector=DetectorConfig(min_history=3, window=5),
    )
    model = build_model(to_config({}).model, 64)
    optimizer = build_optimizer(model, to_config({}).optim)
    rb = Rollback(cfg, tmp_path / "rollback")
    for step in range(6):
        rb.maybe_snapshot(step, model, optimizer, step)
        assert rb.check(step, 1.0 + 0.01 * (step % 2), 1.0, data_position=step + 1) is None
    marker = tmp_path / "payload-ran"
    for path in (tmp_path / "rollback").glob("step_*.pt"):
        plant_payload(path, marker)
    assert rb.check(6, float("inf"), 1.0, data_position=7)["kind"] == "rollback"
    with pytest.raises(StateFileError, match="refused") as info:
        rb.restore(model, optimizer)
    assert "rollback/step_" in str(info.value) and "weights_only" not in str(info.value)
    assert not marker.exists()


def test_a_checkpoint_cannot_point_the_snapshot_cleanup_outside_the_run_dir(tmp_path):
    remedy = dict(kind="rollback", rollback_storage="disk", rollback_every=5, rollback_min_age=5)
    run_dir = tmp_path / "run"
    train(tiny_cfg(remedy=remedy, train=dict(ckpt_every=10, keep_checkpoints=5)), run_dir)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (run_dir / "rollback").mkdir(exist_ok=True)
    (run_dir / "rollback" / "step_0000005.pt").symlink_to(victim)  # a link inside, to a file outside
    ckpt = checkpoints(run_dir)[-1]
    state = torch.load(ckpt, weights_only=True)
    for name in ("../../victim.txt", str(victim), "step_0000005.pt"):
        state["remedy"]["snapshots"] = [{"step": 5, "data_position": 5, "file": name}]
        torch.save(state, ckpt)
        before = snapshot_of(run_dir)
        with pytest.raises(ConfigError) as info:
            train(resume_cfg(remedy=remedy), run_dir)
        message = str(info.value)
        assert str(ckpt) in message and "\n" not in message
        assert victim.read_text() == "keep me"
        assert snapshot_of(run_dir) == before
    with pytest.raises(UnsafePathError):
        Rollback(to_config({"remedy": remedy}).remedy, run_dir / "rollback").load_state_dict(
            {**state["remedy"], "snapshots": [{"step": 5, "data_position": 5, "file": "/etc/passwd"}]}
        )


def test_a_refused_checkpoint_is_named_in_one_line_without_torchs_hint(completed_run, tmp_path):
    marker = tmp_path / "payload-ran"
    plant_payload(completed_run / "checkpoints" / "step_0000030.pt", marker)
    before = snapshot_of(completed_run)
    args = [
        "train.steps=20",
        "train.batch_size=4",
        "train.seq_len=32",
        "train.resume=true",
        f"out_dir={completed_run}",
        "train.progress=false",
    ]
    result = cli(*args, cwd=tmp_path)
    lines = error_lines(result)
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "step_0000030.pt" in lines[0] and "refused" in lines[0]
    assert "weights_only" not in lines[0] and "Re-running" not in lines[0]
    assert not marker.exists()
    assert snapshot_of(completed_run) == before


@pytest.mark.parametrize("planted", ["batches.pt", "state_before.pt"])
def test_a_planted_pickle_in_a_spike_kit_is_refused_in_one_line(tmp_path, planted):
    from proxy.forensics.inspect_cli import main as inspect_main
    from proxy.train.capture import BATCHES_FILE, KIT_FORMAT, KIT_JSON

    kit = tmp_path / "run" / "spike_kits" / "step_0000040"
    kit.mkdir(parents=True)
    state = {"step": 39, "data_position": 39}
    meta = {
        "format": KIT_FORMAT,
        "config": tiny_cfg(),
        "step": 40,
        "trigger": "grad_norm",
        "value": 9.0,
        "threshold": 3.0,
        "states": {"before": state, "at": state, "after": None},
        "trace": [],
        "vocab_size": 512,
    }
    (kit / KIT_JSON).write_text(json.dumps(meta))
    zeros = torch.zeros(2, 1, 8, dtype=torch.long)
    torch.save(
        {"steps": torch.tensor([39, 40]), "inputs": zeros, "labels": zeros, "data_positions": torch.tensor([39, 40])},
        kit / BATCHES_FILE,
    )
    marker = tmp_path / "payload-ran"
    plant_payload(kit / planted, marker)
    before = snapshot_of(tmp_path / "run")
    result = subprocess.run(
        [sys.executable, "-m", "proxy.forensics.inspect_cli", str(kit), "--no-replay", "--lanczos-iters=0"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = error_lines(result)
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert planted in lines[0] and "refused" in lines[0]
    assert "weights_only" not in lines[0] and "Re-running" not in lines[0]
    assert not marker.exists()
    assert snapshot_of(tmp_path / "run") == before
    assert inspect_main  # the console script's entry point is the module run above


def test_a_foreign_kit_json_is_one_line(tmp_path):
    from proxy.train.capture import KIT_FORMAT, KIT_JSON

    kit = tmp_path / "kit"
    kit.mkdir()
    (kit / KIT_JSON).write_text(json.dumps({"format": KIT_FORMAT, "config": tiny_cfg(), "step": 40}))
    result = subprocess.run(
        [sys.executable, "-m", "proxy.forensics.inspect_cli", str(kit)], capture_output=True, text=True, timeout=300
    )
    lines = error_lines(result)
    assert result.returncode == 2 and len(lines) == 1 and "lacks" in lines[0] and "states" in lines[0], result.stderr


# ============================================================================================
# Nothing already written is lost
# ============================================================================================
def test_a_resume_that_cannot_start_leaves_the_run_as_it_was(completed_run, monkeypatch):
    import wandb

    before = snapshot_of(completed_run)
    # an incompatible config, forced past the config check (tests/train/test_resume.py) to the checkpoint's
    incompatible = resume_cfg(model=dict(n_layers=3))
    incompatible["train"]["resume_override"] = True
    with pytest.raises(ConfigError, match="cannot resume from it") as info:
        train(incompatible, completed_run)
    assert "\n" not in str(info.value) and "step_0000020.pt" in str(info.value)
    assert snapshot_of(completed_run) == before
    assert not (completed_run / START_ERROR_FILE).exists()  # a refused start writes nothing into a run

    # wandb online without a login
    def no_login(**kwargs):
        raise wandb.errors.UsageError("api_key not configured (no-tty). call wandb.login(key=[your_api_key])")

    monkeypatch.setattr(wandb, "init", no_login)
    with pytest.raises(wandb.errors.UsageError):
        train(resume_cfg(wandb=dict(mode="online")), completed_run)
    assert snapshot_of(completed_run) == before
    assert json.loads((completed_run / "summary.json").read_text())["status"] == "completed"
    assert not (completed_run / START_ERROR_FILE).exists()


def test_a_fresh_run_never_overwrites_a_run(completed_run):
    before = snapshot_of(completed_run)
    with pytest.raises(RunDirTaken, match="already holds a run .status completed.") as info:
        train(tiny_cfg(), completed_run)
    assert "train.resume=true" in str(info.value)
    assert snapshot_of(completed_run) == before


@pytest.mark.parametrize("tear", ["half", "empty"])
def test_a_torn_newest_checkpoint_is_skipped_and_named(completed_run, tmp_path, tear):
    """A crash while copying a checkpoint leaves it torn: the resume goes on from the one before,
    and the result is the uninterrupted run's, bit for bit."""
    newest = checkpoints(completed_run)[-1]
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2] if tear == "half" else b"")
    full = load_run(completed_run)
    summary = train(resume_cfg(), completed_run)
    assert summary["status"] == "completed"
    assert summary["resumed_from"].endswith("step_0000010.pt")
    (skipped,) = summary["skipped_checkpoints"]
    assert skipped.startswith("step_0000020.pt") and "unreadable" in skipped
    again = load_run(completed_run)
    assert again.series("train/loss") == full.series("train/loss")
    assert again.series("val/loss") == full.series("val/loss")


def test_every_checkpoint_torn_fails_naming_them(completed_run):
    for path in checkpoints(completed_run):
        path.write_bytes(b"")
    before = snapshot_of(completed_run)
    with pytest.raises(StateFileError, match="no checkpoint loads") as info:
        train(resume_cfg(), completed_run)
    assert "step_0000010.pt" in str(info.value) and "step_0000020.pt" in str(info.value)
    assert snapshot_of(completed_run) == before


def test_a_full_disk_leaves_no_temp_file_and_a_final_status(tmp_path, monkeypatch):
    import proxy.train.ledger as ledger_module

    real_save, real_write = torch.save, ledger_module.atomic_write_text

    def save_until_full(obj, f, *args, **kwargs):
        f.write(b"x" * 4096)  # part of the file made it to disk
        raise OSError(errno.ENOSPC, "No space left on device")

    def write_unless_error_file(path, text):
        if Path(path).name == ERROR_FILE:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, text)

    monkeypatch.setattr(torch, "save", save_until_full)
    monkeypatch.setattr(ledger_module, "atomic_write_text", write_unless_error_file)
    run_dir = tmp_path / "full"
    with pytest.raises(OSError, match="No space left"):
        train(tiny_cfg(train=dict(ckpt_every=10)), run_dir)
    monkeypatch.setattr(torch, "save", real_save)
    leftovers = [p.name for p in run_dir.rglob("*") if p.name.endswith(".tmp")]
    assert not leftovers
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and "No space left" in summary["error"]
    assert summary["steps_completed"] == 10
    assert not (run_dir / ERROR_FILE).exists()  # its write failed; the status did not wait for it


def _reference_rows(run_dir: Path) -> list:
    run = load_run(run_dir)
    return [run.series(k) for k in ("train/loss", "val/loss", "optim/grad_norm")]


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_at_a_step_with_a_checkpoint_and_resume_goes_on(tmp_path, sig, code):
    args = [
        "train.steps=150",
        "train.batch_size=4",
        "train.seq_len=32",
        "train.log_every=1",
        "train.eval_every=50",
        "train.eval_batches=1",
        "train.progress=false",
        "schedule.warmup_steps=5",
    ]
    run_dir = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "disabled"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy.train", *args, f"out_dir={run_dir}"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    metrics = run_dir / "metrics.jsonl"
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 30):
        time.sleep(0.2)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=300)
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert proc.returncode == code, stderr
    assert len(lines) == 1 and lines[0].startswith(f"interrupted by {sig.name} at step"), stderr
    assert "train.resume=true" in lines[0] and "Traceback" not in stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    stopped = summary["steps_completed"]
    assert summary["status"] == "interrupted" and 0 < stopped < 150
    assert summary["interrupted_by"] == sig.name
    assert checkpoints(run_dir)[-1].name == f"step_{stopped:07d}.pt"

    if sig != signal.SIGTERM:
        return  # the resume below is the same for either signal
    resumed = cli(*args, "train.resume=true", f"out_dir={run_dir}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    whole = cli(*args, f"out_dir={tmp_path / 'whole'}", cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr
    assert _reference_rows(run_dir) == _reference_rows(tmp_path / "whole")  # bitwise


def test_a_second_writer_is_refused_and_writes_nothing(tmp_path):
    run_dir = tmp_path / "shared"
    lock = RunLock(run_dir)
    lock.acquire()  # another process, as far as the run can tell: flock is per open file
    try:
        with pytest.raises(RunDirBusy, match=f"pid {os.getpid()}"):
            train(tiny_cfg(), run_dir)
        assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]
        result = cli("train.steps=2", f"out_dir={run_dir}", cwd=tmp_path)
        lines = error_lines(result)
        assert result.returncode == 2 and len(lines) == 1 and "another process" in lines[0], result.stderr
    finally:
        lock.release()
    assert train(tiny_cfg(), run_dir)["status"] == "completed"  # the lock goes with its holder


def test_two_jobs_started_together_get_two_run_dirs(tmp_path):
    args = ["train.steps=2", "train.batch_size=2", "train.seq_len=16", "train.eval_batches=1", "train.progress=false"]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "proxy.train", *args],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    runs = find_runs([tmp_path / "runs"])
    assert len(runs) == 2
    assert {load_run(r).status for r in runs} == {"completed"}


def test_the_report_lists_a_run_whose_summary_is_lost(tmp_path):
    train(tiny_cfg(), tmp_path / "kept")
    train(tiny_cfg(optim=dict(lr=1e-2)), tmp_path / "lost")
    (tmp_path / "lost" / "summary.json").unlink()
    result = build_report([tmp_path], tmp_path / "report")
    rows = {row.path: row for row in result.runs}
    lost = rows[str((tmp_path / "lost").resolve())]
    assert lost.status == "unknown" and lost.lr == 1e-2 and lost.final_val_loss is not None
    assert "no summary.json" in result.markdown.read_text()


# ============================================================================================
# Clear errors
# ============================================================================================
def test_an_unusable_run_dir_is_one_line_naming_the_cause(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    result = cli("train.steps=2", f"hydra.run.dir={blocker / 'run'}", cwd=tmp_path)
    lines = error_lines(result)
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "Not a directory" in lines[0] and len(lines[0]) < 300
    result = cli("train.steps=2", f"out_dir={blocker / 'run'}", f"hydra.run.dir={tmp_path / 'h'}", cwd=tmp_path)
    lines = error_lines(result)
    assert result.returncode == 2 and len(lines) == 1 and "cannot write to" in lines[0], result.stderr


def test_a_traceback_on_stderr_becomes_its_last_cause():
    from proxy.train.cli import one_line

    held = (
        "Traceback (most recent call last):\n"
        '  File "/x/hydra/_internal/utils.py", line 220, in run_and_report\n'
        "    return func()\n"
        "           ^^^^^^\n"
        '  File "/x/pathlib.py", line 1116, in mkdir\n'
        "    os.mkdir(self, mode)\n"
        "PermissionError: [Errno 13] Permission denied: '/ro/run/.hydra'\n"
    )
    assert one_line(held) == (
        "cannot write /ro/run/.hydra: Permission denied (proxy-train writes its log and "
        ".hydra/ into hydra.run.dir: give it a writable folder)"
    )


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_run_dir_is_one_line_naming_the_cause(completed_run, tmp_path):
    before = snapshot_of(completed_run)
    modes = {p: p.stat().st_mode for p in [completed_run, *completed_run.rglob("*")]}
    for p in sorted(modes, key=lambda q: -len(q.parts)):
        p.chmod(modes[p] & ~0o222)
    try:
        result = cli(
            "train.steps=30",
            "train.batch_size=4",
            "train.seq_len=32",
            "train.resume=true",
            f"out_dir={completed_run}",
            "train.progress=false",
            f"hydra.run.dir={tmp_path / 'h'}",
            cwd=tmp_path,
        )
    finally:
        for p, mode in modes.items():
            p.chmod(mode)
    lines = error_lines(result)
    assert result.returncode == 2 and len(lines) == 1 and len(lines[0]) < 300, result.stderr
    assert snapshot_of(completed_run) == before


def test_a_failed_run_points_to_a_traceback_only_where_one_was_written(tmp_path):
    from proxy.train.cli import _traceback_hint

    assert _traceback_hint(tmp_path) == ""
    (tmp_path / START_ERROR_FILE).write_text("Traceback ...")
    assert START_ERROR_FILE in _traceback_hint(tmp_path)
    (tmp_path / ERROR_FILE).write_text("Traceback ...")
    assert ERROR_FILE in _traceback_hint(tmp_path) and START_ERROR_FILE not in _traceback_hint(tmp_path)


def test_binary_garbage_is_not_a_text_corpus(tmp_path):
    garbage = tmp_path / "corpus.txt"
    garbage.write_bytes(bytes(range(256)) * 64)
    with pytest.raises(DataError, match="corpus.txt: not text"):
        build_source(to_config({"data": {"source": "text", "path": str(garbage)}}).data)
    controls = tmp_path / "controls.txt"
    controls.write_bytes(b"\x01\x02\x03\x04 words " * 200)
    with pytest.raises(DataError, match="controls.txt: not text .* control characters"):
        build_source(to_config({"data": {"source": "text", "path": str(controls)}}).data)


def test_a_utf8_error_in_a_folder_names_the_file_and_offset(tmp_path):
    folder = tmp_path / "books"
    folder.mkdir()
    (folder / "a.txt").write_text("a clean book " * 50)
    (folder / "b.txt").write_bytes(b"twelve bytes\xe9 and then latin-1")
    cfg = to_config({"data": {"source": "text", "path": str(folder), "tokenizer": "bpe", "bpe_vocab_size": 300}})
    with pytest.raises(DataError, match=r"b\.txt: not UTF-8 at byte 12"):
        build_source(cfg.data)


def test_planted_links_in_a_run_dir_are_refused_before_anything_is_written(tmp_path):
    """A copied or hostile run dir: a .lock, checkpoints/ or rollback/ that is a link must not
    point the lock's pid write, the checkpoint pruning or the snapshot cleanup at other files."""
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.txt"
    secret.write_text("keep me")
    (outside / "step_0000005.pt").write_text("not ours")
    for name, target in ((".lock", secret), ("checkpoints", outside), ("rollback", outside), ("metrics.jsonl", secret)):
        run_dir = tmp_path / f"run-{name.strip('.')}"
        run_dir.mkdir()
        (run_dir / name).symlink_to(target)
        with pytest.raises((UnsafePathError, RunDirError)) as info:
            train(tiny_cfg(train=dict(ckpt_every=5)), run_dir)
        assert name in str(info.value) and "\n" not in str(info.value)
        assert sorted(p.name for p in run_dir.iterdir()) == [name]  # nothing written beside the link
        assert secret.read_text() == "keep me" and (outside / "step_0000005.pt").read_text() == "not ours"


def test_a_torn_checkpoint_is_set_aside_so_pruning_keeps_the_good_ones(completed_run):
    newest = checkpoints(completed_run)[-1]
    newest.write_bytes(b"")
    train(tiny_cfg(train=dict(steps=25, ckpt_every=5, keep_checkpoints=1, resume=True)), completed_run)
    names = sorted(p.name for p in (completed_run / "checkpoints").iterdir())
    assert "step_0000020.pt.torn" in names  # kept for a look, out of the checkpoint namespace
    assert [p.name for p in checkpoints(completed_run)] == ["step_0000025.pt"]
    assert torch.load(checkpoints(completed_run)[-1], weights_only=True)["step"] == 25


def test_checkpoints_alone_make_a_run_dir_a_fresh_run_must_not_take(tmp_path):
    run_dir = tmp_path / "only-checkpoints"
    train(tiny_cfg(train=dict(ckpt_every=10)), run_dir)
    for name in ("summary.json", "metrics.jsonl", "config.yaml"):
        (run_dir / name).unlink()
    kept = sorted(p.name for p in checkpoints(run_dir))
    with pytest.raises(RunDirTaken):
        train(tiny_cfg(train=dict(ckpt_every=10, keep_checkpoints=1)), run_dir)
    assert sorted(p.name for p in checkpoints(run_dir)) == kept
