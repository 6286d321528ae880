"""The device check (benchmarks/gpu_check/) on a CPU: the same script the GPU runs, at tiny
shapes with the kernels interpreted, so its first contact with a GPU cannot fail for a reason a
CPU can show."""

import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.gpu_check import processes, supervisor
from tests.train.test_trainer import ROOT


@pytest.mark.slow
def test_the_dry_run_runs_every_part_and_writes_its_results(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (json_path,) = tmp_path.glob("gpu-check-*.json")
    record = json.loads(json_path.read_text())
    assert record["dry_run"] and record["versions"]["torch"]
    assert [p["part"] for p in record["parts"]] == [1, 2, 3, 4, 5]
    for part in record["parts"]:
        assert part["status"] == "ok", part
        assert part["checks"], part["name"]
        assert all(c["passed"] is None for c in part["checks"])  # a CPU judges no GPU target
        assert part["phases"] and "running" not in part  # what a second try sets its caps from
    end_to_end = record["parts"][2]
    assert any("compiled" in note for note in end_to_end["notes"])
    assert any("diagnostics at every step" in c["check"] for c in end_to_end["checks"])
    markdown = json_path.with_suffix(".md").read_text()
    assert "DRY RUN" in markdown and "## 5. a finding end to end: ok" in markdown


def test_a_part_over_its_cap_is_recorded_and_the_check_goes_on(monkeypatch):
    name, what, gpu_cap, _ = supervisor.PARTS[4]
    monkeypatch.setitem(supervisor.PARTS, 4, (name, what, gpu_cap, 1))  # one second: the child cannot finish
    part = supervisor.launch_part(4, dry_run=True)
    assert part["status"] == "timeout" and "cap of 1 s" in part["error"]
    assert part["part"] == 4 and part["cap_s"] == 1


def test_without_a_gpu_the_real_check_says_so(capsys):
    if supervisor.torch.cuda.is_available():
        pytest.skip("a GPU is here")
    assert supervisor.main([]) == 2
    assert "--dry-run" in capsys.readouterr().err


def test_a_part_that_raises_keeps_what_it_had_measured(monkeypatch, tmp_path):
    def part(setting, rec):
        rec.check("measured before the failure", "1.00x", ">= 1.0x", True)
        rec.row("rows", {"seq": 1024, "ms": 1.5})
        with rec.phase("the step that breaks"):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setitem(supervisor.PART_FUNCTIONS, 2, part)
    path = tmp_path / "result.json"
    assert supervisor.run_part(2, dry_run=True, result_path=path) == 1
    result = json.loads(path.read_text())
    assert result["status"] == "failed" and "illegal memory access" in result["error"]
    assert [c["check"] for c in result["checks"]] == ["measured before the failure"]
    assert result["rows"] == [{"seq": 1024, "ms": 1.5}]
    (phase,) = result["phases"]
    assert phase["phase"] == "the step that breaks" and phase["raised"]


def test_a_rerun_of_some_parts_writes_beside_the_full_record():
    when = dt.datetime(2026, 12, 5, 14, 3, 9)
    full = supervisor.result_stem("NVIDIA H200", when, [1, 2, 3, 4, 5])
    assert full == "gpu-check-nvidia-h200-2026-12-05-140309"
    rerun = supervisor.result_stem("NVIDIA H200", when, [3])  # even within the same second
    assert rerun == full + "-parts-3"
    assert supervisor.result_stem("NVIDIA H200", when + dt.timedelta(minutes=7), [1, 2, 3, 4, 5]) != full


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")  # a zombie no one reaps (PID 1 in some containers) is dead too


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds processes through /proc")
@pytest.mark.parametrize("own_group", [True, False], ids=["a part", "a command inside a part"])
def test_a_command_over_its_cap_takes_its_descendants_with_it(tmp_path, own_group):
    pid_file = tmp_path / "grandchild"
    script = (
        "import subprocess, sys, time\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
        "time.sleep(60)\n"
    )
    with pytest.raises(subprocess.TimeoutExpired):
        processes.run_capped([sys.executable, "-c", script], dict(os.environ), timeout=4, own_group=own_group)
    grandchild = int(pid_file.read_text())
    deadline = time.time() + 5
    while not _gone(grandchild) and time.time() < deadline:
        time.sleep(0.1)
    assert _gone(grandchild)
    assert not processes._LIVE_GROUPS
