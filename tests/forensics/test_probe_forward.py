"""proxy/forensics/probe_forward.py and proxy-inspect --forward: the streamed forward held to
transformers (golden numbers), to proxy's own model, and to the untrusted-input rules.

The golden numbers were made once, outside the repository, with torch 2.13.0 (CPU) and transformers
5.25.0: the same ``hf_weights`` written as a float32 model.safetensors with the config below,
loaded with AutoModelForCausalLM.from_pretrained(attn_implementation="eager" wrapped to capture the
query and key after RoPE, with eager's causal mask), run on ``probe_ids()`` with labels=ids; per
layer the max of |q.k| * head_dim^-0.5 over j <= i from the captured q / k (repeat_kv for the grouped
heads), the residual RMS from hooks on the decoder layers, log Z = logsumexp(logits), the loss
transformers returns. Our forward agreed to 6e-6 (float32) on every number.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from proxy.config import Config, MLPKind, ModelConfig, Norm, NormPosition, QKNorm
from proxy.forensics import probe_forward as pf
from proxy.forensics.inspect_cli import main as inspect_main
from proxy.forensics.probe_forward import ProbeResult, probe_forward, probe_series, probe_tokens
from proxy.forensics.series import SeriesError, _in_memory, find_series, open_hf
from proxy.forensics.series_report import forward_jumps
from proxy.model import build_model
from tests.forensics.test_series import llama_series

BASE = {
    "hidden_size": 32,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,  # grouped-query: two heads share a key/value head
    "num_hidden_layers": 3,
    "intermediate_size": 48,
    "vocab_size": 64,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500.0,
    "rope_scaling": None,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
}
LLAMA = {**BASE, "architectures": ["LlamaForCausalLM"], "model_type": "llama"}
OLMO2 = {**BASE, "architectures": ["Olmo2ForCausalLM"], "model_type": "olmo2"}
LAYER = {
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "input_layernorm",
              "post_attention_layernorm"),
    "olmo2": ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm", "gate_proj", "up_proj", "down_proj",
              "post_attention_layernorm", "post_feedforward_layernorm"),
}  # fmt: skip


def hf_weights(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny model's weights, drawn in a fixed order from one seeded generator: matrices
    N(0, 1/fan_in) (q and k x2, so the attention logits are O(1-10)), norm gains 1 + N(0, 0.2^2)."""
    g = torch.Generator().manual_seed(seed)
    d, heads, kv = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    hd, ff, vocab = d // heads, config["intermediate_size"], config["vocab_size"]
    shapes = {"q_proj": (heads * hd, d), "k_proj": (kv * hd, d), "v_proj": (kv * hd, d), "o_proj": (d, heads * hd),
              "q_norm": (heads * hd,), "k_norm": (kv * hd,), "gate_proj": (ff, d), "up_proj": (ff, d),
              "down_proj": (d, ff)}  # fmt: skip

    def draw(shape: tuple[int, ...], gain: float = 1.0) -> torch.Tensor:
        if len(shape) == 1:
            return 1 + 0.2 * torch.randn(shape, generator=g)
        return torch.randn(shape, generator=g) * gain / math.sqrt(shape[1])

    kind = config["model_type"]
    out = {"model.embed_tokens.weight": draw((vocab, d), math.sqrt(d))}
    for i in range(config["num_hidden_layers"]):
        for part in LAYER[kind]:
            where = "self_attn" if part.endswith(("_proj", "_norm")) and part[0] in "qkvo" else "mlp"
            name = (
                f"model.layers.{i}.{part}.weight" if "layernorm" in part else f"model.layers.{i}.{where}.{part}.weight"
            )
            out[name] = draw(shapes.get(part, (d,)), 2.0 if part in ("q_proj", "k_proj") else 1.0)
    out["model.norm.weight"] = draw((d,))
    if not config["tie_word_embeddings"]:
        out["lm_head.weight"] = draw((vocab, d))
    return out


def probe_ids(vocab: int = 64) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(1234))


def write_hf(folder: Path, config: dict, weights: dict[str, torch.Tensor], sharded: bool = False) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    weights = {k: v.contiguous() for k, v in weights.items()}
    if not sharded:
        save_file(weights, str(folder / "model.safetensors"))
        return folder
    names = sorted(weights)
    weight_map = {}
    for i, part in enumerate((names[::2], names[1::2]), start=1):
        shard = f"model-0000{i}-of-00002.safetensors"
        save_file({n: weights[n] for n in part}, str(folder / shard))
        weight_map.update({n: shard for n in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


# -- golden numbers from transformers 5.25.0 (the module docstring) ------------------------------
GOLDEN_LLAMA = {"attn_max_abs_logit": [16.539543, 16.357031, 16.322628], "attn_max_logit": [16.539543, 16.357031, 16.322628], "attn_head_max_abs_logit": [[16.539543, 11.579359, 9.6393518, 14.188868], [12.077876, 16.357031, 12.786276, 12.125585], [13.853861, 14.998591, 16.27607, 16.322628]], "residual_rms": [1.4243493, 1.7329305, 1.9742172], "log_z_mean": 4.6679535, "log_z_max": 5.1162543, "output_max_logit_mean": 2.5744746, "loss": 5.1058497, "logits": {"0,0": [-0.74760032, -1.0486765, -0.82466906, 1.1394837, 0.31325802, 1.7127023, -1.3181235, 0.17817277], "0,23": [-1.2979723, 1.0344757, -1.236142, -1.2425076, -1.7872187, 0.73018128, 1.6589043, -0.89173007], "1,11": [-1.652584, 2.2270885, -0.64985466, -1.3245416, 0.86633527, -0.019839982, -0.034290716, 0.21315217]}}  # fmt: skip  # noqa: E501
GOLDEN_OLMO2 = {"attn_max_abs_logit": [3.2599487, 3.9300907, 3.8337638], "attn_max_logit": [3.2599487, 3.4438965, 3.5282722], "attn_head_max_abs_logit": [[3.2599487, 2.9881501, 2.384706, 2.7600389], [3.4831901, 3.4549687, 3.9300907, 3.7996595], [3.8337638, 2.9468672, 3.1336131, 3.5282722]], "residual_rms": [1.843189, 2.3955598, 2.6726358], "log_z_mean": 4.5592184, "log_z_max": 4.882329, "output_max_logit_mean": 2.2977662, "loss": 4.4810629, "logits": {"0,0": [0.12734656, -1.0043045, 0.56062239, 1.0172988, -0.51064742, -0.50278717, -1.4109954, -1.2970597], "0,23": [-0.38636807, 1.4776144, 0.19692092, 0.3166064, 0.17741174, 0.35652882, 0.47901365, -1.9935243], "1,11": [0.42239386, -1.2057768, 0.19442475, 0.78471869, 0.5222463, 0.83920687, -0.70951664, -0.22244257]}}  # fmt: skip  # noqa: E501
GOLDEN_LLAMA_TIED = {"log_z_mean": 17.676191, "log_z_max": 29.258932, "output_max_logit_mean": 17.428579, "loss": 19.25091, "logits": {"0,0": [1.5392398, -0.58140779, -5.7199225, 6.8936391, -2.1702251, -5.1142983, -0.80304593, 6.2182217], "0,23": [-9.2363434, 6.0403881, 2.6468139, -2.6955872, -0.010104374, -7.1386538, 0.80392456, -5.5339293], "1,11": [4.8693709, 16.288906, -3.0546057, -0.17764612, -1.920377, 5.4815121, -3.724062, 4.92063]}}  # fmt: skip  # noqa: E501


def assert_golden(result: ProbeResult, golden: dict) -> None:
    for key, want in golden.items():
        if key == "logits":
            assert result.logits is not None
            for position, values in want.items():
                b, t = map(int, position.split(","))
                assert result.logits[b, t, :8].tolist() == pytest.approx(values, rel=1e-4, abs=1e-5), position
        else:
            got = getattr(result, key)
            assert (sum(got, []) if key == "attn_head_max_abs_logit" else got) == pytest.approx(
                sum(want, []) if key == "attn_head_max_abs_logit" else want, rel=1e-4
            ), key


@pytest.fixture
def small_blocks(monkeypatch):
    """Attention and output in blocks smaller than the probe, so the block edges are exercised."""
    monkeypatch.setattr(pf, "QUERY_BLOCK", 7)
    monkeypatch.setattr(pf, "OUTPUT_BLOCK", 5)


@pytest.mark.parametrize("sharded", [False, True])
def test_llama_layout_gives_transformers_numbers(tmp_path, small_blocks, sharded):
    ckpt = open_hf(write_hf(tmp_path / "llama", LLAMA, hf_weights(LLAMA), sharded))
    layers_done: list[int] = []
    result = probe_forward(ckpt, probe_ids(), keep_logits=True, progress=layers_done.append)
    assert_golden(result, GOLDEN_LLAMA)
    assert layers_done == [1, 1, 1] and result.shape == [2, 24]


def test_olmo2_layout_gives_transformers_numbers(tmp_path, small_blocks):
    ckpt = open_hf(write_hf(tmp_path / "olmo2", OLMO2, hf_weights(OLMO2)))
    assert pf.hf_layout(ckpt, ckpt.config).kind == "olmo2"
    assert_golden(probe_forward(ckpt, probe_ids(), keep_logits=True), GOLDEN_OLMO2)


def test_tied_embeddings_give_transformers_numbers_and_equal_an_lm_head_copy(tmp_path):
    tied = {**LLAMA, "tie_word_embeddings": True}
    weights = hf_weights(tied)
    result = probe_forward(open_hf(write_hf(tmp_path / "tied", tied, weights)), probe_ids(), keep_logits=True)
    assert_golden(result, GOLDEN_LLAMA_TIED)
    # the same layers as the untied model (its weights are drawn first, in the same order)
    assert result.attn_max_abs_logit == pytest.approx(GOLDEN_LLAMA["attn_max_abs_logit"], rel=1e-4)
    # no lm_head and tie_word_embeddings unset: the embedding is the head, as with an explicit copy
    copied = {**weights, "lm_head.weight": weights["model.embed_tokens.weight"].clone()}
    untied = probe_forward(open_hf(write_hf(tmp_path / "copy", LLAMA, copied)), probe_ids(), keep_logits=True)
    absent = probe_forward(
        open_hf(write_hf(tmp_path / "absent", {**LLAMA, "tie_word_embeddings": None}, weights)), probe_ids()
    )
    assert untied.loss == pytest.approx(result.loss, rel=1e-6) and absent.loss == pytest.approx(result.loss, rel=1e-6)


def test_a_planted_q_scale_multiplies_that_layers_logit_and_leaves_the_layers_before(tmp_path):
    """Checkpoint 3 = checkpoint 2 with layer 1's W_q x10: layer 1's max |logit| x10 exactly (its input
    is unchanged), layer 0 bit-identical; a second read comes from the cache."""
    base = hf_weights(LLAMA)
    noise = hf_weights(LLAMA, seed=7)
    second = {k: v + 0.01 * noise[k] for k, v in base.items()}
    third = {**second, "model.layers.1.self_attn.q_proj.weight": second["model.layers.1.self_attn.q_proj.weight"] * 10}
    for step, weights in ((1, base), (2, second), (3, third)):
        write_hf(tmp_path / "series" / f"step{step}", LLAMA, weights, sharded=step == 2)
    checkpoints = find_series([tmp_path / "series"])
    probe = probe_tokens(checkpoints[0], None, n_seq=2, seq_len=32, seed=0)
    assert probe.source == "random ids (seed 0)" and tuple(probe.tokens.shape) == (2, 32)
    results, resumed = probe_series(checkpoints, probe, cache=tmp_path / "cache")
    assert resumed == 0
    before, after = results[1], results[2]
    assert after.attn_max_abs_logit[1] / before.attn_max_abs_logit[1] == pytest.approx(10.0, rel=1e-4)
    assert after.attn_max_abs_logit[0] == before.attn_max_abs_logit[0]
    assert after.residual_rms[0] == before.residual_rms[0]
    assert 0.8 < results[1].attn_max_abs_logit[1] / results[0].attn_max_abs_logit[1] < 1.25
    assert forward_jumps(results)[0][:2] == (1, 1)
    again, resumed = probe_series(checkpoints, probe, cache=tmp_path / "cache")
    assert resumed == 3 and [r.as_json() for r in again] == [r.as_json() for r in results]


# -- proxy's own checkpoints ------------------------------------------------------------------
def proxy_checkpoint(model_cfg: ModelConfig, vocab: int = 50, seed: int = 0):
    """A tiny proxy model with spread-out weights (logits O(1)), as series.py holds a lab checkpoint."""
    torch.manual_seed(seed)
    model = build_model(model_cfg, vocab)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if p.ndim == 1 else p * (10.0 if "qkv" in name else 3.0))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ckpt = _in_memory("step_1", Path("step_1.pt"), 1, state, model_cfg.d_model, model_cfg.n_heads, model_cfg.n_layers)
    ckpt.config = Config(model=model_cfg)
    return model.eval(), ckpt


@pytest.mark.parametrize(
    "model_cfg",
    [
        ModelConfig(d_model=32, n_layers=2, n_heads=4, max_seq_len=64),  # proxy's default: LayerNorm, GELU
        ModelConfig(
            d_model=32,
            n_layers=2,
            n_heads=4,
            max_seq_len=64,
            qk_norm=QKNorm.rmsnorm,
            norm_position=NormPosition.reordered,
            tie_embeddings=True,
        ),  # fmt: skip
    ],
    ids=["default", "qk-norm-reordered-tied"],
)
def test_a_proxy_checkpoint_gives_proxys_own_forward(model_cfg):
    model, ckpt = proxy_checkpoint(model_cfg)
    tokens = torch.randint(0, 50, (3, 20), generator=torch.Generator().manual_seed(3))
    result = probe_forward(ckpt, tokens, keep_logits=True)
    labels = torch.cat([tokens[:, 1:], torch.full((3, 1), -100)], dim=1)
    with torch.no_grad():
        own = model(tokens, labels, collect_stats=True)
    assert result.logits is not None and torch.allclose(result.logits, own.logits, rtol=1e-5, atol=1e-5)
    assert result.loss == pytest.approx(float(own.ce_loss), rel=1e-5)
    assert result.log_z_mean == pytest.approx(float(torch.logsumexp(own.logits, -1).mean()), rel=1e-5)
    # the signed max is the statistic training logs (attn/max_logit/layer_N); |.| is at least it
    signed = [float(m.max()) for m in own.attn_max_logits]
    assert result.attn_max_logit == pytest.approx(signed, rel=1e-5)
    assert all(a >= s for a, s in zip(result.attn_max_abs_logit, signed))
    assert len(result.attn_head_max_abs_logit[0]) == 4 and len(result.residual_rms) == 2


def test_a_llama_shaped_proxy_model_written_as_hugging_face_gives_the_same_numbers(tmp_path):
    """proxy's model with RMSNorm and SwiGLU is LLaMA: written in the Hugging Face layout, the streamed
    forward matches proxy's own forward (a second implementation of the same math)."""
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=4, max_seq_len=64, norm=Norm.rmsnorm, mlp=MLPKind.swiglu, d_ff=48)
    model, ckpt = proxy_checkpoint(cfg)
    weights = {
        "model.embed_tokens.weight": model.embed.weight,
        "model.norm.weight": model.final_norm.weight,
        "lm_head.weight": model.lm_head.weight,
    }
    for i, b in enumerate(model.blocks):
        q, k, v = b.attn.qkv.weight.chunk(3)
        gate, up = b.mlp.fc_in.weight.chunk(2)
        parts = {
            "self_attn.q_proj": q,
            "self_attn.k_proj": k,
            "self_attn.v_proj": v,
            "self_attn.o_proj": b.attn.proj.weight,
            "mlp.gate_proj": gate,
            "mlp.up_proj": up,
            "mlp.down_proj": b.mlp.fc_out.weight,
            "input_layernorm": b.attn_norm.weight,
            "post_attention_layernorm": b.mlp_norm.weight,
        }
        weights.update({f"model.layers.{i}.{n}.weight": w for n, w in parts.items()})
    config = {**LLAMA, "num_key_value_heads": 4, "num_hidden_layers": 2, "vocab_size": 50, "rms_norm_eps": cfg.norm_eps}
    config.update(rope_theta=cfg.rope_theta, max_position_embeddings=cfg.max_seq_len)
    hf = open_hf(write_hf(tmp_path / "hf", config, {k: v.detach().clone() for k, v in weights.items()}))
    tokens = torch.randint(0, 50, (2, 40), generator=torch.Generator().manual_seed(5))
    ours, own = probe_forward(hf, tokens, keep_logits=True), probe_forward(ckpt, tokens, keep_logits=True)
    assert ours.logits is not None and own.logits is not None
    assert torch.allclose(ours.logits, own.logits, rtol=1e-4, atol=1e-4)
    assert ours.attn_max_abs_logit == pytest.approx(own.attn_max_abs_logit, rel=1e-4)
    assert ours.residual_rms == pytest.approx(own.residual_rms, rel=1e-4)


# -- probe tokens -------------------------------------------------------------------------------
def test_probe_ids_and_text_files(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder = write_hf(tmp_path / "ckpt", LLAMA, hf_weights(LLAMA))
    words = ["[UNK]", *(f"w{i}" for i in range(40))]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    (folder / "tokenizer.json").write_text(tokenizer.to_str())
    ckpt = open_hf(folder)
    (tmp_path / "probe.txt").write_text(" ".join(f"w{i % 40}" for i in range(100)))
    text = probe_tokens(ckpt, tmp_path / "probe.txt", n_seq=3, seq_len=20)
    assert text.tokens.shape == (3, 20) and text.tokens[0, :3].tolist() == [1, 2, 3]
    assert text.source == f"text from {tmp_path / 'probe.txt'}"
    (tmp_path / "ids.json").write_text(json.dumps([[1, 2, 3, 4, 5], [6, 7, 8, 9]]))
    assert probe_tokens(ckpt, tmp_path / "ids.json", n_seq=4, seq_len=100).tokens.tolist() == [
        [1, 2, 3, 4],
        [6, 7, 8, 9],
    ]
    (tmp_path / "flat.json").write_text(json.dumps(list(range(10))))
    assert probe_tokens(ckpt, tmp_path / "flat.json", n_seq=4, seq_len=3).tokens.tolist() == [
        [0, 1, 2],
        [3, 4, 5],
        [6, 7, 8],
    ]
    assert probe_tokens(ckpt, None, n_seq=1, seq_len=1000).tokens.shape == (1, 64)  # cut to the context


# -- untrusted input: one line naming the file ----------------------------------------------------
def one_line(exc: pytest.ExceptionInfo, path: Path) -> str:
    message = str(exc.value)
    assert "\n" not in message and str(path) in message, message
    return message


def test_hostile_probes_are_refused_in_one_line_naming_the_file(tmp_path):
    folder = write_hf(tmp_path / "ckpt", LLAMA, hf_weights(LLAMA))
    ckpt = open_hf(folder)
    (tmp_path / "big.json").write_text(json.dumps([[1, 2, 64]]))
    with pytest.raises(SeriesError) as exc:
        probe_tokens(ckpt, tmp_path / "big.json")
    assert "token id 64 is outside the vocabulary of 64" in one_line(exc, tmp_path / "big.json")
    (tmp_path / "link.json").symlink_to(tmp_path / "big.json")
    with pytest.raises(SeriesError) as exc:
        probe_tokens(ckpt, tmp_path / "link.json")
    assert "a link" in one_line(exc, tmp_path / "link.json")
    (tmp_path / "bad.json").write_text("[1, 2,")
    with pytest.raises(SeriesError) as exc:
        probe_tokens(ckpt, tmp_path / "bad.json")
    assert "not valid JSON" in one_line(exc, tmp_path / "bad.json")
    (folder / "tokenizer.json").write_text('{"model": "not a tokenizer"')
    (tmp_path / "text.txt").write_text("some text")
    with pytest.raises(SeriesError) as exc:
        probe_tokens(ckpt, tmp_path / "text.txt")
    one_line(exc, folder / "tokenizer.json")
    with pytest.raises(SeriesError) as exc:
        probe_forward(ckpt, torch.tensor([[1, 70]]))
    assert "token id 70" in one_line(exc, folder)


@pytest.mark.parametrize(
    "change, named, says",
    [
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "config.json", "rope_scaling"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "config.json", "rope_parameters"),
        ({"architectures": ["MistralForCausalLM"]}, "config.json", "MistralForCausalLM"),
        ({"hidden_act": "gelu"}, "config.json", "hidden_act"),
        ({"attention_bias": True}, "config.json", "attention_bias"),
        ("bias", "model.safetensors", "q_proj.bias"),
    ],
    ids=["rope-scaling", "rope-yarn", "architecture", "activation", "attention-bias", "bias-tensor"],
)
def test_unsupported_models_are_refused_in_one_line_naming_the_file(tmp_path, change, named, says):
    weights = hf_weights(LLAMA)
    if change == "bias":
        weights["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(32)
    ckpt = open_hf(write_hf(tmp_path / "ckpt", LLAMA if change == "bias" else {**LLAMA, **change}, weights))
    for call in (lambda: probe_tokens(ckpt, None), lambda: probe_forward(ckpt, probe_ids())):
        with pytest.raises(SeriesError) as exc:
            call()
        assert says in one_line(exc, tmp_path / "ckpt" / named)


# -- the command line ---------------------------------------------------------------------------
def test_the_cli_adds_the_probe_forward_to_the_series_report(tmp_path, capsys):
    llama_series(tmp_path / "series")  # tests/forensics/test_series.py: layer 1's W_q x6 into step3000
    out = tmp_path / "out"
    assert inspect_main([str(tmp_path / "series"), "--forward", "--probe-shape", "2,32", "--out", str(out)]) == 0
    printed = capsys.readouterr().out  # x6 on the weights, with the other small updates: x5.7 on the probe
    assert re.search(
        r"probe forward: largest rise of a max \|attention logit\|: layer 1, x5\.[5-9].* step2000 -> step3000", printed
    )
    text = (out / "series.md").read_text()
    table = text.split("Probe forward: max |attention logit| per layer")[1].split("##")[0]
    rows = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("|")]
    # 4 checkpoints of a 2-layer model: the checkpoints run down the page, a column per layer
    assert rows[0] == "checkpoint"
    assert [r for r in rows if r.startswith("step")] == [f"step{s}000" for s in (1, 2, 3, 4)]
    assert "| layer 0 | layer 1 |" in table and (out / "series_forward.png").is_file()
    forward = json.loads((out / "series.json").read_text())["forward"]
    assert forward["probe"] == "random ids (seed 0)" and forward["shape"] == [2, 32]
    assert [len(c["attn_max_abs_logit"]) for c in forward["checkpoints"]] == [2, 2, 2, 2]
    assert inspect_main([str(tmp_path / "series"), "--forward", "--probe-shape", "2,32", "--out", str(out)]) == 0
    assert "4 probe forwards from the cache" in capsys.readouterr().out


def test_the_cli_refuses_an_unsupported_model_before_reading(tmp_path, capsys):
    for step in (1, 2):
        write_hf(
            tmp_path / "s" / f"step{step}",
            {**LLAMA, "rope_scaling": {"type": "dynamic", "factor": 2}},
            hf_weights(LLAMA),
        )
    assert inspect_main([str(tmp_path / "s"), "--forward", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "config.json" in err[0] and "rope_scaling" in err[0]
    assert not (tmp_path / "out").exists()
