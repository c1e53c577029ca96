"""Train a small transformer language model twice, with PyTorch's ops and with normax.torch.

    python examples/demo.py                      # 2 x 300 steps: well under a minute on 2 cores
    python examples/demo.py --steps 400 --plot curves.png

The model is a character-level decoder (2 blocks, width 64, 4 heads, context 64) trained on a
short text beside this file (tiny.txt). Both runs start from the same seed, see the same batches and
run the same optimizer; they differ only in the ops:

- attention softmax: ``torch.nn.functional.softmax`` vs ``normax.torch.softmax``;
- the norms (RMSNorm before attention, LayerNorm before the MLP, a final RMSNorm): torch's
  modules vs the same modules after ``normax.torch.patch(model)``;
- the loss: ``cross_entropy(h @ W.T, targets)`` vs ``normax.torch.linear_cross_entropy(h, W,
  targets)``, which never builds the logits.

It prints the median time per training step of each run and how closely the two loss curves agree
(they start identical to rounding and drift apart only as rounding differences compound).
"""

from __future__ import annotations

import argparse
import math
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


def plot(path: str, curves: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, losses in curves.items():
        ax.plot(losses, label=name, linewidth=1.2, linestyle="-" if name == "torch" else "--")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats per character)")
    ax.set_title("Tiny transformer LM: PyTorch ops vs normax.torch (same seed)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description="Train a tiny transformer LM with torch's ops and with normax.torch."
    )
    parser.add_argument("--steps", type=int, default=300, help="training steps per run (default 300)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        help="threads for both torch and normax (default: each library's own default; on a busy "
        "machine 1 avoids thread-pool contention that makes per-step times meaningless)",
    )
    parser.add_argument("--plot", metavar="FILE.png", help="draw both loss curves (needs matplotlib)")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
        normax.set_num_threads(args.threads)
    text = load_text()
    chars = sorted(set(text))
    data = torch.tensor([chars.index(c) for c in text], dtype=torch.long)
    print(
        f"text: {len(text)} characters, vocabulary {len(chars)}; {args.steps} steps of {args.batch} x "
        f"{args.context} tokens; torch threads {torch.get_num_threads()}, normax threads {normax.get_num_threads()}"
    )
    results = {}
    for ops in (TORCH_OPS, NORMAX_OPS):
        losses, times = train(
            ops, data, len(chars), steps=args.steps, seed=args.seed, batch=args.batch, context=args.context
        )
        results[ops.name] = (losses, times)
        med = statistics.median(times[1:] if len(times) > 1 else times)
        print(f"{ops.name:7s} loss {losses[0]:.4f} -> {losses[-1]:.4f}, median step {med * 1e3:.1f} ms")
    (lt, tt), (ln, tn) = results["torch"], results["normax"]
    diffs = [abs(a - b) for a, b in zip(lt, ln)]
    mt = statistics.median(tt[1:] if len(tt) > 1 else tt)
    mn = statistics.median(tn[1:] if len(tn) > 1 else tn)
    print(f"per-step time: torch {mt * 1e3:.1f} ms, normax {mn * 1e3:.1f} ms (normax speedup {mt / mn:.2f}x)")
    first10 = max(diffs[:10])
    print(
        f"loss curves: max |difference| {max(diffs):.2e} over all steps, {first10:.2e} over the first 10; "
        f"final losses {lt[-1]:.4f} (torch) vs {ln[-1]:.4f} (normax)"
    )
    if args.plot:
        plot(args.plot, {"torch": lt, "normax": ln})
        print(f"plot written to {args.plot}")
    return {"torch": lt, "normax": ln, "torch_step_s": mt, "normax_step_s": mn}


if __name__ == "__main__":
    main()
