"""The CUDA path of logprobs and linear_logprobs: no kernel yet, so each call raises the
registry's NotImplementedError naming the op (the CPU runs them on host arrays)."""

from __future__ import annotations

from .. import missing


def logprobs(logits, target, *, axis=-1, temperature=1.0, ignore_index=-100, return_entropy=True):
    raise missing("cuda", "logprobs")


def linear_logprobs(
    hidden,
    linear_weight,
    target,
    *,
    linear_bias=None,
    temperature=1.0,
    ignore_index=-100,
    chunk_size=None,
    return_entropy=True,
):
    raise missing("cuda", "linear_logprobs")
