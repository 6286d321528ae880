"""New studies (issue 18): presets compose, predictions come from the committed ladder, and the
verdicts decide on constructed runs (one reproducing, one not)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from proxy.config import register_configs
from proxy.records import RunRecord, write_json
from proxy.verdict import load_script
from tests.experiments import judge_tables

REPO = Path(__file__).resolve().parents[2]
EXPERIMENTS = REPO / "experiments"
L0 = math.log(512)
LRS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)


def composed(overrides: list[str]):
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=True)


def member(root: Path, overrides: dict, config: dict, *, lr: float, seed: int, loss: float, max_logit: float) -> Path:
    items = [f"{k}={v}" for k, v in overrides.items()] + [f"optim.lr={lr!r}", f"train.seed={seed}"]
    run_dir = root / ",".join(f"{k}={v}" for k, v in overrides.items()) / f"lr={lr!r},seed={seed}"
    write_json(
        run_dir / "config.yaml",
        {**config, "optim": {**config.get("optim", {}), "lr": lr}, "train": {"seed": seed, "steps": 40}},
    )
    record = RunRecord(run_dir)
    record.update(status="running", overrides=items, lr=lr, loss_at_init=L0, steps_planned=40)
    for step in range(0, 41, 20):
        record.log(step, {"train/loss": L0 + (loss - L0) * step / 40, "attn/max_logit": max_logit * step / 40})
    record.update(status="completed", final_val_loss=loss, final_train_loss=loss, steps_completed=40)
    record.close()
    return run_dir


# --------------------------------------------------------------------------------------------
# Extrapolation
# --------------------------------------------------------------------------------------------
def test_extrapolation_preset_is_the_ladder_protocol_one_width_on() -> None:
    ladder = composed(["+experiment=lr_sensitivity_scaling/lab"])
    nxt = composed(["+experiment=extrapolation/lab"])
    assert nxt.experiment == "extrapolation" and str(nxt.hydra.sweeper.params["model.d_model"]) == "256"
    for key in ("train", "sweep", "schedule", "optim", "model"):
        a, b = dict(ladder[key]), dict(nxt[key])
        assert a == b, key
    pred = json.loads((EXPERIMENTS / "extrapolation" / "predictions.json").read_text())
    assert pred["next_d_model"] == 256 and set(pred["sensitivity"]) == {"none", "qknorm_zloss"}


def test_predictions_come_from_the_committed_ladder(tmp_path: Path) -> None:
    predict = load_script(EXPERIMENTS / "extrapolation" / "predict.py")
    assert predict.main(["--out", str(tmp_path)]) == 0
    fresh = json.loads((tmp_path / "predictions.json").read_text())
    committed = json.loads((EXPERIMENTS / "extrapolation" / "predictions.json").read_text())
    for part in ("logit", "sensitivity", "next_params_non_embedding"):
        assert _close(fresh[part], committed[part]), part


def _close(a, b) -> bool:
    """Equal up to the last bits of a float (a least-squares fit's rounding differs across BLAS builds)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def extrapolated_sweep(root: Path, pred: dict, right: bool) -> Path:
    """d=256 runs whose peaks and sensitivities equal the predictions (or are 10x / 0.3 nats off)."""
    for recipe in ("none", "qknorm_zloss"):
        target = pred["sensitivity"][recipe]["predicted"] + (0.0 if right else 0.3)
        # a parabola in log10 LR around 1e-2 whose mean excess over the 6-LR grid is `target`
        excess = [math.log10(lr / 1e-2) ** 2 for lr in LRS]
        a = target / (sum(excess) / len(excess))
        for seed in range(3):
            for lr, e in zip(LRS, excess):
                peak = pred["logit"][f"{recipe}/lr={lr:g}"]["predicted"] * (1 if right else 10)
                member(
                    root,
                    {"+experiment": "extrapolation/lab", "+stability": recipe, "model.d_model": 256},
                    {"model": {"d_model": 256}},
                    lr=lr,
                    seed=seed,
                    loss=3.5 + a * e,
                    max_logit=peak,
                )
    return root


@pytest.mark.parametrize("right", [True, False])
def test_extrapolation_verdict(tmp_path: Path, right: bool) -> None:
    pred = json.loads((EXPERIMENTS / "extrapolation" / "predictions.json").read_text())
    verdict = judge_tables(
        EXPERIMENTS / "extrapolation", [extrapolated_sweep(tmp_path / "s", pred, right)], tmp_path / "r"
    )
    assert verdict.reproduced is right, verdict.to_markdown()
    assert len(verdict.checks) == 3


def test_protocol2_bounds_come_from_the_committed_runs_and_the_preset_takes_fresh_seeds() -> None:
    bounds = load_script(EXPERIMENTS / "extrapolation" / "protocol2" / "bounds.py")
    p1 = bounds.p1
    template = {"d_model": 64, "n_layers": 2, "n_heads": 4}
    n_next = {
        r: p1.params_non_embedding(256, {**template, "qk_norm": q})
        for r, q in (("none", "off"), ("qknorm_zloss", "layernorm"))
    }
    fresh = bounds.bounds(p1.read_ladder(p1.LADDER), p1.read_ladder(bounds.D256_RUNS), n_next)
    committed = json.loads((EXPERIMENTS / "extrapolation" / "protocol2" / "bounds.json").read_text())
    for part in ("logit_log10", "sensitivity", "fresh_seeds"):
        assert _close(fresh[part], committed[part]), part
    # the bound is the noise: sd at d=256 over sqrt(5) with the prediction's standard error, times 2
    e = committed["sensitivity"]["none"]
    assert e["bound"] == pytest.approx(2 * math.sqrt(e["se_pred"] ** 2 + e["sd_at_256"] ** 2 / 5))
    cfg = composed(["+experiment=extrapolation/fresh_lab"])
    assert list(cfg.sweep.seeds) == committed["fresh_seeds"] and cfg.experiment == "extrapolation_fresh"


def fresh_sweep(root: Path, b: dict, off: float = 0.0, seeds=(3, 4, 5, 6, 7)) -> Path:
    """d=256 runs on fresh seeds whose log10 peaks and sensitivities sit at the protocol-2
    predictions, moved by ``off`` bounds (0: on the prediction)."""
    for recipe in ("none", "qknorm_zloss"):
        e = b["sensitivity"][recipe]
        target = e["predicted"] + off * e["bound"]
        excess = [math.log10(lr / 1e-2) ** 2 for lr in LRS]
        a = target / (sum(excess) / len(excess))
        for seed in seeds:
            for lr, x in zip(LRS, excess):
                cell = b["logit_log10"][f"{recipe}/lr={lr:g}"]
                member(
                    root,
                    {"+experiment": "extrapolation/fresh_lab", "+stability": recipe, "model.d_model": 256},
                    {"model": {"d_model": 256}},
                    lr=lr,
                    seed=seed,
                    loss=3.5 + a * x,
                    max_logit=10 ** (cell["predicted"] + off * cell["bound"]),
                )
    return root


@pytest.mark.parametrize(("off", "reproduced"), [(0.5, True), (1.5, False)])
def test_extrapolation_protocol2_judges_against_the_noise_bounds(tmp_path: Path, off: float, reproduced: bool) -> None:
    b = json.loads((EXPERIMENTS / "extrapolation" / "protocol2" / "bounds.json").read_text())
    finding = EXPERIMENTS / "extrapolation" / "protocol2"
    verdict = judge_tables(finding, [fresh_sweep(tmp_path / "s", b, off)], tmp_path / "r")
    assert verdict.testable and [c.passed for c in verdict.checks][::2] == [reproduced, reproduced]
    assert verdict.reproduced is reproduced, verdict.to_markdown()
    # protocol 1's seeds are not fresh: not testable, nothing judged
    seen = judge_tables(finding, [fresh_sweep(tmp_path / "seen", b, 0.0, seeds=(0, 1, 2))], tmp_path / "r2")
    assert not seen.testable and not seen.checks


# --------------------------------------------------------------------------------------------
# LR transfer across width (muParam)
# --------------------------------------------------------------------------------------------
TRANSFER_LRS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)


def test_lr_transfer_preset_crosses_widths_with_mup() -> None:
    cfg = composed(["+experiment=lr_transfer/lab"])
    params = cfg.hydra.sweeper.params
    assert str(params["optim.mup"]) == "false,true" and str(params["model.d_model"]) == "32,64,128,256"
    assert list(cfg.sweep.lrs) == list(TRANSFER_LRS) and list(cfg.sweep.seeds) == [0, 1, 2]
    assert cfg.optim.mup_base_fan_in == 32 and cfg.model.qk_norm == "layernorm" and cfg.loss.z_loss == 1e-4


def transfer_sweep(root: Path, transfers: bool, seeds=range(3), mup_drift: float = 0.0) -> Path:
    """Loss parabolas in log10 LR: the standard optimum falls 0.3 decades per doubling of width;
    the muP optimum stays at 10^-1.5 (``transfers``; or moves ``mup_drift`` decades per doubling)
    or moves like the standard one."""
    for mup in (False, True):
        for k, width in enumerate((32, 64, 128, 256)):
            drop = -mup_drift * k if (mup and transfers) else 0.3 * k
            for seed in seeds:
                centre = -1.5 - drop + 0.03 * (seed % 3 - 1)
                for lr in TRANSFER_LRS:
                    loss = 3.5 + 0.4 * (math.log10(lr) - centre) ** 2
                    member(
                        root,
                        {"+experiment": "lr_transfer/lab", "optim.mup": str(mup).lower(), "model.d_model": width},
                        {"model": {"d_model": width}, "optim": {"mup": mup}},
                        lr=lr,
                        seed=seed,
                        loss=min(loss, L0),
                        max_logit=50.0,
                    )
    return root


@pytest.mark.parametrize("transfers", [True, False])
def test_lr_transfer_verdict(tmp_path: Path, transfers: bool) -> None:
    verdict = judge_tables(EXPERIMENTS / "lr_transfer", [transfer_sweep(tmp_path / "s", transfers)], tmp_path / "r")
    assert verdict.reproduced is transfers, verdict.to_markdown()
    assert len(verdict.checks) == 4
    assert verdict.checks[0].passed  # every optimum (10^-1.5 ... 10^-2.4) lies inside 1e-3 ... 1


@pytest.mark.parametrize(("drift", "p2_bound", "noise_bound"), [(0.0, True, True), (0.06, True, False)])
def test_lr_transfer_protocol3_adds_a_bound_from_the_seed_noise(
    tmp_path: Path, drift: float, p2_bound: bool, noise_bound: bool
) -> None:
    """Protocol 3 keeps protocol 2's four criteria on seeds 3-7 and adds |shift| < 0.10 decades: a
    muP optimum that moves 0.18 decades passes the half-grid bound and fails the noise bound."""
    sweep = transfer_sweep(tmp_path / "s", True, seeds=range(3, 8), mup_drift=drift)
    verdict = judge_tables(EXPERIMENTS / "lr_transfer" / "protocol3", [sweep], tmp_path / "r")
    claims = {c.claim.split(" (")[0]: c.passed for c in verdict.checks}
    assert len(verdict.checks) == 6 and verdict.checks[4].passed  # seeds 3-7 present
    assert verdict.checks[1].passed is p2_bound and verdict.checks[5].passed is noise_bound, claims
    assert verdict.reproduced is noise_bound
    if drift:
        assert verdict.numbers["muP shift, seeds positive"] == "5 of 5"
