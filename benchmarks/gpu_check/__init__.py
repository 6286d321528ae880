"""The device check: every question a GPU must answer, in one run of under 9 minutes (525 s of caps).

    python -m benchmarks.gpu_check [--out DIR] [--parts 1 2 3 4 5] [--cap PART=SECONDS ...]  # GPU
    python -m benchmarks.gpu_check --dry-run --out /tmp/check                                 # CPU

GPU time is rare (about 15 minutes on one H200 when a session is lent one), so this one script
answers everything the CPU cannot, each part in its own process under its own time cap (a hang
or a broken CUDA context in one part leaves the others' results; the caps sum to 525 s, which
leaves a lease time to rerun one part), and writes its results after every part:
``gpu-check-<device>-<date>-<HHMMSS>[-parts-N]`` ``.json`` and ``.md`` in benchmarks/results/ (or
--out). A part records each check, table row and phase time as it is made, so a part that raises
or runs past its cap keeps what it had measured, and its phase times say how to set ``--cap``
for a second try.

    1 correctness   flash attention fwd+bwd against the fp32 reference at T 1k-8k, D 64/128,
                    causal, bf16 and fp16, and the max-logit statistic; fused CE and linear-CE
                    at V 32k/50k/128k with z-loss and ignore_index; the tests/ kernel suite on
                    CUDA (TRITON_INTERPRET=0)
    2 kernel speed  attention fwd+bwd against SDPA's flash backend (target >= 1.0x); CE and
                    linear-CE time and peak memory against F.cross_entropy eager / compiled and
                    Liger-Kernel (targets: peak memory <= 1/4 of torch's, time <= Liger's)
    3 end to end    the 124m preset at seq 1024, bf16: tokens/s and MFU per attention / loss
                    backend (eager; triton/torch also compiled, target >= 40% MFU), and the cost
                    of the diagnostics, on vs off in the same trainer (target <= 5%)
    4 sweep         K=8 LRs vectorized in one process against 8 runs one after another, on
                    1m / 5m / 20m, each size warmed up untimed first (target >= 4x)
    5 a finding     a shrunken GPU preset end to end: proxy-train -> proxy-verdict

``--dry-run`` runs the same parts on the CPU with tiny shapes, the kernels under the Triton
interpreter and the targets not judged: the test suite runs it, so the script cannot crash on
its first contact with a GPU for any reason a CPU can show.

On the device image (its own torch and triton; no hydra-core, omegaconf or Liger): carry the
wheels that ``benchmarks/gpu_wheels.sh`` downloads and put the project on PYTHONPATH (the
README's "Running the device check" gives the device tool's call and what to rerun).

Processes: each part leads its own process group (in the parent's session, so whatever cleans
up after the command reaches it too); everything a part starts (pytest, proxy-train,
proxy-verdict and their workers) stays in that group, and the parent kills the whole group when
the part ends, runs past its cap, or the parent itself exits or is sent SIGTERM / SIGINT.
"""
