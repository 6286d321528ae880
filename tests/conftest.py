"""Test-wide settings.

TRITON_INTERPRET must be set before any Triton kernel is defined: the interpreter then runs the
real kernel code on CPU tensors, so CI checks the kernels without a GPU. wandb never writes to
$HOME from the tests.
"""

import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
_wandb_tmp = tempfile.mkdtemp(prefix="proxy-wandb-")
os.environ.setdefault("WANDB_DIR", _wandb_tmp)
os.environ.setdefault("WANDB_CACHE_DIR", _wandb_tmp)
os.environ.setdefault("WANDB_CONFIG_DIR", _wandb_tmp)
os.environ.setdefault("WANDB_SILENT", "true")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402
import torch  # noqa: E402

# under pytest-xdist each worker gets one thread: two workers on two cores, no oversubscription
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_threads = max(1, (os.cpu_count() or 1) // _workers)
torch.set_num_threads(_threads)
os.environ.setdefault("OMP_NUM_THREADS", str(_threads))  # inherited by the CLI subprocesses


@pytest.fixture
def repo_root() -> Path:
    return ROOT
