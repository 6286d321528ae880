"""The model: shapes, causality, init schemes, QK-norm, z-loss, backends, preset sizes."""

import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import proxy.kernels.reference as ref
from proxy.config import ModelConfig
from proxy.model import build_model, init_std_for

V = 97


def make(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(**kw), V)


@pytest.mark.parametrize("norm_position", ["pre", "reordered"])
@pytest.mark.parametrize("mlp", ["gelu", "swiglu"])
def test_shapes_and_causality(norm_position, mlp):
    model = make(norm_position=norm_position, mlp=mlp, norm="rmsnorm")
    idx = torch.randint(0, V, (2, 24))
    logits = model(idx).logits
    assert logits.shape == (2, 24, V)
    # changing future tokens must not change the logits of earlier positions
    idx2 = idx.clone()
    idx2[:, 12:] = torch.randint(0, V, (2, 12))
    logits2 = model(idx2).logits
    torch.testing.assert_close(logits[:, :12], logits2[:, :12])
    assert not torch.allclose(logits[:, 12:], logits2[:, 12:])


def test_no_biases_and_untied_by_default():
    model = make()
    assert all(p.ndim == 2 or "norm" in n for n, p in model.named_parameters()), "1-D params are norm gains"
    assert model.lm_head.weight is not model.embed.weight
    tied = make(tie_embeddings=True)
    assert tied.lm_head.weight is tied.embed.weight
    assert tied.n_params() == make().n_params() - V * 64


def _layer_stds(model):
    return {n: p.detach().std().item() for n, p in model.named_parameters() if p.ndim == 2}


@pytest.mark.parametrize("scheme", ["normal", "scaled", "fan_in"])
def test_init_scheme_stds_follow_their_formulas(scheme):
    cfg = ModelConfig(d_model=128, n_layers=3, n_heads=4, init=scheme)
    torch.manual_seed(0)
    model = build_model(cfg, 1000)
    # a normal truncated at 3 sigma has std 0.9866 sigma
    trunc = math.sqrt(1 - 6 * math.exp(-4.5) / math.sqrt(2 * math.pi) / (math.erf(3 / math.sqrt(2))))
    for name, std in _layer_stds(model).items():
        shape = tuple(dict(model.named_parameters())[name].shape)
        expected = init_std_for(name, shape, cfg) * trunc
        assert std == pytest.approx(expected, rel=0.06), name
        if scheme == "normal":
            assert expected == pytest.approx(0.02 * trunc)
    if scheme == "scaled":  # deeper output projections start smaller
        stds = _layer_stds(model)
        assert stds["blocks.2.attn.proj.weight"] < stds["blocks.0.attn.proj.weight"] / 1.5
        assert init_std_for("blocks.2.mlp.fc_out.weight", (128, 512), cfg) == pytest.approx(1 / math.sqrt(2 * 512 * 3))
    if scheme == "fan_in":
        assert init_std_for("blocks.0.mlp.fc_out.weight", (128, 512), cfg) == pytest.approx(1 / math.sqrt(512))
        assert init_std_for("embed.weight", (1000, 128), cfg) == pytest.approx(1 / math.sqrt(128))


def test_init_std_and_gain_override():
    cfg = ModelConfig(d_model=128, init_std=0.05, init_gain=2.0)
    torch.manual_seed(0)
    model = build_model(cfg, 1000)
    assert model.blocks[0].mlp.fc_in.weight.std().item() == pytest.approx(0.1 * 0.9866, rel=0.05)


def test_qk_norm_bounds_attention_logits():
    """Blow up the q/k projections: without QK-norm the logits explode, with it they stay bounded."""
    idx = torch.randint(0, V, (2, 32))
    logits = {}
    for qk in ["off", "layernorm", "rmsnorm"]:
        model = make(qk_norm=qk)
        with torch.no_grad():
            for block in model.blocks:
                block.attn.qkv.weight.mul_(100.0)
        out = model(idx, idx, collect_stats=True)
        logits[qk] = max(m.max().item() for m in out.attn_max_logits)
        has_norm = model.blocks[0].attn.q_norm is not None
        assert has_norm == (qk != "off")
    head_dim = 16
    assert logits["off"] > 300
    # normalised q, k have norm sqrt(head_dim): |z| <= sqrt(d_h) * g_q * g_k with unit gains
    assert logits["layernorm"] <= math.sqrt(head_dim) + 1e-3
    assert logits["rmsnorm"] <= math.sqrt(head_dim) + 1e-3


def test_max_logit_statistic_matches_scores():
    model = make(qk_norm="off")
    idx = torch.randint(0, V, (3, 20))
    attn = model.blocks[0].attn
    captured = {}

    def hook(_m, inputs, output):
        captured["out"] = output

    handle = attn.register_forward_hook(hook)
    out_naive = model(idx, idx, collect_stats=True)
    handle.remove()
    sdpa = make(qk_norm="off", attention="sdpa")
    sdpa.load_state_dict(model.state_dict())
    out_sdpa = sdpa(idx, idx, collect_stats=True)
    for a, b in zip(out_naive.attn_max_logits, out_sdpa.attn_max_logits):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_naive.loss, out_sdpa.loss, rtol=1e-5, atol=1e-5)
    assert sdpa(idx, idx, collect_stats=False).attn_max_logits[0] is None  # free on normal steps


def test_z_loss_equals_formula_and_ignore_index():
    model = make()
    idx = torch.randint(0, V, (2, 16))
    labels = idx.clone()
    labels[0, :5] = -100
    out = model(idx, labels, z_loss=1e-4, collect_stats=True)  # statistics only when asked
    logits = out.logits.reshape(-1, V).double()
    flat = labels.reshape(-1)
    keep = flat != -100
    lse = torch.logsumexp(logits, -1)[keep]
    ce = torch.nn.functional.cross_entropy(logits, flat, ignore_index=-100)
    assert out.ce_loss.item() == pytest.approx(ce.item(), rel=1e-5)
    assert out.z_loss.item() == pytest.approx(1e-4 * (lse**2).mean().item(), rel=1e-5)
    assert out.loss.item() == pytest.approx(out.ce_loss.item() + out.z_loss.item(), rel=1e-6)
    assert out.output_stats["lse_mean"].item() == pytest.approx(lse.mean().item(), rel=1e-5)


def test_fused_linear_path_matches_materialised_logits():
    model = make()
    fused = make(loss_impl="fused_linear")
    fused.load_state_dict(model.state_dict())
    idx = torch.randint(0, V, (2, 16))
    a, b = model(idx, idx, z_loss=1e-3), fused(idx, idx, z_loss=1e-3)
    assert b.logits is None
    torch.testing.assert_close(a.loss, b.loss)
    a.loss.backward()
    b.loss.backward()
    torch.testing.assert_close(model.lm_head.weight.grad, fused.lm_head.weight.grad)


def test_reference_attention_matches_sdpa():
    q, k, v = (torch.randn(2, 3, 17, 16) for _ in range(3))
    out, max_logit = ref.attention(q, k, v)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    scores = (q @ k.transpose(-1, -2)) / 4.0
    scores = scores.masked_fill(~torch.ones(17, 17, dtype=torch.bool).tril(), float("-inf"))
    torch.testing.assert_close(max_logit, scores.amax((-2, -1)))


@pytest.mark.parametrize("preset", sorted(p.stem for p in (Path(__file__).parents[1] / "conf/model").glob("*.yaml")))
def test_presets_state_their_param_counts(preset, repo_root):
    """Each size preset's stated non-embedding count is what the model really has (meta device)."""
    raw = OmegaConf.load(repo_root / "conf/model" / f"{preset}.yaml")
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), raw))
    with torch.device("meta"):
        model = build_model(cfg, 512)
    stated = cfg.approx_params.split()[0]
    value = float(stated[:-1]) * (1e6 if stated.endswith("M") else 1e3)
    assert model.n_params(non_embedding=True) == pytest.approx(value, rel=0.01)
