//! StableMax and log-StableMax (Prieto et al. 2025, "Grokking at the Edge of Numerical
//! Stability"): softmax with exp replaced by s(x) = x + 1 for x >= 0, 1 / (1 - x) for x < 0,
//! over any (outer, len, inner) layout. s grows linearly, so no exponent range is needed: the sum
//! is plain (f32 partial sums folded into f64), and a row overflows only near the type's limit,
//! where it is redone in f64.
//!
//! The backwards are softmax's scaled by s'(x) / s(x) = 1 / (1 + |x|) (normax-py composes them
//! from [`crate::softmax::softmax_backward`]): they need x, which y does not determine.

use crate::driver::{self, Layout, RowMap};
use crate::float::Float;
use crate::lse::max_pass;
use crate::rows::{
    column_max, columns_lane_sums, fill, lane_sums, lanes, load_n, map_columns, map_elements_to,
    row_sums, store_n, Store,
};
use crate::simd::{log1p, Vector, MAX_LANES};
use crate::softmax::{check_io, output_store};
use crate::Error;

/// s(x) lane-wise as (1 + max(x, 0)) / (1 - min(x, 0)): one factor is exactly 1, so each branch
/// is rounded once, with no select and no subnormal constant (JAX's threads run with
/// denormals-are-zero). -inf gives 0, +inf gives inf; NaN propagates (`max`/`min` return their
/// second operand for NaN on every ISA).
#[inline(always)]
fn s_of<V: Vector>(x: V) -> V {
    let zero = V::splat(V::Elem::ZERO);
    let one = V::splat(V::Elem::ONE);
    one.add(zero.max(x)).div(one.sub(zero.min(x)))
}

/// s(x) in f64 (the exact path and the log's per-element terms).
pub(crate) fn s64(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 + x
    } else {
        1.0 / (1.0 - x)
    }
}

/// log s(x) = sign(x) log1p(|x|), without forming s(x).
pub(crate) fn ln_s64(x: f64) -> f64 {
    if x >= 0.0 {
        x.ln_1p()
    } else {
        -(-x).ln_1p()
    }
}

/// A row's (or a chunk's) sums: `total` = sum s(x); with the log, `max` (the largest element)
/// and `below` = the sum over the elements below it, so log y_max = -log1p(rest / s(max)) keeps
/// its relative accuracy when one element dominates.
#[derive(Clone, Copy, Debug)]
struct Sums {
    total: f64,
    below: f64,
    max: f64,
}

impl Sums {
    /// # Safety
    /// `x` readable for `len` elements.
    #[inline(always)]
    unsafe fn of<V: Vector, const LOG: bool>(x: *const V::Elem, len: usize) -> Sums {
        if !LOG {
            let [total] = row_sums::<V, 1>(
                len,
                #[inline(always)]
                |i, n| [s_of(crate::rows::load_n::<V>(x.add(i), n))],
            );
            return Sums {
                total,
                below: f64::NAN,
                max: f64::NAN,
            };
        }
        let mx = max_pass::<V>(x, len);
        let bound = V::splat(mx);
        let [total, below] = row_sums::<V, 2>(
            len,
            #[inline(always)]
            |i, n| {
                let v = crate::rows::load_n::<V>(x.add(i), n);
                let s = s_of(v);
                [s, s.keep(v.lt(bound))]
            },
        );
        Sums {
            total,
            below,
            max: mx.to_f64(),
        }
    }

    /// [`Sums::of`] with the log for `n <= LANES` adjacent columns `stride` apart, one per lane.
    #[inline(always)]
    unsafe fn of_columns<V: Vector>(
        x: *const V::Elem,
        stride: usize,
        len: usize,
        n: usize,
    ) -> [Sums; MAX_LANES] {
        let empty = Sums {
            total: f64::NAN,
            below: f64::NAN,
            max: f64::NAN,
        };
        let mut out = [empty; MAX_LANES];
        let mx = column_max::<V>(x, stride, len, n);
        let [total, below] = lane_sums::<V, 2>(
            len,
            #[inline(always)]
            |i| {
                let v = load_n::<V>(x.add(i * stride), n);
                let s = s_of(v);
                [s, s.keep(v.lt(mx))]
            },
        );
        let mut maxes = [V::Elem::ZERO; MAX_LANES];
        mx.store(maxes.as_mut_ptr());
        for l in 0..n {
            out[l] = Sums {
                total: total[l],
                below: below[l],
                max: maxes[l].to_f64(),
            };
        }
        out
    }

    /// The f64 sums of a row the vector sums cannot serve (an f32 partial sum overflowed).
    unsafe fn exact<T: Float>(x: *const T, len: usize) -> Sums {
        let xs = std::slice::from_raw_parts(x, len);
        let max = xs
            .iter()
            .map(|v| v.to_f64())
            .fold(f64::NEG_INFINITY, f64::max);
        let (mut total, mut below) = (0.0, 0.0);
        for v in xs {
            let v = v.to_f64();
            total += s64(v);
            if v < max {
                below += s64(v);
            }
        }
        Sums { total, below, max }
    }

    fn combine(self, o: Sums) -> Sums {
        let max = self.max.max(o.max);
        let below = |p: &Sums| if p.max < max { p.total } else { p.below };
        Sums {
            total: self.total + o.total,
            below: below(&self) + below(&o),
            max,
        }
    }

    /// Whether the sums describe a row with a result: no NaN, no +inf, not empty or all -inf.
    fn usable(&self) -> bool {
        self.total.is_finite() && self.total > 0.0
    }
}

/// y = s(x) / total: times 1 / total, or divided by it where 1 / total would be subnormal (a sum
/// near the type's limit), or in f64 where the sum exceeds the type.
#[inline(always)]
unsafe fn write_stablemax<V: Vector>(
    x: *const V::Elem,
    y: *mut V::Elem,
    len: usize,
    s: Sums,
    store: Store,
) {
    let total = V::Elem::from_f64(s.total);
    if !s.usable() || s.total < (2.0f64).powi(100) {
        let inv = V::splat(V::Elem::from_f64(if s.usable() {
            1.0 / s.total
        } else {
            f64::NAN
        }));
        map_elements_to::<V>(
            x,
            y,
            len,
            store,
            #[inline(always)]
            |v| s_of(v).mul(inv),
        );
    } else if total.to_f64().is_finite() {
        let d = V::splat(total);
        map_elements_to::<V>(
            x,
            y,
            len,
            store,
            #[inline(always)]
            |v| s_of(v).div(d),
        );
    } else {
        for i in 0..len {
            *y.add(i) = V::Elem::from_f64(s64((*x.add(i)).to_f64()) / s.total);
        }
    }
}

/// log y_max = -log1p(rest / s(max)) for the max's own entries (and its ties'), rest the sum of
/// the others: near 0 it keeps its relative accuracy where log s(max) - log(total) would not.
fn log_of_max<T: Float>(s: &Sums) -> f64 {
    // s(max) as the sums saw it (rounded to T), and how many elements equal the max.
    let s_max = T::from_f64(s64(s.max)).to_f64();
    let ties = ((s.total - s.below) / s_max).round().max(1.0);
    // 0 - log1p: a lone element gives +0, as log_softmax does.
    0.0 - ((s.below + (ties - 1.0) * s_max) / s_max).ln_1p()
}

/// y = log s(x) - log(total) for a row (contiguous): log s(x) = sign(x) log1p(|x|) on the vector
/// log1p, kept as its two parts so that hi - log(total)'s multiple of 2^-9 is exact and the
/// result is rounded once; the max's entries from [`log_of_max`].
///
/// # Safety
/// `x` readable and `y` writable for `len` elements (`y` may be `x`).
#[inline(always)]
unsafe fn write_log_stablemax_row<V: Vector>(
    x: *const V::Elem,
    y: *mut V::Elem,
    len: usize,
    s: Sums,
) {
    if !s.usable() {
        fill(y, len, V::Elem::NAN);
        return;
    }
    let ln_total = s.total.ln();
    let ln_hi = (ln_total * 512.0).round() / 512.0;
    let (c_hi, c_lo) = (
        V::splat(V::Elem::from_f64(ln_hi)),
        V::splat(V::Elem::from_f64(ln_total - ln_hi)),
    );
    let top = V::Elem::from_f64(log_of_max::<V::Elem>(&s));
    let max = V::Elem::from_f64(s.max);
    let bound = V::splat(max);
    let zero = V::splat(V::Elem::ZERO);
    let one = V::splat(V::Elem::ONE);
    let two = one.add(one);
    let mut i = 0;
    while i < len {
        let n = (len - i).min(V::LANES);
        let v = load_n::<V>(x.add(i), n);
        let (hi, lo) = V::Elem::log1p_parts(v.max(zero.sub(v)));
        let sign = one.sub(two.keep(v.lt(zero)));
        let r = hi.mul(sign).sub(c_hi).add(lo.mul(sign).sub(c_lo));
        // Lanes not below the max: the max itself (a row with a result has no NaN).
        if V::mask_any(one.keep(v.lt(bound)).lt(one)) {
            let (mut vs, mut rs) = ([V::Elem::ZERO; MAX_LANES], [V::Elem::ZERO; MAX_LANES]);
            v.store(vs.as_mut_ptr());
            r.store(rs.as_mut_ptr());
            for j in 0..n {
                if vs[j] == max {
                    rs[j] = top;
                }
            }
            store_n(V::load(rs.as_ptr()), y.add(i), n);
        } else {
            store_n(r, y.add(i), n);
        }
        i += n;
    }
}

/// y = log s(x) - log(total), in f64 per element; the max's entries from [`log_of_max`].
/// Elements `stride` apart (a column).
unsafe fn write_log_stablemax<T: Float>(
    x: *const T,
    y: *mut T,
    len: usize,
    stride: usize,
    s: Sums,
) {
    if !s.usable() {
        for i in 0..len {
            *y.add(i * stride) = T::NAN;
        }
        return;
    }
    let ln_total = s.total.ln();
    let top = log_of_max::<T>(&s);
    for i in 0..len {
        let v = (*x.add(i * stride)).to_f64();
        *y.add(i * stride) = T::from_f64(if v == s.max {
            top
        } else {
            ln_s64(v) - ln_total
        });
    }
}

/// stablemax rows (log_stablemax with LOG).
struct StableMax<const LOG: bool>(Store);

impl<const LOG: bool> StableMax<LOG> {
    #[inline(always)]
    unsafe fn write<V: Vector>(&self, x: *const V::Elem, y: *mut V::Elem, len: usize, s: Sums) {
        if LOG {
            write_log_stablemax_row::<V>(x, y, len, s)
        } else {
            write_stablemax::<V>(x, y, len, s, self.0)
        }
    }
}

impl<T: Float, const LOG: bool> RowMap<T> for StableMax<LOG> {
    type Stat = Sums;
    const TWO_INPUTS: bool = false;

    #[inline(always)]
    unsafe fn row<V: Vector<Elem = T>>(&self, x: *const T, _: *const T, y: *mut T, len: usize) {
        let mut s = Sums::of::<V, LOG>(x, len);
        if !s.total.is_finite() {
            // NaN or +inf in the row (the result is NaN), or an f32 partial sum overflowed.
            s = Sums::exact(x, len);
        }
        self.write::<V>(x, y, len, s)
    }
    #[inline(always)]
    unsafe fn chunk_stat<V: Vector<Elem = T>>(&self, x: *const T, _: *const T, len: usize) -> Sums {
        Sums::of::<V, LOG>(x, len)
    }
    fn combine(a: Sums, b: Sums) -> Sums {
        a.combine(b)
    }
    fn splittable(s: &Sums) -> bool {
        s.total.is_finite()
    }
    #[inline(always)]
    unsafe fn chunk_write<V: Vector<Elem = T>>(
        &self,
        x: *const T,
        _: *const T,
        y: *mut T,
        len: usize,
        s: Sums,
    ) {
        self.write::<V>(x, y, len, s)
    }
    #[inline(always)]
    unsafe fn column_stats<V: Vector<Elem = T>>(
        &self,
        x: *const T,
        _: *const T,
        stride: usize,
        len: usize,
        stats: &mut [Option<Sums>],
    ) {
        // The row kernel redoes the columns it would redo in f64 (a sum that is not finite), and,
        // without the log, those whose sum needs a division (see `write_stablemax`).
        if !LOG {
            let mut totals = vec![[0.0]; stats.len()];
            columns_lane_sums::<V, 1>(
                len,
                &mut totals,
                #[inline(always)]
                |i, c, n| [s_of(load_n::<V>(x.add(i * stride + c), n))],
            );
            for (st, [total]) in stats.iter_mut().zip(totals) {
                *st = (total.is_finite() && total < (2.0f64).powi(100)).then_some(Sums {
                    total,
                    below: f64::NAN,
                    max: f64::NAN,
                });
            }
            return;
        }
        for (g, st) in stats.chunks_mut(V::LANES).enumerate() {
            let sums = Sums::of_columns::<V>(x.add(g * V::LANES), stride, len, st.len());
            for (v, s) in st.iter_mut().zip(sums) {
                let fast = s.total.is_finite() && (LOG || s.total < (2.0f64).powi(100));
                *v = fast.then_some(s);
            }
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
        stats: &[Option<Sums>],
    ) {
        if LOG {
            for (c, s) in stats.iter().enumerate() {
                if let Some(s) = *s {
                    write_log_stablemax(x.add(c), y.add(c), len, stride, s);
                }
            }
            return;
        }
        // As write_stablemax: s(x) times 1 / total (NaN for a column without a result).
        let params = |c0: usize| {
            lanes::<V>(V::LANES, |l| match stats.get(c0 + l) {
                Some(Some(s)) if s.usable() => T::from_f64(1.0 / s.total),
                _ => T::NAN,
            })
        };
        map_columns::<V, V>(
            x,
            std::ptr::null(),
            y,
            (stride, len, stats.len()),
            params,
            #[inline(always)]
            |inv, v, _| s_of(v).mul(inv),
        );
    }
}

/// log1p(x) element-wise with the active ISA (the log1p the kernels use; exposed for testing).
pub fn log1p_slice<T: Float>(x: &[T], y: &mut [T]) -> Result<(), Error> {
    Layout::rows(1, x.len()).check("out", y.len(), x.len())?;
    struct Log1pKernel<'a, T>(&'a [T], &'a mut [T]);
    impl<T: Float> crate::isa::Kernel<T> for Log1pKernel<'_, T> {
        type Output = ();
        #[inline(always)]
        fn run<V: Vector<Elem = T>>(self) {
            unsafe {
                crate::rows::map_elements::<V>(
                    self.0.as_ptr(),
                    self.1.as_mut_ptr(),
                    self.0.len(),
                    #[inline(always)]
                    |v| log1p(v),
                )
            }
        }
    }
    crate::isa::dispatch(Log1pKernel(x, y));
    Ok(())
}

/// # Safety
/// `x` readable and `y` writable for `layout.size()` elements (`y` may be `x`).
unsafe fn stablemax_rows<T: Float, const LOG: bool>(x: *const T, y: *mut T, layout: Layout) {
    let op = StableMax::<LOG>(output_store::<T>(&layout));
    driver::map(&op, x, std::ptr::null(), y, layout)
}

/// stablemax over the `len` axis of `x`: s(x) / sum(s(x)), written to `y`.
pub fn stablemax<T: Float>(x: &[T], y: &mut [T], layout: Layout) -> Result<(), Error> {
    check_io(&layout, x, y.len())?;
    unsafe { stablemax_rows::<T, false>(x.as_ptr(), y.as_mut_ptr(), layout) };
    Ok(())
}

/// stablemax in place.
pub fn stablemax_inplace<T: Float>(x: &mut [T], layout: Layout) -> Result<(), Error> {
    layout.check("x", x.len(), layout.size()?)?;
    let p = x.as_mut_ptr();
    unsafe { stablemax_rows::<T, false>(p, p, layout) };
    Ok(())
}

/// log_stablemax over the `len` axis of `x`: log s(x) - log(sum(s(x))), written to `y`.
pub fn log_stablemax<T: Float>(x: &[T], y: &mut [T], layout: Layout) -> Result<(), Error> {
    check_io(&layout, x, y.len())?;
    unsafe { stablemax_rows::<T, true>(x.as_ptr(), y.as_mut_ptr(), layout) };
    Ok(())
}

/// log_stablemax in place.
pub fn log_stablemax_inplace<T: Float>(x: &mut [T], layout: Layout) -> Result<(), Error> {
    layout.check("x", x.len(), layout.size()?)?;
    let p = x.as_mut_ptr();
    unsafe { stablemax_rows::<T, true>(p, p, layout) };
    Ok(())
}
