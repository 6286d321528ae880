"""The device check's settings (a GPU's shapes or a CPU's tiny ones) and its recorder: each check,
table row and phase time written as it is made, so a part that fails keeps what it measured."""

from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from proxy.records import atomic_write_text

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"


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


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).split(".")[-1]


def rel_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """||ours - ref|| / ||ref|| in float64 (NaN anywhere: inf)."""
    a, b = ours.detach().double(), ref.detach().double()
    if not torch.isfinite(a).all():
        return math.inf
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Whole or not at all: a part killed mid-write must not leave the parent unreadable JSON."""
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def read_json(path: Path) -> dict[str, Any]:
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
            write_json(self.path, {"status": "partial", **self.data})
