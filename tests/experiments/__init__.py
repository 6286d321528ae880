"""Helpers the finding tests share."""

from proxy.verdict import judge_runs


def judge_tables(finding, paths, out):
    """A verdict through proxy-verdict's path, its report without the figures these tests do not
    look at (the figures are most of a verdict's seconds; the tests that check figures draw them)."""
    return judge_runs(finding, paths, out, figures=False)
