//! Sums of exponentials: the shared machinery of softmax, log_softmax, logsumexp and the
//! cross-entropy family.
//!
//! Two ways to get a row's sum of exp(x), both without ever computing x - max:
//! - in-cache: a max pass gives the largest exponent N up front, then each term m * 2^(n - N) is
//!   formed directly (and optionally stored, so softmax needs only a scaling pass after it).
//!   Cheapest while the row sits in cache.
//! - two-pass (Dukhan & Ablavatski 2020): pass 1 reads x from memory once and keeps the sum as a
//!   (mantissa, exponent) pair, so nothing overflows and no max pass over the row is needed; pass 2
//!   reads x again and writes the result. The paper rescales per SIMD lane on every addition; here
//!   each L1-sized block takes its exponent from its own max while the block is in L1, and the
//!   blocks' pairs combine exactly. Same single read of memory, about half the arithmetic per
//!   element on AVX2 (measured with `cargo bench --bench softmax`).
//!
//! Both evaluate exp(x) = m * 2^n from x itself, so the result keeps the exp's few-ULP accuracy
//! instead of inheriting the rounding of x - max. The log-sum-exp is kept as max + (lse - max),
//! never rounded whole before x is subtracted (see [`Lse`]), and refined as max + log1p(rest)
//! where one element dominates, on both paths (see [`refined_lse`]). Rows with NaN, +inf, or |x|
//! beyond `Float::SPLIT_LIMIT` (where the Cody-Waite reduction degrades) go to an exact f64 path.

use crate::float::Float;
use crate::rows::{column_max, load_n, prefetch_line, Store};
use crate::simd::{exp_reduced_low, load_partial, store_partial, Vector, MAX_LANES};
use crate::sum::{CompensatedSum, SHORT_FOLD};
use std::f64::consts::LN_2;

/// A sum of exponentials held as m * 2^n, combined exactly (in f64) across blocks and threads,
/// with the largest element it covers (`max`, whose exponent is n).
///
/// `top` is the max's own term exp(max) * 2^-n as the kernel computed it, and `rest` the sum of
/// the terms of the elements below the max (both at the same scale as m), or NaN where not
/// computed. With them the log-sum-exp is max + log1p(rest / top + ties - 1): the rounding of the
/// max's term cancels, so a dominant element gives log_softmax <= 0 within a few ULP.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ExpSum {
    pub m: f64,
    pub n: f64,
    pub max: f64,
    pub top: f64,
    pub rest: f64,
}

/// ln 2 split so that n * LN_2_HI is exact for |n| < 2^21 (fdlibm's split).
const LN_2_HI: f64 = f64::from_bits(0x3fe6_2e42_fee0_0000);
const LN_2_LO: f64 = f64::from_bits(0x3dea_39ef_3579_3c76);

impl ExpSum {
    pub const EMPTY: ExpSum = ExpSum {
        m: 0.0,
        n: f64::NEG_INFINITY,
        max: f64::NEG_INFINITY,
        top: 0.0,
        rest: 0.0,
    };

    /// The sum of exp(x) * 2^-n over x[..] with max element `max` and n = round(max log2 e);
    /// `top` and `rest` not computed.
    pub fn new<T: Float>(m: f64, max: T) -> ExpSum {
        ExpSum {
            m,
            n: (max * T::LOG2E).round_even().to_f64(),
            max: max.to_f64(),
            top: f64::NAN,
            rest: f64::NAN,
        }
    }

    pub fn combine(self, o: ExpSum) -> ExpSum {
        if self.m == 0.0 {
            return o;
        }
        if o.m == 0.0 {
            return self;
        }
        let n = self.n.max(o.n);
        let (a, b) = (
            pow2_nonpositive_f64(self.n - n),
            pow2_nonpositive_f64(o.n - n),
        );
        // Below the combined max: all of a part whose max is lower, the rest of one that has it.
        let below = |p: &ExpSum, other: &ExpSum| if p.max < other.max { p.m } else { p.rest };
        ExpSum {
            m: self.m * a + o.m * b,
            n,
            max: self.max.max(o.max),
            top: if self.max >= o.max {
                self.top * a
            } else {
                o.top * b
            },
            rest: below(&self, &o) * a + below(&o, &self) * b,
        }
    }

    /// lse - max (>= 0): log1p(rest / top + ties - 1) where `rest` is known, else
    /// ln(m) + (n ln 2 - max) with n ln 2 - max exact (no rounding of a large lse: f64 rows of
    /// uniform [-1000, 1000] were 404 ULP off at |log_softmax| >= 1 with ln(m) + n ln 2).
    pub fn ln_over_max(self) -> f64 {
        let r = self.rest / self.top;
        let v = if r.is_nan() {
            self.m.ln() + ((self.n * LN_2_HI - self.max) + self.n * LN_2_LO)
        } else {
            let ties = ((self.m - self.rest) / self.top).round().max(1.0);
            (r + (ties - 1.0)).ln_1p()
        };
        // The sum is at least the max's term: never let rounding make log_softmax(max) > 0.
        v.max(0.0)
    }

    /// log of the sum (-inf when empty).
    pub fn ln(self) -> f64 {
        if self.m == 0.0 {
            return f64::NEG_INFINITY;
        }
        self.max + self.ln_over_max()
    }

    /// log of the sum as an [`Lse`] for element type T.
    pub fn lse<T: Float>(self) -> Lse {
        Lse::new::<T>(self.max, self.ln_over_max())
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

    /// The whole row's sum if the fast path holds for it. None (take the exact path) for rows
    /// flagged Exact and rows whose every element is below -SPLIT_LIMIT (all -inf included).
    pub fn usable<T: Float>(self) -> Option<ExpSum> {
        match self {
            RowSum::Fast(s) if s.n >= -T::SPLIT_LIMIT.to_f64() * std::f64::consts::LOG2_E => {
                Some(s)
            }
            _ => None,
        }
    }
}

/// Elements per two-pass block: small enough to stay in L1 between its max and its sum.
const BLOCK: usize = 2048;

/// A two-pass block sums its rest (a second pass while it is in L1) where rest / top < this: a
/// row dominated by one element (rest / top < REST_ROW, see [`refined_lse`]) has it known in the
/// block that holds its max, with room for the f32 rounding of the estimate.
const REST_BLOCK: f64 = 0.125;
/// A row is dominated by its max (the log-sum-exp is refined) where rest / top < this: at 0.1 or
/// more the rounding of the max's term is a few ULP of log(1 + rest) too.
const REST_ROW: f64 = 0.1;

/// Two-pass, pass 1: the sum of exponentials of x[..len] from one read of memory.
///
/// Blocks whose elements are all -inf add nothing. Blocks whose max is finite but below
/// -SPLIT_LIMIT are left out if negligible beside the rest (more than 2^-(BIAS + 24) of it);
/// otherwise the row takes the exact path.
///
/// # Safety
/// `x` must be valid for reading `len` elements.
#[inline(always)]
pub unsafe fn sum_two_pass<V: Vector>(x: *const V::Elem, len: usize) -> RowSum {
    let limit = V::Elem::SPLIT_LIMIT;
    let mut total = ExpSum::EMPTY;
    let mut dropped = f64::NEG_INFINITY;
    let mut i = 0;
    while i < len {
        let n = BLOCK.min(len - i);
        let block = x.add(i);
        i += n;
        let mx = max_pass::<V>(block, n);
        if !(mx <= limit) {
            return RowSum::Exact;
        }
        if mx < -limit {
            dropped = dropped.max(mx.to_f64());
            continue;
        }
        let s = ExpSum::new(0.0, mx);
        let m = sum_given_max::<V>(block, n, V::Elem::from_f64(s.n), (None, true), None);
        if m.is_nan() {
            return RowSum::Exact;
        }
        total = total.combine(with_rest::<V>(block, n, ExpSum { m, ..s }, REST_BLOCK));
    }
    let negligible = (V::Elem::BIAS.to_f64() + 24.0) * LN_2;
    if dropped > f64::NEG_INFINITY && !(total.ln() - dropped > negligible) {
        return RowSum::Exact;
    }
    RowSum::Fast(total)
}

/// The row's maximum. NaN may or may not survive `max`; the sum pass catches it either way.
#[inline(always)]
pub(crate) unsafe fn max_pass<V: Vector>(x: *const V::Elem, len: usize) -> V::Elem {
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

/// exp(x) * 2^-top for x <= the row max, with `top` the max's exponent: one fma both rounds
/// x log2 e and leaves 2^(n - top + SUBNORMAL_STEP) in the low bits, and `exp_reduced_low` carries
/// the 2^-SUBNORMAL_STEP: one rounding, so terms below 2^-(BIAS - 1) underflow gradually to
/// subnormals instead of flushing to 0. Terms below 2^-(BIAS + SUBNORMAL_STEP) of the max are 0
/// (so -inf gives exactly 0); NaN propagates (`floor.max(x)` returns x when x is NaN, on every ISA).
#[derive(Clone, Copy)]
pub(crate) struct ScaledExp<V> {
    bias: V,
    floor: V,
}

impl<V: Vector> ScaledExp<V> {
    #[inline(always)]
    pub(crate) fn new(top: V::Elem) -> Self {
        let (bias, floor) = Self::constants(top);
        ScaledExp {
            bias: V::splat(bias),
            floor: V::splat(floor),
        }
    }

    /// One `top` per lane (the column kernels: one column per lane), the same constants as `new`.
    #[inline(always)]
    pub(crate) fn lanes(tops: &[V::Elem; MAX_LANES]) -> Self {
        let (mut bias, mut floor) = ([V::Elem::ZERO; MAX_LANES], [V::Elem::ZERO; MAX_LANES]);
        for l in 0..V::LANES {
            (bias[l], floor[l]) = Self::constants(tops[l]);
        }
        unsafe {
            ScaledExp {
                bias: V::load(bias.as_ptr()),
                floor: V::load(floor.as_ptr()),
            }
        }
    }

    #[inline(always)]
    fn constants(top: V::Elem) -> (V::Elem, V::Elem) {
        let k = V::Elem::SUBNORMAL_STEP;
        (
            V::Elem::ROUND_MAGIC + V::Elem::BIAS + k - top,
            (top - V::Elem::BIAS - k) / V::Elem::LOG2E,
        )
    }

    #[inline(always)]
    pub(crate) fn apply(self, x: V) -> V {
        let x = self.floor.max(x);
        let v = x.mul_add(V::splat(V::Elem::LOG2E), self.bias);
        let n = v.sub(self.bias);
        exp_reduced_low(x, n).mul(v.exponent_bits())
    }
}

/// In-cache pass 2: sum of exp(x) * 2^-top (x times `scale` where given), optionally storing each
/// term. NaN if x holds NaN. With `ahead`, prefetches the next row (the next `len` elements) so
/// the following row's reads overlap this row's arithmetic; prefetches never fault, past the end
/// of the array included.
#[inline(always)]
unsafe fn sum_given_max<V: Vector>(
    x: *const V::Elem,
    len: usize,
    top: V::Elem,
    (store, ahead): (Option<*mut V::Elem>, bool),
    scale: Option<V::Elem>,
) -> f64 {
    let (k, exp) = (scale.map(V::splat), ScaledExp::<V>::new(top));
    #[inline(always)]
    fn term<V: Vector>(exp: ScaledExp<V>, k: Option<V>, v: V) -> V {
        exp.apply(k.map_or(v, |k| v.mul(k)))
    }
    let zero = V::splat(V::Elem::ZERO);
    let mut acc = [zero; 4];
    let mut total = CompensatedSum::default();
    let mut steps = 0;
    let w = V::LANES;
    let mut i = 0;
    while i + 4 * w <= len {
        if ahead {
            for j in 0..4 {
                prefetch_line::<V>(x.wrapping_add(len), i + j * w);
            }
        }
        for (j, a) in acc.iter_mut().enumerate() {
            let t = term(exp, k, V::load(x.add(i + j * w)));
            if let Some(y) = store {
                t.store(y.add(i + j * w));
            }
            *a = a.add(t);
        }
        i += 4 * w;
        steps += 1;
        if steps == SHORT_FOLD {
            total.add_lanes(&acc);
            acc = [zero; 4];
            steps = 0;
        }
    }
    while i < len {
        let n = (len - i).min(w);
        let t = if n == w {
            term(exp, k, V::load(x.add(i)))
        } else {
            term(
                exp,
                k,
                load_partial::<V>(x.add(i), n, V::Elem::NEG_INFINITY),
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
    total.add_lanes(&acc);
    total.value()
}

/// A log-sum-exp as hi + lo, with hi exactly representable in the element type and lo small
/// beside it: x - hi is then exact where x is close to hi, so log_softmax = (x - hi) - lo keeps
/// its accuracy near 0, and nothing rounds the large lse before x is subtracted.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Lse {
    pub hi: f64,
    pub lo: f64,
}

impl Lse {
    /// max + rel (rel = lse - max >= 0, `max` an element) split at the element type's precision.
    pub fn new<T: Float>(max: f64, rel: f64) -> Lse {
        // hi = the lse rounded to T, lo = the remainder (TwoSum: exact).
        let s = max + rel;
        let hi = T::from_f64(s).to_f64();
        let b = s - max;
        let err = (max - (s - b)) + (rel - b);
        Lse {
            hi,
            lo: (s - hi) + err,
        }
    }

    pub fn value(self) -> f64 {
        self.hi + self.lo
    }
}

/// log of the row's sum of exponentials, `s`, made accurate where it matters most.
///
/// Without `rest`, the log-sum-exp carries the rounding of the largest term (a few 1e-8 absolute
/// in f32, 1e-16 in f64), which is large relative to a log-sum-exp near 0, or to log_softmax of a
/// dominant element (-log(1 + rest)). When the sum is dominated by its largest terms (or the
/// result is near 0), this sums `rest` over the elements below the max only (unless `s` has it,
/// as from the two-pass blocks), so the result is max + log1p(rest / top + ties - 1) and a
/// single-element row gives exactly its value.
///
/// # Safety
/// `x` must be valid for reading `len` elements and `s` its (usable) sum.
#[inline(always)]
pub unsafe fn refined_lse<V: Vector>(x: *const V::Elem, len: usize, s: ExpSum) -> Lse {
    refined_lse_of::<V>(x, len, s, false)
}

/// [`refined_lse`] where `x` holds the terms exp(x) * 2^-n that [`sum_in_cache`] stored instead of
/// the elements (an in-place caller no longer has them); terms below the max's are the rest.
///
/// # Safety
/// As [`refined_lse`], with the stored terms in place of the elements.
#[inline(always)]
pub unsafe fn refined_lse_from_terms<V: Vector>(
    terms: *const V::Elem,
    len: usize,
    s: ExpSum,
) -> Lse {
    refined_lse_of::<V>(terms, len, s, true)
}

#[inline(always)]
unsafe fn refined_lse_of<V: Vector>(x: *const V::Elem, len: usize, s: ExpSum, terms: bool) -> Lse {
    if !s.rest.is_nan() {
        return s.lse::<V::Elem>();
    }
    // rel = ln(m / top): m / top - 1 >= REST_ROW without a second transcendental per row.
    let rel = s.ln_over_max();
    if rel >= REST_ROW.ln_1p() && (s.max + rel).abs() >= 0.25 {
        return Lse::new::<V::Elem>(s.max, rel);
    }
    with_rest_of::<V>(x, len, s, terms).lse::<V::Elem>()
}

/// [`refined_lse`] of a sum whose `top` and `rest` are both known (the column kernels sum `rest`
/// in the same pass as `m`): the same choice of formula as the row path, so a row that is not
/// dominated by its max (where `m - rest` would cancel) keeps ln(m) + (n ln 2 - max).
pub(crate) fn refined_lse_known<T: Float>(s: ExpSum) -> Lse {
    let rel = ExpSum {
        rest: f64::NAN,
        ..s
    }
    .ln_over_max();
    if s.m / s.top - 1.0 >= REST_ROW && (s.max + rel).abs() >= 0.25 {
        return Lse::new::<T>(s.max, rel);
    }
    s.lse::<T>()
}

/// Rows per block of [`column_exp_sums`]: a block is read twice (max, then sum) while in cache.
/// Small, because the columns' rows are `stride` apart and a stride that is a multiple of 4 KiB
/// maps every row to the same few cache sets: 64 rows of 64-byte lines stay in an 8-way L2 at any
/// stride (a whole column would not, and each pass over it went to memory). Also the fold
/// interval: 16 steps of 4 rows, each accumulator adding at most `SHORT_FOLD` vectors.
const COLUMN_BLOCK: usize = 4 * SHORT_FOLD;

/// One group of LANES columns in [`column_exp_sums`]: the running max and its exponent, and the
/// sums so far, per lane.
struct LaneSums<V: Vector> {
    running: V,
    maxes: [V::Elem; MAX_LANES],
    tops: [V::Elem; MAX_LANES],
    scaled: ScaledExp<V>,
    m: [CompensatedSum; MAX_LANES],
    rest: [CompensatedSum; MAX_LANES],
}

/// The exponent a lane's terms are scaled by for its running max: the max's own within the
/// split limit (beyond it the column takes the exact path and its terms do not matter).
#[inline(always)]
fn column_top<T: Float>(mx: T) -> T {
    let limit = T::SPLIT_LIMIT;
    let c = if !(mx <= limit) {
        limit
    } else if mx < -limit {
        -limit
    } else {
        mx
    };
    (c * T::LOG2E).round_even()
}

/// The statistics of `out.len()` adjacent columns (`len` elements `stride` apart, one per SIMD
/// lane), equal to those [`sum_in_cache`] finds for a row (with REST also `top` and `rest`) but
/// from one read of memory: each block of rows is read for its max, then for its terms
/// exp(x) * 2^-N while in cache, N the exponent of the lane's running max, every group of
/// columns in turn. Where a block raises N, the lane's sums so far are rescaled (exactly, by a
/// power of two), and where it raises the max, everything so far is below the max (`rest` = `m`).
/// None for a column that needs the exact path (NaN, +inf, |x| beyond the split limit, all
/// -inf), where the row path's [`RowSum::usable`] is None.
///
/// # Safety
/// `x` readable at `i * stride + c` for i < len, c < out.len().
#[inline(always)]
pub(crate) unsafe fn column_exp_sums<V: Vector, const REST: bool>(
    x: *const V::Elem,
    stride: usize,
    len: usize,
    out: &mut [Option<ExpSum>],
) {
    let cols = out.len();
    let limit = V::Elem::SPLIT_LIMIT;
    let zero = V::splat(V::Elem::ZERO);
    let start = [column_top(V::Elem::NEG_INFINITY); MAX_LANES];
    let mut groups: Vec<LaneSums<V>> = (0..cols.div_ceil(V::LANES))
        .map(|_| LaneSums {
            running: V::splat(V::Elem::NEG_INFINITY),
            maxes: [V::Elem::NEG_INFINITY; MAX_LANES],
            tops: start,
            scaled: ScaledExp::<V>::lanes(&start),
            m: [CompensatedSum::default(); MAX_LANES],
            rest: [CompensatedSum::default(); MAX_LANES],
        })
        .collect();
    let mut i = 0;
    while i < len {
        let rows = COLUMN_BLOCK.min(len - i);
        for (g, st) in groups.iter_mut().enumerate() {
            let n = V::LANES.min(cols - g * V::LANES);
            let block = x.add(i * stride + g * V::LANES);
            let next = st.running.max(column_max::<V>(block, stride, rows, n));
            if V::mask_any(next.gt_or_nan(st.running)) {
                // Rare after the first blocks: a lane's max rose.
                let mut raised = [V::Elem::ZERO; MAX_LANES];
                next.store(raised.as_mut_ptr());
                for l in 0..n {
                    if raised[l] > st.maxes[l] {
                        let top = column_top(raised[l]);
                        let k = pow2_nonpositive_f64(st.tops[l].to_f64() - top.to_f64());
                        st.m[l].scale(k);
                        st.rest[l] = st.m[l]; // everything before is below the new max
                        (st.maxes[l], st.tops[l]) = (raised[l], top);
                    }
                }
                st.running = next;
                st.scaled = ScaledExp::<V>::lanes(&st.tops);
            }
            let (scaled, running) = (st.scaled, st.running);
            let mut acc = [[zero; 2]; 4];
            let mut r = 0;
            while r < rows {
                for (j, a) in acc.iter_mut().enumerate().take(rows - r) {
                    let v = load_n::<V>(block.add((r + j) * stride), n);
                    let t = scaled.apply(v);
                    a[0] = a[0].add(t);
                    if REST {
                        a[1] = a[1].add(t.keep(v.lt(running)));
                    }
                }
                r += 4;
            }
            let mut lanes = [V::Elem::ZERO; MAX_LANES];
            for (k, sums) in [&mut st.m, &mut st.rest].into_iter().enumerate() {
                if k == 1 && !REST {
                    break;
                }
                let s = acc[0][k].add(acc[1][k]).add(acc[2][k].add(acc[3][k]));
                s.store(lanes.as_mut_ptr());
                for l in 0..n {
                    sums[l].add(lanes[l].to_f64());
                }
            }
        }
        i += rows;
    }
    for (g, st) in groups.iter().enumerate() {
        let mut top = [V::Elem::ZERO; MAX_LANES];
        st.scaled.apply(st.running).store(top.as_mut_ptr());
        for l in 0..V::LANES.min(cols - g * V::LANES) {
            let (mx, sum) = (st.maxes[l], st.m[l].value());
            out[g * V::LANES + l] = if !(mx <= limit) || mx < -limit || sum.is_nan() {
                None
            } else {
                RowSum::Fast(ExpSum {
                    m: sum,
                    n: st.tops[l].to_f64(),
                    max: mx.to_f64(),
                    top: if REST { top[l].to_f64() } else { f64::NAN },
                    rest: if REST { st.rest[l].value() } else { f64::NAN },
                })
                .usable::<V::Elem>()
            };
        }
    }
}

/// `s` (the sum of x[..len]) with `top` and, where rest / top < `below`, `rest` computed.
#[inline(always)]
unsafe fn with_rest<V: Vector>(x: *const V::Elem, len: usize, s: ExpSum, below: f64) -> ExpSum {
    let top = ScaledExp::<V>::new(V::Elem::from_f64(s.n))
        .apply(V::splat(V::Elem::from_f64(s.max)))
        .reduce_max()
        .to_f64();
    if s.m < (1.0 + below) * top {
        with_rest_of::<V>(x, len, s, false)
    } else {
        ExpSum { top, ..s }
    }
}

/// `s` with `top` and `rest`: the max's term and the sum of the terms below it, from the elements
/// (or, with `terms`, from the terms exp(x) * 2^-n that [`sum_in_cache`] stored).
#[inline(always)]
unsafe fn with_rest_of<V: Vector>(x: *const V::Elem, len: usize, s: ExpSum, terms: bool) -> ExpSum {
    let xmax = V::Elem::from_f64(s.max);
    let scaled = ScaledExp::<V>::new(V::Elem::from_f64(s.n));
    let t_max = scaled.apply(V::splat(xmax)).reduce_max();
    let t_max_v = V::splat(t_max);
    let bound = V::splat(xmax);
    let zero = V::splat(V::Elem::ZERO);
    let (mut rest, mut acc, mut steps) = (CompensatedSum::default(), zero, 0);
    let w = V::LANES;
    let mut i = 0;
    while i < len {
        let n = (len - i).min(w);
        let v = if n == w {
            V::load(x.add(i))
        } else {
            // Padding below everything: -inf elements, or zero terms.
            let fill = if terms {
                V::Elem::ZERO
            } else {
                V::Elem::NEG_INFINITY
            };
            load_partial::<V>(x.add(i), n, fill)
        };
        acc = acc.add(if terms {
            v.keep(v.lt(t_max_v))
        } else {
            scaled.apply(v).keep(v.lt(bound))
        });
        i += w;
        steps += 1;
        if steps == SHORT_FOLD {
            rest.add(acc.reduce_add().to_f64());
            (acc, steps) = (zero, 0);
        }
    }
    rest.add(acc.reduce_add().to_f64());
    ExpSum {
        top: t_max.to_f64(),
        rest: rest.value(),
        ..s
    }
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
    sum_in_cache_of::<V>(x, len, None, (store, true))
}

/// [`sum_in_cache`] without the prefetch of the next row, for outputs written by streaming stores
/// (the prefetches hold the fill buffers they combine in: softmax 16384x4096 15% slower with them).
///
/// # Safety
/// As [`sum_in_cache`].
#[inline(always)]
pub(crate) unsafe fn sum_in_cache_streamed<V: Vector>(
    x: *const V::Elem,
    len: usize,
    store: Option<*mut V::Elem>,
) -> RowSum {
    sum_in_cache_of::<V>(x, len, None, (store, false))
}

/// [`sum_in_cache`] of the row x * `scale` (`scale` > 0: a cross-entropy's 1 / temperature),
/// the products never written: the terms are exp(x * scale) * 2^-N.
///
/// # Safety
/// As [`sum_in_cache`].
#[inline(always)]
pub unsafe fn sum_in_cache_scaled<V: Vector>(
    x: *const V::Elem,
    len: usize,
    scale: V::Elem,
    store: Option<*mut V::Elem>,
) -> RowSum {
    sum_in_cache_of::<V>(x, len, Some(scale), (store, true))
}

#[inline(always)]
unsafe fn sum_in_cache_of<V: Vector>(
    x: *const V::Elem,
    len: usize,
    scale: Option<V::Elem>,
    store: (Option<*mut V::Elem>, bool),
) -> RowSum {
    // max(x * k) = max(x) * k for k > 0: rounding is monotone.
    let mx = match scale {
        Some(k) => max_pass::<V>(x, len) * k,
        None => max_pass::<V>(x, len),
    };
    if !(mx <= V::Elem::SPLIT_LIMIT) || mx < -V::Elem::SPLIT_LIMIT {
        // Beyond the limit, all -inf and empty rows included: the exact path.
        return RowSum::Exact;
    }
    let s = ExpSum::new(0.0, mx);
    let m = sum_given_max::<V>(x, len, V::Elem::from_f64(s.n), store, scale);
    if m.is_nan() {
        return RowSum::Exact;
    }
    RowSum::Fast(ExpSum { m, ..s })
}

/// Rows up to this many elements use the in-cache algorithm; longer ones the two-pass one (rows of
/// 2^18 or more are chunked two-pass in the driver anyway). On the 2-core AVX-512 VM (2 MiB of L2
/// per core; float32 softmax, one thread, 16 MiB per case): AVX-512 in-cache 15-25% faster at rows
/// of 1024 and 4096, level (within 5%) from 16384 to 131072, 12-14% slower at 262143; AVX2 10-30%
/// faster up to 131072, level at 262143. One limit for both: below it AVX-512 is within noise.
pub const IN_CACHE_MAX_LEN: usize = 1 << 18;

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

/// How a row's sum of exponentials is found (see `lse`): by row length, or forced (benchmarks).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algorithm {
    /// In-cache up to `IN_CACHE_MAX_LEN` elements, two-pass beyond.
    Auto,
    TwoPass,
    InCache,
}

impl Algorithm {
    pub(crate) fn in_cache(self, len: usize) -> bool {
        match self {
            Algorithm::Auto => len <= IN_CACHE_MAX_LEN,
            Algorithm::TwoPass => false,
            Algorithm::InCache => true,
        }
    }
}

/// The row's sum of exponentials, by the chosen algorithm.
#[inline(always)]
pub(crate) unsafe fn row_sum<V: Vector>(
    x: *const V::Elem,
    len: usize,
    algorithm: Algorithm,
) -> RowSum {
    row_sum_for::<V>(x, len, algorithm, Store::Plain)
}

/// [`row_sum`] for a row whose output is written by `store` (see [`sum_in_cache_streamed`]).
#[inline(always)]
pub(crate) unsafe fn row_sum_for<V: Vector>(
    x: *const V::Elem,
    len: usize,
    algorithm: Algorithm,
    store: Store,
) -> RowSum {
    if !algorithm.in_cache(len) {
        sum_two_pass::<V>(x, len)
    } else if store == Store::Stream {
        sum_in_cache_streamed::<V>(x, len, None)
    } else {
        sum_in_cache::<V>(x, len, None)
    }
}
