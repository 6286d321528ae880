"""Dissection of spike kits: curvature against exact answers, offender ranking, the full report."""

import json

import pytest
import torch

from proxy.config import to_config
from proxy.data import build_source
from proxy.forensics import curvature, find_kits, load_kit
from proxy.forensics.dissect import batch_sequence_stats, bimodality_coefficient, inspect_kit
from proxy.forensics.dissect_report import write_report
from proxy.forensics.inspect_cli import main
from proxy.model import build_model
from proxy.optim import AdamW
from tests.forensics.test_capture_and_replay import SPIKE_STEP, run_with_capture, single_thread, spike_cfg  # noqa: F401
from tests.train.test_trainer import tiny_cfg


def _quadratic(n: int = 24, seed: int = 0):
    """0.5 x^T A x over two parameter tensors, with a known spectrum (top 7.5, bottom -2)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    a = q @ torch.diag(torch.linspace(-2.0, 7.5, n, dtype=torch.float64)) @ q.T
    first = torch.randn(n // 3, generator=g, dtype=torch.float64, requires_grad=True)
    second = torch.randn(2, (n - n // 3) // 2, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.cat([first, second.reshape(-1)])
    return a, [first, second], 0.5 * x @ a @ x


def test_sharpness_matches_the_exact_top_eigenvalue_of_a_quadratic():
    a, params, loss = _quadratic()
    n = a.shape[0]
    precond = torch.linspace(0.2, 3.0, n, dtype=torch.float64)
    result = curvature.sharpness(loss, params, precond, lr=0.01, beta1=0.9, iterations=n)
    assert result.sharpness == pytest.approx(float(torch.linalg.eigvalsh(a).max()), rel=1e-9)
    exact_adam = torch.linalg.eigvals(torch.diag(1 / precond) @ a).real.max()
    assert result.preconditioned == pytest.approx(float(exact_adam), rel=1e-9)
    assert result.gd_threshold == pytest.approx(200.0)
    assert result.adam_threshold == pytest.approx(3800.0)  # 38 / lr at beta1 = 0.9
    spectrum = curvature.lanczos(curvature.hessian_matvec(loss, params), n, iterations=n)
    assert spectrum.bottom == pytest.approx(-2.0, abs=1e-9)  # the negative end is found too


@pytest.mark.parametrize(("lr", "beta2", "band"), [(0.01, 0.95, (0.95, 1.15)), (0.05, 0.999, (0.75, 1.1))])
def test_full_batch_adam_on_a_quadratic_holds_the_preconditioned_ratio_at_the_edge(lr, beta2, band):
    """The instrument held to what it measures: full-batch Adam on 0.5 x^T A x drives
    lambda_max(P^-1 H) to (2 + 2 beta1) / ((1 - beta1) eta) = 38/eta and keeps it there (Cohen et al.
    2022); measured after 2000 steps, every 100 steps to 3000, every value inside ``band`` (the
    band experiments/adam_edge_of_stability/full_batch.py takes its criteria from: 0.78-1.11)."""
    n = 24
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    a = q @ torch.diag(torch.linspace(0.1, 7.5, n, dtype=torch.float64)) @ q.T
    x = torch.nn.Parameter(torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    opt = AdamW([x], lr=lr, betas=(0.9, beta2), eps=1e-8)
    ratios = []
    for step in range(3000):
        opt.zero_grad()
        (0.5 * x @ a @ x).backward()
        opt.step()
        if step >= 2000 and step % 100 == 99:
            p = curvature.adam_preconditioner(opt, [x])
            ratios.append(curvature.sharpness(0.5 * x @ a @ x, [x], p, lr=lr, beta1=0.9, iterations=n).adam_ratio)
    assert all(band[0] <= r <= band[1] for r in ratios), ratios


def test_adam_preconditioner_is_sqrt_v_hat_plus_eps_over_the_lr_scale():
    w = torch.nn.Parameter(torch.randn(3, 4))
    b = torch.nn.Parameter(torch.randn(4))
    opt = AdamW([{"params": [w], "lr_scale": 0.5}, {"params": [b]}], lr=1e-2, betas=(0.9, 0.95), eps=1e-3)
    for _ in range(3):
        opt.zero_grad()
        ((w @ b) ** 2).sum().backward()
        opt.step()
    p = curvature.adam_preconditioner(opt, [w, b])
    bias = 1 - 0.95**3
    expected_w = ((opt.state[w]["exp_avg_sq"] / bias).sqrt() + 1e-3) / 0.5
    expected_b = (opt.state[b]["exp_avg_sq"] / bias).sqrt() + 1e-3
    assert torch.allclose(p, torch.cat([expected_w.reshape(-1), expected_b]).double(), rtol=1e-6)


def test_masking_unseen_coordinates_keeps_a_never_trained_row_out_of_the_preconditioned_sharpness():
    """An embedding-like table whose row 1 never gets a gradient (v = 0): a held-out loss that
    touches it has curvature there, which P = eps would blow up by 1/eps; masked, the
    preconditioned sharpness is that of the rows Adam has seen."""
    table = torch.nn.Parameter(torch.ones(2, 3))
    opt = AdamW([table], lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    for _ in range(3):
        opt.zero_grad()
        (table[0] ** 2).sum().backward()  # training reads row 0 only
        opt.step()
    held_out = (table**2).sum()  # the held-out sample reads both rows: curvature 2 on each
    plain = curvature.sharpness(held_out, [table], curvature.adam_preconditioner(opt, [table]), 1e-2, 0.9, 6)
    held_out = (table**2).sum()
    masked_p = curvature.adam_preconditioner(opt, [table], mask_unseen=True)
    masked = curvature.sharpness(held_out, [table], masked_p, 1e-2, 0.9, 6)
    assert torch.isinf(masked_p[3:]).all() and torch.isfinite(masked_p[:3]).all()
    assert plain.preconditioned == pytest.approx(2 / 1e-8, rel=1e-3)  # row 1's eps dominates
    row0 = 2 / float(masked_p[0])  # curvature 2 over row 0's sqrt(v_hat) + eps
    assert masked.preconditioned == pytest.approx(row0, rel=1e-6) and masked.sharpness == pytest.approx(2.0)


def test_bimodality_coefficient_separates_one_mode_from_two():
    g = torch.Generator().manual_seed(0)
    normal = torch.randn(100_000, generator=g)
    two_modes = torch.where(torch.rand(100_000, generator=g) < 0.5, -1.0, 1.0) + 0.05 * normal
    assert bimodality_coefficient(normal) == pytest.approx(1 / 3, abs=0.01)
    assert bimodality_coefficient(two_modes) > 0.9


def test_top_offender_is_the_planted_sequence():
    cfg = to_config(tiny_cfg())
    torch.manual_seed(0)
    source = build_source(cfg.data)
    model = build_model(cfg.model, source.vocab_size)
    x, y = source.batch("train", 0, 8, 32)
    planted = 5
    x[planted] = torch.tensor([7, 300] * 16)  # a 2-gram repeated: coherent per-token gradients
    y[planted] = torch.tensor([300, 7] * 16)
    stats = batch_sequence_stats(model, cfg, x, y, dict(min_period=1, max_period=13, min_repeats=8))
    ranked = sorted(stats, key=lambda s: -s.grad_contribution)
    assert ranked[0].row == planted
    assert [s.row for s in stats if s.repeated_tokens] == [planted]
    # the rows' weighted gradients sum to the batch gradient, so each aligns with it positively
    assert ranked[0].cosine > max(s.cosine for s in ranked[1:])


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("inspect") / "spike"
    run_with_capture(run_dir, spike_cfg())
    return load_kit(find_kits(run_dir)[0])


def test_inspect_kit_finds_the_cause_and_writes_the_report(kit, tmp_path):
    insp = inspect_kit(kit, curvature_iters=8)
    cfg = kit.config
    plants = build_source(cfg.data).sample("train", SPIKE_STEP, 8, 32).plants
    planted_rows = sorted(p.row for p in plants)
    assert planted_rows  # the fixture's batch has plants
    top = max(insp.sequences, key=lambda s: s.grad_contribution)
    assert top.row in planted_rows
    assert sorted(s.row for s in insp.sequences if s.repeated_tokens) == planted_rows
    assert set(planted_rows) <= set(insp.offending_rows)

    verdicts = {v.variant: v for v in insp.verdicts}
    assert verdicts["same"].bitwise and verdicts["same"].recurs and verdicts["same"].after_state_equal
    assert not verdicts["different"].recurs  # far from the injection window: clean data
    assert not verdicts["without_offenders"].recurs
    assert insp.spike.grad_norm > insp.pre.grad_norm
    assert insp.spike.sharpness is not None and insp.spike.sharpness.sharpness > 0
    assert len(insp.spike.attn_max_logits) == cfg.model.n_layers
    assert len(insp.spike.attn_max_logits[0]) == cfg.model.n_heads

    report = write_report(insp, tmp_path / "out")
    text = report.read_text()
    for needle in ("## Per parameter", "## The spiking batch", "## Replays", "## Curvature", "38/η"):
        assert needle in text
    for figure in ("replay.png", "update_distribution.png", "sequences.png"):
        assert (tmp_path / "out" / figure).stat().st_size > 0
    data = json.loads((tmp_path / "out" / "inspect.json").read_text())
    assert data["step"] == SPIKE_STEP and data["replays"][0]["bitwise"] is True


def test_cli_reports_and_rejects_bad_input(kit, tmp_path, capsys):
    assert main([str(kit.path), "--out", str(tmp_path / "cli"), "--no-replay", "--lanczos-iters", "0"]) == 0
    out = capsys.readouterr().out
    assert f"spike at step {SPIKE_STEP}: loss" in out and (tmp_path / "cli" / "report.md").is_file()
    assert main([str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no such path") and "\n" not in err
