//! Normalizations over contiguous rows: RMSNorm, LayerNorm and CRMSNorm (forward and backward),
//! and the element passes of PowerNorm.
//!
//! Each row kernel reads its row a few times while it sits in cache and writes it once:
//! - statistics: RMSNorm sums x^2 (CRMSNorm also x); LayerNorm sums x with compensated (TwoSum)
//!   `Elem` partials, so the mean is accurate to about f64 rounding (`accurate_sum`), then - with m0
//!   = that mean rounded to the element type - the squares of d = x - m0 (the biased variance is
//!   mean(d^2) - (mean - m0)^2, where mean - m0 is tiny, so nothing cancels even when
//!   |mean| >> std). Other sums are short `Elem` partials folded into f64 (`rows`), and the
//!   statistics are kept in f64.
//! - the output pass: y = xhat * weight + bias with xhat = (x - m0) * rstd + (m0 - mean) * rstd.
//! - backward: one pass for the row sums the gradient needs, which also adds the row's
//!   dweight/dbias terms to its block's column sums (`Elem` sums of 16 rows folded into f64 in the
//!   kernel, the blocks fixed by the shape and added in order: deterministic), one writing dx.
//!   Short rows are written 4 at a time, column by column, their dweight/dbias terms summed in
//!   registers and added in the write pass.
//! - extremes: a row whose statistics leave what `Elem` resolves (squares that overflow past
//!   |x| ~ 1.8e19 / sqrt(len) in f32, or that are subnormal with an `eps` too small to hide it) is
//!   redone from a copy scaled by a power of two (exact), its `eps` scaled to match; a rare
//!   second pass, nothing in the normal case but a range check of each row's statistics.
//! - outputs too large to stay cached (`rows::Store`) are written with streaming stores, saving
//!   the read-for-ownership of every line; the loops carry no per-vector branches (absent weight or
//!   bias are ones/zeros, the RMS norms centre on 0, variants are const generics).
//!
//! Here: the parameters, the statistics and the forward; the backward is in `backward`, PowerNorm's
//! passes over tokens in `power`.

use crate::driver::{self, Ptr};
use crate::float::Float;
use crate::isa::{dispatch, Kernel};
use crate::rows::{for_each_vector_from, load_n, put, row_sums, sum_squares, Store};
use crate::simd::{Vector, MAX_LANES};
use crate::spec::{check_eps, check_len, NormKind};
use crate::Error;
use std::ops::Range;

mod backward;
mod power;

pub use backward::backward;
pub use power::{power_norm_backward, power_norm_forward, PowerGrad, PowerLayout, PowerOutput};

/// One call's normalization: rows of `len` elements, weight and bias of `len` elements each.
#[derive(Clone, Copy, Debug)]
pub struct Params<'a, T> {
    pub norm: NormKind,
    pub len: usize,
    pub eps: f64,
    pub weight: Option<&'a [T]>,
    /// LayerNorm only.
    pub bias: Option<&'a [T]>,
}

impl<T: Float> Params<'_, T> {
    /// Rows in an array of `size` elements, after checking the parameters.
    fn rows(&self, name: &str, size: usize) -> Result<usize, Error> {
        check_eps(self.eps)?;
        for (p, pname) in [(self.weight, "weight"), (self.bias, "bias")] {
            if let Some(p) = p {
                if p.len() != self.len {
                    return Err(Error::Value(format!(
                        "{pname} has {} elements; the rows have {}",
                        p.len(),
                        self.len
                    )));
                }
            }
        }
        if self.bias.is_some() && !self.norm.has_bias() {
            return Err(Error::Value(format!("{:?} takes no bias", self.norm)));
        }
        if self.len == 0 {
            return if size == 0 {
                Ok(0)
            } else {
                Err(Error::Value(format!("{name}: rows of length 0")))
            };
        }
        if size % self.len != 0 {
            return Err(Error::Value(format!(
                "{name} has {size} elements, not a whole number of rows of {}",
                self.len
            )));
        }
        Ok(size / self.len)
    }
}

pub(super) fn opt_ptr<T>(p: Option<&[T]>) -> Ptr<T> {
    Ptr::from_const(p.map_or(std::ptr::null(), |s| s.as_ptr()))
}

fn opt_ptr_mut<T>(p: Option<&mut [T]>) -> Ptr<T> {
    Ptr(p.map_or(std::ptr::null_mut(), |s| s.as_mut_ptr()))
}

/// g = dy * weight over elements i..i + k (`w` never null: ones stand in for no weight).
#[inline(always)]
pub(super) unsafe fn grad<V: Vector>(dy: *const V::Elem, w: Ptr<V::Elem>, i: usize, k: usize) -> V {
    load_n::<V>(dy.add(i), k).mul(load_n::<V>(w.at(i), k))
}

/// A row's statistics in f64: mean (0 for the RMS norms) and 1/sqrt(var + eps).
#[derive(Clone, Copy, Debug)]
pub(super) struct Stats {
    pub(super) mean: f64,
    pub(super) rstd: f64,
}

impl Stats {
    /// Whether the row must be redone scaled: a statistic that overflowed (or NaN), or an rstd
    /// beyond 2^51 (f32; 2^484 in f64), where the mean square is below 2^-102 (2^-969), so the
    /// squares summed were subnormal and rstd may not even fit in `T`.
    #[inline(always)]
    pub(super) fn extreme<T>(&self) -> bool {
        const F32_MOST: f64 = f64::from_bits((1023 + 51) << 52); // 2^51
        const F64_MOST: f64 = f64::from_bits((1023 + 484) << 52); // 2^484
        let most = if std::mem::size_of::<T>() == 4 {
            F32_MOST
        } else {
            F64_MOST
        };
        !(self.mean.is_finite() && self.rstd > 0.0 && self.rstd <= most)
    }

    /// The statistics of a row from those of its copy scaled by `k`.
    fn unscaled(self, k: f64) -> Stats {
        Stats {
            mean: self.mean / k,
            rstd: self.rstd * k,
        }
    }
}

/// mean((k x)^2) of a row and the power of two k that brings its largest |x| into [1, 2), in
/// f64; None for a row of zeros or one holding inf or NaN.
pub(super) unsafe fn scaled_mean_square<T: Float>(x: *const T, len: usize) -> Option<(f64, f64)> {
    let row = std::slice::from_raw_parts(x, len);
    let k = row_scale(row)?;
    let ss: f64 = row.iter().map(|v| (v.to_f64() * k).powi(2)).sum();
    Some((ss / len as f64, k))
}

/// The power of two k that brings the row's largest |x| into [1, 2); None for a row of zeros or
/// one holding inf or NaN (nothing to scale).
fn row_scale<T: Float>(row: &[T]) -> Option<f64> {
    let mut most = 0.0f64;
    for v in row {
        let a = v.to_f64().abs();
        if a.is_nan() {
            return None;
        }
        most = most.max(a);
    }
    if most == 0.0 || most.is_infinite() {
        return None;
    }
    Some((-most.log2().floor()).exp2())
}

/// A finite rstd clamped to the largest `T`: past it only rows of zeros remain (others are
/// scaled), where the largest keeps 0 * r = 0 and inf would give NaN.
pub(super) fn clamp_rstd<T>(rstd: f64) -> f64 {
    let most = if std::mem::size_of::<T>() == 4 {
        f32::MAX as f64
    } else {
        f64::MAX
    };
    if rstd.is_finite() {
        rstd.min(most)
    } else {
        rstd
    }
}

/// Copies the row into `buf` scaled by the power of two k that brings its largest |x| into
/// [1, 2), and returns k; None for a row of zeros or one holding inf or NaN (nothing to scale).
/// Exact but for elements below 2^-126 (f32) of the largest, which become subnormal.
unsafe fn scale_row<T: Float>(x: *const T, len: usize, buf: &mut Vec<T>) -> Option<f64> {
    let row = std::slice::from_raw_parts(x, len);
    let k = row_scale(row)?;
    buf.clear();
    buf.extend(row.iter().map(|v| T::from_f64(v.to_f64() * k)));
    Some(k)
}

#[inline(always)]
unsafe fn row_stats<V: Vector>(norm: NormKind, x: *const V::Elem, len: usize, eps: f64) -> Stats {
    let n = len as f64;
    let (mean, ms) = match norm {
        NormKind::Rms => (0.0, sum_squares::<V>(x, len) / n),
        NormKind::Crms => {
            let [ss, s] = row_sums::<V, 2>(
                len,
                #[inline(always)]
                |i, k| {
                    let v = load_n::<V>(x.add(i), k);
                    [v.mul(v), v]
                },
            );
            (0.0, (ss + s * s) / (n + 1.0))
        }
        NormKind::Layer => {
            let mean = accurate_sum::<V>(x, len) / n;
            let m0 = V::Elem::from_f64(mean);
            let mv = V::splat(m0);
            let [sdd] = row_sums::<V, 1>(
                len,
                #[inline(always)]
                |i, k| {
                    let d = load_n::<V>(x.add(i), k).sub(mv);
                    [d.mul(d)]
                },
            );
            // sum (x - m0)^2 = sum (x - mean)^2 + n (mean - m0)^2
            let dm = mean - m0.to_f64();
            let var = sdd / n - dm * dm;
            // Clamped at 0, but NaN (a row with inf) stays NaN, as torch's rstd.
            (mean, if var < 0.0 { 0.0 } else { var })
        }
    };
    Stats {
        mean,
        rstd: 1.0 / (ms + eps).sqrt(),
    }
}

/// The statistics of a row scaled by k (`scale_row`), with eps scaled to match: eps k^2. The
/// scaled mean square is 0 (a constant LayerNorm row) or at least 1/len; where the sum is tiny
/// (so that mean square is 0) or eps k^2 overflowed (so eps dwarfs it), only eps counts, and
/// rstd = 1 / (sqrt(eps) k) has none of eps k^2's over- or underflow.
#[inline(always)]
unsafe fn scaled_stats<V: Vector>(
    norm: NormKind,
    x: *const V::Elem,
    len: usize,
    eps: f64,
    k: f64,
) -> Stats {
    let ek = eps * k * k;
    let mut s = row_stats::<V>(norm, x, len, ek);
    if ek.is_infinite() || !(s.rstd < f64::from_bits((1023 + 500) << 52)) {
        s.rstd = 1.0 / (eps.sqrt() * k);
    }
    s
}

/// sum(x) over x[..len], accurate to about f64 rounding: each lane's `Elem` partial sum keeps the
/// exact rounding error of every addition (Knuth's TwoSum) in a second accumulator. The mean must
/// be that accurate: an output near 0 has an ULP of ~1e-12 * std, and plain f32 partials put the
/// row mean off by ~1e-8 * std (59-103 ULP at the 99.9th percentile on zero-mean rows).
/// Cost: 7 operations per vector instead of 1, about +10% on a forward whose rows are in cache
/// (none measurable on forward + backward).
#[inline(always)]
unsafe fn accurate_sum<V: Vector>(x: *const V::Elem, len: usize) -> f64 {
    // a * one + b is exactly a + b: fmas the compiler cannot turn back into adds (`one` is opaque
    // to it) run on the multiply pipes where those are separate from the add pipes (Zen).
    #[inline(always)]
    fn two_sum<V: Vector>(s: &mut V, c: &mut V, v: V, one: V, minus_one: V) {
        let t = s.add(v);
        let vv = s.mul_add(minus_one, t);
        let e = vv.mul_add(minus_one, t);
        let e = s.sub(e).add(v.sub(vv));
        *s = t;
        *c = e.mul_add(one, *c);
    }
    let one = V::splat(std::hint::black_box(V::Elem::ONE));
    let minus_one = V::splat(std::hint::black_box(-V::Elem::ONE));
    let zero = V::splat(V::Elem::ZERO);
    let (mut s, mut c) = ([zero; 4], [zero; 4]);
    let w = V::LANES;
    let mut i = 0;
    while i + 4 * w <= len {
        for j in 0..4 {
            two_sum(
                &mut s[j],
                &mut c[j],
                V::load(x.add(i + j * w)),
                one,
                minus_one,
            );
        }
        i += 4 * w;
    }
    while i < len {
        let k = (len - i).min(w);
        two_sum(
            &mut s[0],
            &mut c[0],
            load_n::<V>(x.add(i), k),
            one,
            minus_one,
        );
        i += k;
    }
    // The four (sum, error) pairs folded into one by TwoSum, exactly but for the error terms'
    // own roundings (relative 2^-24 of terms 2^-24 of the sum); then its lanes in f64. Lane by
    // lane in f64 for all eight vectors was most of a short row's cost (rows of 64: 128 scalar
    // additions against ~50 vector operations for the whole forward).
    let (mut s01, mut s23, mut e) = (s[0], s[2], c[0].add(c[1]).add(c[2].add(c[3])));
    two_sum(&mut s01, &mut e, s[1], one, minus_one);
    two_sum(&mut s23, &mut e, s[3], one, minus_one);
    two_sum(&mut s01, &mut e, s23, one, minus_one);
    let mut lanes = [V::Elem::ZERO; MAX_LANES];
    s01.store(lanes.as_mut_ptr());
    let total = lanes[..w].iter().map(|l| l.to_f64()).sum::<f64>();
    total + e.reduce_add().to_f64()
}

/// xhat = (x - m0) * r + c as vectors: with m0 the mean rounded to `Elem` (so x - m0 is exact
/// near the mean) and c = (m0 - mean) * r carrying the rest of the mean. For the RMS norms m0 and
/// c are 0, and (x - 0) * r + 0 is exactly x * r: one formula, no branch in the loops.
#[derive(Clone, Copy)]
struct Centering<V> {
    m0: V,
    r: V,
    c: V,
}

impl<V: Vector> Centering<V> {
    #[inline(always)]
    fn new(s: Stats) -> Self {
        let m0 = V::Elem::from_f64(s.mean);
        Centering {
            m0: V::splat(m0),
            r: V::splat(V::Elem::from_f64(clamp_rstd::<V::Elem>(s.rstd))),
            c: V::splat(V::Elem::from_f64((m0.to_f64() - s.mean) * s.rstd)),
        }
    }

    #[inline(always)]
    fn xhat(&self, x: V) -> V {
        x.sub(self.m0).mul_add(self.r, self.c)
    }
}

/// A row's stats from the saved arrays (null: recompute).
#[inline(always)]
unsafe fn saved_or_stats<V: Vector>(
    norm: NormKind,
    x: *const V::Elem,
    len: usize,
    eps: f64,
    mean: Ptr<f64>,
    rstd: Ptr<f64>,
    r: usize,
) -> Stats {
    if rstd.0.is_null() {
        return row_stats::<V>(norm, x, len, eps);
    }
    let mean = if mean.0.is_null() { 0.0 } else { *mean.at(r) };
    Stats {
        mean,
        rstd: *rstd.at(r),
    }
}

/// `weight` (or ones) and `bias` (or zeros) as pointers the loops always read: no branch per
/// vector for the optional parameters.
struct Affine<T> {
    w: Ptr<T>,
    b: Ptr<T>,
    _ones: Vec<T>,
    _zeros: Vec<T>,
}

impl<T: Float> Affine<T> {
    fn new(p: &Params<T>) -> Self {
        let ones = if p.weight.is_none() {
            vec![T::ONE; p.len]
        } else {
            Vec::new()
        };
        let zeros = if p.bias.is_none() {
            vec![T::ZERO; p.len]
        } else {
            Vec::new()
        };
        Affine {
            w: Ptr::from_const(p.weight.unwrap_or(&ones).as_ptr()),
            b: Ptr::from_const(p.bias.unwrap_or(&zeros).as_ptr()),
            _ones: ones,
            _zeros: zeros,
        }
    }
}

struct Forward<'a, T> {
    p: &'a Params<'a, T>,
    x: Ptr<T>,
    y: Ptr<T>,
    w: Ptr<T>,
    b: Ptr<T>,
    mean: Ptr<f64>,
    rstd: Ptr<f64>,
    store: Store,
    rows: Range<usize>,
}

/// y = xhat * w + b over one row; the full vectors from `head` on streamed if STREAM.
#[inline(always)]
unsafe fn write_row<V: Vector, const STREAM: bool>(
    x: *const V::Elem,
    y: *mut V::Elem,
    w: Ptr<V::Elem>,
    b: Ptr<V::Elem>,
    len: usize,
    head: usize,
    cen: Centering<V>,
) {
    for_each_vector_from::<V>(
        head,
        len,
        #[inline(always)]
        |i, n| {
            let v = cen
                .xhat(load_n::<V>(x.add(i), n))
                .mul_add(load_n::<V>(w.at(i), n), load_n::<V>(b.at(i), n));
            put::<V, STREAM>(v, y.add(i), n);
        },
    );
}

impl<T: Float> Kernel<T> for Forward<'_, T> {
    type Output = ();
    #[inline(always)]
    fn run<V: Vector<Elem = T>>(self) {
        let p = self.p;
        let len = p.len;
        let mut scaled = Vec::new();
        let stats = |r: usize| unsafe { row_stats::<V>(p.norm, self.x.at(r * len), len, p.eps) };
        // Each row's statistics are taken one row ahead, so the out-of-order core overlaps the
        // next row's reductions with this row's write instead of waiting on its own (sqrt, divide:
        // short rows were latency-bound).
        let mut ahead = (!self.rows.is_empty()).then(|| stats(self.rows.start));
        for r in self.rows.clone() {
            unsafe {
                let (mut x, y) = (self.x.at(r * len) as *const T, self.y.at(r * len));
                let mut s = ahead.expect("taken one row ahead");
                ahead = (r + 1 < self.rows.end).then(|| stats(r + 1));
                let mut cen = Centering::<V>::new(s);
                if s.extreme::<T>() {
                    if let Some(k) = scale_row(x, len, &mut scaled) {
                        let sk = scaled_stats::<V>(p.norm, scaled.as_ptr(), len, p.eps, k);
                        // Not finite: a constant LayerNorm row, all zeros unscaled already.
                        if sk.rstd.is_finite() {
                            x = scaled.as_ptr();
                            cen = Centering::<V>::new(sk);
                            s = sk.unscaled(k);
                        }
                    }
                }
                match self.store.row::<V>(y) {
                    (head, Store::Stream) => {
                        write_row::<V, true>(x, y, self.w, self.b, len, head, cen)
                    }
                    (head, Store::Plain) => {
                        write_row::<V, false>(x, y, self.w, self.b, len, head, cen)
                    }
                }
                if !self.mean.0.is_null() {
                    *self.mean.at(r) = s.mean;
                }
                if !self.rstd.0.is_null() {
                    *self.rstd.at(r) = s.rstd;
                }
            }
        }
        self.store.finish::<V>();
    }
}

unsafe fn forward_raw<T: Float>(
    p: &Params<T>,
    x: *const T,
    y: *mut T,
    rows: usize,
    mean: Ptr<f64>,
    rstd: Ptr<f64>,
) {
    let (x, y) = (Ptr::from_const(x), Ptr(y));
    let affine = Affine::new(p);
    let (w, b) = (affine.w, affine.b);
    let store = Store::for_output::<T>(rows * p.len);
    driver::for_each_row_block(rows, p.len, |rows| {
        dispatch(Forward {
            p,
            x,
            y,
            w,
            b,
            mean,
            rstd,
            store,
            rows,
        })
    });
}

fn check_stats_out(
    rows: usize,
    mean: &Option<&mut [f64]>,
    rstd: &Option<&mut [f64]>,
) -> Result<(), Error> {
    if let Some(m) = mean {
        check_len("mean", m.len(), rows)?;
    }
    if let Some(r) = rstd {
        check_len("rstd", r.len(), rows)?;
    }
    Ok(())
}

/// Normalizes each row of `x` into `y`; optionally stores each row's mean (LayerNorm; 0 for the
/// RMS norms) and 1/sqrt(var + eps) (the RMS norms: 1/sqrt(mean square + eps)) for the backward.
pub fn forward<T: Float>(
    p: &Params<T>,
    x: &[T],
    y: &mut [T],
    mean: Option<&mut [f64]>,
    rstd: Option<&mut [f64]>,
) -> Result<(), Error> {
    let rows = p.rows("x", x.len())?;
    check_len("out", y.len(), x.len())?;
    check_stats_out(rows, &mean, &rstd)?;
    let (m, r) = (opt_ptr_mut(mean), opt_ptr_mut(rstd));
    unsafe { forward_raw(p, x.as_ptr(), y.as_mut_ptr(), rows, m, r) };
    Ok(())
}

/// [`forward`] in place.
pub fn forward_inplace<T: Float>(
    p: &Params<T>,
    x: &mut [T],
    mean: Option<&mut [f64]>,
    rstd: Option<&mut [f64]>,
) -> Result<(), Error> {
    let rows = p.rows("x", x.len())?;
    check_stats_out(rows, &mean, &rstd)?;
    let (m, r) = (opt_ptr_mut(mean), opt_ptr_mut(rstd));
    let xp = x.as_mut_ptr();
    unsafe { forward_raw(p, xp, xp, rows, m, r) };
    Ok(())
}
