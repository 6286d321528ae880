"""Verdicts kept on the device, and a sweep's remedies judged together as lanes of one state.

A remedy that decides on the device (skip-step, ZClip: proxy/train/remedies.py) keeps each step's
verdict as a small float64 row in :class:`PendingRows` until the loop next reads the device
(proxy/train/watch.py), then copies them all back at once. In a sweep, where every member has its
own remedy, :class:`MemberLanes` lets the members share one state with a lane per member (the
detector or statistics of K members in ``(K, ...)`` tensors), so a step's small kernels run once
for the sweep rather than once per member; each member still sees only its own verdicts.
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar

import torch
from torch import Tensor

S = TypeVar("S")


class PendingRows:
    """The verdicts of steps judged on the device (one float64 row each), kept there until the
    loop's next read-back: :meth:`read` copies them all to the host at once."""

    def __init__(self) -> None:
        self._rows: list[tuple[int, Tensor]] = []

    def __len__(self) -> int:
        return len(self._rows)

    def add(self, step: int, *values: Tensor) -> None:
        """One row of 0-dim values; or, with ``(K,)`` values, one row per member (``(K, F)``)."""
        self._rows.append((step, torch.stack([v.double() for v in values], dim=-1)))

    def read(self) -> list[tuple[int, Any]]:
        """``(step, row)`` of every step added since the last read, in order (one sync), and forget
        them; a row is a list of floats (a list of them per member with ``(K,)`` values)."""
        if not self._rows:
            return []
        steps = [s for s, _ in self._rows]
        values = torch.stack([row for _, row in self._rows]).tolist()  # one sync
        self._rows = []
        return list(zip(steps, values))


class MemberLanes(Generic[S]):
    """``state`` holds K members' remedy state in lanes; each step's verdicts are one ``(K, F)``
    row, read back at the first member's :meth:`read` and handed to each member at its own. A
    member that sat the step out (``live`` false: it diverged) gets nothing for it."""

    def __init__(self, state: S, n: int):
        self.state = state
        self.rows = PendingRows()
        self.settled: list[list[tuple[int, list[float]]]] = [[] for _ in range(n)]

    def add(self, step: int, live: Tensor, *values: Tensor) -> None:
        """One step's ``(K,)`` verdict columns and which members were judged (bool ``(K,)``)."""
        self.rows.add(step, *values, live)

    def read(self, k: int) -> list[tuple[int, list[float]]]:
        """Member ``k``'s verdicts since its last read (reads the device for every member at once)."""
        for step, members in self.rows.read():
            for lane, row in enumerate(members):
                if row[-1]:
                    self.settled[lane].append((step, row[:-1]))
        rows, self.settled[k] = self.settled[k], []
        return rows

    def pending(self, k: int) -> bool:
        return bool(self.rows) or bool(self.settled[k])

    def forget(self, k: int) -> None:
        """Drop member ``k``'s verdicts, those still on the device included (a load of its state)."""
        self.read(k)


__all__ = ["MemberLanes", "PendingRows"]
