"""Bad configuration fails before any training, with one line that names the key."""

import os

import pytest
from omegaconf import OmegaConf

from proxy.config import Config, ConfigError, as_dict, from_dict, schema_keys, to_config


def test_defaults_validate_and_round_trip():
    cfg = to_config(OmegaConf.structured(Config))
    again = from_dict(as_dict(cfg))
    assert again == cfg
    assert as_dict(cfg)["model"]["qk_norm"] == "off"


@pytest.mark.parametrize(
    "override, needle",
    [
        ({"model": {"qk_norm": "sometimes"}}, "qk_norm"),
        ({"model": {"n_layerz": 3}}, "n_layerz"),
        ({"optim": {"lr": "fast"}}, "optim.lr"),
        ({"model": {"d_model": 65, "n_heads": 4}}, "model.d_model=65"),
        ({"optim": {"lr": -1e-3}}, "optim.lr=-0.001"),
        ({"model": {"init": "xavier"}}, "init"),
        ({"train": {"seq_len": 4096}}, "train.seq_len=4096"),
        ({"optim": {"beta2": 1.5}}, "optim.beta2"),
        ({"data": {"source": "memmap"}}, "data.path"),
    ],
)
def test_bad_values_name_the_key(override, needle):
    with pytest.raises(ConfigError) as info:
        to_config(OmegaConf.create(override))
    message = str(info.value)
    assert needle in message
    assert "\n" not in message


def test_long_override_lists_give_run_directories_the_file_system_accepts():
    from proxy.analysis import MAX_DIRNAME_BYTES, short_dirname

    assert short_dirname("optim.lr=0.1,model.qk_norm=off") == "optim.lr=0.1,model.qk_norm=off"
    long_a = ",".join(f"train.key_{i}=value" for i in range(40))
    long_b = long_a.replace("value", "other", 1)
    a, b = short_dirname(long_a), short_dirname(long_b)
    assert len(a.encode()) <= MAX_DIRNAME_BYTES and len(b.encode()) <= MAX_DIRNAME_BYTES
    assert a != b and a.startswith("train.key_0=") and short_dirname(long_a) == a  # unique, stable
    assert len(short_dirname("é" * 300).encode()) <= MAX_DIRNAME_BYTES  # never splits a character


def test_a_key_the_schema_does_not_have_is_refused_with_the_closest_one():
    with pytest.raises(ConfigError, match=r"unknown key optim\.lrr \(did you mean optim\.lr\?\)"):
        to_config({"optim": {"lrr": 3e-3}})
    with pytest.raises(ConfigError, match=r"unknown key trian \(did you mean train\?\)"):
        to_config({"trian": {"steps": 3}})


@pytest.mark.parametrize("typo", ["optim.lrr=3e-3", "+optim.lrr=3e-3"])
def test_a_typo_on_the_command_line_never_trains(tmp_path, typo):
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "proxy.train", "model=tiny", typo, "train.steps=2"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "WANDB_MODE": "disabled"},
    )
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "unknown key optim.lrr (did you mean optim.lr?)" in lines[0]
    assert not list(tmp_path.rglob("summary.json"))  # nothing trained


def test_the_detector_settings_live_once_and_old_names_are_moved_or_told():
    from proxy.config import RENAMED_KEYS, stored_config

    cfg = to_config({"remedy": {"detector": {"sigma": 3.0}}, "capture": {"detector": {"window": 40}}})
    assert cfg.remedy.detector.sigma == 3.0 and cfg.capture.detector.window == 40
    assert cfg.capture.detector.sigma == 6.0 and cfg.remedy.detector.window == 128  # the same defaults
    # a stored config of an older proxy (a run dir, a checkpoint, a kit) reads with its keys moved
    old = {"remedy": {"kind": "skip_step", "spike_sigma": 3.0, "spike_window": 32}, "capture": {"min_history": 7}}
    moved = stored_config(old, "run/config.yaml")
    assert (moved.remedy.detector.sigma, moved.remedy.detector.window) == (3.0, 32)
    assert moved.capture.detector.min_history == 7
    assert old["remedy"]["spike_sigma"] == 3.0  # the tree read is not changed
    # a command line that uses an old name is told the new one
    with pytest.raises(ConfigError, match=r"^remedy.spike_sigma is now remedy.detector.sigma"):
        to_config({"remedy": {"spike_sigma": 3.0}})
    assert set(RENAMED_KEYS.values()) <= set(schema_keys())
