"""The GPU paths, as far as a CPU can check them: the Triton kernels (run by the interpreter,
conftest sets TRITON_INTERPRET=1) under torch.compile with no graph break, the compile + bf16
autocast trainer path against eager fp32, and what the defaults resolve to on CUDA."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from proxy.config import ConfigError, register_configs, to_config
from proxy.model import build_model
from proxy.train import train
from proxy.train.runtime import backends, uses_cuda_graphs
from tests.train.test_trainer import ROOT, tiny_cfg


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_model(**model):
    cfg = to_config({"model": {"d_model": 32, "n_heads": 2, **model}})
    torch.manual_seed(0)
    return build_model(cfg.model, 64)


@pytest.mark.parametrize("model", [dict(attention="triton", loss_impl="triton"), dict(loss_impl="fused_linear")])
def test_the_kernels_compile_without_a_graph_break(model):
    """fullgraph=True fails on any graph break: the kernels are torch.library ops the compiled
    graph calls. aot_eager traces forward and backward (AOTAutograd) without code generation."""
    eager, compiled_model = small_model(**model), small_model(**model)
    compiled = torch.compile(compiled_model, backend="aot_eager", fullgraph=True)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 64, (2, 8), generator=gen), torch.randint(0, 64, (2, 8), generator=gen)
    y[0, :3] = -100
    ours = compiled(x, y, z_loss=1e-4, collect_stats=True)
    ref = eager(x, y, z_loss=1e-4, collect_stats=True)
    ours.loss.backward()
    ref.loss.backward()
    torch.testing.assert_close(ours.loss, ref.loss, atol=1e-6, rtol=1e-5)
    for key in ref.output_stats:
        torch.testing.assert_close(ours.output_stats[key], ref.output_stats[key], atol=1e-5, rtol=1e-5)
    for (name, p), q in zip(compiled_model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.slow
def test_compile_and_bf16_autocast_train_like_eager_fp32(tmp_path):
    """The CUDA defaults (train.compile, bf16 autocast) taken on the CPU, with inductor: they train,
    and stay within bf16's precision of the eager fp32 run."""
    common = dict(steps=6, log_every=1, eval_every=3, eval_batches=1)
    eager = train(tiny_cfg(train=dict(compile="false", dtype="fp32", **common)), tmp_path / "eager")
    fast = train(tiny_cfg(train=dict(compile="true", dtype="bf16", **common)), tmp_path / "compiled")
    assert fast["status"] == "completed"
    assert fast["backends"] == {
        "attention": "naive",
        "loss_impl": "torch",
        "dtype": "bf16",
        "compile": True,
        "compile_mode": "default",
    }
    assert fast["final_val_loss"] == pytest.approx(eager["final_val_loss"], rel=2e-3)
    assert fast["final_train_loss"] == pytest.approx(eager["final_train_loss"], rel=2e-3)


def test_the_default_config_resolves_to_the_fast_paths_on_cuda():
    GlobalHydra.instance().clear()
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = to_config(compose(config_name="config", overrides=["model=124m"]))
    triton = importlib.util.find_spec("triton") is not None
    assert backends(cfg, torch.device("cuda")) == {
        "attention": "triton" if triton else "sdpa",
        "loss_impl": "torch",
        "dtype": "bf16",
        "compile": True,
        "compile_mode": "default",
    }
    assert backends(cfg, torch.device("cpu")) == {
        "attention": "naive",
        "loss_impl": "torch",
        "dtype": "fp32",
        "compile": False,
    }
    # CUDA graphs: the mode is recorded, and how many graphs fell back to plain launches
    graphs = to_config({"model": {"name": "124m"}, "train": {"compile_mode": "reduce-overhead"}})
    assert backends(graphs, torch.device("cuda"))["compile_mode"] == "reduce-overhead"
    assert uses_cuda_graphs(graphs, torch.device("cuda")) and not uses_cuda_graphs(graphs, torch.device("cpu"))
    with pytest.raises(ConfigError, match="train.compile_mode"):
        to_config({"train": {"compile_mode": "fastest"}})
    wide = to_config({"model": {"d_model": 1024, "n_heads": 4}})  # head dim 256: beyond the kernel
    assert backends(wide, torch.device("cuda"))["attention"] == "sdpa"


def test_auto_attention_on_a_cpu_is_the_reference_and_is_recorded(tmp_path):
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randint(0, 64, (2, 8), generator=gen), torch.randint(0, 64, (2, 8), generator=gen)
    auto, naive = small_model(attention="auto"), small_model(attention="naive")
    a, b = auto(x, y, collect_stats=True), naive(x, y, collect_stats=True)
    assert torch.equal(a.loss, b.loss) and all(torch.equal(p, q) for p, q in zip(a.attn_max_logits, b.attn_max_logits))
    summary = train(tiny_cfg(train=dict(steps=2)), tmp_path / "run")
    assert summary["backends"]["attention"] == "naive"


def test_device_time_estimates_of_a_preset():
    from proxy.train.estimate import announce, estimate, job_config, sweep_jobs

    jobs = sweep_jobs(["+experiment=attention_logit_growth/gpu"])
    assert len(jobs) == 6  # model x qk_norm; the LR grid is each job's ensemble
    one = job_config(jobs[0])
    assert len(one.sweep.lrs) == 7 and len(one.sweep.seeds) == 3
    e = estimate(one, "H200")
    assert e.members == 21 and e.seconds > 0
    longer = estimate(to_config({**_as_dict(one), "train": {**_as_dict(one)["train"], "steps": 4000}}), "H200")
    assert longer.seconds > e.seconds
    # an ensemble of K small models costs less than K runs of one (the GPU is launch-bound there)
    solo = estimate(one, "H200", members=1)
    assert e.seconds < 21 * solo.seconds
    narrowed = sweep_jobs(["+experiment=attention_logit_growth/gpu", "model=5m"])
    assert {frozenset(j) for j in narrowed} == {frozenset(j) for j in jobs if "model=5m" in j}  # the command line wins
    swept = sweep_jobs(["model=tiny", "model.d_model=64,128"])  # a sweep typed on the command line
    assert sorted(j[-1] for j in swept) == ["model.d_model=128", "model.d_model=64"]
    if not torch.cuda.is_available():
        assert announce(one) is None  # nothing to announce without a GPU


def _as_dict(cfg):
    from proxy.config import as_dict

    return as_dict(cfg)
