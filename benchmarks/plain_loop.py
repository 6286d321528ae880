"""proxy's training step against a plain nanoGPT-style loop at the same shape, side by side.

    python -m benchmarks.plain_loop [--model tiny] [--rounds 5] [--steps 40] [--threads 1] [--out FILE]

The plain loop is the least a training step can do: the same architecture (pre-LN without bias,
RoPE, a 4x GELU MLP, untied head, the same parameter count), the same batches from proxy's data
source, torch.optim.AdamW (foreach), ``clip_grad_norm_`` and ``zero_grad``, the loss read back
only every ``log_every`` steps. Each with ``naive`` attention (masked softmax: proxy's CPU default,
``model.attention=auto``, which reports the max logit every step) and ``sdpa``
(F.scaled_dot_product_attention; proxy's ``model.attention=sdpa``). proxy runs through
``Trainer.train_step`` on non-logging steps, with everything a run has (the divergence rule on
the device, per-member LRs, its own AdamW). Rounds interleave the four, so drift in the
machine's load falls on all of them; the table gives the median tokens/s and proxy's ratio to
the plain loop with the same attention. Timings belong here, never in pass/fail tests.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.trainer_speed import config_for as trainer_config
from proxy.config import Config
from proxy.data import build_source
from proxy.records import atomic_write_text
from proxy.train import RunInfo, Trainer

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# The plain model: what proxy's GPT computes on a non-logging step, nothing else
# --------------------------------------------------------------------------------------------
def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class PlainBlock(nn.Module):
    def __init__(self, d: int, heads: int, sdpa: bool):
        super().__init__()
        self.heads, self.sdpa = heads, sdpa
        self.ln1, self.ln2 = nn.LayerNorm(d, bias=False), nn.LayerNorm(d, bias=False)
        self.qkv, self.proj = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        self.fc_in, self.fc_out = nn.Linear(d, 4 * d, bias=False), nn.Linear(4 * d, d, bias=False)

    def attend(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        if self.sdpa:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
            mask = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
            out = scores.masked_fill(mask, float("-inf")).softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, t, d))

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x = x + self.attend(self.ln1(x), cos, sin)
        return x + self.fc_out(F.gelu(self.fc_in(self.ln2(x))))


class PlainGPT(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, heads: int, max_len: int, sdpa: bool):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(PlainBlock(d, heads, sdpa) for _ in range(layers))
        self.ln_f, self.head = nn.LayerNorm(d, bias=False), nn.Linear(d, vocab, bias=False)
        half = d // heads // 2
        angles = torch.outer(torch.arange(max_len).float(), 1.0 / 10000 ** (torch.arange(half).float() / half))
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)
        for p in self.parameters():
            if p.ndim == 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        t = x.shape[1]
        cos, sin = self.cos[:t], self.sin[:t]
        h = self.embed(x)
        for block in self.blocks:
            h = block(h, cos, sin)
        logits = self.head(self.ln_f(h))
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), y.view(-1))


def plain_step(cfg: Config, sdpa: bool) -> tuple[Callable[[int], None], int]:
    """One plain training step per call (the batch at the position given); its parameter count."""
    source = build_source(cfg.data)
    m = cfg.model
    model = PlainGPT(source.vocab_size, m.d_model, m.n_layers, m.n_heads, cfg.train.seq_len, sdpa)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps, foreach=True
    )
    t = cfg.train

    def step(i: int) -> None:
        x, y = source.batch("train", i, t.batch_size, t.seq_len)
        loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i % t.log_every == 0:
            loss.item()

    return step, sum(p.numel() for p in model.parameters())


def proxy_step(cfg: Config, run_dir: Path) -> tuple[Callable[[int], None], int, Trainer]:
    trainer = Trainer(cfg, RunInfo(run_dir, "bench"))
    trainer.members[0].loss_at_init = 10.0  # as after the first eval: the divergence rule is on

    def step(i: int) -> None:
        trainer.train_step(i, logging_step=False)

    return step, trainer.model.n_params(), trainer


def config_for(model: str, batch: int, seq_len: int, attention: str = "naive") -> Config:
    """benchmarks/trainer_speed.py's config, eager on the CPU, with this attention."""
    return trainer_config(model, False, batch, seq_len, "cpu", attention)


def timed(step: Callable[[int], None], start: int, steps: int, tokens_per_step: int) -> float:
    begin = time.perf_counter()
    for i in range(start, start + steps):
        step(i)
    return steps * tokens_per_step / (time.perf_counter() - begin)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="write FILE.json and FILE.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = config_for(args.model, args.batch_size, args.seq_len)
    tokens = args.batch_size * args.seq_len
    load_before = os.getloadavg()
    rates: dict[str, list[float]] = {name: [] for name in ("proxy naive", "plain naive", "proxy sdpa", "plain sdpa")}
    with tempfile.TemporaryDirectory() as tmp:
        ours, n_ours, trainer = proxy_step(cfg, Path(tmp) / "naive")
        ours_sdpa, _, trainer_sdpa = proxy_step(
            config_for(args.model, args.batch_size, args.seq_len, "sdpa"), Path(tmp) / "sdpa"
        )
        naive, n_naive = plain_step(cfg, sdpa=False)
        sdpa, _ = plain_step(cfg, sdpa=True)
        steps = {"proxy naive": ours, "plain naive": naive, "proxy sdpa": ours_sdpa, "plain sdpa": sdpa}
        position = 0
        for step in steps.values():
            for i in range(args.warmup):
                step(position + i)
        position += args.warmup
        for r in range(args.rounds):
            for name, step in steps.items():
                rates[name].append(timed(step, position, args.steps, tokens))
            position += args.steps
            print(f"round {r + 1}: " + "  ".join(f"{n} {v[-1]:,.0f}" for n, v in rates.items()), flush=True)
        trainer.ledger.release()
        trainer_sdpa.ledger.release()
    median = {name: statistics.median(values) for name, values in rates.items()}
    ratios = {f"proxy / plain, {a} attention": median[f"proxy {a}"] / median[f"plain {a}"] for a in ("naive", "sdpa")}
    result = {
        "date": date.today().isoformat(),
        "device": "cpu",
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": args.threads,
        "model": args.model,
        "params": {"proxy": n_ours, "plain": n_naive},
        "shape": {"batch_size": args.batch_size, "seq_len": args.seq_len},
        "load_average_1m": {"before": load_before[0], "after": os.getloadavg()[0]},
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "tokens_per_s": rates,
        "median_tokens_per_s": median,
        "ratios": ratios,
    }
    lines = [
        f"# proxy against a plain loop: {args.model}, {args.batch_size}x{args.seq_len} tokens, "
        f"{args.threads} thread(s), torch {torch.__version__}, {result['date']}",
        "",
        f"Parameters: proxy {n_ours:,}, plain {n_naive:,}. Median of {args.rounds} interleaved rounds of "
        f"{args.steps} non-logging steps; load average {load_before[0]:.2f} before, "
        f"{result['load_average_1m']['after']:.2f} after (2 shared cores).",
        "",
        "| loop | tokens/s (median) | rounds |",
        "|---|---:|---|",
        *(f"| {n} | {median[n]:,.0f} | {', '.join(f'{v:,.0f}' for v in rates[n])} |" for n in rates),
        "",
        *(f"- {k}: **{v:.2f}x**" for k, v in ratios.items()),
    ]
    print("\n".join(lines))
    if args.out:
        out = Path(args.out)
        atomic_write_text(out.with_suffix(".json"), json.dumps(result, indent=2) + "\n")
        atomic_write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
