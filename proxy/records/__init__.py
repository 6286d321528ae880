"""The run directory: the unit of record every other part reads and writes.

Layout of one run directory::

    config.yaml        the resolved config (also .hydra/config.yaml when Hydra made the run)
    summary.json       always present once the run starts; rewritten atomically
    metrics.jsonl      one JSON object per logged step (flat keys, '/' separators),
                       and one object per event (``{"step": s, "event": kind, ...}``), in the
                       order they happened. After a ``rollback`` event (``restore_step`` r) the
                       loop re-runs steps from r: the rows logged before it with step >= r belong
                       to the abandoned branch, and the reader sets them apart (:class:`Branch`).
    checkpoints/       step_XXXXXXX.pt, loadable with torch.load(weights_only=True)
    rollback/          a rollback remedy's disk snapshots (remedy.rollback_storage=disk)
    spike_kits/        step_XXXXXXX/: what spike capture saved (proxy/train/capture.py)
    tokenizer.json     the BPE tokenizer of a data.source=text run (decodes its checkpoints)
    tensorboard/       TensorBoard event files (tensorboard.enabled=true)
    train.log          Hydra's job log: the run's start, evals and end (proxy-train only)
    error.txt          the traceback of a run that failed
    start_error.txt    why a start in a new run dir failed (a start refused in a directory
                       that already holds a run writes nothing there: it says why on stderr)
    .lock              held by the one process writing the directory (flock); it also keeps
                       room on the disk for the record of a failure

``summary.json`` status goes ``running`` -> ``completed`` | ``diverged`` | ``failed`` |
``interrupted`` (SIGINT / SIGTERM: a last checkpoint was written, ``train.resume=true`` goes on).
A run whose process died leaves ``running`` behind; the report lists it as such, and a run dir
whose files are not what proxy writes as ``unreadable``.

The contract, one concern per module:

    keys.py    the names above, statuses, metric keys and event kinds (writers and readers use
               these constants, never the strings)
    files.py   the one atomic writer (temporary file, rename: never through a link), output
               folders, and the readers of untrusted files (bounded, no link followed, no
               interpolation resolved, states with weights_only=True)
    writer.py  the one-writer lock and :class:`RunRecord` (summary and metrics)
    summary.py :class:`Summary`, summary.json's fields with their types (what a reader gets and
               ``train()`` returns)
    reader.py  :func:`load_run`: what the report and the verdicts read

The trainer writes through the ledger (proxy/train/ledger.py), which writes through
:class:`RunRecord`; the report reads through :func:`load_run`, so a sweep made on a cluster can
be copied home and reported without any live process or wandb.
"""

from proxy.records.files import *  # noqa: F401,F403 - the package is the contract's one import
from proxy.records.files import __all__ as _files
from proxy.records.keys import *  # noqa: F401,F403
from proxy.records.keys import attn_layer_key  # noqa: F401
from proxy.records.reader import *  # noqa: F401,F403
from proxy.records.reader import __all__ as _reader
from proxy.records.summary import Summary
from proxy.records.writer import *  # noqa: F401,F403
from proxy.records.writer import __all__ as _writer

__all__ = [*_files, *_reader, *_writer, "Summary"]
