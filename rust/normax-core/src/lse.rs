//! Sums of exponentials: the shared machinery of softmax, log_softmax, logsumexp and the
//! cross-entropy family.
//!
//! Two ways to get a row's sum of exp(x), both without ever computing x - max:
//! - two-pass (Dukhan & Ablavatski 2020): one read keeps, per lane, the sum as m * 2^n and rescales
//!   the smaller exponent on every addition; nothing overflows and no max pass is needed.
//! - in-cache: a max pass gives the largest exponent N up front, then each term m * 2^(n - N) is
//!   formed directly (and optionally stored for a later scaling pass). Fewer operations per element,
//!   one more read: the better choice while the row sits in cache.
//!
//! Both evaluate exp(x) = m * 2^n from x itself, so the result keeps the exp's few-ULP accuracy
//! instead of inheriting the rounding of x - max. Rows with NaN, +inf, or |x| beyond
//! `Float::SPLIT_LIMIT` (where the Cody-Waite reduction degrades) go to an exact f64 path.

use crate::float::Float;
use crate::simd::{
    exp_parts, exp_reduced, load_partial, pow2_nonpositive, store_partial, Vector, MAX_LANES,
};
use std::f64::consts::LN_2;

/// A sum of exponentials held as m * 2^n, combined exactly (in f64) across lanes, blocks and threads.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ExpSum {
    pub m: f64,
    pub n: f64,
}

impl ExpSum {
    pub const EMPTY: ExpSum = ExpSum {
        m: 0.0,
        n: f64::NEG_INFINITY,
    };

    pub fn combine(self, o: ExpSum) -> ExpSum {
        if self.m == 0.0 {
            return o;
        }
        if o.m == 0.0 {
            return self;
        }
        let n = self.n.max(o.n);
        ExpSum {
            m: self.m * pow2_nonpositive_f64(self.n - n) + o.m * pow2_nonpositive_f64(o.n - n),
            n,
        }
    }

    /// log of the sum.
    pub fn ln(self) -> f64 {
        self.m.ln() + self.n * LN_2
    }
}

/// 2^k for integral k <= 0, from its bits (0 below the normal range): cheaper than exp2.
fn pow2_nonpositive_f64(k: f64) -> f64 {
    if k < -1022.0 {
        0.0
    } else {
        f64::from_bits(((k as i64 + 1023) as u64) << 52)
    }
}

/// A row's statistics: the sum of exponentials, or a marker that the row needs the exact path.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RowSum {
    Fast(ExpSum),
    Exact,
}

impl RowSum {
    pub fn combine(self, o: RowSum) -> RowSum {
        match (self, o) {
            (RowSum::Fast(a), RowSum::Fast(b)) => RowSum::Fast(a.combine(b)),
            _ => RowSum::Exact,
        }
    }

    /// Rows whose every element is below -SPLIT_LIMIT (all -inf included) also take the exact path.
    fn checked<T: Float>(self) -> RowSum {
        match self {
            RowSum::Fast(s) if s.n < -T::SPLIT_LIMIT.to_f64() * std::f64::consts::LOG2_E => {
                RowSum::Exact
            }
            other => other,
        }
    }
}

/// Accumulator flush periods: level-1 (4 vectors, unrolled) folds into level-2 every FOLD steps,
/// level-2 into f64 every FOLD folds. Keeps every f32 partial sum short (each element passes
/// through at most 2 * FOLD roundings), so the row sum stays within a few ULP without summing
/// in f64 per element.
pub(crate) const FOLD: usize = 16;

fn floor_of<T: Float>() -> T {
    -(T::SPLIT_LIMIT + T::SPLIT_LIMIT)
}

/// m * 2^e += exp(x): the per-lane two-pass accumulation step.
#[inline(always)]
fn accumulate<V: Vector>(m: &mut V, e: &mut V, tm: V, te: V) {
    let ne = e.max(te);
    *m = tm.mul_add(
        pow2_nonpositive(te.sub(ne)),
        m.mul(pow2_nonpositive(e.sub(ne))),
    );
    *e = ne;
}

#[inline(always)]
fn lanes_to_sum<V: Vector>(m: V, e: V) -> ExpSum {
    let mut ms = [V::Elem::ZERO; MAX_LANES];
    let mut es = [V::Elem::ZERO; MAX_LANES];
    unsafe {
        m.store(ms.as_mut_ptr());
        e.store(es.as_mut_ptr());
    }
    (0..V::LANES).fold(ExpSum::EMPTY, |acc, i| {
        acc.combine(ExpSum {
            m: ms[i].to_f64(),
            n: es[i].to_f64(),
        })
    })
}

/// Two-pass, pass 1: the row's sum of exponentials from one read of x[..len].
///
/// # Safety
/// `x` must be valid for reading `len` elements.
#[inline(always)]
pub unsafe fn sum_two_pass<V: Vector>(x: *const V::Elem, len: usize) -> RowSum {
    let limit = V::splat(V::Elem::SPLIT_LIMIT);
    let floor = V::splat(floor_of::<V::Elem>());
    let floor_exp = floor.mul(V::splat(V::Elem::LOG2E)).round();
    let zero = V::splat(V::Elem::ZERO);
    let mut special = V::mask_none();
    let (mut m, mut e) = ([zero; 4], [floor_exp; 4]);
    let (mut m2, mut e2) = (zero, floor_exp);
    let mut total = ExpSum::EMPTY;
    let (mut steps, mut folds) = (0, 0);
    let w = V::LANES;
    let mut i = 0;
    while i + 4 * w <= len {
        for j in 0..4 {
            let v = V::load(x.add(i + j * w));
            special = V::mask_or(special, v.gt_or_nan(limit));
            let (tm, te) = exp_parts(v.max(floor));
            accumulate(&mut m[j], &mut e[j], tm, te);
        }
        i += 4 * w;
        steps += 1;
        if steps == FOLD {
            for j in 0..4 {
                accumulate(&mut m2, &mut e2, m[j], e[j]);
                (m[j], e[j]) = (zero, floor_exp);
            }
            steps = 0;
            folds += 1;
            if folds == FOLD {
                total = total.combine(lanes_to_sum(m2, e2));
                (m2, e2, folds) = (zero, floor_exp, 0);
            }
        }
    }
    while i < len {
        let v = if i + w <= len {
            V::load(x.add(i))
        } else {
            load_partial::<V>(x.add(i), len - i, V::Elem::NEG_INFINITY)
        };
        special = V::mask_or(special, v.gt_or_nan(limit));
        let (tm, te) = exp_parts(v.max(floor));
        accumulate(&mut m[0], &mut e[0], tm, te);
        i += w;
    }
    for j in 0..4 {
        accumulate(&mut m2, &mut e2, m[j], e[j]);
    }
    if V::mask_any(special) {
        return RowSum::Exact;
    }
    // Padding lanes of a partial load hold exp(floor): far below anything real, or the row is exact.
    RowSum::Fast(total.combine(lanes_to_sum(m2, e2))).checked::<V::Elem>()
}

/// The row's maximum. NaN may or may not survive `max`; the sum pass catches it either way.
#[inline(always)]
unsafe fn max_pass<V: Vector>(x: *const V::Elem, len: usize) -> V::Elem {
    let mut mx = [V::splat(V::Elem::NEG_INFINITY); 4];
    let w = V::LANES;
    let mut i = 0;
    while i + 4 * w <= len {
        for (j, acc) in mx.iter_mut().enumerate() {
            *acc = acc.max(V::load(x.add(i + j * w)));
        }
        i += 4 * w;
    }
    while i < len {
        let v = if i + w <= len {
            V::load(x.add(i))
        } else {
            load_partial::<V>(x.add(i), len - i, V::Elem::NEG_INFINITY)
        };
        mx[0] = mx[0].max(v);
        i += w;
    }
    mx[0].max(mx[1]).max(mx[2].max(mx[3])).reduce_max()
}

/// exp(x) * 2^-top for x <= the row max, given bias = ROUND_MAGIC + BIAS - top and
/// floor = (top - BIAS) / log2 e: one fma both rounds x log2 e and leaves 2^(n - top) in the low
/// bits. Terms below 2^-(BIAS - 1) of the max flush to 0 (so -inf gives exactly 0); NaN propagates
/// (`floor.max(x)` returns x when x is NaN, on every ISA).
#[inline(always)]
fn scaled_exp<V: Vector>(x: V, bias: V, floor: V) -> V {
    let x = floor.max(x);
    let v = x.mul_add(V::splat(V::Elem::LOG2E), bias);
    let n = v.sub(bias);
    exp_reduced(x, n).mul(v.exponent_bits())
}

/// In-cache pass 2: sum of exp(x) * 2^-top, optionally storing each term. NaN if x holds NaN.
/// Prefetches the next row (the next `len` elements) so the following row's reads overlap this
/// row's arithmetic; prefetches never fault, past the end of the array included.
#[inline(always)]
unsafe fn sum_given_max<V: Vector>(
    x: *const V::Elem,
    len: usize,
    top: V::Elem,
    store: Option<*mut V::Elem>,
) -> f64 {
    let bias = V::splat(V::Elem::ROUND_MAGIC + V::Elem::BIAS - top);
    let floor = V::splat((top - V::Elem::BIAS) / V::Elem::LOG2E);
    let zero = V::splat(V::Elem::ZERO);
    let mut acc = [zero; 4];
    let mut total = 0.0f64;
    let mut steps = 0;
    let w = V::LANES;
    let mut i = 0;
    while i + 4 * w <= len {
        V::prefetch(x.wrapping_add(len + i));
        V::prefetch(x.wrapping_add(len + i + 2 * w));
        for (j, a) in acc.iter_mut().enumerate() {
            let t = scaled_exp(V::load(x.add(i + j * w)), bias, floor);
            if let Some(y) = store {
                t.store(y.add(i + j * w));
            }
            *a = a.add(t);
        }
        i += 4 * w;
        steps += 1;
        if steps == FOLD {
            total += acc[0]
                .add(acc[1])
                .add(acc[2].add(acc[3]))
                .reduce_add()
                .to_f64();
            acc = [zero; 4];
            steps = 0;
        }
    }
    while i < len {
        let n = (len - i).min(w);
        let t = if n == w {
            scaled_exp(V::load(x.add(i)), bias, floor)
        } else {
            scaled_exp(
                load_partial::<V>(x.add(i), n, V::Elem::NEG_INFINITY),
                bias,
                floor,
            )
        };
        if let Some(y) = store {
            if n == w {
                t.store(y.add(i))
            } else {
                store_partial(t, y.add(i), n)
            }
        }
        acc[0] = acc[0].add(t);
        i += w;
    }
    total
        + acc[0]
            .add(acc[1])
            .add(acc[2].add(acc[3]))
            .reduce_add()
            .to_f64()
}

/// The in-cache statistics; with `store`, the terms exp(x) * 2^-N are left in it for scaling.
///
/// # Safety
/// `x` readable and `store` writable for `len` elements (they may be the same buffer).
#[inline(always)]
pub unsafe fn sum_in_cache<V: Vector>(
    x: *const V::Elem,
    len: usize,
    store: Option<*mut V::Elem>,
) -> RowSum {
    let mx = max_pass::<V>(x, len);
    if !(mx <= V::Elem::SPLIT_LIMIT) || mx < -V::Elem::SPLIT_LIMIT {
        return RowSum::Exact;
    }
    let top = (mx * V::Elem::LOG2E).round_even();
    let m = sum_given_max::<V>(x, len, top, store);
    if m.is_nan() {
        return RowSum::Exact;
    }
    RowSum::Fast(ExpSum { m, n: top.to_f64() })
}

/// Rows up to this many elements use the in-cache algorithm; longer ones the two-pass one.
/// Chosen from `cargo bench --bench softmax` (the crossover on the development machine).
pub const IN_CACHE_MAX_LEN: usize = 1 << 16;

/// The exact path: max and sum of exp(x - max) in f64. `nan` is set if any element is NaN.
pub struct ExactStats {
    pub max: f64,
    pub sum: f64,
    pub nan: bool,
}

/// # Safety
/// `x` must be valid for reading `len` elements.
pub unsafe fn exact_stats<T: Float>(x: *const T, len: usize) -> ExactStats {
    let xs = std::slice::from_raw_parts(x, len);
    let nan = xs.iter().any(|v| v.is_nan());
    let max = xs
        .iter()
        .map(|v| v.to_f64())
        .fold(f64::NEG_INFINITY, f64::max);
    let sum = if max.is_finite() {
        xs.iter().map(|v| (v.to_f64() - max).exp()).sum()
    } else {
        f64::NAN
    };
    ExactStats { max, sum, nan }
}

impl ExactStats {
    /// log-sum-exp with the peers' special values: NaN wins, then +inf, then -inf (all -inf/empty).
    pub fn lse(&self) -> f64 {
        if self.nan {
            f64::NAN
        } else if !self.max.is_finite() {
            self.max
        } else {
            self.max + self.sum.ln()
        }
    }

    /// Whether softmax/log_softmax of the row is all NaN (NaN, +inf, or nothing but -inf).
    pub fn row_is_nan(&self) -> bool {
        self.nan || !self.max.is_finite()
    }
}
