"""Run directories in, an instability report out (``proxy-report``).

The report reads only run directories (:mod:`proxy.records`), never wandb or a live process, so a
sweep made on a cluster can be copied home and reported on a laptop. What it shows, per run and
per *variant* (a run's command-line overrides minus the LR and the seed: the runs of one
LR-sensitivity curve):

- the headline first: the variants compared, their key numbers, the verdict of a finding;
- LR sensitivity (Wortsman et al.) per variant beside the LR-vs-final-loss curves;
- the runs table, each run named by what varies: status, losses, steps, attention/output logit
  statistics, spike scores;
- curves over steps: loss, max attention logit per layer, output logit mean, grad norm, and per
  layer grad RMS, update RMS / LR and parameter norms, with detected spikes and the trainer's
  events (skip-step, rollback, ...) marked.

Every run found is listed: failed, diverged and still-running runs are reported, never dropped.

    tables.py    what a report (and a verdict) reads: RunRow per run, SensitivityRow per variant
    headline.py  the headline, read off the tables (proxy-demo prints it too)
    figures.py   the curves
    document.py  the one Markdown / HTML writer (also used by verdicts and proxy-inspect)
    build.py     build_report() (collect_report() + write_report()) and the proxy-report command line
"""

from proxy.report.build import (
    ReportError,
    ReportResult,
    build_report,
    collect_report,
    default_out_dir,
    main,
    write_report,
)
from proxy.report.figures import SpikeMarks
from proxy.report.headline import Claim, Headline, VerdictSummary
from proxy.report.tables import RunRow, SensitivityRow

__all__ = [
    "Claim",
    "Headline",
    "ReportError",
    "ReportResult",
    "RunRow",
    "SensitivityRow",
    "SpikeMarks",
    "VerdictSummary",
    "build_report",
    "collect_report",
    "default_out_dir",
    "main",
    "write_report",
]
