"""summary.json as a typed record: :class:`Summary`, what a reader gets and what ``train()`` returns.

The writer (proxy/train/ledger.py) writes summary.json field by field as a run goes; every field it
writes is declared here once, with its type, so a reader writes ``run.summary.final_val_loss``
rather than ``run.summary.get("final_val_loss")`` and a misspelt field is a type error, not a
silent None. A stored summary is untrusted: :meth:`Summary.of` refuses a field whose value is not
of its declared type (one line naming the file and the field), and keeps fields it does not know
(a newer proxy's) in :attr:`Summary.stored` without reading them.

``Summary`` is also a read-only mapping over the fields as stored, for code that iterates over
them (the tests compare a member's fields with a standalone run's).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

from proxy.records.files import StoredFileError
from proxy.records.keys import STATUSES, UNKNOWN


@dataclass(frozen=True, eq=False)
class Summary(Mapping[str, Any]):
    """The fields of summary.json. Every field is optional: a running or failed run, or an older
    proxy's, has some of them; None is "not recorded"."""

    # what the run is (written at its start)
    status: str = UNKNOWN  # running -> completed | diverged | failed | interrupted (records.keys)
    run_name: Optional[str] = None
    sweep_id: Optional[str] = None
    experiment: Optional[str] = None
    overrides: Optional[tuple[str, ...]] = None  # the command line's overrides, as typed
    steps_planned: Optional[int] = None
    lr: Optional[float] = None  # optim.lr, the peak LR
    n_params: Optional[int] = None
    n_params_non_embedding: Optional[int] = None
    device: Optional[str] = None
    started_at: Optional[float] = None  # unix time
    updated_at: Optional[float] = None
    data: Optional[dict[str, Any]] = None  # the data source's description
    threads: Optional[dict[str, Any]] = None  # torch's thread settings (bitwise results need the same)
    code: Optional[dict[str, Any]] = None  # the proxy source: {commit, dirty} of its git checkout
    backends: Optional[dict[str, Any]] = None  # the resolved attention / cross-entropy backends
    token_classes: Optional[dict[str, Any]] = None
    ensemble: Optional[dict[str, Any]] = None  # an ensemble member's place: members, index, label
    resumed_from: Optional[str] = None  # the checkpoint the last resume started from
    resumed_with: Optional[dict[str, Any]] = None  # what a resume changed
    resume_override: Optional[dict[str, Any]] = None  # what train.resume_override forced, over every resume
    loss_at_init: Optional[float] = None  # val loss at step 0
    # how it went (written at its end)
    steps_completed: Optional[int] = None
    tokens: Optional[int] = None
    wall_time_s: Optional[float] = None
    final_train_loss: Optional[float] = None  # mean train loss of the last train.log_every steps
    final_val_loss: Optional[float] = None
    best_val_loss: Optional[float] = None
    diverged_at_step: Optional[int] = None
    interrupted_by: Optional[str] = None  # the signal that stopped an interrupted run
    error: Optional[str] = None  # a failed run's exception, in one line
    max_attn_logit_peak: Optional[float] = None  # the largest attn/max_logit logged
    max_attn_logit_final: Optional[float] = None
    output_logit_mean_final: Optional[float] = None
    loss_spikes: Optional[int] = None  # probe/loss spikes (proxy/spikes.py), with train.probe_every
    loss_collapses: Optional[int] = None
    loss_spike_steps: Optional[tuple[int, ...]] = None
    # the fields as stored, unknown ones included (not compared, not shown)
    stored: Mapping[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, stored: Mapping[str, Any], source: str = "summary.json") -> Summary:
        """The typed summary of a stored (or just written) one; StoredFileError naming ``source``
        and the field if a field holds a value of another type than its declared one."""
        values: dict[str, Any] = {}
        for name, kind in _FIELD_TYPES.items():
            if stored.get(name) is not None:
                values[name] = _checked(stored[name], kind, f"{source}: {name}")
        if values.get("status", UNKNOWN) not in (*STATUSES, UNKNOWN):
            raise StoredFileError(f"{source}: status {str(values['status'])[:40]!r} is not one proxy writes")
        return cls(**values, stored=dict(stored))

    # -- the mapping over the stored fields ----------------------------------------------------
    def __getitem__(self, key: str) -> Any:
        return self.stored[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.stored)

    def __len__(self) -> int:
        return len(self.stored)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Summary):
            return dict(self.stored) == dict(other.stored)
        return isinstance(other, Mapping) and dict(self.stored) == dict(other)

    __hash__ = None  # type: ignore[assignment]

    def replace(self, **changes: Any) -> Summary:
        """A copy with some fields changed (the stored mapping with them)."""
        return dataclasses.replace(self, **changes, stored={**self.stored, **changes})


def field_names() -> tuple[str, ...]:
    """Every summary.json field proxy writes."""
    return tuple(_FIELD_TYPES)


def _checked(value: Any, kind: Any, where: str) -> Any:
    """``value`` as the type ``kind`` (Optional stripped) or StoredFileError."""
    origin = get_origin(kind)
    if origin is Union:  # Optional[X]
        (kind,) = [a for a in get_args(kind) if a is not type(None)]
        origin = get_origin(kind)
    if origin is tuple:  # tuple[X, ...] from a JSON list
        (item, _) = get_args(kind)
        if not isinstance(value, (list, tuple)):
            raise StoredFileError(f"{where} is a {type(value).__name__}, not a list")
        return tuple(_checked(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise StoredFileError(f"{where} is a {type(value).__name__}, not a mapping")
        return value
    ok = {
        str: isinstance(value, str),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
    }[kind]
    if not ok:
        raise StoredFileError(f"{where} is a {type(value).__name__}, not a {kind.__name__}")
    return float(value) if kind is float else value


_FIELD_TYPES: dict[str, Any] = {f.name: get_type_hints(Summary)[f.name] for f in fields(Summary) if f.name != "stored"}
