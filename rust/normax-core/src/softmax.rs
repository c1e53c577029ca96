//! softmax, log_softmax, logsumexp and the two backwards, over any (outer, len, inner) layout.

use crate::driver::{self, Layout, RowMap, RowReduce};
use crate::float::Float;
use crate::lse::{
    exact_stats, refined_lse, sum_in_cache, sum_two_pass, CompensatedSum, ExpSum, Lse, RowSum,
    ScaledExp, FOLD, IN_CACHE_MAX_LEN,
};
use crate::rows::{for_each_vector, for_each_vector_from, load_n, put, store_n, Store};
use crate::simd::{exp, load_partial, store_partial, Vector};
use crate::Error;

/// Applies `f` to each full vector and the partial tail of x[..len], writing y.
#[inline(always)]
pub(crate) unsafe fn map_elements<V: Vector>(
    x: *const V::Elem,
    y: *mut V::Elem,
    len: usize,
    f: impl Fn(V) -> V,
) {
    map_elements_to(x, y, len, Store::Plain, f)
}

/// [`map_elements`] with the output written by `store` (streaming stores for large outputs).
#[inline(always)]
unsafe fn map_elements_to<V: Vector>(
    x: *const V::Elem,
    y: *mut V::Elem,
    len: usize,
    store: Store,
    f: impl Fn(V) -> V,
) {
    let (head, store) = store.row::<V>(y);
    if store == Store::Stream {
        for_each_vector_from::<V>(
            head,
            len,
            #[inline(always)]
            |i, n| put::<V, true>(f(load_n::<V>(x.add(i), n)), y.add(i), n),
        );
        store.finish::<V>();
    } else {
        for_each_vector::<V>(
            len,
            #[inline(always)]
            |i, n| store_n(f(load_n::<V>(x.add(i), n)), y.add(i), n),
        );
    }
}

/// Same as [`map_elements`] with two inputs.
#[inline(always)]
unsafe fn map_elements2<V: Vector>(
    a: *const V::Elem,
    b: *const V::Elem,
    y: *mut V::Elem,
    len: usize,
    f: impl Fn(V, V) -> V,
) {
    let w = V::LANES;
    let mut i = 0;
    while i + w <= len {
        f(V::load(a.add(i)), V::load(b.add(i))).store(y.add(i));
        i += w;
    }
    if i < len {
        let n = len - i;
        let va = load_partial::<V>(a.add(i), n, V::Elem::ZERO);
        let vb = load_partial::<V>(b.add(i), n, V::Elem::ZERO);
        store_partial(f(va, vb), y.add(i), n);
    }
}

/// a[i..i+n] * b[i..i+n] (or a alone when `b` is null), zero-padded past n.
#[inline(always)]
unsafe fn dot_term<V: Vector>(a: *const V::Elem, b: *const V::Elem, i: usize, n: usize) -> V {
    let va = load_n::<V>(a.add(i), n);
    if b.is_null() {
        va
    } else {
        va.mul(load_n::<V>(b.add(i), n))
    }
}

/// sum(a * b), or sum(a) when `b` is null; f32 partial sums folded into f64 every few vectors.
#[inline(always)]
pub(crate) unsafe fn dot<V: Vector>(a: *const V::Elem, b: *const V::Elem, len: usize) -> f64 {
    let zero = V::splat(V::Elem::ZERO);
    let w = V::LANES;
    let mut acc = [zero; 4];
    let mut total = CompensatedSum::default();
    let mut i = 0;
    let mut steps = 0;
    while i + 4 * w <= len {
        for (j, s) in acc.iter_mut().enumerate() {
            *s = s.add(dot_term::<V>(a, b, i + j * w, w));
        }
        i += 4 * w;
        steps += 1;
        if steps == FOLD {
            total.add_lanes(&acc);
            acc = [zero; 4];
            steps = 0;
        }
    }
    while i < len {
        let n = (len - i).min(w);
        acc[0] = acc[0].add(dot_term::<V>(a, b, i, n));
        i += w;
    }
    total.add_lanes(&acc);
    total.value()
}

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

thread_local! {
    /// Per-thread scratch row (f64 words, so aligned for any element type).
    static SCRATCH: std::cell::RefCell<Vec<f64>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// This thread's scratch row, at least `len` elements of T. Valid until the next call on this
/// thread (kernels do not nest). The kernel runs outside `LocalKey::with`, whose closure would be
/// compiled without the ISA's target features.
fn scratch_row<T: Float>(len: usize) -> *mut T {
    SCRATCH.with(|cell| {
        let mut buf = cell.borrow_mut();
        let words = (len * std::mem::size_of::<T>()).div_ceil(8);
        if buf.len() < words {
            buf.resize(words, 0.0);
        }
        buf.as_mut_ptr() as *mut T
    })
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

/// How a row's sum of exponentials is found (see `lse`): by row length, or forced (benchmarks).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algorithm {
    /// In-cache up to `IN_CACHE_MAX_LEN` elements, two-pass beyond.
    Auto,
    TwoPass,
    InCache,
}

impl Algorithm {
    fn in_cache(self, len: usize) -> bool {
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
    if algorithm.in_cache(len) {
        sum_in_cache::<V>(x, len, None)
    } else {
        sum_two_pass::<V>(x, len)
    }
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

/// softmax rows: the row algorithm, and how the output is stored.
pub(crate) struct Softmax(pub Algorithm, pub Store);

impl<T: Float> RowMap<T> for Softmax {
    type Stat = RowSum;
    const TWO_INPUTS: bool = false;

    #[inline(always)]
    unsafe fn row<V: Vector<Elem = T>>(&self, x: *const T, _: *const T, y: *mut T, len: usize) {
        if self.0.in_cache(len) {
            if self.1 == Store::Stream {
                // Terms go to a scratch row in cache, so y is written once, by streaming stores.
                let terms = scratch_row::<T>(len);
                match sum_in_cache::<V>(x, len, Some(terms)).usable::<T>() {
                    Some(s) => scale_into::<V>(terms, y, len, s, Store::Stream),
                    None => exact_softmax(x, y, len, false),
                }
                return;
            }
            // Terms land in y, then one scaling pass; the exact path writes nothing before it.
            match sum_in_cache::<V>(x, len, Some(y)).usable::<T>() {
                Some(s) => scale_into::<V>(y, y, len, s, Store::Plain),
                None => exact_softmax(x, y, len, false),
            }
        } else {
            match sum_two_pass::<V>(x, len).usable::<T>() {
                Some(s) => write_softmax::<V>(x, y, len, s, self.1),
                None => exact_softmax(x, y, len, false),
            }
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
            write_softmax::<V>(x, y, len, s, self.1);
        }
    }
}

/// log_softmax rows: the row algorithm, and how the output is stored.
pub(crate) struct LogSoftmax(pub Algorithm, pub Store);

impl<T: Float> RowMap<T> for LogSoftmax {
    type Stat = RowSum;
    const TWO_INPUTS: bool = false;

    #[inline(always)]
    unsafe fn row<V: Vector<Elem = T>>(&self, x: *const T, _: *const T, y: *mut T, len: usize) {
        match row_sum::<V>(x, len, self.0).usable::<T>() {
            Some(s) => write_log_softmax::<V>(x, y, len, refined_lse::<V>(x, len, s), self.1),
            None => exact_softmax(x, y, len, true),
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
            write_log_softmax::<V>(x, y, len, Lse::split::<T>(s.ln()), self.1);
        }
    }
}

pub(crate) struct LogSumExp(pub Algorithm);

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
pub(crate) struct WeightedLogSumExp;

/// max over the included elements, and sum(b * exp(x - max)); NaN-poisoned rows carry `nan`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct WeightedSum {
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

/// dx = y * (dy - sum(dy * y)) with y = softmax(x).
pub(crate) struct SoftmaxBackward;

impl<T: Float> RowMap<T> for SoftmaxBackward {
    type Stat = f64;
    const TWO_INPUTS: bool = true;

    #[inline(always)]
    unsafe fn row<V: Vector<Elem = T>>(&self, y: *const T, dy: *const T, dx: *mut T, len: usize) {
        let s = dot::<V>(y, dy, len);
        self.chunk_write::<V>(y, dy, dx, len, s);
    }
    #[inline(always)]
    unsafe fn chunk_stat<V: Vector<Elem = T>>(&self, y: *const T, dy: *const T, len: usize) -> f64 {
        dot::<V>(y, dy, len)
    }
    fn combine(a: f64, b: f64) -> f64 {
        a + b
    }
    fn splittable(_: &f64) -> bool {
        true
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
        let s = V::splat(T::from_f64(s));
        map_elements2::<V>(
            y,
            dy,
            dx,
            len,
            #[inline(always)]
            |y, dy| y.mul(dy.sub(s)),
        );
    }
}

/// dx = dy - exp(y) * sum(dy) with y = log_softmax(x).
pub(crate) struct LogSoftmaxBackward;

impl<T: Float> RowMap<T> for LogSoftmaxBackward {
    type Stat = f64;
    const TWO_INPUTS: bool = true;

    #[inline(always)]
    unsafe fn row<V: Vector<Elem = T>>(&self, y: *const T, dy: *const T, dx: *mut T, len: usize) {
        let s = dot::<V>(dy, std::ptr::null(), len);
        self.chunk_write::<V>(y, dy, dx, len, s);
    }
    #[inline(always)]
    unsafe fn chunk_stat<V: Vector<Elem = T>>(&self, _: *const T, dy: *const T, len: usize) -> f64 {
        dot::<V>(dy, std::ptr::null(), len)
    }
    fn combine(a: f64, b: f64) -> f64 {
        a + b
    }
    fn splittable(_: &f64) -> bool {
        true
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
        let s = V::splat(T::from_f64(s));
        map_elements2::<V>(
            y,
            dy,
            dx,
            len,
            #[inline(always)]
            |y, dy| exp(y).mul(s).sub(dy).mul(V::splat(-T::ONE)),
        );
    }
}

/// Streaming stores for outputs too large to stay cached, written row by row (not gathered).
fn output_store<T>(layout: &Layout) -> Store {
    if layout.inner == 1 {
        Store::for_output::<T>(layout.size().unwrap_or(0))
    } else {
        Store::Plain
    }
}

fn check_io<T>(layout: &Layout, x: &[T], y_len: usize) -> Result<(), Error> {
    let n = layout.size()?;
    layout.check("x", x.len(), n)?;
    layout.check("out", y_len, n)
}

/// softmax over the `len` axis of `x`, written to `y`.
pub fn softmax<T: Float>(x: &[T], y: &mut [T], layout: Layout) -> Result<(), Error> {
    softmax_with(x, y, layout, Algorithm::Auto)
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
    unsafe {
        driver::map(
            &Softmax(algorithm, output_store::<T>(&layout)),
            x.as_ptr(),
            std::ptr::null(),
            y.as_mut_ptr(),
            layout,
        )
    };
    Ok(())
}

/// softmax in place.
pub fn softmax_inplace<T: Float>(x: &mut [T], layout: Layout) -> Result<(), Error> {
    layout.check("x", x.len(), layout.size()?)?;
    let p = x.as_mut_ptr();
    unsafe {
        driver::map(
            &Softmax(Algorithm::Auto, output_store::<T>(&layout)),
            p,
            std::ptr::null(),
            p,
            layout,
        )
    };
    Ok(())
}

/// log_softmax over the `len` axis of `x`, written to `y`.
pub fn log_softmax<T: Float>(x: &[T], y: &mut [T], layout: Layout) -> Result<(), Error> {
    check_io(&layout, x, y.len())?;
    unsafe {
        driver::map(
            &LogSoftmax(Algorithm::Auto, output_store::<T>(&layout)),
            x.as_ptr(),
            std::ptr::null(),
            y.as_mut_ptr(),
            layout,
        )
    };
    Ok(())
}

/// log_softmax in place.
pub fn log_softmax_inplace<T: Float>(x: &mut [T], layout: Layout) -> Result<(), Error> {
    layout.check("x", x.len(), layout.size()?)?;
    let p = x.as_mut_ptr();
    unsafe {
        driver::map(
            &LogSoftmax(Algorithm::Auto, output_store::<T>(&layout)),
            p,
            std::ptr::null(),
            p,
            layout,
        )
    };
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

/// Gradient of softmax: dx = y * (dy - sum(dy * y)) with y = softmax(x).
pub fn softmax_backward<T: Float>(
    y: &[T],
    dy: &[T],
    dx: &mut [T],
    layout: Layout,
) -> Result<(), Error> {
    check_io(&layout, y, dx.len())?;
    layout.check("dy", dy.len(), y.len())?;
    unsafe {
        driver::map(
            &SoftmaxBackward,
            y.as_ptr(),
            dy.as_ptr(),
            dx.as_mut_ptr(),
            layout,
        )
    };
    Ok(())
}

/// Gradient of log_softmax: dx = dy - exp(y) * sum(dy) with y = log_softmax(x).
pub fn log_softmax_backward<T: Float>(
    y: &[T],
    dy: &[T],
    dx: &mut [T],
    layout: Layout,
) -> Result<(), Error> {
    check_io(&layout, y, dx.len())?;
    layout.check("dy", dy.len(), y.len())?;
    unsafe {
        driver::map(
            &LogSoftmaxBackward,
            y.as_ptr(),
            dy.as_ptr(),
            dx.as_mut_ptr(),
            layout,
        )
    };
    Ok(())
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
