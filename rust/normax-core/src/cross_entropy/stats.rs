//! The statistics of `return_stats` on the row kernels' side: the per-row outputs, the argmax
//! check against the target (np.argmax's ties and NaN), and the plain path's pass 2 that also
//! sums the entropy.

use super::rows::Acc;
use crate::driver::Ptr;
use crate::float::Float;
use crate::lse::Lse;
use crate::rows::{load_n, store_n};
use crate::simd::{load_partial, Vector};

/// A row's statistics (`return_stats`): the log-sum-exp and entropy of the distribution the loss
/// uses, and whether the argmax of the logits as given is the target.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct RowStats {
    pub(super) lse: f64,
    pub(super) entropy: f64,
    pub(super) correct: bool,
}

impl RowStats {
    /// An ignored row's.
    pub(super) const IGNORED: RowStats = RowStats {
        lse: 0.0,
        entropy: 0.0,
        correct: false,
    };
}

/// Where the per-row statistics go, indexed by the row's global index; null: not asked for.
#[derive(Clone, Copy)]
pub(super) struct StatsOut<T> {
    pub(super) lse: Ptr<T>,
    pub(super) entropy: Ptr<T>,
    pub(super) correct: Ptr<bool>,
}

impl<T: Float> StatsOut<T> {
    pub(super) const NONE: StatsOut<T> = StatsOut {
        lse: Ptr(std::ptr::null_mut()),
        entropy: Ptr(std::ptr::null_mut()),
        correct: Ptr(std::ptr::null_mut()),
    };

    pub(super) fn wanted(&self) -> bool {
        !self.lse.0.is_null()
    }

    /// # Safety
    /// Row `g` within every buffer.
    pub(super) unsafe fn write(&self, g: usize, s: RowStats) {
        *self.lse.at(g) = T::from_f64(s.lse);
        *self.entropy.at(g) = T::from_f64(s.entropy);
        *self.correct.at(g) = s.correct;
    }
}

/// `n <= LANES` elements from `p`, the lanes past `n` set to `fill` (a plain load when whole).
#[inline(always)]
pub(super) unsafe fn load_or<V: Vector>(p: *const V::Elem, n: usize, fill: V::Elem) -> V {
    if n == V::LANES {
        V::load(p)
    } else {
        load_partial::<V>(p, n, fill)
    }
}

/// (max, any NaN) of x[..len]; max -inf when empty.
#[inline(always)]
pub(super) unsafe fn max_and_nan<V: Vector>(x: *const V::Elem, len: usize) -> (V::Elem, bool) {
    let inf = V::splat(V::Elem::INFINITY);
    let mut mx = V::splat(V::Elem::NEG_INFINITY);
    let mut nan = V::mask_none();
    let mut i = 0;
    while i < len {
        let n = (len - i).min(V::LANES);
        let v = load_or::<V>(x.add(i), n, V::Elem::NEG_INFINITY);
        // Nothing is greater than +inf: the lanes set are the NaN ones.
        nan = V::mask_or(nan, v.gt_or_nan(inf));
        mx = mx.max(v);
        i += V::LANES;
    }
    (mx.reduce_max(), V::mask_any(nan))
}

/// What decides whether a row's argmax is its target, gathered over the row or over blocks of
/// it: the largest logit before the target and after it, whether any of those is NaN, and the
/// target's own.
#[derive(Clone, Copy, Debug)]
pub(super) struct Top {
    before: V64,
    after: V64,
    x_y: f64,
}

/// The max and NaN flag of a set of logits (max -inf and `any` false when empty).
#[derive(Clone, Copy, Debug)]
struct V64 {
    max: f64,
    nan: bool,
    any: bool,
}

impl V64 {
    const EMPTY: V64 = V64 {
        max: f64::NEG_INFINITY,
        nan: false,
        any: false,
    };

    #[inline(always)]
    unsafe fn add<V: Vector>(&mut self, x: *const V::Elem, len: usize) {
        if len > 0 {
            let (m, nan) = max_and_nan::<V>(x, len);
            self.max = self.max.max(m.to_f64());
            self.nan |= nan;
            self.any = true;
        }
    }
}

impl Top {
    pub(super) const NEW: Top = Top {
        before: V64::EMPTY,
        after: V64::EMPTY,
        x_y: f64::NAN,
    };

    /// Adds x[..len], the classes [v0, v0 + len) of a row whose target is `y`.
    #[inline(always)]
    pub(super) unsafe fn add<V: Vector>(
        &mut self,
        x: *const V::Elem,
        v0: usize,
        len: usize,
        y: usize,
    ) {
        let local = y.wrapping_sub(v0);
        if y < v0 {
            self.after.add::<V>(x, len);
        } else if local >= len {
            self.before.add::<V>(x, len);
        } else {
            self.before.add::<V>(x, local);
            self.x_y = (*x.add(local)).to_f64();
            self.after.add::<V>(x.add(local + 1), len - local - 1);
        }
    }

    /// `np.argmax == y`: no NaN before the target, and either the target NaN or nothing before
    /// it as large and nothing after it larger (nor NaN).
    pub(super) fn correct(&self) -> bool {
        let (b, a, x_y) = (self.before, self.after, self.x_y);
        !b.nan && (x_y.is_nan() || ((!b.any || b.max < x_y) && !a.nan && a.max <= x_y))
    }
}

/// Whether `np.argmax(x[..len]) == y`: the first maximum, or the first NaN where there is one.
#[inline(always)]
pub(super) unsafe fn argmax_is<V: Vector>(x: *const V::Elem, len: usize, y: usize) -> bool {
    let mut top = Top::NEW;
    top.add::<V>(x, 0, len, y);
    top.correct()
}

/// `np.argmax(x[..len])` (first maximum, or first NaN).
pub(super) unsafe fn argmax<V: Vector>(x: *const V::Elem, len: usize) -> usize {
    let (mx, nan) = max_and_nan::<V>(x, len);
    (0..len)
        .find(|&c| {
            let v = *x.add(c);
            if nan {
                v.is_nan()
            } else {
                v == mx
            }
        })
        .unwrap_or(0)
}

/// The plain path's pass 2 with statistics: returns sum_c e_c (lse - z_c) over the terms
/// e_c = exp(z_c) * 2^-N that pass 1 left in `terms`, z = x * `inv_t` recomputed from the logits
/// as given (as `transform_into` computes it), and whether their argmax is `y` (a fast row holds
/// no NaN: the largest logit before `y` below x_y, none after it above); with GRAD, scales the
/// terms by `k` into gradients.
#[inline(always)]
pub(super) unsafe fn scale_terms<V: Vector, const GRAD: bool>(
    terms: *mut V::Elem,
    x: *const V::Elem,
    (len, y): (usize, usize),
    lse: Lse,
    inv_t: Option<V::Elem>,
    k: V::Elem,
) -> (f64, Option<bool>) {
    let hi = V::Elem::from_f64(lse.hi);
    let lo = V::splat(V::Elem::from_f64((lse.hi - hi.to_f64()) + lse.lo));
    let (hi, k, big) = (
        V::splat(hi),
        V::splat(k),
        V::splat(V::Elem::from_f64(f32::MAX as f64)),
    );
    let inv_t = inv_t.map(V::splat);
    let x_y = *x.add(y);
    let mut before = V::splat(V::Elem::NEG_INFINITY);
    let mut after = before;
    let (mut before_s, mut after_s) = (V::Elem::NEG_INFINITY, V::Elem::NEG_INFINITY);
    let mut acc = Acc::<V>::new();
    let mut i = 0;
    while i < len {
        let n = (len - i).min(V::LANES);
        let e = load_n::<V>(terms.add(i), n);
        // Padding lanes: -inf, below every maximum, and a term of 0.
        let xv = load_or::<V>(x.add(i), n, V::Elem::NEG_INFINITY);
        if i + n <= y {
            before = before.max(xv);
        } else if i > y {
            after = after.max(xv);
        } else {
            for c in i..i + n {
                let v = *x.add(c);
                if c < y && v > before_s {
                    before_s = v;
                } else if c > y && v > after_s {
                    after_s = v;
                }
            }
        }
        let z = match inv_t {
            Some(s) => xv.mul(s),
            None => xv,
        };
        // A term of 0 (z = -inf included) adds 0.
        acc.add(e.mul(hi.sub(z).add(lo).min(big)));
        if GRAD {
            store_n(e.mul(k), terms.add(i), n);
        }
        i += V::LANES;
    }
    let before = before.reduce_max().to_f64().max(before_s.to_f64());
    let after = after.reduce_max().to_f64().max(after_s.to_f64());
    let x_y = x_y.to_f64();
    let correct = (y == 0 || before < x_y) && after <= x_y;
    (acc.value(), Some(correct))
}
