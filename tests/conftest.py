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

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def repo_root() -> Path:
    return ROOT
