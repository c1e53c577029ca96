"""One rank of the vocabulary-parallel linear tests: ``python _linear_worker.py RANK WORLD PORT OUTDIR``.

normax.torch.vocab_parallel_linear_cross_entropy under every logits budget (kept logits, none kept,
the default's free-memory rule with an injected free-memory query) and
normax.torch.vocab_parallel_linear_logprobs, each against explicit float64 torch on the whole
vocabulary. As _worker.py: every rank builds the same problem from the same seed and runs its shard;
failures are collected, not raised, so every rank finishes every collective; the results' bits go
to OUTDIR/rank{R}.json for the parent to compare across ranks.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import sys
import traceback

import normax.torch as nt
import torch
import torch.distributed as dist
import torch.nn.functional as F
from normax.torch import _vocab_parallel_linear as vpl

RANK, WORLD, PORT, OUTDIR = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
FAILURES: list[str] = []
RESULTS: dict[str, list[int]] = {}
CALLS: list[str] = []


def _count(name, fn):
    def wrapped(*args, **kwargs):
        CALLS.append(name)
        return fn(*args, **kwargs)

    return wrapped


for _name in ("all_gather_into_tensor", "all_gather", "all_reduce", "broadcast", "barrier", "reduce"):
    setattr(dist, _name, _count(_name, getattr(dist, _name)))


def check(ok: bool, what: str) -> None:
    if not ok:
        FAILURES.append(f"rank {RANK}: {what}")


def close(a: torch.Tensor, b: torch.Tensor, rtol: float, what: str) -> None:
    """max |a - b| <= rtol * max |b| over the finite entries; the same NaN and inf patterns."""
    a, b = a.detach().double(), b.detach().double()
    if a.shape != b.shape:
        return check(False, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}")
    fin = torch.isfinite(b)
    if not torch.equal(torch.isfinite(a), fin) or not torch.equal(a[~fin].nan_to_num(), b[~fin].nan_to_num()):
        return check(False, f"{what}: non-finite pattern differs")
    scale = b[fin].abs().max().item() if fin.any() else 0.0
    err = (a - b)[fin].abs().max().item() if fin.any() else 0.0
    check(err <= rtol * max(scale, 1e-30), f"{what}: max error {err:.3g} vs scale {scale:.3g}")


def record(name: str, *tensors) -> None:
    RESULTS[name] = [int(v) for t in tensors for v in t.detach().double().reshape(-1).view(torch.int64)]


def splits(v: int, uneven: bool) -> list[int]:
    if not uneven:
        return [v // WORLD] * WORLD
    sizes = [max(1, v // WORLD - WORLD + 1 + 2 * k) for k in range(WORLD)]
    sizes[-1] += v - sum(sizes)
    return sizes


def problem(seed, n, h, v, dtype, bias):
    g = torch.Generator().manual_seed(seed)
    hid = torch.randn(n, h, generator=g, dtype=torch.float64).to(dtype)
    w = torch.randn(v, h, generator=g, dtype=torch.float64).to(dtype)
    b = torch.randn(v, generator=g, dtype=torch.float64).to(dtype) if bias else None
    t = torch.randint(0, v, (n,), generator=g)
    t[0], t[1] = v - 1, -100  # a class on the last rank, an ignored row
    return hid, w, b, t


def shard(v, uneven):
    sizes = splits(v, uneven)
    start = sum(sizes[:RANK])
    return start, sizes[RANK]


# -- The linear cross-entropy under each budget: the same loss and gradients whatever is kept.

BUDGETS = [
    ("default", None, True),  # tiny logits: the default budget keeps them
    ("zero", 0, False),
    ("one byte", 1, False),  # smaller than the logits: nothing kept
    ("exact", "exact", True),  # exactly the logits' bytes
]


def run_budget_case(dtype, uneven, budget_name, budget, kept_expected, opts):
    n, h, v = 13, 8, 37 if uneven else 36  # 36: an equal split for every world size tested
    hid, w, b, t = problem(7, n, h, v, dtype, opts.get("bias", False))
    start, length = shard(v, uneven)
    if budget == "exact":
        budget = n * length * (8 if dtype == torch.float64 else 4)
    hf, wf = hid.clone().double().requires_grad_(True), w.clone().double().requires_grad_(True)
    bf = None if b is None else b.clone().double().requires_grad_(True)
    kw = {k: opts[k] for k in ("reduction", "label_smoothing", "z_loss", "softcap") if k in opts}
    ref = nt.cross_entropy(F.linear(hf, wf, bf), t, **kw)  # float64 throughout
    hs = hid.clone().requires_grad_(True)
    ws = w[start : start + length].clone().requires_grad_(True)
    bs = None if b is None else b[start : start + length].clone().requires_grad_(True)
    name = f"ce-{dtype}-{'uneven' if uneven else 'even'}-{budget_name}-{sorted(opts)}"
    del CALLS[:]
    loss = nt.vocab_parallel_linear_cross_entropy(
        hs, ws, t, bias_shard=bs, vocab_start=start if uneven else None, logits_budget=budget,
        chunk_size=opts.get("chunk_size"), **kw,
    )  # fmt: skip
    check(CALLS == ["all_gather_into_tensor"], f"{name}: forward collectives {CALLS}")
    kept = loss.grad_fn.kept  # what the backward will take instead of recomputing
    check(bool(kept) == kept_expected, f"{name}: kept logits {bool(kept)}, expected {kept_expected}")
    if kept:
        check(tuple(kept[0].shape) == (n, length), f"{name}: kept shape {tuple(kept[0].shape)}")
    rtol = 1e-12 if dtype == torch.float64 else 3e-6
    close(loss, ref, rtol, f"{name}: loss")
    gout = torch.rand(loss.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 0.5
    inputs = [hf, wf] + ([bf] if bf is not None else [])
    grefs = torch.autograd.grad(ref, inputs, gout)
    del CALLS[:]
    grads = torch.autograd.grad(loss, [hs, ws] + ([bs] if bs is not None else []), gout.to(dtype))
    check(CALLS == ["all_reduce"], f"{name}: backward collectives {CALLS}")
    # Sums over H and the vocabulary of float32 products: a few roundings of the largest terms.
    grtol = 1e-11 if dtype == torch.float64 else 2e-5
    close(grads[0], grefs[0], grtol, f"{name}: dhidden")
    close(grads[1], grefs[1][start : start + length], grtol, f"{name}: dweight")
    if bs is not None:
        close(grads[2], grefs[2][start : start + length], grtol, f"{name}: dbias")
    record(name, loss)


def injected_free_memory_case():
    """logits_budget=None keeps the logits exactly when they fit a quarter of the free memory
    (the injected query's answer) and 1 GiB."""
    n, h, v = 10, 4, 6 * WORLD
    hid, w, _, t = problem(11, n, h, v, torch.float32, False)
    need = n * (v // WORLD) * 4
    real = vpl.free_memory
    try:
        for free, expected in ((4 * need, True), (4 * need - 4, False), (1 << 40, True)):
            vpl.free_memory = lambda device, free=free: free
            ws = w[RANK * (v // WORLD) : (RANK + 1) * (v // WORLD)]
            loss = nt.vocab_parallel_linear_cross_entropy(hid.requires_grad_(True), ws, t)
            kept = bool(loss.grad_fn.kept)
            check(kept == expected, f"free memory {free}: kept {kept}, expected {expected}")
            loss.backward()
        # Above the 1 GiB cap nothing is kept, however much memory is free.
        check(not vpl.keeps_logits(None, 1 << 15, (1 << 15) + 1, 1, torch.device("cpu")), "1 GiB cap")
        check(vpl.keeps_logits(None, 1 << 15, 1 << 15, 1, torch.device("cpu")), "1 GiB fits the cap")
    finally:
        vpl.free_memory = real


# -- Temperature and token weights on both cross-entropies.

WEIGHTED_OPTIONS = [
    {"temperature": 0.7},
    {"token_weight": True},
    {"temperature": 1.6, "token_weight": True, "reduction": "sum", "label_smoothing": 0.1},
    {"temperature": 0.5, "token_weight": True, "reduction": "none", "use_weight": True, "z_loss": 1e-3},
    {"token_weight": True, "use_weight": True, "softcap": 3.0, "temperature": 2.0},
    {"token_weight": "zero"},  # every weight 0: the mean is 0 / 0, NaN
]


def reference_weighted(logits, t, temperature, tw, cw, opts):
    """float64: the rows' losses of logits / T (as nt.cross_entropy takes them) times the token
    weights, reduced; "mean" over the sum of token weight x class weight of the rows kept."""
    opts = dict(opts)
    reduction = opts.pop("reduction", "mean")
    if tw is None:
        return nt.cross_entropy(logits / temperature, t, weight=cw, reduction=reduction, **opts)
    rows = nt.cross_entropy(logits / temperature, t, weight=cw, reduction="none", **opts)
    weighted = rows * tw
    if reduction == "none":
        return weighted
    kept = t != -100
    wy = torch.ones_like(tw) if cw is None else cw[t.clamp(min=0)]
    denom = (tw * wy * kept).sum()
    return weighted.sum() / denom if reduction == "mean" else weighted.sum()


def run_weighted_case(i, kind, dtype, uneven):
    opts = dict(WEIGHTED_OPTIONS[i])
    n, h, v = 10, 8, 37 if uneven else 36
    hid, w, b, t = problem(200 + i, n, h, v, dtype, kind != "logits")
    g = torch.Generator().manual_seed(300 + i)
    cw = torch.rand(v, generator=g, dtype=torch.float64) + 0.5 if opts.pop("use_weight", False) else None
    tw = opts.pop("token_weight", None)
    if tw is not None:
        tw = torch.zeros(n, dtype=torch.float64) if tw == "zero" else torch.rand(n, generator=g, dtype=torch.float64) * 2
    temperature = opts.pop("temperature", 1.0)
    start, length = shard(v, uneven)
    name = f"weighted-{kind}-{i}-{dtype}-{'uneven' if uneven else 'even'}"
    rtol = 1e-12 if dtype == torch.float64 else 3e-6
    grtol = 1e-11 if dtype == torch.float64 else 2e-5
    common = {"vocab_start": start if uneven else None, "temperature": temperature, **opts}
    common["weight"] = None if cw is None else cw.to(dtype)
    common["token_weight"] = None if tw is None else tw.to(dtype)
    if kind == "logits":
        xf = F.linear(hid.double(), w.double(), b).detach().requires_grad_(True)
        ref = reference_weighted(xf, t, temperature, tw, cw, opts)
        xs = xf.detach()[:, start : start + length].to(dtype).requires_grad_(True)
        loss = nt.vocab_parallel_cross_entropy(xs, t, **common)
        ref_inputs, inputs, parts = [xf], [xs], [slice(start, start + length)]
    else:
        hf, wf, bf = (a.clone().double().requires_grad_(True) for a in (hid, w, b))
        ref = reference_weighted(F.linear(hf, wf, bf), t, temperature, tw, cw, opts)
        hs = hid.clone().requires_grad_(True)
        ws = w[start : start + length].clone().requires_grad_(True)
        bs = b[start : start + length].clone().requires_grad_(True)
        budget = 0 if kind == "linear-recompute" else None
        loss = nt.vocab_parallel_linear_cross_entropy(hs, ws, t, bias_shard=bs, logits_budget=budget, **common)
        check(bool(loss.grad_fn.kept) == (budget is None), f"{name}: kept {bool(loss.grad_fn.kept)}")
        ref_inputs, inputs = [hf, wf, bf], [hs, ws, bs]
        parts = [slice(None), slice(start, start + length), slice(start, start + length)]
    close(loss, ref, rtol, f"{name}: loss")
    record(name, loss)
    if torch.isnan(ref).all():
        return
    gout = torch.rand(loss.shape, generator=g, dtype=torch.float64) + 0.5
    grefs = torch.autograd.grad(ref, ref_inputs, gout)
    grads = torch.autograd.grad(loss, inputs, gout.to(dtype))
    for k, (gs, gr, part) in enumerate(zip(grads, grefs, parts)):
        close(gs, gr[:, part] if kind == "logits" else gr[part], grtol, f"{name}: grad {k}")


def weighted_errors():
    n, v = 6, 4 * WORLD
    g = torch.Generator().manual_seed(17)  # the same problem on every rank
    x = torch.randn(n, v, generator=g)
    t = torch.randint(0, v, (n,), generator=g)
    xs = x[:, RANK * 4 : RANK * 4 + 4]
    vpce = nt.vocab_parallel_cross_entropy
    expect_error(
        "token_weight requires grad",
        lambda: vpce(xs, t, token_weight=torch.ones(n, requires_grad=True)),
        "RuntimeError",
        ["the derivative for 'token_weight' is not implemented."],
    )
    with torch.no_grad():
        vpce(xs, t, token_weight=torch.ones(n, requires_grad=True))  # no grad mode: taken as a constant
    tw = torch.ones(n - 1 if RANK == 0 else n)
    words = ["token_weight", "shape"] if RANK == 0 else ["rank(s)", "rejected"]
    expect_error("token_weight shape", lambda: vpce(xs, t, token_weight=tw), "ValueError", words)
    if WORLD > 1:
        tw2 = torch.ones(n)
        tw2[2] += RANK
        expect_error("token_weight values", lambda: vpce(xs, t, token_weight=tw2), "ValueError", ["disagree"])
        temp = 1.0 + RANK
        expect_error("temperatures", lambda: vpce(xs, t, temperature=temp), "ValueError", ["disagree"])
        expect_error(
            "lp temperatures",
            lambda: nt.vocab_parallel_linear_logprobs(torch.randn(n, 3), torch.randn(4, 3), t, temperature=temp),
            "ValueError",
            ["disagree"],
        )
    for bad in (0.0, -2.0, math.nan):
        expect_error(f"temperature {bad}", lambda bad=bad: vpce(xs, t, temperature=bad), "ValueError", ["temperature"])


# -- The log-probs and entropy.


def reference_logprobs(hf, wf, bf, t, temperature):
    """float64 (logprob, entropy), ignored rows 0, p = 0 terms 0 (also for -inf logits)."""
    z = F.linear(hf, wf, bf) / temperature
    ls = z.log_softmax(-1)
    p = ls.exp()
    keep = t != -100
    logp = ls.gather(1, t.clamp(min=0)[:, None]).squeeze(1)
    ent = -(p * torch.where(p > 0, ls, torch.zeros_like(ls))).sum(-1)
    return torch.where(keep, logp, 0.0), torch.where(keep, ent, 0.0)


LOGPROB_CASES = [
    {},
    {"temperature": 0.7, "bias": True},
    {"temperature": 1.9, "budget": 0, "chunk_size": 40},
    {"budget": 0, "chunk_size": 1, "bias": True},
    {"budget": 1},
    {"neg_inf_bias": True, "temperature": 1.3},
    {"first_shard_neg_inf": True, "budget": 0},
]


def run_logprob_case(i, case, dtype, uneven):
    case = dict(case)
    n, h, v = 12, 8, 29 if uneven else 24
    bias = case.pop("bias", False) or "neg_inf_bias" in case or "first_shard_neg_inf" in case
    hid, w, b, t = problem(50 + i, n, h, v, dtype, bias)
    start, length = shard(v, uneven)
    if case.pop("neg_inf_bias", False):
        b[3:6] = -math.inf  # some -inf logits (no target among them)
        t[(t >= 3) & (t < 6)] = 7
    if case.pop("first_shard_neg_inf", False):
        first = splits(v, uneven)[0] if WORLD > 1 else v // 2
        b[:first] = -math.inf  # the first rank's every logit is -inf (one rank: half the classes)
        t[(t >= 0) & (t < first)] = v - 2
    temperature = case.pop("temperature", 1.0)
    budget = case.pop("budget", None)
    chunk = case.pop("chunk_size", None)
    hf, wf = hid.clone().double().requires_grad_(True), w.clone().double().requires_grad_(True)
    bf = None if b is None else b.clone().double().requires_grad_(True)
    ref_lp, ref_h = reference_logprobs(hf, wf, bf, t, temperature)
    name = f"logprobs-{i}-{dtype}-{'uneven' if uneven else 'even'}"
    hs = hid.clone().requires_grad_(True)
    ws = w[start : start + length].clone().requires_grad_(True)
    bs = None if b is None else b[start : start + length].clone().requires_grad_(True)
    shard_inputs = [hs, ws] + ([bs] if bs is not None else [])
    ref_inputs = [hf, wf] + ([bf] if bf is not None else [])
    kw = {"bias_shard": bs, "vocab_start": start if uneven else None, "temperature": temperature,
          "chunk_size": chunk, "logits_budget": budget}  # fmt: skip
    rtol = 1e-12 if dtype == torch.float64 else 2e-6
    grtol = 1e-11 if dtype == torch.float64 else 2e-5
    g = torch.Generator().manual_seed(i)
    g_lp, g_h = torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)
    for which in ("both", "logprob", "entropy"):
        del CALLS[:]
        lp, ent = nt.vocab_parallel_linear_logprobs(hs, ws, t, **kw)
        check(CALLS == ["all_gather_into_tensor"], f"{name}: forward collectives {CALLS}")
        check(lp.dtype == dtype and ent.dtype == dtype, f"{name}: dtypes {lp.dtype}, {ent.dtype}")
        close(lp, ref_lp, rtol, f"{name}: logprob")
        close(ent, ref_h, rtol, f"{name}: entropy")
        if which == "both":
            record(name, lp, ent)
            out, ref, gouts = (lp, ent), (ref_lp, ref_h), (g_lp, g_h)
        elif which == "logprob":
            out, ref, gouts = (lp,), (ref_lp,), (g_lp,)  # entropy unused: no gradient flows into it
        else:
            out, ref, gouts = (ent,), (ref_h,), (g_h,)
        grefs = torch.autograd.grad(ref, ref_inputs, gouts, retain_graph=True)
        del CALLS[:]
        grads = torch.autograd.grad(out, shard_inputs, [x.to(dtype) for x in gouts])
        check(CALLS == ["all_reduce"], f"{name}/{which}: backward collectives {CALLS}")
        close(grads[0], grefs[0], grtol, f"{name}/{which}: dhidden")
        close(grads[1], grefs[1][start : start + length], grtol, f"{name}/{which}: dweight")
        if bs is not None:
            close(grads[2], grefs[2][start : start + length], grtol, f"{name}/{which}: dbias")
    alone = nt.vocab_parallel_linear_logprobs(hs, ws, t, return_entropy=False, **kw)
    check(torch.equal(alone, lp), f"{name}: return_entropy=False must give the same logprob")


def expect_error(name, fn, kind, words):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the test records whichever exception each rank raised
        ok = type(e).__name__ == kind and all(w in str(e) for w in words)
        check(ok, f"{name}: raised {type(e).__name__}: {e}")
        return
    check(False, f"{name}: no error")


def bad_inputs():
    n, h, v = 8, 4, 4 * WORLD
    hid, w, _, t = problem(3, n, h, v, torch.float32, False)
    ws = w[RANK * 4 : RANK * 4 + 4]
    lp, lce = nt.vocab_parallel_linear_logprobs, nt.vocab_parallel_linear_cross_entropy
    for bad, kind in ((-1, "ValueError"), (1.5, "TypeError"), (True, "TypeError"), ("1", "TypeError")):
        expect_error(f"budget {bad!r}", lambda bad=bad: lce(hid, ws, t, logits_budget=bad), kind, ["logits_budget"])
        expect_error(f"lp budget {bad!r}", lambda bad=bad: lp(hid, ws, t, logits_budget=bad), kind, ["logits_budget"])
    for bad, kind in ((0.0, "ValueError"), (-1.0, "ValueError"), (math.inf, "ValueError"), ("x", "TypeError")):
        expect_error(f"temperature {bad!r}", lambda bad=bad: lp(hid, ws, t, temperature=bad), kind, ["temperature"])
    t3 = t.clone()
    t3[2] = v + 5
    expect_error("class out of range", lambda: lp(hid, ws, t3), "IndexError", [str(v + 5), "position 2"])
    rows = n - 1 if RANK == WORLD - 1 else n
    if WORLD > 1:
        expect_error(
            "row counts", lambda: lp(hid[:rows], ws, t[:rows]), "ValueError", ["disagree", "number of rows"]
        )
        t4 = t.clone()
        t4[3] = (t4[3] + RANK) % v
        expect_error("target values", lambda: lp(hid, ws, t4), "ValueError", ["disagree"])
    # The group still works after all that.
    lp_ok, _ = lp(hid, ws, t)
    ref, _ = reference_logprobs(hid.double(), w.double(), None, t, 1.0)
    close(lp_ok, ref, 2e-6, "after errors")


def main():
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(PORT))
    dist.init_process_group("gloo", rank=RANK, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    for dtype in (torch.float32, torch.float64):
        for uneven in (False, True):
            for budget_name, budget, kept in BUDGETS:
                for opts in ({}, {"bias": True, "reduction": "none", "label_smoothing": 0.1},
                             {"reduction": "sum", "z_loss": 1e-3, "softcap": 3.0, "chunk_size": 30}):  # fmt: skip
                    run_budget_case(dtype, uneven, budget_name, budget, kept, opts)
            for i, case in enumerate(LOGPROB_CASES):
                run_logprob_case(i, case, dtype, uneven)
    for kind in ("logits", "linear-kept", "linear-recompute"):
        for dtype in (torch.float32, torch.float64):
            for i in range(len(WEIGHTED_OPTIONS)):
                run_weighted_case(i, kind, dtype, i % 2 == 1)
    injected_free_memory_case()
    bad_inputs()
    weighted_errors()
    with open(os.path.join(OUTDIR, f"rank{RANK}.json"), "w") as f:
        json.dump({"failures": FAILURES, "losses": RESULTS}, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except Exception:  # noqa: BLE001 - reported through the exit status and the printed traceback
        traceback.print_exc()
        sys.exit(1)
    sys.stdout.flush()
    os._exit(0)
