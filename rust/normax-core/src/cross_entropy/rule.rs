//! The loss algebra of one row: the per-call constants, the gradient coefficients and the
//! sum of exponentials that blocks of a row combine into.

use crate::driver::Ptr;
use crate::float::Float;
use crate::lse::{exact_stats, row_sum, sum_two_pass, Algorithm, ExpSum, Lse, RowSum};
use crate::simd::Vector;
use crate::spec::{CeOptions, GradOutput, Reduction};
use crate::Error;
use std::f64::consts::LN_2;

/// The per-row gradient scale: grad_output, divided by the denominator for a mean.
#[derive(Clone, Copy)]
pub(super) enum Scale<'a, T> {
    All(f64),
    Rows(&'a [T]),
}

impl<T: Float> Scale<'_, T> {
    pub(super) fn of(&self, row: usize) -> f64 {
        match self {
            Scale::All(s) => *s,
            Scale::Rows(g) => g[row].to_f64(),
        }
    }
}

pub(super) fn scale_for<'a, T: Float>(
    reduction: Reduction,
    grad_output: GradOutput<&'a [T]>,
    denom: f64,
    rows: usize,
) -> Result<Scale<'a, T>, Error> {
    match (reduction, grad_output) {
        (Reduction::Mean, GradOutput::Scalar(g)) => Ok(Scale::All(g / denom)),
        (_, GradOutput::Scalar(g)) => Ok(Scale::All(g)),
        (Reduction::None, GradOutput::Rows(g)) if g.len() == rows => Ok(Scale::Rows(g)),
        (Reduction::None, GradOutput::Rows(g)) => Err(Error::Value(format!(
            "grad_output has {} elements; expected one per row ({rows})",
            g.len()
        ))),
        (_, GradOutput::Rows(_)) => Err(Error::Value(
            "grad_output must be a number unless reduction is 'none'".into(),
        )),
    }
}

/// The per-call constants of the loss.
pub(super) struct Rule<T> {
    pub(super) eps: f64,
    pub(super) z: f64,
    /// C in eps / C: the whole vocabulary, also when a row is processed block by block.
    pub(super) classes: usize,
    pub(super) cap: Option<T>,
    /// Class weights; null for all ones.
    pub(super) weight: Ptr<T>,
    /// sum_c w_c.
    pub(super) w_sum: f64,
    /// 1 / temperature, applied to the logits before the softcap; None where the logits arrive
    /// already divided (the linear op's GEMM) or the temperature is 1.
    pub(super) inv_t: Option<T>,
    /// 1 / temperature in every gradient (d z / d x).
    pub(super) grad_t: f64,
    /// One factor per row on its loss and gradient (indexed by the row's global index); null
    /// for all ones.
    pub(super) token_weight: Ptr<T>,
    /// A power of two the fast path's sums of w_c (lse - x_c) are accumulated at: small enough
    /// that a partial sum of terms up to the largest float times the largest weight stays
    /// finite (the result is scaled back in f64).
    pub(super) unit: f64,
    /// StableMax: the logits are phi(cap(x / T)) (`CeOptions::stablemax`).
    pub(super) stable: bool,
}

/// Gradient coefficients of one row: grad_c = (p_c * a - w_c * (b + ct * t_c)) * cap'(x_c).
/// `zl` is the z-loss part of `a` (s * 2 z lse), kept apart for the target's own entry.
#[derive(Clone, Copy)]
pub(super) struct Coef {
    pub(super) a: f64,
    pub(super) b: f64,
    pub(super) ct: f64,
    pub(super) zl: f64,
    /// The row's logits are StableMax's phi: the gradient carries exp(-|phi|) (and the cap's
    /// factor of x' = sign(phi) expm1(|phi|)).
    pub(super) stable: bool,
}

impl<T: Float> Rule<T> {
    pub(super) fn new(o: &CeOptions<&[T]>, classes: usize) -> Rule<T> {
        let w_max = o
            .weight
            .map_or(1.0, |w| w.iter().fold(1.0f64, |m, v| m.max(v.to_f64())));
        // 16 vectors of up to 16 lanes are added in T before folding into f64 (`rows::Acc`);
        // one more factor 2 for the rounding of the terms.
        let unit = if w_max.is_finite() {
            (-((w_max * 512.0).log2().ceil())).exp2()
        } else {
            1.0
        };
        let inv_t = 1.0 / o.temperature;
        Rule {
            eps: o.label_smoothing,
            z: o.z_loss,
            classes,
            cap: o.softcap.map(T::from_f64),
            weight: Ptr::from_const(o.weight.map_or(std::ptr::null(), |w| w.as_ptr())),
            w_sum: o
                .weight
                .map_or(classes as f64, |w| w.iter().map(|v| v.to_f64()).sum()),
            inv_t: (o.temperature != 1.0).then(|| T::from_f64(inv_t)),
            grad_t: inv_t,
            token_weight: Ptr::from_const(o.token_weight.map_or(std::ptr::null(), |t| t.as_ptr())),
            unit,
            stable: o.stablemax,
        }
    }

    /// Row `g`'s token weight (1 without).
    pub(super) fn token_weight_of(&self, g: usize) -> f64 {
        if self.token_weight.0.is_null() {
            1.0
        } else {
            unsafe { (*self.token_weight.at(g)).to_f64() }
        }
    }

    /// `sum_wt` = sum_c w_c t_c (w_y for a hard target); `s` the row's gradient scale.
    pub(super) fn coef(&self, lse: f64, sum_wt: f64, s: f64) -> Coef {
        let mut a = (1.0 - self.eps) * sum_wt;
        if self.eps > 0.0 {
            a += self.eps * self.w_sum / self.classes as f64;
        }
        let zl = if self.z > 0.0 {
            2.0 * self.z * lse
        } else {
            0.0
        };
        Coef {
            a: s * (a + zl),
            b: s * self.eps / self.classes as f64,
            ct: s * (1.0 - self.eps),
            zl: s * zl,
            stable: self.stable,
        }
    }

    /// The row's loss from its target term (w_y (lse - x_y), or sum_c w_c t_c (lse - x_c)) and
    /// its smoothing sum sum_c w_c (lse - x_c). Terms that are switched off are left out, so an
    /// infinite sum does not turn into NaN by a zero factor.
    pub(super) fn loss(&self, lse: f64, target_term: f64, smooth: f64) -> f64 {
        let mut l = (1.0 - self.eps) * target_term;
        if self.eps > 0.0 {
            l += self.eps / self.classes as f64 * smooth;
        }
        if self.z > 0.0 {
            l += self.z * lse * lse;
        }
        l
    }

    /// The gradient at a hard target's own class, in f64 (x_y capped).
    ///
    /// p_y a - w_y (b + ct) is written as (p_y - 1) a + b (W - w_y) + zl (the w_y ct terms cancel
    /// exactly), with p_y - 1 = expm1(-(lse - x_y)) = -(the other classes' probability): where
    /// p_y rounds to 1 (a margin above ~17 in f32, ~37 in f64: the "Softmax Collapse") the
    /// gradient stays that small sum within a few ULP instead of becoming exactly 0.
    pub(super) fn target_grad(&self, x_y: f64, lse: Lse, c: &Coef, w_y: f64) -> f64 {
        let residual = if self.eps > 0.0 {
            c.b * (self.w_sum - w_y)
        } else {
            0.0
        };
        let g = c.a * (-minus(lse, x_y)).exp_m1() + (residual + c.zl);
        g * chain(x_y, self.cap.map(T::to_f64), c.stable)
    }

    pub(super) fn weight_of(&self, class: usize) -> f64 {
        if self.weight.0.is_null() {
            1.0
        } else {
            unsafe { (*self.weight.at(class)).to_f64() }
        }
    }
}

/// d(logit the loss sees)/d(capped logit) at logit `z`: the cap's 1 - (x / s)^2 with x = z, or
/// for StableMax (z = phi(x)) exp(-|z|) = 1 / (1 + |x|) times the cap's factor of x = sign(z)
/// expm1(|z|).
pub(super) fn chain(z: f64, cap: Option<f64>, stable: bool) -> f64 {
    let (x, phi_chain) = if stable {
        (z.abs().exp_m1(), (-z.abs()).exp())
    } else {
        (z, 1.0)
    };
    match cap {
        Some(s) => {
            let u = x / s;
            phi_chain * (1.0 - u * u)
        }
        None => phi_chain,
    }
}

/// lse - x, the large parts cancelled first: exact where x is hi (a row's max, or its rounding).
pub(super) fn minus(l: Lse, x: f64) -> f64 {
    (l.hi - x) + l.lo
}

/// A row's (or a block of a row's) sum of exponentials, combinable across vocabulary blocks.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum RowLse {
    /// From the two-pass / in-cache machinery: every element within the fast range.
    Fast(ExpSum),
    /// From the exact path: sum = sum * e^max in f64; max = -inf when every element is -inf.
    Exact { max: f64, sum: f64 },
    /// NaN or +inf somewhere: the row's loss and gradient are NaN.
    Nan,
}

impl RowLse {
    pub(super) const EMPTY: RowLse = RowLse::Fast(ExpSum::EMPTY);

    pub(super) fn from_sum<T: Float>(s: RowSum, x: *const T, len: usize) -> RowLse {
        match s.usable::<T>() {
            Some(e) => RowLse::Fast(e),
            None => {
                let st = unsafe { exact_stats(x, len) };
                if st.nan || st.max == f64::INFINITY {
                    RowLse::Nan
                } else if st.max == f64::NEG_INFINITY {
                    RowLse::Exact {
                        max: f64::NEG_INFINITY,
                        sum: 0.0,
                    }
                } else {
                    RowLse::Exact {
                        max: st.max,
                        sum: st.sum,
                    }
                }
            }
        }
    }

    /// # Safety
    /// `x` readable for `len` elements.
    #[inline(always)]
    pub(super) unsafe fn of<V: Vector>(x: *const V::Elem, len: usize) -> RowLse {
        RowLse::from_sum(row_sum::<V>(x, len, Algorithm::Auto), x, len)
    }

    /// [`RowLse::of`] for one vocabulary block of a row (the linear cross-entropy): by the
    /// two-pass blocks, which keep `rest` where one element dominates, so the blocks combine
    /// into an lse - x_y that stays relatively accurate for a dominant target.
    ///
    /// # Safety
    /// `x` readable for `len` elements.
    #[inline(always)]
    pub(super) unsafe fn of_block<V: Vector>(x: *const V::Elem, len: usize) -> RowLse {
        RowLse::from_sum(sum_two_pass::<V>(x, len), x, len)
    }

    /// (M, s) with the sum = s * e^M; M = -inf when empty.
    pub(super) fn scaled(self) -> (f64, f64) {
        match self {
            RowLse::Fast(e) if e.m == 0.0 => (f64::NEG_INFINITY, 0.0),
            RowLse::Fast(e) => (e.n * LN_2, e.m),
            RowLse::Exact { max, sum } => (max, sum),
            RowLse::Nan => (f64::NAN, f64::NAN),
        }
    }

    pub(super) fn combine(self, o: RowLse) -> RowLse {
        match (self, o) {
            (RowLse::Nan, _) | (_, RowLse::Nan) => RowLse::Nan,
            (RowLse::Fast(a), RowLse::Fast(b)) => RowLse::Fast(a.combine(b)),
            (a, b) => {
                let ((am, asum), (bm, bsum)) = (a.scaled(), b.scaled());
                if am == f64::NEG_INFINITY {
                    return RowLse::Exact { max: bm, sum: bsum };
                }
                if bm == f64::NEG_INFINITY {
                    return RowLse::Exact { max: am, sum: asum };
                }
                let m = am.max(bm);
                RowLse::Exact {
                    max: m,
                    sum: asum * (am - m).exp() + bsum * (bm - m).exp(),
                }
            }
        }
    }

    /// log of the sum so far: -inf when empty, NaN for a NaN row.
    pub(super) fn ln_sum(self) -> f64 {
        let (m, s) = self.scaled();
        if m == f64::NEG_INFINITY {
            m
        } else {
            m + s.ln()
        }
    }

    /// The row's log-sum-exp, or None where its loss and gradient are NaN (NaN, +inf, or nothing
    /// but -inf: torch's log_softmax is NaN there too). The exact path keeps the max apart, so
    /// lse - x stays exact next to huge values (a row of equal values near -1e30 gives log C).
    pub(super) fn lse(self) -> Option<Lse> {
        match self {
            RowLse::Nan => None,
            // max + (lse - max), not rounded whole: lse - x_y stays exact (and relatively
            // accurate where `rest` is known) for a dominant target.
            RowLse::Fast(e) if e.m > 0.0 => Some(Lse::new::<f64>(e.max, e.ln_over_max())),
            RowLse::Exact { max, sum } if max > f64::NEG_INFINITY => Some(Lse {
                hi: max,
                lo: sum.ln(),
            }),
            _ => None,
        }
    }
}
