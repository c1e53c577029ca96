"""Vocabulary-parallel cross-entropy on gloo: normax against a Megatron-style reference in torch ops
(three all-reduces) and against ``torch.distributed.tensor.parallel.loss_parallel()`` +
``F.cross_entropy`` on a DTensor sharded on the classes.

    python benches/python/bench_distributed.py [--worlds 2 4] [--rows 4096] [--linear-rows 4096]
        [--repeats 5] [--rounds 1] [--linear-only]

For each world size, WORLD processes on localhost (gloo) each hold V / WORLD classes of
V = 128256 (the logits, or the LM-head rows with H = 1024 for the linear case) and time a
training step, forward + backward, as the median of `--repeats` steps after one warm-up step.
The linear case runs normax with its default logits budget (the local logits kept for the
backward when they fit) and with ``logits_budget=0`` (recomputed), against a Megatron-style LM
head (torch GEMM + the same torch-ops cross-entropy), in `--rounds` alternating rounds whose steps
are pooled into one median per case.
Printed per case: median step time (rank 0's, every rank steps in lockstep), rank 0's median CPU
time per step (its own work, less sensitive than the wall time to other jobs on a shared
machine), collectives per step
(counted by wrapping torch.distributed's functions; DTensor's functional collectives by
``CommDebugMode``), payload bytes each rank sends per step (ring algorithms: an all-reduce of B
bytes sends 2 (P-1)/P B, an all-gather of B bytes per rank (P-1) B), and the peak extra resident
memory of the step (Linux VmHWM, reset through /proc/self/clear_refs, minus the resident set
before it; inputs already allocated).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import subprocess
import sys
import time


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def worker(rank: int, world: int, port: int, args) -> None:
    import normax.torch as nt
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600))
    torch.set_num_threads(args.threads)
    import normax

    normax.set_num_threads(args.threads)

    sent = {"calls": 0, "bytes": 0}

    def counted(name, fn):
        def wrapped(*a, **k):
            sent["calls"] += 1
            if name == "all_reduce":
                sent["bytes"] += 2 * (world - 1) / world * a[0].numel() * a[0].element_size()
            elif name == "all_gather_into_tensor":
                sent["bytes"] += (world - 1) * a[1].numel() * a[1].element_size()
            return fn(*a, **k)

        return wrapped

    for name in ("all_reduce", "all_gather_into_tensor"):
        setattr(dist, name, counted(name, getattr(dist, name)))

    class MegatronCE(torch.autograd.Function):
        """Megatron-core's vocab_parallel_cross_entropy, in torch ops: three all-reduces forward."""

        @staticmethod
        def forward(ctx, x, target, start):
            m = x.max(dim=-1).values
            dist.all_reduce(m, op=dist.ReduceOp.MAX)
            x = x - m.unsqueeze(-1)
            local = target - start
            inside = (local >= 0) & (local < x.shape[-1])
            idx = local.clamp(0, x.shape[-1] - 1)
            predicted = x.gather(-1, idx.unsqueeze(-1)).squeeze(-1) * inside
            dist.all_reduce(predicted)
            x.exp_()
            total = x.sum(-1)
            dist.all_reduce(total)
            loss = total.log() - predicted
            x.div_(total.unsqueeze(-1))
            ctx.save_for_backward(x, idx, inside)
            return loss.mean()

        @staticmethod
        def backward(ctx, g):
            p, idx, inside = ctx.saved_tensors
            grad = p.clone()
            grad.scatter_add_(-1, idx.unsqueeze(-1), -inside.to(grad.dtype).unsqueeze(-1))
            return grad * (g / p.shape[0]), None, None

    class MegatronLinear(torch.autograd.Function):
        """A column-parallel LM head's input: identity forward, all-reduce of d hidden backward."""

        @staticmethod
        def forward(ctx, h):
            return h.view_as(h)

        @staticmethod
        def backward(ctx, g):
            dist.all_reduce(g)
            return g

    v, h = args.vocab, args.hidden
    vl = v // world
    start = rank * vl
    gen = torch.Generator().manual_seed(rank)  # each rank draws only its own shard
    tgen = torch.Generator().manual_seed(12345)  # the targets: the same on every rank
    results = {}

    def measure(name, step, make_inputs, comm_mode=False):
        inputs = make_inputs()
        step(*inputs)  # warm-up
        for t in inputs:
            t.grad = None
        times, cpu = [], []
        calls = nbytes = 0
        for _ in range(args.repeats):
            for t in inputs:
                t.grad = None  # the step's peak includes the gradients it allocates
            dist.barrier()
            sent.update(calls=0, bytes=0)
            before = _status("VmRSS")
            _reset_peak()
            if comm_mode:
                from torch.distributed.tensor.debug import CommDebugMode

                mode = CommDebugMode()
                t0, c0 = time.perf_counter(), time.process_time()
                with mode:
                    step(*inputs)
                times.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
                calls = mode.get_total_counts()
                nbytes = calls * 2 * (world - 1) / world * inputs[1].numel() * 4  # all-reduces of N floats
            else:
                t0, c0 = time.perf_counter(), time.process_time()
                step(*inputs)
                times.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
                calls, nbytes = sent["calls"], sent["bytes"]
            peak = _status("VmHWM") - before
        # A case measured in several rounds: the median of all its steps, the largest peak.
        r = results.setdefault(name, {"case": name, "world": world, "times": [], "cpu": [], "peak_mib": 0.0})
        r["times"] += times
        r["cpu"] += cpu
        r.update(
            median_s=statistics.median(r["times"]),
            cpu_s=statistics.median(r["cpu"]),
            collectives=calls,
            bytes_sent=nbytes,
            peak_mib=max(r["peak_mib"], peak / 2**20),
        )

    n = args.rows
    target = torch.randint(0, v, (n,), generator=tgen)

    def logits():
        x = torch.randn(n, vl, generator=gen).requires_grad_(True)
        return x, target

    def normax_step(x, t):
        nt.vocab_parallel_cross_entropy(x, t).backward()

    def megatron_step(x, t):
        MegatronCE.apply(x, t, start).backward()

    if not args.linear_only:
        measure("logits: normax", normax_step, logits)
        measure("logits: Megatron-style torch ops", megatron_step, logits)

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor.parallel import loss_parallel

    mesh = init_device_mesh("cpu", (world,))

    def dlogits():
        x, t = logits()
        dx = DTensor.from_local(x.detach(), mesh, [Shard(1)]).requires_grad_(True)
        return dx, DTensor.from_local(t, mesh, [Replicate()])

    def dtensor_step(dx, t):
        with loss_parallel():
            F.cross_entropy(dx, t).backward()

    if not args.linear_only:
        measure("logits: loss_parallel() + F.cross_entropy", dtensor_step, dlogits, comm_mode=True)

    nl = args.linear_rows
    tl = torch.randint(0, v, (nl,), generator=tgen)

    def linear():
        hid = torch.randn(nl, h, generator=torch.Generator().manual_seed(7)).requires_grad_(True)
        w = (torch.randn(vl, h, generator=gen) * h**-0.5).requires_grad_(True)
        return hid, w

    def normax_linear(hid, w):
        nt.vocab_parallel_linear_cross_entropy(hid, w, tl).backward()

    def normax_linear_recompute(hid, w):
        nt.vocab_parallel_linear_cross_entropy(hid, w, tl, logits_budget=0).backward()

    def megatron_linear(hid, w):
        MegatronCE.apply(MegatronLinear.apply(hid) @ w.T, tl, start).backward()

    # Alternating rounds, so the machine's drift reaches every case alike.
    for _ in range(args.rounds):
        measure(f"linear H={h}: normax, logits kept (default budget)", normax_linear, linear)
        measure(f"linear H={h}: normax, logits_budget=0 (recompute)", normax_linear_recompute, linear)
        measure(f"linear H={h}: Megatron-style torch ops", megatron_linear, linear)
    if rank == 0:
        rows = [{k: v for k, v in r.items() if k not in ("times", "cpu")} for r in results.values()]
        print(json.dumps({"rows": n, "linear_rows": nl, "results": rows}), flush=True)
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--linear-rows", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=5, help="steps per case and round")
    p.add_argument("--rounds", type=int, default=1, help="alternating rounds of the linear cases")
    p.add_argument("--linear-only", action="store_true", help="only the linear (LM head) cases")
    p.add_argument("--threads", type=int, default=1, help="threads per rank (torch's and normax's)")
    p.add_argument("--worker", type=int, nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(*args.worker, args)
        return
    print(
        f"V={args.vocab}, rows={args.rows} (linear: {args.linear_rows} rows, H={args.hidden}), "
        f"{args.threads} thread(s) per rank, median of {args.repeats} steps (forward + backward; "
        f"linear: {args.rounds} alternating round(s) of them)"
    )
    for world in args.worlds:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, __file__, *sys.argv[1:], "--worker"]
        procs = [
            subprocess.Popen([*cmd, str(r), str(world), str(port)], stdout=subprocess.PIPE, text=True)
            for r in range(world)
        ]
        out = [pr.communicate()[0] for pr in procs]
        if any(pr.returncode for pr in procs):
            sys.exit(f"world {world}: a rank failed")
        data = json.loads(out[0].strip().splitlines()[-1])
        base = {}
        print(f"\nworld {world}")
        print(
            f"{'case':56s} {'median ms':>10s} {'vs normax':>9s} {'CPU ms':>8s} {'vs normax':>9s} "
            f"{'collectives':>11s} {'KiB sent/rank':>13s} {'peak MiB':>9s}"
        )
        for r in data["results"]:
            kind = r["case"].split(":")[0]
            base.setdefault(kind, (r["median_s"], r["cpu_s"]))
            print(
                f"{r['case']:56s} {r['median_s'] * 1e3:10.1f} {r['median_s'] / base[kind][0]:8.2f}x "
                f"{r['cpu_s'] * 1e3:8.1f} {r['cpu_s'] / base[kind][1]:8.2f}x "
                f"{r['collectives']:11d} {r['bytes_sent'] / 1024:13.1f} {r['peak_mib']:9.1f}"
            )


if __name__ == "__main__":
    main()
