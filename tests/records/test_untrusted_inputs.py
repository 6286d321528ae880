"""A copied run dir, kit or corpus is untrusted input (issue 27; README "What keeps a run directory whole").

Each test plants one fault in a folder as someone else could have left it, runs what a user runs
(proxy-report, proxy-verdict, proxy-inspect, a resume, proxy-prepare), and checks that nothing
outside the named folder changed, nothing already written was lost, and the user saw one line
naming the file and the problem. The full-disk and read-only cases run in a private mount
namespace (``unshare``: a real tmpfs that fills, a real read-only bind mount, even as root) and
are skipped where the machine has none.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from proxy.config import ConfigError, to_config
from proxy.data import DataError, build_source, prepare
from proxy.records import (
    CHECKPOINTS,
    UNREADABLE,
    StoredFileError,
    UnsafePathError,
    atomic_write_text,
    checkpoints,
    load_run,
    output_dir,
    read_yaml,
    save_state,
    terminal_text,
)
from proxy.report import build_report
from proxy.report import main as report_main
from proxy.report.document import Items, Paragraph, Table, csv_cell, md_text, to_markdown
from proxy.train import train
from proxy.train.ledger import RunDirTaken
from tests.records.test_run_dir_faults import cli, error_lines, resume_cfg, snapshot_of
from tests.report.test_build import make_run
from tests.train.test_trainer import tiny_cfg

ROOT = Path(__file__).resolve().parents[2]
SECRET = "hunter2-do-not-leak"
BOMB = textwrap.dedent("""\
    a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
    b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
    c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
    d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
    e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
    f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
    g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
    h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
    i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
    """)


def unshare_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True)
    return probe.returncode == 0


needs_unshare = pytest.mark.skipif(not unshare_works(), reason="no private mount namespace (unshare) here")


def in_namespace(shell: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """``shell`` run as root of a private user and mount namespace (mounts vanish with it)."""
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", shell],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def victim(tmp_path) -> Path:
    """A file outside every run dir that a planted link points at (a stand-in for ~/.bashrc)."""
    path = tmp_path / "home" / ".bashrc"
    path.parent.mkdir()
    path.write_text("# the user's shell\n")
    return path


@pytest.fixture
def sweep(tmp_path) -> Path:
    root = tmp_path / "copied-sweep"
    make_run(root, "0", lr=1e-3, qk_norm="off", final_loss=3.0)
    make_run(root, "1", lr=1e-2, qk_norm="off", final_loss=2.5)
    return root


def outside(tmp_path: Path, run_root: Path) -> dict[str, bytes]:
    """Every file under tmp_path that is not under ``run_root``: what no command may change."""
    return {
        str(p): p.read_bytes()
        for p in sorted(tmp_path.rglob("*"))
        if p.is_file() and not p.is_symlink() and run_root not in p.parents
    }


# ============================================================================================
# 1. Writes never follow a planted link
# ============================================================================================
@pytest.mark.parametrize("name", ["runs.csv", "report.md", "report.html", "figures/loss.png"])
def test_a_planted_link_among_the_report_files_is_replaced_not_written_through(tmp_path, sweep, victim, name):
    (sweep / "report" / "figures").mkdir(parents=True)
    (sweep / "report" / name).symlink_to(victim)
    # the chained attack: a string in summary.json that a shell would run, were runs.csv ~/.bashrc
    summary = json.loads((sweep / "0" / "summary.json").read_text())
    summary["error"] = '$(touch /tmp/pwned) =HYPERLINK("http://evil")'
    (sweep / "0" / "summary.json").write_text(json.dumps(summary))
    before = outside(tmp_path, sweep)
    assert report_main([str(sweep)]) == 0
    assert victim.read_text() == "# the user's shell\n"
    assert outside(tmp_path, sweep) == before
    written = sweep / "report" / name
    assert not written.is_symlink() and written.stat().st_size > 0


@pytest.mark.parametrize("linked", ["report", "report/figures"])
def test_a_report_folder_that_is_a_link_is_refused_in_one_line(tmp_path, sweep, linked, capsys):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    if linked == "report/figures":
        (sweep / "report").mkdir()
    (sweep / linked).symlink_to(elsewhere)
    assert report_main([str(sweep)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a link" in err[0] and linked.split("/")[-1] in err[0]
    assert list(elsewhere.iterdir()) == []


def test_verdict_files_planted_as_links_are_replaced(tmp_path, victim):
    from proxy.verdict import main as verdict_main

    root = tmp_path / "copied-sweep"
    for i, (lr, qk) in enumerate([(1e-3, "off"), (1e-2, "off"), (1e-3, "layernorm"), (1e-2, "layernorm")]):
        make_run(root, str(i), lr=lr, qk_norm=qk)
    (root / "report").mkdir()
    for name in ("verdict.md", "verdict.json"):
        (root / "report" / name).symlink_to(victim)
    verdict_main([str(ROOT / "experiments" / "attention_logit_growth"), str(root)])
    assert victim.read_text() == "# the user's shell\n"
    assert not (root / "report" / "verdict.md").is_symlink()
    assert json.loads((root / "report" / "verdict.json").read_text())["label"]


@pytest.fixture(scope="module")
def kit_run(tmp_path_factory) -> Path:
    from tests.forensics.test_capture_and_replay import run_with_capture, spike_cfg

    run_dir = tmp_path_factory.mktemp("kit") / "spike"
    run_with_capture(run_dir, spike_cfg())
    return run_dir


def _inspect(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "proxy.forensics.inspect_cli", *args, "--no-replay", "--lanczos-iters=0"],
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_inspect_output_never_goes_through_a_link(tmp_path, kit_run, victim):
    run = tmp_path / "copied-run"
    shutil.copytree(kit_run, run)
    (kit,) = sorted((run / "spike_kits").iterdir())
    (kit / "inspect").mkdir()
    (kit / "inspect" / "report.md").symlink_to(victim)
    result = _inspect(str(kit))
    assert result.returncode == 0, result.stderr
    assert victim.read_text() == "# the user's shell\n"
    assert "Spike kit" in (kit / "inspect" / "report.md").read_text()

    # an inspect/ folder that is a link, and a kit folder that is a link (found from the run dir)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.rmtree(kit / "inspect")
    (kit / "inspect").symlink_to(elsewhere)
    result = _inspect(str(kit))
    assert result.returncode == 2 and len(error_lines(result)) == 1 and "is a link" in result.stderr
    (kit / "inspect").unlink()
    moved = tmp_path / "moved-kit"
    kit.rename(moved)
    kit.symlink_to(moved)
    result = _inspect(str(run))
    assert result.returncode == 2 and len(error_lines(result)) == 1, result.stderr
    assert kit.name in result.stderr and "is a link" in result.stderr
    assert not (moved / "inspect").exists()


def test_proxy_prepare_refuses_an_output_folder_that_is_a_link(tmp_path, victim):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("a small corpus of plain words. " * 200)
    out = tmp_path / "data"
    out.symlink_to(victim.parent)
    with pytest.raises(UnsafePathError, match="is a link"):
        prepare(str(corpus), str(out))
    assert sorted(p.name for p in victim.parent.iterdir()) == [".bashrc"]


def test_output_dir_checks_every_folder_below_the_named_one(tmp_path):
    named = tmp_path / "named"
    (named / "a").mkdir(parents=True)
    (tmp_path / "away").mkdir()
    (named / "a" / "b").symlink_to(tmp_path / "away")
    with pytest.raises(UnsafePathError, match="b is a link"):
        output_dir(named, "a", "b", "c")
    with pytest.raises(UnsafePathError, match="not a plain folder name"):
        output_dir(named, "..")
    assert output_dir(named, "a", "new") == named / "a" / "new" and (named / "a" / "new").is_dir()
    assert not (tmp_path / "away" / "c").exists()


# ============================================================================================
# 2. and 3. A resume trusts neither the stored config's interpolations nor a hand edit
# ============================================================================================
@pytest.fixture
def completed_cli_run(tmp_path) -> tuple[Path, list[str]]:
    args = [
        "train.steps=20",
        "train.batch_size=4",
        "train.seq_len=32",
        "train.eval_batches=1",
        "train.ckpt_every=10",
        "train.progress=false",
    ]
    run_dir = tmp_path / "run"
    result = cli(*args, f"out_dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    return run_dir, args


def _edit_config(run_dir: Path, old: str, new: str) -> None:
    path = run_dir / "config.yaml"
    text = path.read_text()
    assert old in text, text
    path.write_text(text.replace(old, new, 1))


def test_a_resume_never_resolves_an_interpolation_from_a_copied_config(tmp_path, completed_cli_run):
    run_dir, args = completed_cli_run
    _edit_config(run_dir, "run_name: null", "run_name: ${oc.env:SECRET_TOKEN}")
    before = snapshot_of(run_dir)
    env_secret = {"SECRET_TOKEN": SECRET}
    os.environ.update(env_secret)
    try:
        result = cli("train.steps=30", "train.resume=true", f"out_dir={run_dir}", cwd=tmp_path)
    finally:
        os.environ.pop("SECRET_TOKEN")
    lines = error_lines(result)
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "run_name" in lines[0] and "interpolation" in lines[0] and "config.yaml" in lines[0]
    assert SECRET not in result.stdout + result.stderr
    assert snapshot_of(run_dir) == before
    assert not any(SECRET.encode() in p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())


def test_a_hand_edited_config_is_not_resumed_silently(tmp_path, completed_cli_run):
    run_dir, args = completed_cli_run
    _edit_config(run_dir, "lr: 0.003", "lr: 0.5")
    before = snapshot_of(run_dir)
    result = cli("train.steps=30", "train.resume=true", f"out_dir={run_dir}", cwd=tmp_path)
    lines = error_lines(result)
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "optim.lr (0.003 -> 0.5)" in lines[0] and "step_0000020.pt" in lines[0]
    assert "config.yaml was edited after that checkpoint (optim.lr=0.003): put it back" in lines[0]
    assert snapshot_of(run_dir) == before

    forced = cli(
        "train.steps=30", "train.resume=true", "train.resume_override=true", f"out_dir={run_dir}", cwd=tmp_path
    )
    assert forced.returncode == 0, forced.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resume_override"]["optim.lr"] == [0.003, 0.5] and summary["lr"] == 0.5
    state = torch.load(checkpoints(run_dir)[-1], weights_only=True)
    assert state["config"]["optim"]["lr"] == 0.5  # the next resume compares with what was trained


def test_a_resume_of_a_deleted_config_is_compared_with_the_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    train(tiny_cfg(train=dict(ckpt_every=10, keep_checkpoints=5)), run_dir)
    (run_dir / "config.yaml").unlink()
    with pytest.raises(ConfigError, match=r"optim.lr \(0.003 -> 0.01\)"):
        train(resume_cfg(optim=dict(lr=1e-2)), run_dir)


def test_an_alias_bomb_in_a_stored_config_is_refused_at_once(tmp_path, completed_cli_run):
    run_dir, _ = completed_cli_run
    (run_dir / "config.yaml").write_text(BOMB)
    start = time.time()
    result = cli("train.resume=true", f"out_dir={run_dir}", cwd=tmp_path)
    lines = error_lines(result)
    assert result.returncode == 2 and len(lines) == 1 and "alias bomb" in lines[0], result.stderr
    assert time.time() - start < 60
    with pytest.raises(StoredFileError, match="more than 100,000 values"):
        read_yaml(run_dir / "config.yaml")


def test_numbers_that_are_not_finite_are_refused_at_validation(tmp_path):
    for key, value in (
        ("optim", {"lr": float("inf")}),
        ("optim", {"eps": float("nan")}),
        ("loss", {"z_loss": float("-inf")}),
    ):
        with pytest.raises(ConfigError, match="must be a finite number") as info:
            to_config({key: value})
        assert f"{key}.{next(iter(value))}=" in str(info.value)
    result = cli("optim.lr=inf", "train.steps=2", cwd=tmp_path)
    lines = error_lines(result)
    assert result.returncode == 2 and len(lines) == 1 and "optim.lr=inf" in lines[0], result.stderr


# ============================================================================================
# 4. One bad run never brings the report down
# ============================================================================================
def _plant(run: Path, fault: str) -> None:
    summary, metrics, config = run / "summary.json", run / "metrics.jsonl", run / "config.yaml"
    if fault == "row not an object":
        metrics.write_text("[1, 2]\n" + metrics.read_text())
    elif fault == "row without a step":
        metrics.write_text('{"train/loss": 3.0}\n' + metrics.read_text())
    elif fault == "row with a text step":
        metrics.write_text('{"step": "7", "train/loss": 3.0}\n' + metrics.read_text())
    elif fault == "summary a list":
        summary.write_text("[]")
    elif fault == "summary null":
        summary.write_text("null")
    elif fault == "summary a folder":
        summary.unlink()
        summary.mkdir()
    elif fault == "summary a link":
        summary.unlink()
        summary.symlink_to("/etc/hostname")
    elif fault == "summary a fifo":
        summary.unlink()
        os.mkfifo(summary)
    elif fault == "torn config":
        config.write_text("model: {n_layers: 2\noptim: [")
    elif fault == "alias bomb":
        config.write_text(BOMB)
    elif fault == "interpolation":
        config.write_text("run_name: ${oc.env:HOME}\n")
    elif fault == "lr inf":
        data = json.loads(summary.read_text())
        data["lr"] = "inf"
        summary.write_text(json.dumps(data))
    elif fault == "huge integer":
        summary.write_text(summary.read_text().replace('"final_val_loss": 2.8', '"final_val_loss": 1' + "0" * 400))
    elif fault == "huge step":
        metrics.write_text(metrics.read_text() + '{"step": 1' + "0" * 400 + ', "train/loss": 3.0}\n')
    elif fault == "deep nesting":
        metrics.write_text('{"step": 1, "x": ' + "[" * 900 + "]" * 900 + "}\n" + metrics.read_text())
    elif fault == "seed a mapping":
        config.write_text(config.read_text().replace('"seed": 0', '"seed": {"a": 1}'))
    elif fault == "nul padding":
        with metrics.open("ab") as f:
            f.truncate(metrics.stat().st_size + (20 << 20))  # 20 MiB of NUL bytes, no newline
    else:
        raise AssertionError(fault)


FAULTS = [
    "row not an object",
    "row without a step",
    "row with a text step",
    "summary a list",
    "summary null",
    "summary a folder",
    "summary a link",
    "summary a fifo",
    "torn config",
    "alias bomb",
    "interpolation",
    "lr inf",
    "huge integer",
    "huge step",
    "deep nesting",
    "seed a mapping",
    "nul padding",
]


@pytest.mark.parametrize("fault", FAULTS)
def test_one_bad_run_is_listed_unreadable_and_the_report_is_written(tmp_path, sweep, fault, capsys):
    bad = make_run(sweep, "2", lr=3e-2, qk_norm="off", final_loss=2.8)
    _plant(bad, fault)
    start = time.time()
    assert report_main([str(sweep)]) == 0
    assert time.time() - start < 60
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("proxy-report: unreadable:") and "\n" not in err[0]
    result = build_report([sweep], tmp_path / "again")
    rows = {Path(row.path).name: row for row in result.runs}
    assert rows["2"].status == UNREADABLE and rows["2"].error and "\n" not in rows["2"].error
    assert {rows["0"].status, rows["1"].status} == {"completed"}
    md = result.markdown.read_text()
    assert "unreadable, left out of every table and figure" in md
    assert result.sensitivity_of("model.qk_norm=off").lrs == [1e-3, 1e-2]


def test_math_text_in_a_run_name_is_drawn_as_text(tmp_path, sweep):
    run = make_run(sweep, "2", lr=3e-2, qk_norm="off", final_loss=2.8)
    summary = json.loads((run / "summary.json").read_text())
    summary["overrides"].append("experiment=$\\x$")  # matplotlib would parse it as math, and fail
    (run / "summary.json").write_text(json.dumps(summary))
    result = build_report([sweep], tmp_path / "rep")
    assert {row.status for row in result.runs} == {"completed"}
    assert (tmp_path / "rep" / "figures" / "loss.png").stat().st_size > 0


# ============================================================================================
# 5. An interrupted report leaves the previous one whole
# ============================================================================================
def test_a_report_that_fails_midway_leaves_the_previous_report_whole(tmp_path, sweep, monkeypatch):
    import proxy.report.figures as figures

    build_report([sweep])
    out = sweep / "report"
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    real = figures.atomic_write_bytes
    calls = []

    def full_after_two(path, data):
        calls.append(path)
        if len(calls) > 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, data)

    monkeypatch.setattr(figures, "atomic_write_bytes", full_after_two)
    make_run(sweep, "2", lr=3e-2, qk_norm="off", final_loss=2.8)
    with pytest.raises(OSError, match="No space left"):
        build_report([sweep])
    after = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after.keys() == before.keys()  # no temporary file, no 0-byte figure
    assert all(after[name] for name in after)
    for name in ("report.md", "report.html", "runs.csv"):
        assert after[name] == before[name]


def test_a_failed_write_removes_its_temporary_and_names_the_file(tmp_path, monkeypatch):
    """torch.save reports a full disk as 'unexpected pos ...': the one writer says what happened."""
    import proxy.records.files as files

    target = tmp_path / "checkpoints" / "step_0000010.pt"
    target.parent.mkdir()
    target.write_bytes(b"the previous checkpoint")
    real_fdopen = os.fdopen

    class FillsUp:
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, data):
            self.n += len(data)
            if self.n > 50_000:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

    monkeypatch.setattr(files.os, "fdopen", lambda fd, mode: FillsUp(real_fdopen(fd, mode)))
    with pytest.raises(OSError) as info:
        save_state(target, {"w": torch.zeros(100_000)})
    assert info.value.errno == errno.ENOSPC and str(target) in str(info.value)
    assert "unexpected pos" not in str(info.value)
    assert [p.name for p in target.parent.iterdir()] == ["step_0000010.pt"]
    assert target.read_bytes() == b"the previous checkpoint"


# ============================================================================================
# 6. Each viewer sees text, not markup
# ============================================================================================
def test_markup_from_a_run_dir_is_neutralised_for_each_viewer(tmp_path, sweep):
    hostile = "<img src=x onerror=alert(1)> ![t](http://evil.example/p.png) [x](http://evil.example)"
    bad = make_run(sweep, "2", lr=3e-2, qk_norm="off", status="failed", metrics=False)
    summary = json.loads((bad / "summary.json").read_text())
    summary.update(error=f"# Injected heading\n{hostile}", run_name='=HYPERLINK("http://e")')
    (bad / "summary.json").write_text(json.dumps(summary))
    result = build_report([sweep], tmp_path / "rep")
    md = result.markdown.read_text()
    assert "<img" not in md and not re.search(r"(?<!\\)\]\(http://evil", md)  # no tag, no link, no image
    assert not [ln for ln in md.splitlines() if ln.startswith("# ") and ln != "# proxy instability report"]
    html = result.html.read_text()
    assert "<img src=x" not in html and "&lt;img src=x" in html
    cells = [c for line in result.csv.read_text().splitlines() for c in line.split(",")]
    assert not any(c.startswith(("=", '"=', "+", "@")) for c in cells)
    assert csv_cell("-1+2") == "'-1+2" and csv_cell(-1.5) == -1.5
    doc = to_markdown("t", [Paragraph("> quote"), Items(["# not a heading"]), Table(["a"], [["x|y\nz"]])])
    assert "\n\\> quote\n" in doc and "- \\# not a heading" in doc and "x\\|y z" in doc
    assert md_text("[0.001, 0.01]") == "[0.001, 0.01]"  # brackets that make no link stay readable


def test_terminal_escapes_from_a_kit_are_printed_harmlessly(tmp_path, kit_run):
    run = tmp_path / "copied-run"
    shutil.copytree(kit_run, run)
    (kit,) = sorted((run / "spike_kits").iterdir())
    meta = json.loads((kit / "kit.json").read_text())
    meta["trigger"] = "loss\x1b]0;owned\x07\x1b[2J"
    (kit / "kit.json").write_text(json.dumps(meta))
    result = _inspect(str(kit))
    assert result.returncode == 0, result.stderr
    assert "\x1b" not in result.stdout and "\\x1b]0;owned\\x07" in result.stdout
    assert terminal_text("a\u202eb\nc") == "a\\u202eb\\nc"


# ============================================================================================
# 7. Smaller ones
# ============================================================================================
def test_a_seq_len_longer_than_the_data_is_refused_before_the_run_dir_is_claimed(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("short text. " * 100)  # 1200 bytes: a val split of 60
    data = dict(source="text", path=str(corpus))
    run_dir = tmp_path / "run"
    with pytest.raises(DataError, match="fewer than seq_len\\+1=65"):
        train(tiny_cfg(data=data, train=dict(seq_len=64)), run_dir)
    assert not run_dir.exists()
    assert train(tiny_cfg(data=data, train=dict(seq_len=8, batch_size=2)), run_dir)["status"] == "completed"


def test_prepare_says_when_the_bpe_vocabulary_comes_out_smaller(tmp_path, capsys):
    from proxy.data.text import prepare_main

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("ab ab ab ba ba " * 100)
    assert (
        prepare_main(
            ["--input", str(corpus), "--out", str(tmp_path / "d"), "--tokenizer", "bpe", "--vocab-size", "4096"]
        )
        == 0
    )
    err = capsys.readouterr().err
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    assert meta["vocab_size_requested"] == 4096 and meta["vocab_size"] < 4096
    assert f"only {meta['vocab_size']} BPE tokens of the --vocab-size 4096" in err


def test_every_file_of_a_run_has_one_mode(tmp_path):
    run_dir = tmp_path / "run"
    old = os.umask(0o022)
    try:
        train(tiny_cfg(train=dict(ckpt_every=10)), run_dir)
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in run_dir.rglob("*") if p.is_file()}
    assert set(modes.values()) == {0o644}, modes


# ============================================================================================
# 8. Faults the earlier round left open
# ============================================================================================
FULL_DISK = """
import json, sys
from pathlib import Path
from proxy.train import train
from tests.train.test_trainer import tiny_cfg
run_dir = Path(sys.argv[1]) / "run"
error = None
try:
    train(tiny_cfg(train=dict(steps=400, log_every=1, eval_every=1000, ckpt_every=int(sys.argv[2]))), run_dir)
except OSError as exc:
    error = str(exc)
summary = json.loads((run_dir / "summary.json").read_text())
print(json.dumps({"raised": error, "status": summary["status"], "error": summary.get("error"),
                  "error_txt": (run_dir / "error.txt").is_file(),
                  "temporaries": [p.name for p in run_dir.rglob("*.tmp")]}))
"""


@needs_unshare
@pytest.mark.parametrize("size, ckpt_every, full_at", [("512k", 0, "metrics.jsonl"), ("1m", 5, "step_0000005.pt")])
def test_a_full_disk_ends_the_run_failed_saying_so(tmp_path, size, ckpt_every, full_at):
    mount = tmp_path / "disk"
    mount.mkdir()
    script = tmp_path / "full_disk.py"
    script.write_text(FULL_DISK)
    result = in_namespace(
        f"mount -t tmpfs -o size={size} tmpfs {mount} && cd {ROOT} && {sys.executable} {script} {mount} {ckpt_every}"
    )
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["status"] == "failed" and "No space left on device" in seen["error"], seen
    assert full_at in seen["error"] and "unexpected pos" not in seen["error"]
    assert seen["error_txt"] and seen["temporaries"] == []


def test_a_start_sweeps_the_temporaries_an_interrupted_write_left(tmp_path, victim):
    run_dir = tmp_path / "run"
    train(tiny_cfg(train=dict(ckpt_every=10, keep_checkpoints=5)), run_dir)
    stale = run_dir / CHECKPOINTS / ".step_0000030.pt.0123456789abcdef.tmp"
    stale.write_bytes(b"half a checkpoint")
    older = run_dir / ".summary.json.k2j4h5g6.tmp"  # an older proxy's mkstemp name
    older.write_text("{")
    link = run_dir / CHECKPOINTS / ".step_0000040.pt.fedcba9876543210.tmp"
    link.symlink_to(victim)
    keep = run_dir / CHECKPOINTS / "notes.tmp"
    keep.write_text("not ours")
    train(tiny_cfg(train=dict(steps=30, ckpt_every=10, keep_checkpoints=5, resume=True)), run_dir)
    assert not stale.exists() and not older.exists() and not link.is_symlink()
    assert keep.read_text() == "not ours" and victim.read_text() == "# the user's shell\n"


def test_random_bytes_are_not_a_text_corpus_whatever_the_tokenizer(tmp_path):
    corpus = tmp_path / "random.txt"
    corpus.write_bytes(bytes(range(0x80, 0x100)) * 80)  # no NUL, no control byte: still not text
    with pytest.raises(DataError, match=r"random\.txt: not UTF-8 at byte 0"):
        build_source(to_config({"data": {"source": "text", "path": str(corpus)}}).data)
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text("plain words " * 100)
    (folder / "b.txt").symlink_to(tmp_path / "random.txt")
    with pytest.raises(DataError, match=r"b\.txt: a link in the corpus folder"):
        build_source(to_config({"data": {"source": "text", "path": str(folder)}}).data)


def test_a_refused_start_writes_nothing_into_a_run_it_does_not_own(tmp_path):
    run_dir = tmp_path / "done"
    train(tiny_cfg(train=dict(ckpt_every=10)), run_dir)
    before = {p.name for p in run_dir.rglob("*")}
    with pytest.raises(RunDirTaken):
        train(tiny_cfg(optim=dict(lr=1e-2)), run_dir)
    result = cli("train.steps=5", "model.n_layers=3", f"out_dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 2 and len(error_lines(result)) == 1, result.stderr
    assert {p.name for p in run_dir.rglob("*")} == before


@needs_unshare
def test_resuming_in_a_read_only_folder_is_one_line(tmp_path):
    run_dir = tmp_path / "run"
    result = cli(
        "train.steps=4",
        "train.batch_size=2",
        "train.seq_len=16",
        "train.eval_batches=1",
        "train.progress=false",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    before = snapshot_of(run_dir)
    common = f"{sys.executable} -m proxy.train train.resume=true out_dir={run_dir} train.progress=false"
    shell = (
        f"mount --bind {run_dir} {run_dir} && mount -o remount,bind,ro {run_dir} && cd {tmp_path} && "
        f"{{ {common} hydra.run.dir={run_dir}; echo rc=$?; {common}; echo rc=$?; }}"
    )
    result = in_namespace(shell)
    out = result.stdout + result.stderr
    errors = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert out.count("rc=2") == 2 and len(errors) == 2, out
    assert "Unable to configure handler" not in out
    assert "Read-only file system" in errors[0] and "hydra.run.dir" in errors[0]
    assert "cannot write to" in errors[1] and "Read-only file system" in errors[1]
    assert snapshot_of(run_dir) == before


def test_hydra_files_planted_as_links_are_refused_before_hydra_writes(tmp_path, victim):
    run_dir = tmp_path / "copied"
    run_dir.mkdir()
    (run_dir / "train.log").symlink_to(victim)
    result = cli("train.steps=2", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    lines = error_lines(result)
    assert result.returncode == 2 and len(lines) == 1 and "train.log is a link" in lines[0], result.stderr
    assert victim.read_text() == "# the user's shell\n" and not (run_dir / ".hydra").exists()


def test_an_unreadable_run_is_named_by_load_run(tmp_path):
    run = make_run(tmp_path, "r", lr=1e-3, qk_norm="off")
    atomic_write_text(run / "config.yaml", "optim:\n  lr: ${oc.env:HOME}\n")
    loaded = load_run(run)
    assert loaded.status == UNREADABLE and "optim.lr holds an interpolation" in loaded.error
    assert loaded.metrics == [] and loaded.summary == {}


# ============================================================================================
# What the attack review of the first round found (each once more as an attacker would)
# ============================================================================================
@pytest.mark.parametrize("how", ["++hydra.run.dir", "hydra.sweep.dir", "multirun.yaml"])
def test_hydra_folders_of_a_copied_sweep_with_links_are_refused(tmp_path, victim, how):
    copied = tmp_path / "copied"
    job = copied / "0_optim.lr=0.001"
    job.mkdir(parents=True)
    if how == "multirun.yaml":
        (copied / "multirun.yaml").symlink_to(victim)
    else:
        (job / ".hydra").symlink_to(victim.parent)
    arg = f"++hydra.run.dir={job}" if how == "++hydra.run.dir" else f"hydra.sweep.dir={copied}"
    result = cli(*(["-m"] if arg.startswith("hydra.sweep") else []), arg, "train.steps=2", cwd=tmp_path)
    lines = error_lines(result)
    assert result.returncode == 2 and len(lines) == 1 and "is a link" in lines[0], result.stderr
    assert victim.read_text() == "# the user's shell\n" and sorted(p.name for p in victim.parent.iterdir()) == [
        ".bashrc"
    ]


def test_the_verdict_reads_runs_as_the_report_does(tmp_path):
    from proxy.verdict import judge_runs

    root = tmp_path / "copied-sweep"
    for i, (lr, qk) in enumerate([(1e-3, "off"), (1e-2, "off"), (1e-3, "layernorm"), (1e-2, "layernorm")]):
        make_run(root, str(i), lr=lr, qk_norm=qk)
    bad = make_run(root, "4", lr=3e-2, qk_norm="off")
    (bad / "config.yaml").write_text((bad / "config.yaml").read_text().replace('"seed": 0', '"seed": {"a": 1}'))
    inf = make_run(root, "5", lr=3e-2, qk_norm="layernorm")
    (inf / "config.yaml").write_text((inf / "config.yaml").read_text().replace('"lr": 0.03', '"lr": .inf'))
    verdict = judge_runs(ROOT / "experiments" / "attention_logit_growth", [root])
    assert verdict.label  # judged, without the two runs it cannot use
    md = (root / "report" / "report.md").read_text()
    assert "train.seed holds dict" in md and "optim.lr (inf) is not a positive finite number" in md


def test_a_kit_that_is_not_what_capture_writes_is_one_line_and_the_next_kit_is_inspected(tmp_path, kit_run):
    run = tmp_path / "copied-run"
    shutil.copytree(kit_run, run)
    (kit,) = sorted((run / "spike_kits").iterdir())
    twin = kit.with_name("step_9999999")
    shutil.copytree(kit, twin)
    meta = json.loads((kit / "kit.json").read_text())
    meta["trace"][0]["step"] = "x"
    (kit / "kit.json").write_text(json.dumps(meta))
    batches = torch.load(twin / "batches.pt", weights_only=True)
    batches["inputs"] = batches["inputs"] + 10_000  # ids outside the vocabulary
    torch.save(batches, twin / "batches.pt")
    (run / "spike_kits" / "step_0000001").mkdir()
    shutil.copytree(kit_run / "spike_kits" / kit.name, run / "spike_kits" / "step_0000001", dirs_exist_ok=True)
    result = _inspect(str(run))
    errors = error_lines(result)
    assert result.returncode == 2 and len(errors) == 2, result.stderr
    assert "a trace row must be an object with an integer step" in errors[0]
    assert "token ids outside the kit's vocabulary" in errors[1]
    assert "step_0000001: report ->" in result.stdout  # the good kit was inspected all the same


def test_a_kit_never_reads_the_data_path_it_names(tmp_path, kit_run):
    run = tmp_path / "copied-run"
    shutil.copytree(kit_run, run)
    (kit,) = sorted((run / "spike_kits").iterdir())
    fifo = tmp_path / "secret.txt"
    os.mkfifo(fifo)  # reading it would hang: the replay must not open it
    meta = json.loads((kit / "kit.json").read_text())
    meta["config"]["data"].update(source="text", path=str(fifo))
    (kit / "kit.json").write_text(json.dumps(meta))
    result = subprocess.run(
        [sys.executable, "-m", "proxy.forensics.inspect_cli", str(kit), "--lanczos-iters=0"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "a kit's own paths are not followed" in (kit / "inspect" / "report.md").read_text()


def test_a_fifo_in_a_corpus_folder_is_refused_not_waited_on(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text("plain words " * 100)
    os.mkfifo(folder / "b.txt")
    with pytest.raises(DataError, match=r"b\.txt: not a regular file"):
        build_source(to_config({"data": {"source": "text", "path": str(folder)}}).data)


def test_log_lines_show_escape_sequences_as_text(tmp_path, completed_cli_run):
    run_dir, _ = completed_cli_run
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["run_name"] = "\x1b]2;PWNED\x07\x1b[31mRED"
    (run_dir / "summary.json").write_text(json.dumps(summary))
    (run_dir / CHECKPOINTS / ".\x1b[2J.0123456789abcdef.tmp").write_text("stale")
    result = cli("train.steps=30", "train.resume=true", f"out_dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "\x1b" not in result.stdout + result.stderr and "\\x1b]2;PWNED" in result.stdout + result.stderr
    assert "\x1b" not in (run_dir / "train.log").read_text() if (run_dir / "train.log").exists() else True


def test_a_resume_keeps_metrics_lines_it_cannot_decode(tmp_path):
    run_dir = tmp_path / "run"
    train(tiny_cfg(train=dict(ckpt_every=10, keep_checkpoints=5)), run_dir)
    metrics = run_dir / "metrics.jsonl"
    data = metrics.read_bytes()
    metrics.write_bytes(data.replace(b'"train/loss"', b'"train/\xe9loss"', 1))
    train(tiny_cfg(train=dict(steps=30, ckpt_every=10, keep_checkpoints=5, resume=True)), run_dir)
    assert b"\xe9" in metrics.read_bytes()  # nothing already written is lost or rewritten
