"""CrossEntropyStats at the edges: -inf logits in float32 (a p = 0 term adds 0 to the entropy) and
ignored rows whose token weight is inf (the z-loss term sums the kept rows only)."""

import normax
import numpy as np
import pytest


def _entropy_ref(x):
    x = np.asarray(x, np.float64)
    m = x.max(axis=-1, keepdims=True)
    lse = m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True))
    p = np.exp(x - lse)
    d = np.where(p > 0, lse - x, 0.0)
    return (p * d).sum(axis=-1)


@pytest.mark.parametrize("isa", normax.supported_isas())
@pytest.mark.parametrize("with_grad", [False, True])
def test_stats_entropy_float32_minus_inf_logit(isa, with_grad):
    # Spec: p_c = 0 terms contribute 0 to the entropy, also for z_c = -inf.
    x = np.array([[1.0, -np.inf, 0.5, 2.0], [-np.inf, 3.0, 0.0, 1.0]], np.float32)
    t = np.array([0, 1])
    prev = normax.get_isa()
    normax.set_isa(isa)
    try:
        f = normax.cross_entropy_with_grad if with_grad else normax.cross_entropy
        st = f(x, t, reduction="none", return_stats=True)[-1]
    finally:
        normax.set_isa(prev)
    np.testing.assert_allclose(st.entropy, _entropy_ref(x), rtol=1e-5)


def test_linear_stats_entropy_float32_minus_inf_bias():
    h, w = np.zeros((2, 2), np.float32), np.zeros((6, 2), np.float32)
    b = np.array([1, -np.inf, 0, 0, 0, 0], np.float32)
    _, st = normax.linear_cross_entropy(h, w, np.array([0, 1]), linear_bias=b, return_stats=True)
    np.testing.assert_allclose(st.entropy, _entropy_ref(np.tile(b, (2, 1))), rtol=1e-5)


def test_stats_z_loss_ignores_token_weight_of_ignored_rows():
    # Spec: z_loss sums token_weight[r] * lse_r**2 over the rows NOT ignored.
    x = np.random.default_rng(0).normal(size=(3, 4))
    t = np.array([0, -100, 2])
    _, st = normax.cross_entropy(
        x, t, token_weight=np.array([1.0, np.inf, 1.0]), z_loss=0.1, reduction="sum", return_stats=True
    )
    _, ref = normax.cross_entropy(
        x, t, token_weight=np.array([1.0, 0.0, 1.0]), z_loss=0.1, reduction="sum", return_stats=True
    )
    assert np.isfinite(st.z_loss)
    np.testing.assert_allclose(st.z_loss, ref.z_loss)
