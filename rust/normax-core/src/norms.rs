//! Normalizations over contiguous rows: RMSNorm, LayerNorm and CRMSNorm (forward and backward),
//! and the element passes of PowerNorm.
//!
//! Each row kernel reads its row a few times while it sits in cache and writes it once:
//! - statistics: RMSNorm sums x^2 (CRMSNorm also x); LayerNorm sums x, then - with m0 = that mean
//!   rounded to the element type - the deviations d = x - m0 and d^2 (corrected two-pass: the mean is
//!   m0 + mean(d), the biased variance mean(d^2) - mean(d)^2, where mean(d) is tiny, so nothing
//!   cancels even when |mean| >> std). Sums are short `Elem` partials folded into f64 (`rows`), and
//!   the statistics are kept in f64.
//! - the output pass: y = xhat * weight + bias with xhat = (x - m0) * rstd + (m0 - mean) * rstd.
//! - backward: one pass for the row sums the gradient needs, one writing dx and adding the row's
//!   dweight/dbias terms to per-block column sums (`driver::column_sums`, deterministic).
//! - outputs too large to stay cached (`rows::Store`) are written with streaming stores, saving
//!   the read-for-ownership of every line; the loops carry no per-vector branches (absent weight or
//!   bias are ones/zeros, the RMS norms centre on 0, variants are const generics).
//!
//! PowerNorm (Shen et al. 2020) works on tokens (rows) of `channels` values in `groups` equal
//! groups: each group is scaled by 1/sqrt(mean(x^2) + eps) (RMSNorm without weight), then each
//! channel by a per-channel factor that depends on batch statistics over tokens. The per-channel
//! bookkeeping (running statistics, warmup) is O(channels) and lives with the caller; here are the
//! two passes over the tokens.

use crate::driver::{self, Ptr};
use crate::float::Float;
use crate::isa::{dispatch, Kernel};
use crate::rows::{
    add_n, for_each_vector, for_each_vector_from, load_n, put, row_sums, store_n, Store,
};
use crate::simd::Vector;
use crate::Error;
use std::ops::Range;

/// Which normalization.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Norm {
    /// y = x / sqrt(mean(x^2) + eps) * weight
    Rms,
    /// y = (x - mean) / sqrt(var + eps) * weight + bias, biased variance
    Layer,
    /// RMSNorm of the zero-mean vector (x, -sum(x)) of length len + 1, restricted to x:
    /// y = x / sqrt((sum(x^2) + sum(x)^2) / (len + 1) + eps) * weight
    Crms,
}

impl Norm {
    pub fn parse(name: &str) -> Result<Norm, Error> {
        match name {
            "rms" => Ok(Norm::Rms),
            "layer" => Ok(Norm::Layer),
            "crms" => Ok(Norm::Crms),
            _ => Err(Error::Value(format!(
                "unknown normalization {name:?}: expected rms, layer or crms"
            ))),
        }
    }
}

/// One call's normalization: rows of `len` elements, weight and bias of `len` elements each.
#[derive(Clone, Copy, Debug)]
pub struct Params<'a, T> {
    pub norm: Norm,
    pub len: usize,
    pub eps: f64,
    pub weight: Option<&'a [T]>,
    /// LayerNorm only.
    pub bias: Option<&'a [T]>,
}

impl<T: Float> Params<'_, T> {
    /// Rows in an array of `size` elements, after checking the parameters.
    fn rows(&self, name: &str, size: usize) -> Result<usize, Error> {
        if self.eps.is_nan() || self.eps < 0.0 {
            return Err(Error::Value(format!("eps must be >= 0, got {}", self.eps)));
        }
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
        if self.bias.is_some() && self.norm != Norm::Layer {
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

fn check_len<U>(name: &str, s: &[U], expected: usize) -> Result<(), Error> {
    if s.len() != expected {
        return Err(Error::Value(format!(
            "{name} has {} elements; expected {expected}",
            s.len()
        )));
    }
    Ok(())
}

fn opt_ptr<T>(p: Option<&[T]>) -> Ptr<T> {
    Ptr::from_const(p.map_or(std::ptr::null(), |s| s.as_ptr()))
}

fn opt_ptr_mut<T>(p: Option<&mut [T]>) -> Ptr<T> {
    Ptr(p.map_or(std::ptr::null_mut(), |s| s.as_mut_ptr()))
}

/// g = dy * weight over elements i..i + k (`w` never null: ones stand in for no weight).
#[inline(always)]
unsafe fn grad<V: Vector>(dy: *const V::Elem, w: Ptr<V::Elem>, i: usize, k: usize) -> V {
    load_n::<V>(dy.add(i), k).mul(load_n::<V>(w.at(i), k))
}

/// A row's statistics in f64: mean (0 for the RMS norms) and 1/sqrt(var + eps).
#[derive(Clone, Copy, Debug)]
struct Stats {
    mean: f64,
    rstd: f64,
}

#[inline(always)]
unsafe fn row_stats<V: Vector>(norm: Norm, x: *const V::Elem, len: usize, eps: f64) -> Stats {
    let n = len as f64;
    let (mean, ms) = match norm {
        Norm::Rms => {
            let [ss] = row_sums::<V, 1>(
                len,
                #[inline(always)]
                |i, k| {
                    let v = load_n::<V>(x.add(i), k);
                    [v.mul(v)]
                },
            );
            (0.0, ss / n)
        }
        Norm::Crms => {
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
        Norm::Layer => {
            let [s] = row_sums::<V, 1>(
                len,
                #[inline(always)]
                |i, k| [load_n::<V>(x.add(i), k)],
            );
            let m0 = V::Elem::from_f64(s / n);
            let mv = V::splat(m0);
            let [sd, sdd] = row_sums::<V, 2>(
                len,
                #[inline(always)]
                |i, k| {
                    let d = load_n::<V>(x.add(i), k).sub(mv);
                    [d, d.mul(d)]
                },
            );
            let dm = sd / n;
            (m0.to_f64() + dm, (sdd / n - dm * dm).max(0.0))
        }
    };
    Stats {
        mean,
        rstd: 1.0 / (ms + eps).sqrt(),
    }
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
            r: V::splat(V::Elem::from_f64(s.rstd)),
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
    norm: Norm,
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
        for r in self.rows {
            unsafe {
                let (x, y) = (self.x.at(r * len), self.y.at(r * len));
                let s = row_stats::<V>(p.norm, x, len, p.eps);
                let cen = Centering::<V>::new(s);
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
        check_len("mean", m, rows)?;
    }
    if let Some(r) = rstd {
        check_len("rstd", r, rows)?;
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
    check_len("out", y, x.len())?;
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

struct Backward<'a, T> {
    p: &'a Params<'a, T>,
    dy: Ptr<T>,
    x: Ptr<T>,
    dx: Ptr<T>,
    /// Never null (ones without a weight).
    w: Ptr<T>,
    mean: Ptr<f64>,
    rstd: Ptr<f64>,
    /// Column sums of dy * xhat and of dy (null when not wanted), `len` each.
    dweight: Ptr<T>,
    dbias: Ptr<T>,
    store: Store,
    rows: Range<usize>,
}

/// One row's backward write pass: dx = g * r + xhat * b + a, and the row's dweight (dy * xhat)
/// and dbias (dy) terms added to the column sums where ACC_W / ACC_B.
struct RowGrad<V: Vector> {
    dy: *const V::Elem,
    x: *const V::Elem,
    dx: *mut V::Elem,
    w: Ptr<V::Elem>,
    dw: Ptr<V::Elem>,
    db: Ptr<V::Elem>,
    cen: Centering<V>,
    a: V,
    b: V,
}

#[inline(always)]
unsafe fn grad_row<V: Vector, const STREAM: bool, const ACC_W: bool, const ACC_B: bool>(
    g: &RowGrad<V>,
    len: usize,
    head: usize,
) {
    for_each_vector_from::<V>(
        head,
        len,
        #[inline(always)]
        |i, k| {
            let dyi = load_n::<V>(g.dy.add(i), k);
            let xh = g.cen.xhat(load_n::<V>(g.x.add(i), k));
            let gi = dyi.mul(load_n::<V>(g.w.at(i), k));
            put::<V, STREAM>(gi.mul_add(g.cen.r, xh.mul_add(g.b, g.a)), g.dx.add(i), k);
            if ACC_W {
                add_n(dyi.mul(xh), g.dw.at(i), k);
            }
            if ACC_B {
                add_n(dyi, g.db.at(i), k);
            }
        },
    );
}

impl<T: Float> Kernel<T> for Backward<'_, T> {
    type Output = ();
    #[inline(always)]
    fn run<V: Vector<Elem = T>>(self) {
        let p = self.p;
        let (len, norm) = (p.len, p.norm);
        let n = len as f64;
        let w = self.w;
        for r in self.rows {
            unsafe {
                let (dy, x, dx) = (self.dy.at(r * len), self.x.at(r * len), self.dx.at(r * len));
                let s = saved_or_stats::<V>(norm, x, len, p.eps, self.mean, self.rstd, r);
                let cen = Centering::<V>::new(s);
                // dx = r * g + xhat * b + a: the row sums give a and b.
                let (a, b) = match norm {
                    Norm::Layer => {
                        // dx = r * (g - mean(g) - xhat * mean(g * xhat))
                        let [sg, sgx] = row_sums::<V, 2>(
                            len,
                            #[inline(always)]
                            |i, k| {
                                let gv = grad::<V>(dy, w, i, k);
                                [gv, gv.mul(cen.xhat(load_n::<V>(x.add(i), k)))]
                            },
                        );
                        (-s.rstd * sg / n, -s.rstd * sgx / n)
                    }
                    Norm::Rms => {
                        // dx = r * g - x * r^3 * mean(g * x), with x = xhat / r
                        let [sgx] = row_sums::<V, 1>(
                            len,
                            #[inline(always)]
                            |i, k| [grad::<V>(dy, w, i, k).mul(load_n::<V>(x.add(i), k))],
                        );
                        (0.0, -s.rstd * s.rstd * sgx / n)
                    }
                    Norm::Crms => {
                        // dx = r * g - (x + sum(x)) * r^3 * sum(g * x) / (len + 1)
                        let [sgx, sx] = row_sums::<V, 2>(
                            len,
                            #[inline(always)]
                            |i, k| {
                                let v = load_n::<V>(x.add(i), k);
                                [grad::<V>(dy, w, i, k).mul(v), v]
                            },
                        );
                        let b = -s.rstd.powi(3) * sgx / (n + 1.0);
                        (b * sx, b / s.rstd)
                    }
                };
                let g = RowGrad {
                    dy,
                    x,
                    dx,
                    w,
                    dw: self.dweight,
                    db: self.dbias,
                    cen,
                    a: V::splat(T::from_f64(a)),
                    b: V::splat(T::from_f64(b)),
                };
                let (head, store) = self.store.row::<V>(dx);
                let stream = store == Store::Stream;
                match (stream, !g.dw.0.is_null(), !g.db.0.is_null()) {
                    (false, false, false) => grad_row::<V, false, false, false>(&g, len, head),
                    (false, true, false) => grad_row::<V, false, true, false>(&g, len, head),
                    (false, false, true) => grad_row::<V, false, false, true>(&g, len, head),
                    (false, true, true) => grad_row::<V, false, true, true>(&g, len, head),
                    (true, false, false) => grad_row::<V, true, false, false>(&g, len, head),
                    (true, true, false) => grad_row::<V, true, true, false>(&g, len, head),
                    (true, false, true) => grad_row::<V, true, false, true>(&g, len, head),
                    (true, true, true) => grad_row::<V, true, true, true>(&g, len, head),
                }
            }
        }
        self.store.finish::<V>();
    }
}

/// Gradient of [`forward`]: dx from dy and x, and the column sums dweight = sum(dy * xhat) and
/// dbias = sum(dy) over rows where wanted. `mean`/`rstd` are the forward's statistics if saved
/// (LayerNorm needs both; the RMS norms only `rstd`), else they are recomputed.
#[allow(clippy::too_many_arguments)]
pub fn backward<T: Float>(
    p: &Params<T>,
    dy: &[T],
    x: &[T],
    mean: Option<&[f64]>,
    rstd: Option<&[f64]>,
    dx: &mut [T],
    dweight: Option<&mut [T]>,
    dbias: Option<&mut [T]>,
) -> Result<(), Error> {
    let rows = p.rows("x", x.len())?;
    check_len("dy", dy, x.len())?;
    check_len("dx", dx, x.len())?;
    match (p.norm, mean, rstd) {
        (_, None, None)
        | (Norm::Layer, Some(_), Some(_))
        | (Norm::Rms | Norm::Crms, None, Some(_)) => {}
        (Norm::Layer, ..) => {
            return Err(Error::Value(
                "mean and rstd: give both saved statistics or neither".into(),
            ))
        }
        _ => return Err(Error::Value("mean: the RMS norms save only rstd".into())),
    }
    for (s, name) in [(mean, "mean"), (rstd, "rstd")] {
        if let Some(s) = s {
            check_len(name, s, rows)?;
        }
    }
    for (s, name) in [(&dweight, "dweight"), (&dbias, "dbias")] {
        if let Some(s) = s {
            check_len(name, s, p.len)?;
        }
    }
    let (dy, x, dx) = (
        Ptr::from_const(dy.as_ptr()),
        Ptr::from_const(x.as_ptr()),
        Ptr(dx.as_mut_ptr()),
    );
    let (mean, rstd) = (opt_ptr(mean), opt_ptr(rstd));
    let len = p.len;
    let store = Store::for_output::<T>(rows * len);
    let affine = Affine::new(p);
    let w = affine.w;
    let run = |rows: Range<usize>, dweight: Ptr<T>, dbias: Ptr<T>| {
        dispatch(Backward {
            p,
            dy,
            x,
            dx,
            w,
            mean,
            rstd,
            dweight,
            dbias,
            store,
            rows,
        })
    };
    let null = Ptr(std::ptr::null_mut());
    if dweight.is_none() && dbias.is_none() {
        driver::for_each_row_block(rows, len, |r| run(r, null, null));
        return Ok(());
    }
    let (want_w, want_b) = (dweight.is_some(), dbias.is_some());
    let width = len * (want_w as usize + want_b as usize);
    let sums = driver::column_sums::<T>(rows, width, |r, acc| {
        let acc = Ptr(acc.as_mut_ptr());
        let dw = if want_w { acc } else { null };
        let db = if want_b {
            Ptr(acc.at(if want_w { len } else { 0 }))
        } else {
            null
        };
        run(r, dw, db)
    });
    let mut parts = sums.chunks_exact(len);
    for out in [dweight, dbias].into_iter().flatten() {
        for (o, &s) in out
            .iter_mut()
            .zip(parts.next().expect("one part per output"))
        {
            *o = T::from_f64(s);
        }
    }
    Ok(())
}

/// PowerNorm's token layout: `tokens` rows of `channels` values in `groups` equal groups.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PowerLayout {
    pub tokens: usize,
    pub channels: usize,
    pub groups: usize,
}

impl PowerLayout {
    fn check(&self, eps: f64) -> Result<usize, Error> {
        if self.groups == 0 || self.channels % self.groups != 0 {
            return Err(Error::Value(format!(
                "group_num {} does not divide the {} channels",
                self.groups, self.channels
            )));
        }
        if eps.is_nan() || eps < 0.0 {
            return Err(Error::Value(format!("eps must be >= 0, got {eps}")));
        }
        self.tokens
            .checked_mul(self.channels)
            .ok_or_else(|| Error::Value("array too large".into()))
    }
}

/// 1/sqrt(mean(x^2) + eps) of one channel group (the group scaling).
#[inline(always)]
unsafe fn group_scale<V: Vector>(x: *const V::Elem, len: usize, eps: f64) -> V {
    let [ss] = row_sums::<V, 1>(
        len,
        #[inline(always)]
        |i, k| {
            let v = load_n::<V>(x.add(i), k);
            [v.mul(v)]
        },
    );
    V::splat(V::Elem::from_f64(1.0 / (ss / len as f64 + eps).sqrt()))
}

struct PowerForward<'a, T> {
    l: PowerLayout,
    eps: f64,
    x: Ptr<T>,
    /// Tokens left out of the statistics (null: none).
    pad: Ptr<bool>,
    /// Column sums of u^2 (null: not wanted).
    sumsq: Ptr<T>,
    /// y = u * scale + shift (null y: not written).
    scale: &'a [T],
    shift: &'a [T],
    y: Ptr<T>,
    rows: Range<usize>,
}

impl<T: Float> Kernel<T> for PowerForward<'_, T> {
    type Output = ();
    #[inline(always)]
    fn run<V: Vector<Elem = T>>(self) {
        let (c, cg) = (self.l.channels, self.l.channels / self.l.groups);
        for t in self.rows {
            let padded = !self.pad.0.is_null() && unsafe { *self.pad.at(t) };
            let acc = !self.sumsq.0.is_null() && !padded;
            for g in 0..self.l.groups {
                let off = t * c + g * cg;
                unsafe {
                    let x = self.x.at(off);
                    let s = group_scale::<V>(x, cg, self.eps);
                    for_each_vector::<V>(
                        cg,
                        #[inline(always)]
                        |i, k| {
                            let u = load_n::<V>(x.add(i), k).mul(s);
                            let j = g * cg + i;
                            if acc {
                                add_n(u.mul(u), self.sumsq.at(j), k);
                            }
                            if !self.y.0.is_null() {
                                let scale = load_n::<V>(self.scale.as_ptr().add(j), k);
                                let shift = load_n::<V>(self.shift.as_ptr().add(j), k);
                                store_n(u.mul_add(scale, shift), self.y.at(off + i), k);
                            }
                        },
                    );
                }
            }
        }
    }
}

/// The per-channel output transform of [`power_norm_forward`]: y = u * scale + shift.
pub struct PowerOutput<'a, T> {
    pub scale: &'a [T],
    pub shift: &'a [T],
    pub y: &'a mut [T],
}

/// PowerNorm's forward pass over the tokens of `x`. Each group of each token is scaled,
/// u = x / sqrt(mean over the group of x^2 + eps); then, as asked:
/// - `sumsq`: per channel, the sum of u^2 over the tokens that `pad` does not mark (f64, `channels`
///   values: the caller divides by the count for the batch variance);
/// - `out`: y = u * scale + shift per channel (scale = weight / sqrt(phi + eps), shift = bias).
pub fn power_norm_forward<T: Float>(
    x: &[T],
    l: PowerLayout,
    eps: f64,
    pad: Option<&[bool]>,
    sumsq: Option<&mut [f64]>,
    out: Option<PowerOutput<'_, T>>,
) -> Result<(), Error> {
    let size = l.check(eps)?;
    check_len("x", x, size)?;
    if let Some(p) = pad {
        check_len("pad_mask", p, l.tokens)?;
    }
    if let Some(s) = &sumsq {
        check_len("sumsq", s, l.channels)?;
    }
    let (scale, shift, y): (&[T], &[T], Ptr<T>) = match out {
        Some(o) => {
            check_len("scale", o.scale, l.channels)?;
            check_len("shift", o.shift, l.channels)?;
            check_len("y", o.y, size)?;
            (o.scale, o.shift, Ptr(o.y.as_mut_ptr()))
        }
        None => (&[], &[], Ptr(std::ptr::null_mut())),
    };
    let (xp, pad) = (Ptr::from_const(x.as_ptr()), opt_ptr(pad));
    let run = |rows: Range<usize>, sumsq: Ptr<T>| {
        dispatch(PowerForward {
            l,
            eps,
            x: xp,
            pad,
            sumsq,
            scale,
            shift,
            y,
            rows,
        })
    };
    match sumsq {
        None => {
            driver::for_each_row_block(l.tokens, l.channels, |r| run(r, Ptr(std::ptr::null_mut())))
        }
        Some(out) => {
            let sums = driver::column_sums::<T>(l.tokens, l.channels, |r, acc| {
                run(r, Ptr(acc.as_mut_ptr()))
            });
            out.copy_from_slice(&sums);
        }
    }
    Ok(())
}

/// Per-channel inputs of [`power_norm_backward`] (each `channels` long).
pub struct PowerGrad<'a, T> {
    /// g = dy * weight (None: weight one).
    pub weight: Option<&'a [T]>,
    /// z = u * zscale: the factor the forward used.
    pub zscale: &'a [T],
    /// g_hat = g - ema * z; (1 - alpha_bkw) * ema_gz in training, 0 for the exact gradient.
    pub ema: &'a [T],
    /// du = g_hat * dscale: 1/sqrt(batch var + eps) in training, zscale for the exact gradient.
    pub dscale: &'a [T],
}

/// One channel group of one token in the PowerNorm backward: pointers at the group's first element.
struct PowerTerms<V: Vector> {
    x: *const V::Elem,
    dy: *const V::Elem,
    w: Ptr<V::Elem>,
    zs: *const V::Elem,
    ema: *const V::Elem,
    ds: *const V::Elem,
    /// The group's scale 1/sqrt(mean(x^2) + eps).
    s: V,
}

impl<V: Vector> PowerTerms<V> {
    /// (u, z, dy, g_hat, du) of elements i..i + k of the group.
    #[inline(always)]
    unsafe fn at(&self, i: usize, k: usize) -> (V, V, V, V, V) {
        let u = load_n::<V>(self.x.add(i), k).mul(self.s);
        let z = u.mul(load_n::<V>(self.zs.add(i), k));
        let dyv = load_n::<V>(self.dy.add(i), k);
        let gh = grad::<V>(self.dy, self.w, i, k).sub(load_n::<V>(self.ema.add(i), k).mul(z));
        let du = gh.mul(load_n::<V>(self.ds.add(i), k));
        (u, z, dyv, gh, du)
    }
}

struct PowerBackward<'a, T> {
    l: PowerLayout,
    eps: f64,
    c: &'a PowerGrad<'a, T>,
    /// The weight, or ones.
    w: Ptr<T>,
    dy: Ptr<T>,
    x: Ptr<T>,
    dx: Ptr<T>,
    /// Column sums of g_hat * z, dy * z and dy, `channels` each.
    acc: Ptr<T>,
    rows: Range<usize>,
}

impl<T: Float> Kernel<T> for PowerBackward<'_, T> {
    type Output = ();
    #[inline(always)]
    fn run<V: Vector<Elem = T>>(self) {
        let (c, cg) = (self.l.channels, self.l.channels / self.l.groups);
        let w = self.w;
        let (zs, ema, ds) = (
            self.c.zscale.as_ptr(),
            self.c.ema.as_ptr(),
            self.c.dscale.as_ptr(),
        );
        for t in self.rows {
            for g in 0..self.l.groups {
                let off = t * c + g * cg;
                unsafe {
                    let (x, dy, dx) = (self.x.at(off), self.dy.at(off), self.dx.at(off));
                    let s = group_scale::<V>(x, cg, self.eps);
                    let (w, zs, ema, ds) = (
                        Ptr(w.at(g * cg)),
                        zs.add(g * cg),
                        ema.add(g * cg),
                        ds.add(g * cg),
                    );
                    let terms = PowerTerms {
                        x,
                        dy,
                        w,
                        zs,
                        ema,
                        ds,
                        s,
                    };
                    // Back through the group scaling: dx = s * (du - u * mean(du * u)).
                    let [sdu] = row_sums::<V, 1>(
                        cg,
                        #[inline(always)]
                        |i, k| {
                            let (u, _, _, _, du) = terms.at(i, k);
                            [du.mul(u)]
                        },
                    );
                    let su = V::splat(T::from_f64(-sdu / cg as f64)).mul(s);
                    for_each_vector::<V>(
                        cg,
                        #[inline(always)]
                        |i, k| {
                            let (u, z, dyv, gh, du) = terms.at(i, k);
                            store_n(u.mul_add(su, du.mul(s)), dx.add(i), k);
                            let j = g * cg + i;
                            add_n(gh.mul(z), self.acc.at(j), k);
                            add_n(dyv.mul(z), self.acc.at(c + j), k);
                            add_n(dyv, self.acc.at(2 * c + j), k);
                        },
                    );
                }
            }
        }
    }
}

/// PowerNorm's backward pass over the tokens: with u, s the group scaling of `x` (recomputed),
/// z = u * zscale, g = dy * weight, g_hat = g - ema * z and du = g_hat * dscale, writes
/// dx = s * (du - u * mean over the group of du * u) and returns per channel the sums over all
/// tokens of g_hat * z, dy * z (dweight) and dy (dbias), `3 * channels` values in f64.
#[allow(clippy::too_many_arguments)]
pub fn power_norm_backward<T: Float>(
    dy: &[T],
    x: &[T],
    l: PowerLayout,
    eps: f64,
    c: &PowerGrad<'_, T>,
    dx: &mut [T],
) -> Result<Vec<f64>, Error> {
    let size = l.check(eps)?;
    check_len("x", x, size)?;
    check_len("dy", dy, size)?;
    check_len("dx", dx, size)?;
    if let Some(w) = c.weight {
        check_len("weight", w, l.channels)?;
    }
    check_len("zscale", c.zscale, l.channels)?;
    check_len("ema", c.ema, l.channels)?;
    check_len("dscale", c.dscale, l.channels)?;
    let (dy, x, dx) = (
        Ptr::from_const(dy.as_ptr()),
        Ptr::from_const(x.as_ptr()),
        Ptr(dx.as_mut_ptr()),
    );
    let ones = if c.weight.is_none() {
        vec![T::ONE; l.channels]
    } else {
        Vec::new()
    };
    let w = Ptr::from_const(c.weight.unwrap_or(&ones).as_ptr());
    Ok(driver::column_sums::<T>(
        l.tokens,
        3 * l.channels,
        |rows, acc| {
            dispatch(PowerBackward {
                l,
                eps,
                c,
                w,
                dy,
                x,
                dx,
                acc: Ptr(acc.as_mut_ptr()),
                rows,
            })
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    /// The ISA and the thread count are process-wide: tests that change them take this lock.
    use crate::isa::TEST_LOCK as GLOBAL;
    use crate::isa::{self, Isa};
    use crate::threads;

    /// Runs `f` once per ISA this CPU supports, restoring the active one.
    fn each_isa(f: impl Fn(Isa)) {
        let _guard = GLOBAL.lock().unwrap_or_else(|e| e.into_inner());
        let previous = isa::active();
        for i in isa::supported() {
            isa::set_active(i).unwrap();
            f(i);
        }
        isa::set_active(previous).unwrap();
    }

    /// A deterministic pseudo-random sequence in [-1, 1).
    fn noise(n: usize, seed: u64) -> Vec<f64> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 11) as f64 / (1u64 << 52) as f64 - 1.0
            })
            .collect()
    }

    fn cast<T: Float>(v: &[f64]) -> Vec<T> {
        v.iter().map(|&a| T::from_f64(a)).collect()
    }

    fn widen<T: Float>(v: &[T]) -> Vec<f64> {
        v.iter().map(|a| a.to_f64()).collect()
    }

    /// Row statistics straight from the definitions, in f64: (mean, rstd).
    fn ref_stats(norm: Norm, x: &[f64], eps: f64) -> (f64, f64) {
        let n = x.len() as f64;
        let sq: f64 = x.iter().map(|v| v * v).sum();
        match norm {
            Norm::Rms => (0.0, 1.0 / (sq / n + eps).sqrt()),
            Norm::Crms => {
                let s: f64 = x.iter().sum();
                (0.0, 1.0 / ((sq + s * s) / (n + 1.0) + eps).sqrt())
            }
            Norm::Layer => {
                let m = x.iter().sum::<f64>() / n;
                let var = x.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / n;
                (m, 1.0 / (var + eps).sqrt())
            }
        }
    }

    fn ref_forward(
        norm: Norm,
        x: &[f64],
        w: Option<&[f64]>,
        b: Option<&[f64]>,
        eps: f64,
    ) -> Vec<f64> {
        let (m, r) = ref_stats(norm, x, eps);
        (0..x.len())
            .map(|i| (x[i] - m) * r * w.map_or(1.0, |w| w[i]) + b.map_or(0.0, |b| b[i]))
            .collect()
    }

    /// dx of one row from the chain rule written out: y_i = (x_i - m) r w_i (+ b_i).
    fn ref_backward(norm: Norm, dy: &[f64], x: &[f64], w: Option<&[f64]>, eps: f64) -> Vec<f64> {
        let n = x.len() as f64;
        let (m, r) = ref_stats(norm, x, eps);
        let g: Vec<f64> = (0..x.len())
            .map(|i| dy[i] * w.map_or(1.0, |w| w[i]))
            .collect();
        let gx: f64 = g.iter().zip(x).map(|(g, x)| g * (x - m)).sum();
        let sg: f64 = g.iter().sum();
        let sx: f64 = x.iter().sum();
        (0..x.len())
            .map(|j| match norm {
                Norm::Layer => r * (g[j] - sg / n) - (x[j] - m) * r.powi(3) * gx / n,
                Norm::Rms => r * g[j] - x[j] * r.powi(3) * gx / n,
                Norm::Crms => r * g[j] - (x[j] + sx) * r.powi(3) * gx / (n + 1.0),
            })
            .collect()
    }

    /// Largest |a - e| / (|e| + floor).
    fn err(a: &[f64], e: &[f64], floor: f64) -> f64 {
        assert_eq!(a.len(), e.len());
        a.iter()
            .zip(e)
            .map(|(a, e)| (a - e).abs() / (e.abs() + floor))
            .fold(0.0, f64::max)
    }

    const NORMS: [Norm; 3] = [Norm::Rms, Norm::Layer, Norm::Crms];

    #[test]
    fn reference_backward_matches_finite_differences() {
        let (x, dy, w) = (noise(9, 1), noise(9, 2), noise(9, 3));
        for norm in NORMS {
            let dx = ref_backward(norm, &dy, &x, Some(&w), 1e-3);
            let loss = |x: &[f64]| -> f64 {
                let y = ref_forward(norm, x, Some(&w), None, 1e-3);
                y.iter().zip(&dy).map(|(y, d)| y * d).sum()
            };
            for j in 0..x.len() {
                let h = 1e-6;
                let (mut xp, mut xm) = (x.clone(), x.clone());
                xp[j] += h;
                xm[j] -= h;
                let fd = (loss(&xp) - loss(&xm)) / (2.0 * h);
                assert!((fd - dx[j]).abs() < 1e-7, "{norm:?} {j}: {fd} vs {}", dx[j]);
            }
        }
    }

    fn check_forward<T: Float>(isa: Isa, tol: f64) {
        for len in [1, 7, 8, 9, 33, 64, 1000, 4097] {
            let rows = 3;
            let x = noise(rows * len, len as u64);
            let (w, b) = (noise(len, 7), noise(len, 8));
            for norm in NORMS {
                for (weight, bias) in [(false, false), (true, false), (true, true)] {
                    let bias = bias && norm == Norm::Layer;
                    let (wt, bt) = (cast::<T>(&w), cast::<T>(&b));
                    let p = Params {
                        norm,
                        len,
                        eps: 1e-5,
                        weight: weight.then_some(&wt[..]),
                        bias: bias.then_some(&bt[..]),
                    };
                    let xt = cast::<T>(&x);
                    let mut y = vec![T::ZERO; x.len()];
                    let (mut mean, mut rstd) = (vec![0.0; rows], vec![0.0; rows]);
                    forward(&p, &xt, &mut y, Some(&mut mean), Some(&mut rstd)).unwrap();
                    let xw = widen(&xt);
                    for r in 0..rows {
                        let row = &xw[r * len..(r + 1) * len];
                        let (wr, br) = (widen(&wt), widen(&bt));
                        let e = ref_forward(
                            norm,
                            row,
                            weight.then_some(&wr[..]),
                            bias.then_some(&br[..]),
                            1e-5,
                        );
                        let got = widen(&y[r * len..(r + 1) * len]);
                        let what = format!("{isa:?} {norm:?} len {len} w {weight} b {bias}");
                        assert!(err(&got, &e, 1.0) < tol, "{what}: {}", err(&got, &e, 1.0));
                        let (m, s) = ref_stats(norm, row, 1e-5);
                        assert!((mean[r] - m).abs() <= tol * (1.0 + m.abs()), "{what} mean");
                        assert!((rstd[r] - s).abs() <= tol * s, "{what} rstd");
                    }
                    // In place gives the same bits.
                    let mut inplace = xt.clone();
                    forward_inplace(&p, &mut inplace, None, None).unwrap();
                    assert!(inplace
                        .iter()
                        .zip(&y)
                        .all(|(a, b)| a.to_f64().to_bits() == b.to_f64().to_bits()));
                }
            }
        }
    }

    #[test]
    fn forward_matches_the_definition_on_every_isa() {
        // f32: the kernels round a few times per element (x - m0, *r, fma with weight, bias) and
        // the statistics are exact to f64 level; 1e-6 relative (about 8 units of 2^-24) bounds it.
        each_isa(|i| check_forward::<f32>(i, 1e-6));
        each_isa(|i| check_forward::<f64>(i, 1e-14));
    }

    #[test]
    fn variance_is_stable_far_from_zero() {
        // mean 1e4, spread 1e-2: E[x^2] - E[x]^2 would lose every digit in f32.
        each_isa(|isa| {
            for len in [7, 64, 4096] {
                let x: Vec<f32> = noise(len, 5)
                    .iter()
                    .map(|v| (1e4 + 1e-2 * v) as f32)
                    .collect();
                let xw = widen(&x);
                let p = Params::<f32> {
                    norm: Norm::Layer,
                    len,
                    eps: 0.0,
                    weight: None,
                    bias: None,
                };
                let mut y = vec![0.0f32; len];
                let (mut m, mut r) = ([0.0], [0.0]);
                forward(&p, &x, &mut y, Some(&mut m), Some(&mut r)).unwrap();
                let (em, er) = ref_stats(Norm::Layer, &xw, 0.0);
                assert!(
                    (r[0] / er - 1.0).abs() < 1e-5,
                    "{isa:?} {len}: rstd {} vs {er}",
                    r[0]
                );
                assert!((m[0] - em).abs() < 1e-9 * em, "{isa:?} {len}: mean");
                let e = ref_forward(Norm::Layer, &xw, None, None, 0.0);
                assert!(err(&widen(&y), &e, 1.0) < 2e-5, "{isa:?} {len}");
            }
        });
    }

    #[test]
    fn zero_rows_are_finite_with_eps() {
        for norm in NORMS {
            let p = Params::<f32> {
                norm,
                len: 5,
                eps: 1e-6,
                weight: None,
                bias: None,
            };
            let (x, dy) = (vec![0.0f32; 10], vec![1.0f32; 10]);
            let mut y = vec![f32::NAN; 10];
            forward(&p, &x, &mut y, None, None).unwrap();
            assert!(y.iter().all(|&v| v == 0.0), "{norm:?}");
            let mut dx = vec![f32::NAN; 10];
            backward(&p, &dy, &x, None, None, &mut dx, None, None).unwrap();
            assert!(dx.iter().all(|v| v.is_finite()), "{norm:?}");
        }
    }

    fn check_backward<T: Float>(isa: Isa, tol: f64) {
        for (rows, len) in [(5, 1), (3, 7), (40, 33), (4, 1000), (300, 64)] {
            let (x, dy) = (noise(rows * len, 11), noise(rows * len, 12));
            let w = noise(len, 13);
            let (xt, dyt, wt) = (cast::<T>(&x), cast::<T>(&dy), cast::<T>(&w));
            let (xw, dyw, ww) = (widen(&xt), widen(&dyt), widen(&wt));
            for norm in NORMS {
                for weight in [false, true] {
                    let bias = norm == Norm::Layer;
                    let bt = cast::<T>(&noise(len, 14));
                    let p = Params {
                        norm,
                        len,
                        eps: 1e-5,
                        weight: weight.then_some(&wt[..]),
                        bias: bias.then_some(&bt[..]),
                    };
                    let mut dx = vec![T::ZERO; x.len()];
                    let mut dw = vec![T::ZERO; len];
                    let mut db = vec![T::ZERO; len];
                    backward(
                        &p,
                        &dyt,
                        &xt,
                        None,
                        None,
                        &mut dx,
                        Some(&mut dw),
                        bias.then_some(&mut db[..]),
                    )
                    .unwrap();
                    let (mut ew, mut eb) = (vec![0.0; len], vec![0.0; len]);
                    let what = format!("{isa:?} {norm:?} {rows}x{len} w {weight}");
                    for r in 0..rows {
                        let s = r * len..(r + 1) * len;
                        let e = ref_backward(
                            norm,
                            &dyw[s.clone()],
                            &xw[s.clone()],
                            weight.then_some(&ww[..]),
                            1e-5,
                        );
                        // dx is a difference of terms of the size of r * g: measure against that.
                        let scale = ref_stats(norm, &xw[s.clone()], 1e-5).1;
                        assert!(err(&widen(&dx[s.clone()]), &e, scale) < tol, "{what}: dx");
                        let xh = ref_forward(norm, &xw[s.clone()], None, None, 1e-5);
                        for j in 0..len {
                            ew[j] += dyw[r * len + j] * xh[j];
                            eb[j] += dyw[r * len + j];
                        }
                    }
                    assert!(err(&widen(&dw), &ew, 1.0) < tol * 10.0, "{what}: dweight");
                    if bias {
                        assert!(err(&widen(&db), &eb, 1.0) < tol * 10.0, "{what}: dbias");
                    }
                    // Saved statistics give the same result as recomputed ones.
                    let (mut mean, mut rstd) = (vec![0.0; rows], vec![0.0; rows]);
                    let mut y = vec![T::ZERO; x.len()];
                    forward(&p, &xt, &mut y, Some(&mut mean), Some(&mut rstd)).unwrap();
                    let mut dx2 = vec![T::ZERO; x.len()];
                    let saved_mean = (norm == Norm::Layer).then_some(&mean[..]);
                    backward(&p, &dyt, &xt, saved_mean, Some(&rstd), &mut dx2, None, None).unwrap();
                    assert!(
                        dx.iter().zip(&dx2).all(|(a, b)| a.to_f64() == b.to_f64()),
                        "{what}: saved"
                    );
                }
            }
        }
    }

    #[test]
    fn backward_matches_the_chain_rule_on_every_isa() {
        // f32: the row sums are f64-accurate; dx rounds a few times per element (2e-6 relative to
        // r * |g|), dweight sums up to 300 rows in f32 blocks of 16 (1e-5 relative to its terms).
        each_isa(|i| check_backward::<f32>(i, 2e-6));
        each_isa(|i| check_backward::<f64>(i, 1e-13));
    }

    #[test]
    fn column_sums_do_not_depend_on_the_thread_count() {
        let _guard = GLOBAL.lock().unwrap_or_else(|e| e.into_inner());
        let previous = threads::num_threads();
        let (rows, len) = (3000, 96);
        let (x, dy) = (
            cast::<f32>(&noise(rows * len, 21)),
            cast::<f32>(&noise(rows * len, 22)),
        );
        let w = cast::<f32>(&noise(len, 23));
        let p = Params {
            norm: Norm::Rms,
            len,
            eps: 1e-6,
            weight: Some(&w[..]),
            bias: None,
        };
        let run = |threads_n: usize| {
            threads::set_num_threads(threads_n).unwrap();
            let mut dx = vec![0.0f32; rows * len];
            let mut dw = vec![0.0f32; len];
            backward(&p, &dy, &x, None, None, &mut dx, Some(&mut dw), None).unwrap();
            (dx, dw)
        };
        let one = run(1);
        for n in [2, 3, 5] {
            assert_eq!(run(n), one, "{n} threads");
        }
        threads::set_num_threads(previous).unwrap();
    }

    #[test]
    fn streaming_stores_write_the_same_bits() {
        // Outputs past Store's size threshold are written with streaming stores, aligned per row
        // by a head piece; force that path on small rows of odd lengths (misaligned row starts).
        each_isa(|isa| {
            for len in [1, 7, 17, 33, 100] {
                let rows = 9;
                let x = cast::<f32>(&noise(rows * len, 41));
                let dy = cast::<f32>(&noise(rows * len, 42));
                let w = cast::<f32>(&noise(len, 43));
                for norm in NORMS {
                    let p = Params {
                        norm,
                        len,
                        eps: 1e-5,
                        weight: Some(&w[..]),
                        bias: None,
                    };
                    let run = |store: Store| {
                        let (mut y, mut dx) = (vec![0.0f32; rows * len], vec![0.0f32; rows * len]);
                        let (null, nul) = (Ptr(std::ptr::null_mut()), Ptr(std::ptr::null_mut()));
                        let (xp, dyp) = (Ptr::from_const(x.as_ptr()), Ptr::from_const(dy.as_ptr()));
                        let affine = Affine::new(&p);
                        let (w, b, yp) = (affine.w, affine.b, Ptr(y.as_mut_ptr()));
                        let (p, rows) = (&p, 0..rows);
                        let fwd = Forward {
                            p,
                            x: xp,
                            y: yp,
                            w,
                            b,
                            mean: null,
                            rstd: null,
                            store,
                            rows: rows.clone(),
                        };
                        dispatch(fwd);
                        let dxp = Ptr(dx.as_mut_ptr());
                        let (dweight, dbias) = (nul, nul);
                        let (mean, rstd) = (null, null);
                        dispatch(Backward {
                            p,
                            dy: dyp,
                            x: xp,
                            dx: dxp,
                            w,
                            mean,
                            rstd,
                            dweight,
                            dbias,
                            store,
                            rows,
                        });
                        (y, dx)
                    };
                    assert_eq!(
                        run(Store::Stream),
                        run(Store::Plain),
                        "{isa:?} {norm:?} {len}"
                    );
                }
            }
        });
    }

    #[test]
    fn bad_shapes_are_errors() {
        let w = [1.0f32; 3];
        let p = Params {
            norm: Norm::Rms,
            len: 4,
            eps: 1e-6,
            weight: Some(&w[..]),
            bias: None,
        };
        let x = [0.0f32; 8];
        let mut y = [0.0f32; 8];
        assert!(forward(&p, &x, &mut y, None, None).is_err());
        let p = Params::<f32> {
            norm: Norm::Rms,
            len: 3,
            eps: 1e-6,
            weight: None,
            bias: None,
        };
        assert!(forward(&p, &x, &mut y, None, None).is_err());
        let p = Params::<f32> {
            norm: Norm::Rms,
            len: 4,
            eps: -1.0,
            weight: None,
            bias: None,
        };
        assert!(forward(&p, &x, &mut y, None, None).is_err());
        let b = [0.0f32; 4];
        let p = Params::<f32> {
            norm: Norm::Rms,
            len: 4,
            eps: 1e-6,
            weight: None,
            bias: Some(&b[..]),
        };
        assert!(forward(&p, &x, &mut y, None, None).is_err());
        let l = PowerLayout {
            tokens: 2,
            channels: 4,
            groups: 3,
        };
        assert!(power_norm_forward::<f32>(&x, l, 1e-5, None, None, None).is_err());
    }

    /// PowerNorm's passes against the equations in f64.
    fn check_power<T: Float>(isa: Isa, tol: f64) {
        let (tokens, channels) = (37, 24);
        for groups in [1, 4] {
            let cg = channels / groups;
            let x = cast::<T>(&noise(tokens * channels, 31));
            let dy = cast::<T>(&noise(tokens * channels, 32));
            let pad: Vec<bool> = (0..tokens).map(|t| t % 5 == 3).collect();
            let (xw, dyw) = (widen(&x), widen(&dy));
            let eps = 1e-5;
            // Group scaling in f64.
            let mut u = vec![0.0; xw.len()];
            let mut s = vec![0.0; tokens * groups];
            for t in 0..tokens {
                for g in 0..groups {
                    let o = t * channels + g * cg;
                    let ms = xw[o..o + cg].iter().map(|v| v * v).sum::<f64>() / cg as f64;
                    s[t * groups + g] = 1.0 / (ms + eps).sqrt();
                    for i in 0..cg {
                        u[o + i] = xw[o + i] * s[t * groups + g];
                    }
                }
            }
            let l = PowerLayout {
                tokens,
                channels,
                groups,
            };
            let scale = cast::<T>(&noise(channels, 33));
            let shift = cast::<T>(&noise(channels, 34));
            let mut y = vec![T::ZERO; x.len()];
            let mut sumsq = vec![0.0; channels];
            let out = PowerOutput {
                scale: &scale,
                shift: &shift,
                y: &mut y,
            };
            power_norm_forward(&x, l, eps, Some(&pad), Some(&mut sumsq), Some(out)).unwrap();
            for c in 0..channels {
                let e: f64 = (0..tokens)
                    .filter(|&t| !pad[t])
                    .map(|t| u[t * channels + c].powi(2))
                    .sum();
                assert!((sumsq[c] - e).abs() < tol * e, "{isa:?} sumsq");
                for t in 0..tokens {
                    let k = t * channels + c;
                    let e = u[k] * scale[c].to_f64() + shift[c].to_f64();
                    assert!(
                        (y[k].to_f64() - e).abs() < tol * (1.0 + e.abs()),
                        "{isa:?} y"
                    );
                }
            }
            // Backward with arbitrary per-channel factors.
            let (w, zs, ema, ds) = (
                noise(channels, 35),
                noise(channels, 36),
                noise(channels, 37),
                noise(channels, 38),
            );
            let (wt, zst, emat, dst) = (
                cast::<T>(&w),
                cast::<T>(&zs),
                cast::<T>(&ema),
                cast::<T>(&ds),
            );
            let c = PowerGrad {
                weight: Some(&wt),
                zscale: &zst,
                ema: &emat,
                dscale: &dst,
            };
            let mut dx = vec![T::ZERO; x.len()];
            let sums = power_norm_backward(&dy, &x, l, eps, &c, &mut dx).unwrap();
            let (w, zs, ema, ds) = (widen(&wt), widen(&zst), widen(&emat), widen(&dst));
            let mut e_sums = vec![0.0; 3 * channels];
            for t in 0..tokens {
                for g in 0..groups {
                    let o = t * channels + g * cg;
                    let st = s[t * groups + g];
                    let du: Vec<f64> = (0..cg)
                        .map(|i| {
                            let (k, ch) = (o + i, g * cg + i);
                            let z = u[k] * zs[ch];
                            let gh = dyw[k] * w[ch] - ema[ch] * z;
                            e_sums[ch] += gh * z;
                            e_sums[channels + ch] += dyw[k] * z;
                            e_sums[2 * channels + ch] += dyw[k];
                            gh * ds[ch]
                        })
                        .collect();
                    let m: f64 = (0..cg).map(|i| du[i] * u[o + i]).sum::<f64>() / cg as f64;
                    for i in 0..cg {
                        let e = st * (du[i] - u[o + i] * m);
                        let got = dx[o + i].to_f64();
                        assert!(
                            (got - e).abs() < tol * st * 10.0,
                            "{isa:?} g{groups} dx {got} vs {e}"
                        );
                    }
                }
            }
            assert!(err(&sums, &e_sums, 1.0) < tol * 10.0, "{isa:?} column sums");
        }
    }

    #[test]
    fn power_norm_passes_match_the_equations_on_every_isa() {
        each_isa(|i| check_power::<f32>(i, 2e-6));
        each_isa(|i| check_power::<f64>(i, 1e-13));
    }
}
