"""Protocol 3's design check on protocol 2's committed runs (results/protocol2/runs.csv): the check
reads only the design (planned steps, non-embedding parameters), which runs.csv keeps, so it is
decided without the run folders. Writes results/protocol3/verdict.{md,json}.

    python experiments/output_logit_divergence/protocol3/committed.py

Where the design passes, the claims need the runs themselves: proxy-verdict
experiments/output_logit_divergence/protocol3 <sweep dirs>.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

from proxy.records import atomic_write_text
from proxy.verdict import Verdict, load_script

HERE = Path(__file__).resolve().parent
RUNS = HERE.parent / "results" / "protocol2" / "runs.csv"
OUT = HERE.parent / "results" / "protocol3"


def main() -> int:
    p3 = load_script(HERE / "verdict.py")
    with RUNS.open(newline="") as f:
        rows = list(csv.DictReader(f))
    v = Verdict(finding=p3.FINDING, source=p3.SOURCE)
    testable = p3.design(v, [int(r["steps_planned"]) for r in rows], [int(r["n_params_non_embedding"]) for r in rows])
    v.notes = (
        f"Judged on the design of the {len(rows)} runs of {RUNS.relative_to(HERE.parents[2])} (protocol 2, 2026-12-02)."
    )
    if testable:
        v.notes += " The design passes: judge the claims on the run folders with proxy-verdict."
    OUT.mkdir(parents=True, exist_ok=True)
    atomic_write_text(OUT / "verdict.md", v.to_markdown())
    atomic_write_text(OUT / "verdict.json", json.dumps(v.to_json(), indent=2) + "\n")
    print(v.to_markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
