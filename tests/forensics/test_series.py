"""proxy/forensics/series.py and proxy-inspect --series: a released checkpoint series read tensor by
tensor, on a tiny LLaMA-format series written here (no network), and the same numbers for a lab run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from proxy.forensics.inspect_cli import main as inspect_main
from proxy.forensics.series import SeriesError, find_series, logit_bounds, measure, role_of
from proxy.forensics.series_report import bound_jumps, top_moving
from proxy.train import train
from tests.train.test_trainer import tiny_cfg

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 32,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 2,
    "intermediate_size": 64,
    "vocab_size": 50,
}
PLANTED = "model.layers.1.self_attn.q_proj.weight"


def llama_weights(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def w(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.02

    out = {"model.embed_tokens.weight": w(50, 32), "lm_head.weight": w(50, 32), "model.norm.weight": torch.ones(32)}
    for i in range(2):
        p = f"model.layers.{i}."
        out.update(
            {
                p + "self_attn.q_proj.weight": w(32, 32),
                p + "self_attn.k_proj.weight": w(16, 32),
                p + "self_attn.v_proj.weight": w(16, 32),
                p + "self_attn.o_proj.weight": w(32, 32),
                p + "mlp.gate_proj.weight": w(64, 32),
                p + "mlp.up_proj.weight": w(64, 32),
                p + "mlp.down_proj.weight": w(32, 64),
                p + "input_layernorm.weight": torch.ones(32),
                p + "post_attention_layernorm.weight": torch.ones(32),
            }
        )
    return out


def write_checkpoint(folder: Path, weights: dict[str, torch.Tensor], sharded: bool) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(CONFIG))
    weights = {k: v.to(torch.bfloat16) if v.ndim == 2 else v for k, v in weights.items()}  # stored as released
    if not sharded:
        save_file(weights, str(folder / "model.safetensors"))
        return folder
    names = sorted(weights)
    halves = [names[: len(names) // 2], names[len(names) // 2 :]]
    weight_map = {}
    for i, half in enumerate(halves, start=1):
        shard = f"model-0000{i}-of-00002.safetensors"
        save_file({n: weights[n] for n in half}, str(folder / shard))
        weight_map.update({n: shard for n in half})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def llama_series(root: Path) -> list[Path]:
    """4 checkpoints (2 unsharded, 2 sharded), small updates everywhere, and between checkpoints 2
    and 3 a large one in layer 1's q projection."""
    base = llama_weights(0)
    folders = []
    for c in range(4):
        noise = llama_weights(100 + c)
        weights = {k: v + 0.05 * noise[k] if v.ndim == 2 else v for k, v in base.items()}
        if c >= 2:
            weights[PLANTED] = weights[PLANTED] * 6.0
        folders.append(write_checkpoint(root / f"step{1000 * (c + 1)}", weights, sharded=c >= 2))
    return folders


def test_a_planted_update_is_named_first_and_its_layers_logit_bound_jumps(tmp_path):
    folders = llama_series(tmp_path / "series")
    checkpoints = find_series([tmp_path / "series"])  # a folder of checkpoint folders, ordered by step
    assert [c.label for c in checkpoints] == [f.name for f in folders]
    result = measure(checkpoints)
    assert top_moving(result, 1, 1)[0]["name"] == PLANTED
    assert top_moving(result, 0, 1)[0]["name"] != PLANTED
    layer, transition, ratio = bound_jumps(result)[0]
    assert (layer, transition) == (1, 1) and ratio == pytest.approx(6.0, rel=0.05)
    embedding = next(t for t in result.tensors if t["name"] == "model.embed_tokens.weight")
    assert len(embedding["top_rows"]) == 3 and len(embedding["top_rows"][0]) == 5


def test_the_logit_bound_is_a_bound_and_is_tight_for_aligned_inputs():
    torch.manual_seed(0)
    d, heads, kv, hd = 16, 4, 2, 4
    from proxy.forensics.series import Shape

    s = Shape(d, heads, kv, 1, 10, hd)
    q, k, gain = torch.randn(heads * hd, d), torch.randn(kv * hd, d), torch.rand(d) + 0.5
    bounds = logit_bounds(q, k, gain, s)
    x = torch.randn(2000, d)
    x_hat = (x - x.mean(-1, keepdim=True)) / x.std(-1, unbiased=False, keepdim=True)  # LayerNorm: ||x_hat|| = sqrt(d)
    inputs = x_hat * gain
    for h in range(heads):
        qh = inputs @ q[h * hd : (h + 1) * hd].T
        kh = inputs @ k[(h // 2) * hd : (h // 2 + 1) * hd].T
        logits = (qh @ kh.T) / hd**0.5
        assert float(logits.abs().max()) <= bounds[h] * (1 + 1e-5)


def test_the_cli_writes_the_report_and_a_second_read_resumes(tmp_path, capsys):
    llama_series(tmp_path / "series")
    out = tmp_path / "out"
    assert inspect_main([str(tmp_path / "series"), "--out", str(out), "--mark", "step3000"]) == 0
    text = (out / "series.md").read_text()
    assert PLANTED in text and (out / "series_updates.png").is_file() and (out / "series_logit_bound.png").is_file()
    assert "step2000 -> step3000: largest relative update " + PLANTED in capsys.readouterr().out
    assert inspect_main(["--series", str(tmp_path / "series"), "--out", str(out)]) == 0
    assert "items from the cache" in capsys.readouterr().out
    assert json.loads((out / "series.json").read_text())["logit_bounds"][1]["layer"] == 1


def test_a_lab_runs_checkpoints_are_a_series_with_the_same_numbers(tmp_path):
    train(tiny_cfg(train=dict(steps=30, ckpt_every=10, keep_checkpoints=5)), tmp_path / "run")
    checkpoints = find_series([tmp_path / "run"])
    assert [c.step for c in checkpoints] == [10, 20, 30]
    result = measure(checkpoints)
    assert {role_of(t["name"]).kind for t in result.tensors} >= {"embedding", "head", "qkv", "o", "mlp_in"}
    assert [b["layer"] for b in result.bounds] == [0, 1] and all(len(b["max"]) == 3 for b in result.bounds)


def test_adams_state_in_a_lab_series_gives_the_rms_t_the_trainer_logged(tmp_path):
    """Checkpoints one step apart: RMS_t recovered from the two first moments is the one the trainer
    measured at that step (adam_rms/<name>, logged every step here); the normalized step's RMS is
    there at every checkpoint; a series without one-step neighbours reports RMS_t as nan."""
    from proxy.records import ADAM_RMS, load_run

    train(tiny_cfg(train=dict(steps=8, log_every=1, ckpt_every=1, keep_checkpoints=3)), tmp_path / "run")
    checkpoints = find_series([tmp_path / "run"])
    assert [c.step for c in checkpoints] == [6, 7, 8] and all(c.adam for c in checkpoints)
    result = measure(checkpoints)
    run = load_run(tmp_path / "run")
    for t in result.tensors:
        if t["name"] not in checkpoints[0].adam:
            continue  # a tied weight appears once in the optimizer
        assert len(t["adam_step_rms"]) == 3 and all(0 < x < 10 for x in t["adam_step_rms"])
        steps, logged = run.series(ADAM_RMS + t["name"])
        by_step = dict(zip(steps, logged))
        # checkpoint N holds the state after N steps: the transition N -> N + 1 is step index N
        assert t["adam_rms_t"] == pytest.approx([by_step[6], by_step[7]], rel=1e-4), t["name"]
    assert "Adam's state per tensor" in write_report(result, tmp_path / "out")
    spaced = measure(find_series([tmp_path / "run"])[::2])  # steps 6 and 8: two steps apart
    assert all(x != x for t in spaced.tensors if "adam_rms_t" in t for x in t["adam_rms_t"])


def write_report(result, out: Path) -> str:
    from proxy.forensics.series_report import write_series_report

    out.mkdir(parents=True, exist_ok=True)
    return write_series_report(result, out).read_text()


def test_a_spike_kit_is_a_series_of_its_three_states(tmp_path, capsys):
    """A lab spike kit gets the released series' tables: before -> at -> after the spike."""
    from tests.forensics.test_capture_and_replay import BEFORE, SPIKE_STEP, run_with_capture, spike_cfg

    run_with_capture(tmp_path / "run", spike_cfg())
    (kit,) = (tmp_path / "run" / "spike_kits").iterdir()
    checkpoints = find_series([kit])
    assert [c.step for c in checkpoints] == [SPIKE_STEP - BEFORE, SPIKE_STEP, SPIKE_STEP + 2]
    assert checkpoints[0].label == f"before (step {SPIKE_STEP - BEFORE})"
    result = measure(checkpoints)
    assert [b["layer"] for b in result.bounds] == [0, 1] and all(len(b["max"]) == 3 for b in result.bounds)
    assert inspect_main(["--series", str(kit), "--out", str(tmp_path / "out")]) == 0
    assert "before (step" in (tmp_path / "out" / "series.md").read_text()


# -- untrusted series: refused in one line naming the file ---------------------------------------
def refused(paths: list[Path], capsys) -> str:
    assert inspect_main(["--series", *map(str, paths)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    return err[0]


def test_a_pickle_checkpoint_is_refused_unread(tmp_path, capsys):
    good = write_checkpoint(tmp_path / "a", llama_weights(0), sharded=False)
    bad = tmp_path / "b"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps(CONFIG))
    (bad / "pytorch_model.bin").write_bytes(b"\x80\x04not to be unpickled")
    line = refused([good, bad], capsys)
    assert "pytorch_model.bin" in line and "pickle" in line


def test_a_shard_missing_from_the_folder_is_named(tmp_path, capsys):
    good = write_checkpoint(tmp_path / "a", llama_weights(0), sharded=False)
    bad = write_checkpoint(tmp_path / "b", llama_weights(1), sharded=True)
    (bad / "model-00002-of-00002.safetensors").unlink()
    assert "model-00002-of-00002.safetensors: missing" in refused([good, bad], capsys)


def test_a_shard_name_that_leaves_the_folder_is_refused(tmp_path, capsys):
    good = write_checkpoint(tmp_path / "a", llama_weights(0), sharded=False)
    bad = write_checkpoint(tmp_path / "b", llama_weights(1), sharded=True)
    index = bad / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"] = {k: "../a/model.safetensors" for k in data["weight_map"]}
    index.write_text(json.dumps(data))
    assert "refused shard name" in refused([good, bad], capsys)


def test_a_linked_shard_is_refused(tmp_path, capsys):
    good = write_checkpoint(tmp_path / "a", llama_weights(0), sharded=False)
    bad = tmp_path / "b"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps(CONFIG))
    (bad / "model.safetensors").symlink_to(good / "model.safetensors")
    assert "a link" in refused([good, bad], capsys)


def test_a_tensor_that_contradicts_config_json_is_named(tmp_path, capsys):
    weights = llama_weights(0)
    weights["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(32, 32)  # config: 2 kv heads of 8 -> 16 rows
    bad = write_checkpoint(tmp_path / "a", weights, sharded=False)
    good = write_checkpoint(tmp_path / "b", llama_weights(1), sharded=False)
    line = refused([bad, good], capsys)
    assert "model.layers.0.self_attn.k_proj.weight has shape [32, 32]" in line and str(bad) in line


def test_checkpoints_of_different_models_are_not_a_series(tmp_path):
    a = write_checkpoint(tmp_path / "a", llama_weights(0), sharded=False)
    weights = llama_weights(1)
    del weights["lm_head.weight"]
    b = write_checkpoint(tmp_path / "b", weights, sharded=False)
    with pytest.raises(SeriesError, match="not the same model"):
        find_series([a, b])
