"""summary.json as a typed record (proxy/records/summary.py): fields with their types, a stored
value of another type refused in one line, unknown fields kept but not read."""

from __future__ import annotations

import json

import pytest

from proxy.records import StoredFileError, Summary, load_run
from proxy.records.summary import field_names


def test_fields_are_typed_and_the_mapping_is_the_stored_summary():
    stored = {"status": "completed", "lr": 1, "overrides": ["optim.lr=1"], "steps_completed": 7, "newer_field": [1]}
    summary = Summary.of(stored)
    assert summary.lr == 1.0 and isinstance(summary.lr, float)  # a JSON integer where a float belongs
    assert summary.overrides == ("optim.lr=1",) and summary.steps_completed == 7
    assert summary.final_val_loss is None  # not recorded
    assert summary["newer_field"] == [1] and "newer_field" not in field_names()  # kept, not read
    assert summary == stored and dict(summary) == stored
    assert Summary() == {} and Summary().status == "unknown"
    assert summary.replace(status="failed")["status"] == "failed"


@pytest.mark.parametrize(
    "field, value, says",
    [
        ("final_val_loss", "3.1", "final_val_loss is a str, not a float"),
        ("steps_completed", 7.5, "steps_completed is a float, not a int"),
        ("steps_completed", True, "steps_completed is a bool, not a int"),
        ("overrides", "optim.lr=1", "overrides is a str, not a list"),
        ("overrides", ["a", 3], "overrides[1] is a int, not a str"),
        ("ensemble", [1], "ensemble is a list, not a mapping"),
        ("status", "done", "status 'done' is not one proxy writes"),
        ("run_name", {"a": 1}, "run_name is a dict, not a str"),
    ],
)
def test_a_stored_value_of_another_type_is_refused_naming_file_and_field(tmp_path, field, value, says):
    (tmp_path / "summary.json").write_text(json.dumps({"status": "completed", field: value}))
    run = load_run(tmp_path)
    assert run.status == "unreadable"
    assert run.error == f"{tmp_path / 'summary.json'}: {says}"
    with pytest.raises(StoredFileError, match="x.json: "):
        Summary.of({field: value}, "x.json")
