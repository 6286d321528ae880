"""proxy: small-scale proxies for large-scale Transformer training instabilities.

Reproduce attention-logit growth, output-logit divergence and loss / grad-norm spikes in small
decoder-only Transformers, and measure what prevents them. The package is a house with wings;
each wing imports only wings below it (tests/test_layout.py holds it to that)::

    contract     config.py     the typed schema: every knob, enums, one-line errors naming the key
                 records.py    the run directory: names, metric keys, event kinds, atomic writes,
                               the writer (RunRecord) and the reader (load_run)
                 analysis.py   spike scores, LR sensitivity, run variants and names (pure functions)
                 kernels/      attention and cross-entropy with their statistics: references and
                               Triton kernels behind one dispatch
    building     model.py      the decoder-only Transformer with the stability switches
                 optim.py      AdamW (coupled / independent decay, muP), schedules, clipping
                 data/         synthetic language, memmap and text corpora, repeated n-grams
                 report/       run directories -> tables, figures, report.md / .html (proxy-report)
                 frames.py     run directories -> pandas DataFrames, for notebooks (load_frames)
    training     train/        proxy-train: the loop, one step function, the run ledger, remedies,
                               diagnostics, spike capture, data parallelism, vectorized ensembles
    on top       forensics/    spike kits replayed and dissected (proxy-inspect)
                 verdict.py    REPRODUCED / NOT REPRODUCED per finding (proxy-verdict)
                 demo.py       the default study end to end (proxy-demo)

A run's data flows one way: config -> data + model -> train loop -> run directory -> report.
The report reads only run directories, never a live process or wandb.
"""
