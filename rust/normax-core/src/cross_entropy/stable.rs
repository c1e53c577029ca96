//! The StableMax cross-entropy's direct path, for hard targets without smoothing, softcap or
//! statistics. With phi = log s, the loss w_y (lse - phi_y) + z lse^2 needs only sum_c s(x_c)
//! and s(x_y), and the gradient's p_c phi'(x_c) = s(x_c) / (sum (1 + |x_c|)) is m_c^2 / sum with
//! m = 1 / (1 - min(x, 0)) (1 for x >= 0, s(x) below): one division per element and no log1p or
//! exp, where forming phi costs a log1p and its chain an exp.

use super::rule::{minus, Rule};
use super::stats::RowStats;
use crate::float::Float;
use crate::lse::Lse;
use crate::rows::{load_n, map_elements, row_sums, store_n};
use crate::simd::Vector;
use crate::stablemax::{ln_s64, s64};

/// The smallest sum the direct path serves: below it the gradient's factor a / sum could
/// overflow the type.
const MIN_SUM: f64 = 1.0 / (1u128 << 100) as f64;

/// m = 1 / (1 - min(x, 0)) and s(x) = (1 + max(x, 0)) m, each rounded once (one factor is
/// exactly 1): the same s as `stablemax`'s. NaN propagates through `min`.
#[inline(always)]
fn m_and_s<V: Vector>(v: V) -> (V, V) {
    let zero = V::splat(V::Elem::ZERO);
    let one = V::splat(V::Elem::ONE);
    let m = one.div(one.sub(zero.min(v)));
    (m, one.add(zero.max(v)).mul(m))
}

/// Row `y`-targeted loss (unweighted by its token weight) and, with GRAD, its gradient scaled by
/// `s` into `grad` (which may be `x`). None where the sums cannot serve the row (NaN or inf in
/// it, a sum below [`MIN_SUM`] or so large that a / sum is not a normal float32, a target with
/// s = 0): the general path redoes it from `x`, which this leaves as it found it.
///
/// The loss is log1p(rest / s(x_y)), rest the sum over the other elements (ties with x_y counted
/// from the totals), so it keeps its relative accuracy when the target dominates.
///
/// # Safety
/// `x` readable and, with GRAD, `grad` writable for `len` elements; `y < len`.
#[inline(always)]
pub(super) unsafe fn direct_row<V: Vector, const GRAD: bool>(
    rule: &Rule<V::Elem>,
    x: *const V::Elem,
    len: usize,
    y: usize,
    s: f64,
    grad: *mut V::Elem,
) -> Option<(f64, RowStats)> {
    let inv_t = rule.inv_t.unwrap_or(V::Elem::ONE);
    let k = V::splat(inv_t);
    let x_y = *x.add(y) * inv_t;
    let at_target = V::splat(x_y);
    // Pass 1 keeps m in the gradient for pass 2, unless that would overwrite x (in place).
    let keep_m = GRAD && !std::ptr::eq(grad as *const V::Elem, x);
    let [total, other] = row_sums::<V, 2>(
        len,
        #[inline(always)]
        |i, n| {
            let v = load_n::<V>(x.add(i), n).mul(k);
            let (m, sv) = m_and_s(v);
            if keep_m {
                store_n(m, grad.add(i), n);
            }
            [sv, sv.keep(V::mask_or(v.lt(at_target), at_target.lt(v)))]
        },
    );
    let s_y = s64(x_y.to_f64());
    if !(total.is_finite() && total >= MIN_SUM && s_y > 0.0 && s_y.is_finite()) {
        return None;
    }
    // The elements equal to x_y (the target among them) each added s(x_y) as T rounds it.
    let s_y_summed = V::Elem::from_f64(s_y).to_f64();
    let ties = ((total - other) / s_y_summed).round().max(1.0);
    let rest = other + (ties - 1.0) * s_y;
    let lse = Lse {
        hi: ln_s64(x_y.to_f64()),
        lo: (rest / s_y).ln_1p(),
    };
    let w_y = rule.weight_of(y);
    let coef = rule.coef(lse.value(), w_y, s);
    let factor = coef.a / total;
    if GRAD && factor != 0.0 && factor.abs() < f32::MIN_POSITIVE as f64 {
        return None;
    }
    if GRAD {
        // m * f * m: a tiny m^2 would flush to 0 where the product with f does not.
        let f = V::splat(V::Elem::from_f64(factor));
        if keep_m {
            map_elements::<V>(
                grad,
                grad,
                len,
                #[inline(always)]
                |m| m.mul(f).mul(m),
            );
        } else {
            map_elements::<V>(
                x,
                grad,
                len,
                #[inline(always)]
                |v| {
                    let (m, _) = m_and_s(v.mul(k));
                    m.mul(f).mul(m)
                },
            );
        }
        *grad.add(y) = V::Elem::from_f64(rule.target_grad(lse.hi, lse, &coef, w_y));
    }
    let stats = RowStats {
        lse: lse.value(),
        entropy: 0.0,
        correct: false,
    };
    Some((rule.loss(lse.value(), w_y * minus(lse, lse.hi), 0.0), stats))
}
