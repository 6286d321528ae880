"""The device check (benchmarks/gpu_check.py) on a CPU: the same script the GPU runs, at tiny
shapes with the kernels interpreted, so its first contact with a GPU cannot fail for a reason a
CPU can show."""

import json
import subprocess
import sys

import pytest

from benchmarks import gpu_check
from tests.test_train import ROOT


@pytest.mark.slow
def test_the_dry_run_runs_every_part_and_writes_its_results(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (json_path,) = tmp_path.glob("gpu-check-*.json")
    record = json.loads(json_path.read_text())
    assert record["dry_run"] and record["versions"]["torch"]
    assert [p["part"] for p in record["parts"]] == [1, 2, 3, 4, 5]
    for part in record["parts"]:
        assert part["status"] == "ok", part
        assert part["checks"], part["name"]
        assert all(c["passed"] is None for c in part["checks"])  # a CPU judges no GPU target
    markdown = json_path.with_suffix(".md").read_text()
    assert "DRY RUN" in markdown and "## 5. a finding end to end: ok" in markdown


def test_a_part_over_its_cap_is_recorded_and_the_check_goes_on(monkeypatch):
    name, what, gpu_cap, _ = gpu_check.PARTS[4]
    monkeypatch.setitem(gpu_check.PARTS, 4, (name, what, gpu_cap, 1))  # one second: the child cannot finish
    part = gpu_check.launch_part(4, dry_run=True)
    assert part["status"] == "timeout" and "cap of 1 s" in part["error"]
    assert part["part"] == 4 and part["cap_s"] == 1


def test_without_a_gpu_the_real_check_says_so(capsys):
    if gpu_check.torch.cuda.is_available():
        pytest.skip("a GPU is here")
    assert gpu_check.main([]) == 2
    assert "--dry-run" in capsys.readouterr().err
