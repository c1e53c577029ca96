//! softmax, log_softmax, logsumexp and the two backwards, over any (outer, len, inner) layout.

use crate::driver::{self, Layout, RowMap, RowReduce};
use crate::float::Float;
use crate::lse::{
    column_exp_sums, exact_stats, refined_lse, refined_lse_known, row_sum, row_sum_for,
    sum_in_cache, sum_in_cache_streamed, sum_two_pass, Algorithm, ExpSum, Lse, RowSum, ScaledExp,
};
use crate::rows::{
    columns_lane_sums, dot, for_each_vector, for_each_vector_from, lanes, load_n, map_columns,
    map_elements, map_elements_to, prefetch_line, put, scratch_row, store_n, Store,
};
use crate::simd::{exp, Vector, MAX_LANES};
use crate::Error;

/// y = exp(x) / sum, from the row's sum = m * 2^n: each term exp(x) * 2^-n / m.
#[inline(always)]
unsafe fn write_softmax<V: Vector>(
    x: *const V::Elem,
    y: *mut V::Elem,
    len: usize,
    s: ExpSum,
    store: Store,
) {
    let scaled = ScaledExp::<V>::new(V::Elem::from_f64(s.n));
    let inv = V::splat(V::Elem::from_f64(1.0 / s.m));
    map_elements_to::<V>(
        x,
        y,
        len,
        store,
        #[inline(always)]
        |v| scaled.apply(v).mul(inv),
    );
}

/// y = terms / s.m: the in-cache algorithm's scaling pass.
#[inline(always)]
unsafe fn scale_into<V: Vector>(
    terms: *const V::Elem,
    y: *mut V::Elem,
    len: usize,
    s: ExpSum,
    store: Store,
) {
    let inv = V::splat(V::Elem::from_f64(1.0 / s.m));
    map_elements_to::<V>(
        terms,
        y,
        len,
        store,
        #[inline(always)]
        |v| v.mul(inv),
    );
}

/// y = (x - hi) - lo: exact subtraction where x is close to the log-sum-exp.
#[inline(always)]
unsafe fn write_log_softmax<V: Vector>(
    x: *const V::Elem,
    y: *mut V::Elem,
    len: usize,
    lse: Lse,
    store: Store,
) {
    let hi = V::splat(V::Elem::from_f64(lse.hi));
    let lo = V::splat(V::Elem::from_f64(lse.lo));
    map_elements_to::<V>(
        x,
        y,
        len,
        store,
        #[inline(always)]
        |v| v.sub(hi).sub(lo),
    );
}

unsafe fn exact_softmax<T: Float>(x: *const T, y: *mut T, len: usize, log: bool) {
    let st = exact_stats(x, len);
    for i in 0..len {
        // Relative to the max: max + ln(sum) would lose ln(sum) next to a huge max.
        let shifted = (*x.add(i)).to_f64() - st.max;
        *y.add(i) = if st.row_is_nan() {
            T::NAN
        } else if log {
            T::from_f64(shifted - st.sum.ln())
        } else {
            T::from_f64(shifted.exp() / st.sum)
        };
    }
}

/// softmax rows (log_softmax with LOG): the row algorithm, and how the output is stored. LOG is a
/// const so that each instance compiles to its own branch-free row kernel.
struct Softmax<const LOG: bool>(Algorithm, Store);

impl<const LOG: bool> Softmax<LOG> {
    #[inline(always)]
    unsafe fn softmax_row<V: Vector>(&self, x: *const V::Elem, y: *mut V::Elem, len: usize) {
        if self.0.in_cache(len) {
            if self.1 == Store::Stream {
                // Terms go to a scratch row in cache, so y is written once, by streaming stores.
                let terms = scratch_row::<V::Elem>(len);
                match sum_in_cache_streamed::<V>(x, len, Some(terms)).usable::<V::Elem>() {
                    Some(s) => scale_into::<V>(terms, y, len, s, Store::Stream),
                    None => exact_softmax(x, y, len, false),
                }
                return;
            }
            // Terms land in y, then one scaling pass; the exact path writes nothing before it.
            match sum_in_cache::<V>(x, len, Some(y)).usable::<V::Elem>() {
                Some(s) => scale_into::<V>(y, y, len, s, Store::Plain),
                None => exact_softmax(x, y, len, false),
            }
        } else {
            match sum_two_pass::<V>(x, len).usable::<V::Elem>() {
                Some(s) => write_softmax::<V>(x, y, len, s, self.1),
                None => exact_softmax(x, y, len, false),
            }
        }
    }

    #[inline(always)]
    unsafe fn log_softmax_row<V: Vector>(&self, x: *const V::Elem, y: *mut V::Elem, len: usize) {
        match row_sum_for::<V>(x, len, self.0, self.1).usable::<V::Elem>() {
            Some(s) => write_log_softmax::<V>(x, y, len, refined_lse::<V>(x, len, s), self.1),
            None => exact_softmax(x, y, len, true),
        }
    }
}

impl<T: Float, const LOG: bool> RowMap<T> for Softmax<LOG> {
    type Stat = RowSum;
    const TWO_INPUTS: bool = false;

    #[inline(always)]
    unsafe fn row<V: Vector<Elem = T>>(&self, x: *const T, _: *const T, y: *mut T, len: usize) {
        if LOG {
            self.log_softmax_row::<V>(x, y, len)
        } else {
            self.softmax_row::<V>(x, y, len)
        }
    }
    #[inline(always)]
    unsafe fn chunk_stat<V: Vector<Elem = T>>(
        &self,
        x: *const T,
        _: *const T,
        len: usize,
    ) -> RowSum {
        sum_two_pass::<V>(x, len)
    }
    fn combine(a: RowSum, b: RowSum) -> RowSum {
        a.combine(b)
    }
    fn splittable(s: &RowSum) -> bool {
        s.usable::<T>().is_some()
    }
    #[inline(always)]
    unsafe fn chunk_write<V: Vector<Elem = T>>(
        &self,
        x: *const T,
        _: *const T,
        y: *mut T,
        len: usize,
        s: RowSum,
    ) {
        if let Some(s) = s.usable::<T>() {
            if LOG {
                write_log_softmax::<V>(x, y, len, s.lse::<T>(), self.1);
            } else {
                write_softmax::<V>(x, y, len, s, self.1);
            }
        }
    }
    #[inline(always)]
    unsafe fn column_stats<V: Vector<Elem = T>>(
        &self,
        x: *const T,
        _: *const T,
        stride: usize,
        len: usize,
        stats: &mut [Option<RowSum>],
    ) {
        let mut sums = vec![None; stats.len()];
        column_exp_sums::<V, LOG>(x, stride, len, &mut sums);
        for (st, s) in stats.iter_mut().zip(sums) {
            *st = s.map(RowSum::Fast);
        }
    }
    #[inline(always)]
    unsafe fn column_write<V: Vector<Elem = T>>(
        &self,
        x: *const T,
        _: *const T,
        y: *mut T,
        stride: usize,
        len: usize,
        stats: &[Option<RowSum>],
    ) {
        let cols = stats.len();
        let sum = |c: usize| match stats.get(c) {
            Some(Some(RowSum::Fast(s))) => Some(*s),
            _ => None,
        };
        let null = std::ptr::null();
        if LOG {
            // As the row path's refined_lse: y = (x - hi) - lo per column.
            let params = |c0: usize| {
                let mut lse = [Lse { hi: 0.0, lo: 0.0 }; MAX_LANES];
                for (l, v) in lse.iter_mut().enumerate() {
                    if let Some(s) = sum(c0 + l) {
                        *v = refined_lse_known::<T>(s);
                    }
                }
                (
                    lanes::<V>(V::LANES, |l| T::from_f64(lse[l].hi)),
                    lanes::<V>(V::LANES, |l| T::from_f64(lse[l].lo)),
                )
            };
            map_columns::<V, (V, V)>(
                x,
                null,
                y,
                (stride, len, cols),
                params,
                #[inline(always)]
                |(hi, lo), v, _| v.sub(hi).sub(lo),
            );
        } else {
            // As write_softmax: each term exp(x) * 2^-N times 1 / m.
            let params = |c0: usize| {
                let mut tops = [T::ZERO; MAX_LANES];
                for (l, t) in tops.iter_mut().enumerate() {
                    *t = sum(c0 + l).map_or(T::ZERO, |s| T::from_f64(s.n));
                }
                let inv = lanes::<V>(V::LANES, |l| {
                    sum(c0 + l).map_or(T::ZERO, |s| T::from_f64(1.0 / s.m))
                });
                (ScaledExp::<V>::lanes(&tops), inv)
            };
            map_columns::<V, (ScaledExp<V>, V)>(
                x,
                null,
                y,
                (stride, len, cols),
                params,
                #[inline(always)]
                |(scaled, inv), v, _| scaled.apply(v).mul(inv),
            );
        }
    }
}

struct LogSumExp(Algorithm);

impl<T: Float> RowReduce<T> for LogSumExp {
    type Stat = RowSum;
    const TWO_INPUTS: bool = false;

    #[inline(always)]
    unsafe fn row<V: Vector<Elem = T>>(&self, x: *const T, _: *const T, len: usize) -> (T, T) {
        let lse = match row_sum::<V>(x, len, self.0).usable::<T>() {
            Some(s) => refined_lse::<V>(x, len, s).value(),
            None => exact_stats(x, len).lse(),
        };
        (T::from_f64(lse), sign_of_lse(lse))
    }
    #[inline(always)]
    unsafe fn chunk_stat<V: Vector<Elem = T>>(
        &self,
        x: *const T,
        _: *const T,
        len: usize,
    ) -> RowSum {
        sum_two_pass::<V>(x, len)
    }
    fn combine(a: RowSum, b: RowSum) -> RowSum {
        a.combine(b)
    }
    fn finish(s: RowSum) -> Option<(T, T)> {
        s.usable::<T>().map(|s| (T::from_f64(s.ln()), T::ONE))
    }
    #[inline(always)]
    unsafe fn column_values<V: Vector<Elem = T>>(
        &self,
        x: *const T,
        _: *const T,
        stride: usize,
        len: usize,
        out: &mut [Option<(T, T)>],
    ) {
        let mut sums = vec![None; out.len()];
        column_exp_sums::<V, true>(x, stride, len, &mut sums);
        for (o, s) in out.iter_mut().zip(sums) {
            *o = s.map(|s| {
                let lse = refined_lse_known::<T>(s).value();
                (T::from_f64(lse), sign_of_lse(lse))
            });
        }
    }
}

/// Sign of the (unweighted) sum of exponentials: 0 for an empty or all -inf row, NaN for NaN.
fn sign_of_lse<T: Float>(lse: f64) -> T {
    if lse.is_nan() {
        T::NAN
    } else if lse == f64::NEG_INFINITY {
        T::ZERO
    } else {
        T::ONE
    }
}

/// Weighted log-sum-exp: log|sum(b * exp(x))| and its sign, in f64 (as scipy.special.logsumexp).
/// Elements with b == 0 are left out entirely, so x = +-inf there does not poison the row.
struct WeightedLogSumExp;

/// max over the included elements, and sum(b * exp(x - max)); NaN-poisoned rows carry `nan`.
#[derive(Clone, Copy, Debug)]
struct WeightedSum {
    max: f64,
    sum: f64,
    nan: bool,
}

impl WeightedSum {
    unsafe fn of<T: Float>(x: *const T, b: *const T, len: usize) -> WeightedSum {
        let (xs, bs) = (
            std::slice::from_raw_parts(x, len),
            std::slice::from_raw_parts(b, len),
        );
        let included = || xs.iter().zip(bs).filter(|(_, b)| b.to_f64() != 0.0);
        let mut nan = false;
        let mut max = f64::NEG_INFINITY;
        for (x, b) in included() {
            let (x, b) = (x.to_f64(), b.to_f64());
            nan |= x.is_nan() || b.is_nan();
            max = max.max(x);
        }
        let sum = if max.is_finite() {
            included()
                .map(|(x, b)| b.to_f64() * (x.to_f64() - max).exp())
                .sum()
        } else if max == f64::INFINITY {
            // Every +inf term with its weight's sign; opposite signs make NaN, as inf - inf.
            included()
                .filter(|(x, _)| x.to_f64() == f64::INFINITY)
                .map(|(_, b)| b.to_f64().signum() * f64::INFINITY)
                .sum()
        } else {
            0.0
        };
        WeightedSum { max, sum, nan }
    }

    fn combine(self, o: WeightedSum) -> WeightedSum {
        let nan = self.nan || o.nan;
        if !self.max.is_finite() || !o.max.is_finite() {
            // Infinite or empty parts: the larger max decides; equal infinities add.
            return if self.max > o.max {
                WeightedSum { nan, ..self }
            } else if o.max > self.max {
                WeightedSum { nan, ..o }
            } else {
                WeightedSum {
                    max: self.max,
                    sum: self.sum + o.sum,
                    nan,
                }
            };
        }
        let max = self.max.max(o.max);
        let sum = self.sum * (self.max - max).exp() + o.sum * (o.max - max).exp();
        WeightedSum { max, sum, nan }
    }

    fn finish<T: Float>(self) -> (T, T) {
        if self.nan || self.sum.is_nan() {
            return (T::NAN, T::NAN);
        }
        if self.max == f64::INFINITY {
            return (T::INFINITY, T::from_f64(self.sum.signum()));
        }
        if self.sum == 0.0 {
            return (T::NEG_INFINITY, T::ZERO);
        }
        (
            T::from_f64(self.max + self.sum.abs().ln()),
            T::from_f64(self.sum.signum()),
        )
    }
}

impl<T: Float> RowReduce<T> for WeightedLogSumExp {
    type Stat = WeightedSum;
    const TWO_INPUTS: bool = true;

    unsafe fn row<V: Vector<Elem = T>>(&self, x: *const T, b: *const T, len: usize) -> (T, T) {
        WeightedSum::of(x, b, len).finish()
    }
    unsafe fn chunk_stat<V: Vector<Elem = T>>(
        &self,
        x: *const T,
        b: *const T,
        len: usize,
    ) -> WeightedSum {
        WeightedSum::of(x, b, len)
    }
    fn combine(a: WeightedSum, b: WeightedSum) -> WeightedSum {
        a.combine(b)
    }
    fn finish(s: WeightedSum) -> Option<(T, T)> {
        Some(s.finish())
    }
}

/// The backward of softmax: dx = y * (dy - sum(dy * y)) with y = softmax(x); with LOG, of
/// log_softmax: dx = dy - exp(y) * sum(dy) with y = log_softmax(x). How dx is stored.
struct SoftmaxBackward<const LOG: bool>(Store);

/// Rows up to this many elements have the next row's y and dy prefetched while their own dx is
/// written (from cache, no reads of memory): two rows of both inputs stay well within L2.
const BACKWARD_PREFETCH_MAX_LEN: usize = 1 << 15;

/// exp(y) for y <= 0, a log_softmax output: the exponential of [`ScaledExp`] with the exponent
/// 0, half the instructions of the general `exp`; lanes above 0 or NaN (not a log_softmax, but
/// any input is allowed) take the general `exp`.
#[derive(Clone, Copy)]
struct ExpNonPositive<V>(ScaledExp<V>);

impl<V: Vector> ExpNonPositive<V> {
    #[inline(always)]
    fn new() -> Self {
        ExpNonPositive(ScaledExp::new(V::Elem::ZERO))
    }

    #[inline(always)]
    fn apply(self, y: V) -> V {
        if V::mask_any(y.gt_or_nan(V::splat(V::Elem::ZERO))) {
            exp(y)
        } else {
            self.0.apply(y)
        }
    }
}

impl<const LOG: bool> SoftmaxBackward<LOG> {
    /// dx from y, dy and the row's sum `s` (a vector of it): the row and column kernels' formula.
    #[inline(always)]
    fn dx<V: Vector>(e: ExpNonPositive<V>, s: V, y: V, dy: V) -> V {
        if LOG {
            dy.sub(e.apply(y).mul(s))
        } else {
            y.mul(dy.sub(s))
        }
    }

    /// Writes dx[..len] from the row's (or chunk's) sum; with `ahead`, prefetches the `len`
    /// elements after y and dy (the next row, whose sum pass then reads them from cache).
    #[inline(always)]
    unsafe fn write<V: Vector>(
        &self,
        (y, dy, dx): (*const V::Elem, *const V::Elem, *mut V::Elem),
        len: usize,
        s: f64,
        ahead: bool,
    ) {
        let (s, e) = (V::splat(V::Elem::from_f64(s)), ExpNonPositive::<V>::new());
        #[inline(always)]
        unsafe fn at<V: Vector, const LOG: bool>(
            (y, dy): (*const V::Elem, *const V::Elem),
            (e, s): (ExpNonPositive<V>, V),
            ahead: Option<usize>,
            (i, n): (usize, usize),
        ) -> V {
            if let Some(len) = ahead {
                prefetch_line::<V>(y.wrapping_add(len), i);
                prefetch_line::<V>(dy.wrapping_add(len), i);
            }
            let (y, dy) = (load_n::<V>(y.add(i), n), load_n::<V>(dy.add(i), n));
            SoftmaxBackward::<LOG>::dx(e, s, y, dy)
        }
        let ahead = ahead.then_some(len);
        let (head, store) = self.0.row::<V>(dx);
        if store == Store::Stream {
            for_each_vector_from::<V>(
                head,
                len,
                #[inline(always)]
                |i, n| put::<V, true>(at::<V, LOG>((y, dy), (e, s), ahead, (i, n)), dx.add(i), n),
            );
            store.finish::<V>();
        } else {
            for_each_vector::<V>(
                len,
                #[inline(always)]
                |i, n| store_n(at::<V, LOG>((y, dy), (e, s), ahead, (i, n)), dx.add(i), n),
            );
        }
    }
}

impl<T: Float, const LOG: bool> RowMap<T> for SoftmaxBackward<LOG> {
    type Stat = f64;
    const TWO_INPUTS: bool = true;

    #[inline(always)]
    unsafe fn row<V: Vector<Elem = T>>(&self, y: *const T, dy: *const T, dx: *mut T, len: usize) {
        // The sum reads the row from memory; the write pass finds it in cache.
        let s = self.chunk_stat::<V>(y, dy, len);
        self.write::<V>((y, dy, dx), len, s, len <= BACKWARD_PREFETCH_MAX_LEN);
    }
    #[inline(always)]
    unsafe fn chunk_stat<V: Vector<Elem = T>>(&self, y: *const T, dy: *const T, len: usize) -> f64 {
        if LOG {
            dot::<V>(dy, std::ptr::null(), len)
        } else {
            dot::<V>(y, dy, len)
        }
    }
    fn combine(a: f64, b: f64) -> f64 {
        a + b
    }
    fn splittable(_: &f64) -> bool {
        true
    }
    #[inline(always)]
    unsafe fn column_stats<V: Vector<Elem = T>>(
        &self,
        y: *const T,
        dy: *const T,
        stride: usize,
        len: usize,
        stats: &mut [Option<f64>],
    ) {
        // As chunk_stat: sum(dy) (LOG) or sum(y * dy) per column.
        let mut sums = vec![[0.0]; stats.len()];
        columns_lane_sums::<V, 1>(
            len,
            &mut sums,
            #[inline(always)]
            |i, c, n| {
                let d = load_n::<V>(dy.add(i * stride + c), n);
                [if LOG {
                    d
                } else {
                    load_n::<V>(y.add(i * stride + c), n).mul(d)
                }]
            },
        );
        for (st, [s]) in stats.iter_mut().zip(sums) {
            *st = Some(s);
        }
    }
    #[inline(always)]
    unsafe fn column_write<V: Vector<Elem = T>>(
        &self,
        y: *const T,
        dy: *const T,
        dx: *mut T,
        stride: usize,
        len: usize,
        stats: &[Option<f64>],
    ) {
        let params = |c0: usize| {
            lanes::<V>(V::LANES, |l| {
                T::from_f64(stats.get(c0 + l).copied().flatten().unwrap_or(0.0))
            })
        };
        let e = ExpNonPositive::<V>::new();
        map_columns::<V, V>(
            y,
            dy,
            dx,
            (stride, len, stats.len()),
            params,
            #[inline(always)]
            |s, y, dy| Self::dx(e, s, y, dy),
        );
    }
    #[inline(always)]
    unsafe fn chunk_write<V: Vector<Elem = T>>(
        &self,
        y: *const T,
        dy: *const T,
        dx: *mut T,
        len: usize,
        s: f64,
    ) {
        self.write::<V>((y, dy, dx), len, s, false);
    }
}

/// Streaming stores for outputs too large to stay cached, written row by row (not gathered).
pub(crate) fn output_store<T>(layout: &Layout) -> Store {
    if layout.inner == 1 {
        Store::for_output::<T>(layout.size().unwrap_or(0))
    } else {
        Store::Plain
    }
}

pub(crate) fn check_io<T>(layout: &Layout, x: &[T], y_len: usize) -> Result<(), Error> {
    let n = layout.size()?;
    layout.check("x", x.len(), n)?;
    layout.check("out", y_len, n)
}

/// softmax over the `len` axis of `x`, written to `y`.
pub fn softmax<T: Float>(x: &[T], y: &mut [T], layout: Layout) -> Result<(), Error> {
    softmax_with(x, y, layout, Algorithm::Auto)
}

/// softmax (log_softmax with LOG) of `x` into `y`, which may be `x`.
///
/// # Safety
/// `x` readable and `y` writable for `layout.size()` elements.
unsafe fn softmax_rows<T: Float, const LOG: bool>(
    x: *const T,
    y: *mut T,
    layout: Layout,
    algorithm: Algorithm,
) {
    let op = Softmax::<LOG>(algorithm, output_store::<T>(&layout));
    driver::map(&op, x, std::ptr::null(), y, layout)
}

/// softmax with the row algorithm forced (for benchmarks; rows of 2^18 or more are always chunked
/// two-pass).
pub fn softmax_with<T: Float>(
    x: &[T],
    y: &mut [T],
    layout: Layout,
    algorithm: Algorithm,
) -> Result<(), Error> {
    check_io(&layout, x, y.len())?;
    unsafe { softmax_rows::<T, false>(x.as_ptr(), y.as_mut_ptr(), layout, algorithm) };
    Ok(())
}

/// softmax in place.
pub fn softmax_inplace<T: Float>(x: &mut [T], layout: Layout) -> Result<(), Error> {
    layout.check("x", x.len(), layout.size()?)?;
    let p = x.as_mut_ptr();
    unsafe { softmax_rows::<T, false>(p, p, layout, Algorithm::Auto) };
    Ok(())
}

/// log_softmax over the `len` axis of `x`, written to `y`.
pub fn log_softmax<T: Float>(x: &[T], y: &mut [T], layout: Layout) -> Result<(), Error> {
    check_io(&layout, x, y.len())?;
    unsafe { softmax_rows::<T, true>(x.as_ptr(), y.as_mut_ptr(), layout, Algorithm::Auto) };
    Ok(())
}

/// log_softmax in place.
pub fn log_softmax_inplace<T: Float>(x: &mut [T], layout: Layout) -> Result<(), Error> {
    layout.check("x", x.len(), layout.size()?)?;
    let p = x.as_mut_ptr();
    unsafe { softmax_rows::<T, true>(p, p, layout, Algorithm::Auto) };
    Ok(())
}

/// log(sum(b * exp(x))) over the `len` axis into `out` (outer * inner values), with the sign of
/// the sum in `sign` if given. Without `b` the sum is positive unless empty (sign 0, value -inf).
pub fn logsumexp<T: Float>(
    x: &[T],
    b: Option<&[T]>,
    out: &mut [T],
    sign: Option<&mut [T]>,
    layout: Layout,
) -> Result<(), Error> {
    let n = layout.size()?;
    layout.check("x", x.len(), n)?;
    if let Some(b) = b {
        layout.check("b", b.len(), n)?;
    }
    layout.check("out", out.len(), layout.rows_count())?;
    let sign = match sign {
        Some(s) => {
            layout.check("sign", s.len(), layout.rows_count())?;
            s.as_mut_ptr()
        }
        None => std::ptr::null_mut(),
    };
    unsafe {
        match b {
            Some(b) => driver::reduce(
                &WeightedLogSumExp,
                x.as_ptr(),
                b.as_ptr(),
                out.as_mut_ptr(),
                sign,
                layout,
            ),
            None => driver::reduce(
                &LogSumExp(Algorithm::Auto),
                x.as_ptr(),
                std::ptr::null(),
                out.as_mut_ptr(),
                sign,
                layout,
            ),
        }
    }
    Ok(())
}

/// The backward of softmax (log_softmax with LOG) after checking the lengths.
fn backward<T: Float, const LOG: bool>(
    y: &[T],
    dy: &[T],
    dx: &mut [T],
    layout: Layout,
) -> Result<(), Error> {
    check_io(&layout, y, dx.len())?;
    layout.check("dy", dy.len(), y.len())?;
    let op = SoftmaxBackward::<LOG>(output_store::<T>(&layout));
    unsafe { driver::map(&op, y.as_ptr(), dy.as_ptr(), dx.as_mut_ptr(), layout) };
    Ok(())
}

/// Gradient of softmax: dx = y * (dy - sum(dy * y)) with y = softmax(x).
pub fn softmax_backward<T: Float>(
    y: &[T],
    dy: &[T],
    dx: &mut [T],
    layout: Layout,
) -> Result<(), Error> {
    backward::<T, false>(y, dy, dx, layout)
}

/// Gradient of log_softmax: dx = dy - exp(y) * sum(dy) with y = log_softmax(x).
pub fn log_softmax_backward<T: Float>(
    y: &[T],
    dy: &[T],
    dx: &mut [T],
    layout: Layout,
) -> Result<(), Error> {
    backward::<T, true>(y, dy, dx, layout)
}

/// exp(x) element-wise with the active ISA (the same exp the kernels use; exposed for testing).
pub fn exp_slice<T: Float>(x: &[T], y: &mut [T]) -> Result<(), Error> {
    Layout::rows(1, x.len()).check("out", y.len(), x.len())?;
    struct ExpKernel<'a, T>(&'a [T], &'a mut [T]);
    impl<T: Float> crate::isa::Kernel<T> for ExpKernel<'_, T> {
        type Output = ();
        #[inline(always)]
        fn run<V: Vector<Elem = T>>(self) {
            unsafe {
                map_elements::<V>(
                    self.0.as_ptr(),
                    self.1.as_mut_ptr(),
                    self.0.len(),
                    #[inline(always)]
                    |v| exp(v),
                )
            }
        }
    }
    crate::isa::dispatch(ExpKernel(x, y));
    Ok(())
}
