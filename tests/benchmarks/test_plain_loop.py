"""benchmarks/plain_loop.py compares like with like: the plain model is proxy's in size and shape."""

from __future__ import annotations

import pytest

from benchmarks.plain_loop import config_for, plain_step, proxy_step


@pytest.mark.parametrize("model", ["tiny", "1m"])
def test_the_plain_model_has_proxys_parameters_and_trains(tmp_path, model):
    cfg = config_for(model, batch=2, seq_len=16)
    step, n_plain = plain_step(cfg, sdpa=False)
    ours, n_ours, trainer = proxy_step(cfg, tmp_path / "run")
    try:
        assert n_plain == n_ours
        for i in range(2):
            step(i)
            ours(i)
    finally:
        trainer.ledger.release()
