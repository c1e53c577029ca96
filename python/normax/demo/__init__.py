"""Train a small transformer language model twice, with PyTorch's ops and with normax.torch.

    python -m normax.demo                        # 2 x 150 steps: under a minute on 2 cores
    python -m normax.demo --steps 400 --plot demo.png

Needs PyTorch (and matplotlib for ``--plot``). ``import normax`` never imports this module.

The model is a word-level decoder (2 blocks, width 64, 4 heads, context 64) trained on a short
text shipped beside this module (tiny.txt), with an LM head of 16,384 classes (``--vocab``). Both
runs start from the same seed, see the same batches and run the same optimizer; they differ only in
the ops:

- the loss: ``cross_entropy(h @ W.T, targets)`` vs ``normax.torch.linear_cross_entropy(h, W,
  targets)``, which never builds the logits;
- attention softmax: ``torch.nn.functional.softmax`` vs ``normax.torch.softmax``;
- the norms (RMSNorm before attention, LayerNorm before the MLP, a final RMSNorm): torch's
  modules vs the same modules after ``normax.torch.patch(model)``.

Why this model: the ops normax provides are a large share of a language model's step only where
the output layer is large. Real tokenizers have 32k to 256k classes, so the LM head and its
cross-entropy (a batch x vocabulary matrix of logits, its softmax and its gradient) dominate a
small model's step; that is where the fused linear cross-entropy saves time and memory. The text
uses 388 distinct words and punctuation marks; the remaining classes of the head are never targets,
but they cost their logits and gradients exactly as a real vocabulary's rare tokens do. With a
small head (``--vocab 388``, the text's own tokens) every op works on a few thousand numbers, the
step is mostly per-call host cost and short-row kernels, and torch's ops are faster.

It prints the median time per training step of each run and how closely the two loss curves agree
(they start identical to rounding and drift apart only as rounding differences compound).
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
import time
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

import normax
import normax.torch as nt


def load_text() -> str:
    return Path(__file__).with_name("tiny.txt").read_text(encoding="utf-8")


def tokenize(text: str) -> list[str]:
    """Words and punctuation marks, in order: the demo's tokens."""
    return re.findall(r"\w+|[^\w\s]", text)


class Ops(NamedTuple):
    """The ops a run trains with: attention softmax(x, dim) and the loss lm_loss(h, weight, targets)."""

    name: str
    softmax: Callable
    lm_loss: Callable


TORCH_OPS = Ops("torch", F.softmax, lambda h, weight, targets: F.cross_entropy(h @ weight.T, targets))
NORMAX_OPS = Ops("normax", nt.softmax, nt.linear_cross_entropy)


class Block(torch.nn.Module):
    def __init__(self, d: int, heads: int, ops):
        super().__init__()
        self.ops, self.heads = ops, heads
        self.norm1 = torch.nn.RMSNorm(d, eps=1e-6)
        self.qkv = torch.nn.Linear(d, 3 * d)
        self.proj = torch.nn.Linear(d, d)
        self.norm2 = torch.nn.LayerNorm(d)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(d, 4 * d), torch.nn.GELU(), torch.nn.Linear(4 * d, d))

    def forward(self, x, mask):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(d, dim=-1)
        q, k, v = (a.reshape(b, t, self.heads, d // self.heads).transpose(1, 2) for a in (q, k, v))
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(d // self.heads)
        attn = self.ops.softmax(scores.masked_fill(mask, float("-inf")), -1)
        x = x + self.proj((attn @ v).transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.norm2(x))


class TinyLM(torch.nn.Module):
    def __init__(self, vocab: int, ops, d: int = 64, heads: int = 4, layers: int = 2, context: int = 64):
        super().__init__()
        self.ops = ops
        self.tok = torch.nn.Embedding(vocab, d)
        self.pos = torch.nn.Parameter(torch.randn(context, d) * 0.02)
        self.blocks = torch.nn.ModuleList(Block(d, heads, ops) for _ in range(layers))
        self.norm = torch.nn.RMSNorm(d, eps=1e-6)
        self.head = torch.nn.Linear(d, vocab, bias=False)
        self.register_buffer("mask", torch.ones(context, context, dtype=torch.bool).triu(1), persistent=False)

    def forward(self, idx, targets):
        t = idx.shape[1]
        x = self.tok(idx) + self.pos[:t]
        for block in self.blocks:
            x = block(x, self.mask[:t, :t])
        h = self.norm(x)
        return self.ops.lm_loss(h.reshape(-1, h.shape[-1]), self.head.weight, targets.reshape(-1))


def train(ops, data: torch.Tensor, vocab: int, *, steps: int, seed: int, batch: int, context: int):
    """(losses, seconds per step) of one training run."""
    torch.manual_seed(seed)
    model = TinyLM(vocab, ops, context=context)
    if ops is NORMAX_OPS:
        swapped = nt.patch(model)
        assert swapped == 5, swapped  # 2 x (RMSNorm, LayerNorm) + the final RMSNorm
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    losses, times = [], []
    for _ in range(steps):
        starts = torch.randint(0, len(data) - context - 1, (batch,), generator=gen)
        idx = torch.stack([data[s : s + context] for s in starts])
        targets = torch.stack([data[s + 1 : s + context + 1] for s in starts])
        t0 = time.perf_counter()
        loss = model(idx, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
    return losses, times


def plot(path: str, results: dict, vocab: int) -> None:
    """Two panels: both loss curves, and both runs' time per step (median in the legend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, time_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for name, (losses, times) in results.items():
        style = {"linewidth": 1.2, "linestyle": "-" if name == "torch" else "--"}
        loss_ax.plot(range(1, len(losses) + 1), losses, label=name, **style)
        ms = [t * 1e3 for t in times]
        time_ax.plot(
            range(1, len(ms) + 1), ms, label=f"{name} (median {_median_step(times) * 1e3:.1f} ms)", **style
        )
    loss_ax.set_xlabel("step")
    loss_ax.set_ylabel("training loss (nats per token)")
    loss_ax.set_title("loss curves (same seed, same batches)")
    time_ax.set_xlabel("step")
    time_ax.set_ylabel("time per training step (ms)")
    time_ax.set_ylim(bottom=0)
    time_ax.set_title("per-step time (forward + backward + AdamW)")
    for ax in (loss_ax, time_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"Small transformer LM, {vocab} classes in its head: PyTorch ops vs normax.torch")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _median_step(times: list) -> float:
    # The first step pays one-time costs (thread pools, allocator, lazy init): left out.
    return statistics.median(times[1:] if len(times) > 1 else times)


def make_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m normax.demo``."""
    parser = argparse.ArgumentParser(
        prog="python -m normax.demo",
        description="Train a tiny transformer LM twice from one seed, with torch's ops and with "
        "normax.torch, and compare per-step times and loss curves.",
    )
    parser.add_argument("--steps", type=int, default=150, help="training steps per run (default 150)")
    parser.add_argument(
        "--vocab",
        type=int,
        default=16384,
        help="classes of the model's LM head (default 16384; at least the text's 388 distinct tokens)",
    )
    parser.add_argument("--batch", type=int, default=16, help="sequences per batch (default 16)")
    parser.add_argument(
        "--context", type=int, default=64, help="tokens per sequence (the model's context; default 64)"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the weights and the batches, shared by both runs (default 0)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="threads for both torch and normax (default: each library's own default; on a busy "
        "machine 1 avoids thread-pool contention that makes per-step times meaningless)",
    )
    parser.add_argument(
        "--plot", metavar="FILE.png", help="draw both loss curves and the per-step times (needs matplotlib)"
    )
    return parser


def main(argv=None) -> dict:
    """Runs the demo with command-line arguments `argv`; returns both loss curves and step times."""
    parser = make_parser()
    args = parser.parse_args(argv)
    tokens = tokenize(load_text())
    if not 1 <= args.context < len(tokens) - 1:
        parser.error(
            f"--context must be between 1 and {len(tokens) - 2} (the text's tokens), got {args.context}"
        )
    words = sorted(set(tokens))
    if args.vocab < len(words):
        parser.error(f"--vocab must be at least {len(words)} (the text's distinct tokens), got {args.vocab}")
    for name in ("steps", "batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")

    if args.threads:
        torch.set_num_threads(args.threads)
        normax.set_num_threads(args.threads)
    ids = {w: i for i, w in enumerate(words)}
    data = torch.tensor([ids[w] for w in tokens], dtype=torch.long)
    print(
        f"text: {len(tokens)} tokens, {len(words)} distinct; LM head of {args.vocab} classes; "
        f"{args.steps} steps of {args.batch} x "
        f"{args.context} tokens; torch threads {torch.get_num_threads()}, normax threads {normax.get_num_threads()}"
    )
    results = {}
    for ops in (TORCH_OPS, NORMAX_OPS):
        losses, times = train(
            ops, data, args.vocab, steps=args.steps, seed=args.seed, batch=args.batch, context=args.context
        )
        results[ops.name] = (losses, times)
        med = _median_step(times)
        print(f"{ops.name:7s} loss {losses[0]:.4f} -> {losses[-1]:.4f}, median step {med * 1e3:.1f} ms")
    (lt, tt), (ln, tn) = results["torch"], results["normax"]
    diffs = [abs(a - b) for a, b in zip(lt, ln)]
    mt, mn = _median_step(tt), _median_step(tn)
    print(f"per-step time: torch {mt * 1e3:.1f} ms, normax {mn * 1e3:.1f} ms (normax speedup {mt / mn:.2f}x)")
    first10 = max(diffs[:10])
    print(
        f"loss curves: max |difference| {max(diffs):.2e} over all steps, {first10:.2e} over the first 10; "
        f"final losses {lt[-1]:.4f} (torch) vs {ln[-1]:.4f} (normax)"
    )
    if args.plot:
        plot(args.plot, results, args.vocab)
        print(f"plot written to {args.plot}")
    return {"torch": lt, "normax": ln, "torch_step_s": mt, "normax_step_s": mn}
