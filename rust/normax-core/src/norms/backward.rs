//! The backward of the row norms (RMSNorm, LayerNorm, CRMSNorm): dx, and the dweight / dbias
//! column sums. The statistics and the forward are in the parent module.

use super::{opt_ptr, saved_or_stats, scale_row, scaled_stats, Affine, Centering, Params, Stats};
use crate::driver::{self, Ptr, COLUMN_FOLD_ROWS};
use crate::float::Float;
use crate::isa::{dispatch, Kernel};
use crate::rows::{add_n, for_each_vector_from, load_n, put, row_sums, Store};
use crate::simd::Vector;
use crate::spec::{check_len, NormKind};
use crate::Error;
use std::ops::Range;

struct Backward<'a, T> {
    p: &'a Params<'a, T>,
    dy: Ptr<T>,
    x: Ptr<T>,
    dx: Ptr<T>,
    /// Never null (ones without a weight).
    w: Ptr<T>,
    mean: Ptr<f64>,
    rstd: Ptr<f64>,
    /// This block's column sums of dy * xhat and of dy in f64 (null when not wanted), `len` each.
    dweight: Ptr<f64>,
    dbias: Ptr<f64>,
    store: Store,
    rows: Range<usize>,
}

/// Short rows with column sums are written `GROUP` at a time, column by column, their dweight /
/// dbias terms summed in registers: the column sums are loaded and stored once per `GROUP` rows
/// instead of once per row.
const GROUP: usize = 4;
/// Rows up to this many bytes are grouped: a group of longer ones (dy, x and dx of each) would
/// not stay in L1 between the coefficients and the write, and they are not latency-bound.
const GROUP_MAX_ROW_BYTES: usize = 1024;
/// Elements between a block's dweight and dbias partial sums (see [`Backward::run`]).
const STAGGER: usize = 32;

/// One row's backward write pass: dx = g * gr + xhat * b + a (gr: rstd, times the row's scale
/// if it was scaled), and the row's dweight (dy * xhat) and dbias (dy) terms added to the column
/// sums where ACC_W / ACC_B.
#[derive(Clone, Copy)]
struct RowGrad<V: Vector> {
    dy: *const V::Elem,
    x: *const V::Elem,
    dx: *mut V::Elem,
    w: Ptr<V::Elem>,
    dw: Ptr<V::Elem>,
    db: Ptr<V::Elem>,
    cen: Centering<V>,
    gr: V,
    a: V,
    b: V,
}

impl<V: Vector> RowGrad<V> {
    #[inline(always)]
    unsafe fn dx(&self, dyi: V, wi: V, xh: V) -> V {
        dyi.mul(wi).mul_add(self.gr, xh.mul_add(self.b, self.a))
    }
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
            put::<V, STREAM>(g.dx(dyi, load_n::<V>(g.w.at(i), k), xh), g.dx.add(i), k);
            if ACC_W {
                add_n(dyi.mul(xh), g.dw.at(i), k);
            }
            if ACC_B {
                add_n(dyi, g.db.at(i), k);
            }
        },
    );
}

/// [`grad_row`] over `GROUP` rows at once, column by column: each column's dweight / dbias terms
/// of the rows are summed in registers, then added to the column sums.
#[inline(always)]
unsafe fn grad_rows<V: Vector, const STREAM: bool, const ACC_W: bool, const ACC_B: bool>(
    rows: &[RowGrad<V>; GROUP],
    len: usize,
    head: usize,
) {
    let (w, dw, db) = (rows[0].w, rows[0].dw, rows[0].db);
    let zero = V::splat(V::Elem::ZERO);
    for_each_vector_from::<V>(
        head,
        len,
        #[inline(always)]
        |i, k| {
            let wi = load_n::<V>(w.at(i), k);
            let (mut sw, mut sb) = (zero, zero);
            for g in rows {
                let dyi = load_n::<V>(g.dy.add(i), k);
                let xh = g.cen.xhat(load_n::<V>(g.x.add(i), k));
                put::<V, STREAM>(g.dx(dyi, wi, xh), g.dx.add(i), k);
                if ACC_W {
                    sw = sw.add(dyi.mul(xh));
                }
                if ACC_B {
                    sb = sb.add(dyi);
                }
            }
            if ACC_W {
                add_n(sw, dw.at(i), k);
            }
            if ACC_B {
                add_n(sb, db.at(i), k);
            }
        },
    );
}

/// The row's dweight (dy * xhat) and dbias (dy) terms of elements i..i + k added to the column
/// sums where ACC_W / ACC_B.
#[inline(always)]
unsafe fn add_terms<V: Vector, const ACC_W: bool, const ACC_B: bool>(
    dyi: V,
    xh: V,
    dw: Ptr<V::Elem>,
    db: Ptr<V::Elem>,
    i: usize,
    k: usize,
) {
    if ACC_W {
        add_n(dyi.mul(xh), dw.at(i), k);
    }
    if ACC_B {
        add_n(dyi, db.at(i), k);
    }
}

/// The row coefficients of dx = r * g + xhat * b + a, from the row sums of g = dy * w and x;
/// the row's dweight / dbias terms are added to `dw` / `db` on the way where ACC_W / ACC_B.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn grad_coefficients<V: Vector, const ACC_W: bool, const ACC_B: bool>(
    norm: NormKind,
    dy: *const V::Elem,
    w: Ptr<V::Elem>,
    x: *const V::Elem,
    len: usize,
    s: Stats,
    cen: Centering<V>,
    (dw, db): (Ptr<V::Elem>, Ptr<V::Elem>),
) -> (f64, f64) {
    let n = len as f64;
    match norm {
        NormKind::Layer => {
            // dx = r * (g - mean(g) - xhat * mean(g * xhat))
            let [sg, sgx] = row_sums::<V, 2>(
                len,
                #[inline(always)]
                |i, k| {
                    let dyi = load_n::<V>(dy.add(i), k);
                    let gv = dyi.mul(load_n::<V>(w.at(i), k));
                    let xh = cen.xhat(load_n::<V>(x.add(i), k));
                    add_terms::<V, ACC_W, ACC_B>(dyi, xh, dw, db, i, k);
                    [gv, gv.mul(xh)]
                },
            );
            (-s.rstd * sg / n, -s.rstd * sgx / n)
        }
        NormKind::Rms => {
            // dx = r * g - x * r^3 * mean(g * x), with x = xhat / r
            let [sgx] = row_sums::<V, 1>(
                len,
                #[inline(always)]
                |i, k| {
                    let (dyi, v) = (load_n::<V>(dy.add(i), k), load_n::<V>(x.add(i), k));
                    if ACC_W || ACC_B {
                        add_terms::<V, ACC_W, ACC_B>(dyi, cen.xhat(v), dw, db, i, k);
                    }
                    [dyi.mul(load_n::<V>(w.at(i), k)).mul(v)]
                },
            );
            // r * (r * sgx): r^2 alone underflows f64 for rows past ~1e154 (a saved rstd).
            (0.0, -s.rstd * (s.rstd * sgx) / n)
        }
        NormKind::Crms => {
            // dx = r * g - (x + sum(x)) * r^3 * sum(g * x) / (len + 1)
            let [sgx, sx] = row_sums::<V, 2>(
                len,
                #[inline(always)]
                |i, k| {
                    let (dyi, v) = (load_n::<V>(dy.add(i), k), load_n::<V>(x.add(i), k));
                    if ACC_W || ACC_B {
                        add_terms::<V, ACC_W, ACC_B>(dyi, cen.xhat(v), dw, db, i, k);
                    }
                    [dyi.mul(load_n::<V>(w.at(i), k)).mul(v), v]
                },
            );
            // With t ~ 1, never r^3 (underflows f64 for rows past ~1e100).
            let t = s.rstd * sgx / (n + 1.0);
            (-(s.rstd * t) * (s.rstd * sx), -s.rstd * t)
        }
    }
}

impl<T: Float> Backward<'_, T> {
    /// Row r's dx coefficients from its statistics; its column sums go to `dw` / `db` (null:
    /// none). With EARLY the coefficients pass adds the row's column terms (where the statistics
    /// are in range) and the RowGrad carries none; else the write pass is to add them. Err where
    /// the row must be redone scaled (see [`Backward::row`]), saying whether the terms were
    /// added.
    #[inline(always)]
    unsafe fn coefficients<V: Vector<Elem = T>, const EARLY: bool>(
        &self,
        r: usize,
        dw: Ptr<T>,
        db: Ptr<T>,
    ) -> Result<RowGrad<V>, bool> {
        let (p, len) = (self.p, self.p.len);
        let x = self.x.at(r * len) as *const T;
        let dy = self.dy.at(r * len) as *const T;
        let s = saved_or_stats::<V>(p.norm, x, len, p.eps, self.mean, self.rstd, r);
        let cen = Centering::<V>::new(s);
        let early = EARLY && !s.extreme::<T>();
        let (norm, w, sums) = (p.norm, self.w, (dw, db));
        let (a, b) = match (early && !dw.0.is_null(), early && !db.0.is_null()) {
            (false, false) => {
                grad_coefficients::<V, false, false>(norm, dy, w, x, len, s, cen, sums)
            }
            (true, false) => grad_coefficients::<V, true, false>(norm, dy, w, x, len, s, cen, sums),
            (false, true) => grad_coefficients::<V, false, true>(norm, dy, w, x, len, s, cen, sums),
            (true, true) => grad_coefficients::<V, true, true>(norm, dy, w, x, len, s, cen, sums),
        };
        if s.extreme::<T>() || !(a.is_finite() && b.is_finite()) {
            return Err(early);
        }
        let null = Ptr(std::ptr::null_mut());
        Ok(RowGrad {
            dy,
            x,
            dx: self.dx.at(r * len),
            w: self.w,
            dw: if early { null } else { dw },
            db: if early { null } else { db },
            cen,
            gr: V::splat(T::from_f64(s.rstd)),
            a: V::splat(T::from_f64(a)),
            b: V::splat(T::from_f64(b)),
        })
    }

    /// Row r alone, redone from a scaled copy where its statistics leave what `T` resolves. Its
    /// column terms are added in the coefficients pass, which reads the row from memory anyway:
    /// the write pass then stores dx alone. (Added there, the column sums' stores wait behind
    /// dx's, which miss the cache, as stores commit in order: 4096x1024 LayerNorm's backward
    /// took 1.6-1.8x as long with dweight and dbias as without, ~1.45x now, AVX-512.)
    #[inline(always)]
    unsafe fn row<V: Vector<Elem = T>>(
        &self,
        r: usize,
        dw: Ptr<T>,
        db: Ptr<T>,
        scaled: &mut Vec<T>,
    ) {
        let added = match self.coefficients::<V, true>(r, dw, db) {
            Ok(g) => return self.write_row(&g),
            Err(added) => added,
        };
        let null = Ptr(std::ptr::null_mut());
        let (dw, db) = if added { (null, null) } else { (dw, db) };
        let (p, len, norm, w) = (self.p, self.p.len, self.p.norm, self.w);
        let (dy, dx) = (self.dy.at(r * len) as *const T, self.dx.at(r * len));
        let mut x = self.x.at(r * len) as *const T;
        let mut s = saved_or_stats::<V>(norm, x, len, p.eps, self.mean, self.rstd, r);
        let mut cen = Centering::<V>::new(s);
        let none = (null, null);
        let (mut a, mut b) =
            grad_coefficients::<V, false, false>(norm, dy, w, x, len, s, cen, none);
        // dx is homogeneous of degree -1 in x: with x scaled by k (and eps by k^2), dx is k
        // times the scaled row's.
        let mut k = 1.0;
        if let Some(scale) = scale_row(x, len, scaled) {
            let sk = if self.rstd.0.is_null() {
                scaled_stats::<V>(norm, scaled.as_ptr(), len, p.eps, scale)
            } else {
                Stats {
                    mean: s.mean * scale,
                    rstd: s.rstd / scale,
                }
            };
            // Not finite: a constant LayerNorm row, as well off unscaled.
            if sk.rstd.is_finite() {
                (k, x, s) = (scale, scaled.as_ptr(), sk);
                cen = Centering::<V>::new(s);
                (a, b) = grad_coefficients::<V, false, false>(norm, dy, w, x, len, s, cen, none);
            }
        }
        self.write_row(&RowGrad {
            dy,
            x,
            dx,
            w,
            dw,
            db,
            cen,
            gr: V::splat(T::from_f64(k * s.rstd)),
            a: V::splat(T::from_f64(k * a)),
            b: V::splat(T::from_f64(k * b)),
        });
    }

    #[inline(always)]
    unsafe fn write_row<V: Vector<Elem = T>>(&self, g: &RowGrad<V>) {
        let len = self.p.len;
        let (head, store) = self.store.row::<V>(g.dx);
        match (store == Store::Stream, !g.dw.0.is_null(), !g.db.0.is_null()) {
            (false, false, false) => grad_row::<V, false, false, false>(g, len, head),
            (false, true, false) => grad_row::<V, false, true, false>(g, len, head),
            (false, false, true) => grad_row::<V, false, false, true>(g, len, head),
            (false, true, true) => grad_row::<V, false, true, true>(g, len, head),
            (true, false, false) => grad_row::<V, true, false, false>(g, len, head),
            (true, true, false) => grad_row::<V, true, true, false>(g, len, head),
            (true, false, true) => grad_row::<V, true, false, true>(g, len, head),
            (true, true, true) => grad_row::<V, true, true, true>(g, len, head),
        }
    }

    /// Rows r..r + GROUP with column sums: their coefficients first, then dx written and the
    /// column sums added column by column where every row's dx aligns alike (else row by row). A
    /// row that must be scaled sends the group through [`Backward::row`].
    #[inline(always)]
    unsafe fn group<V: Vector<Elem = T>>(
        &self,
        r: usize,
        dw: Ptr<T>,
        db: Ptr<T>,
        scaled: &mut Vec<T>,
    ) {
        // No closures here: one that is not inlined runs without the ISA's target features.
        let (Ok(g0), Ok(g1), Ok(g2), Ok(g3)) = (
            self.coefficients::<V, false>(r, dw, db),
            self.coefficients::<V, false>(r + 1, dw, db),
            self.coefficients::<V, false>(r + 2, dw, db),
            self.coefficients::<V, false>(r + 3, dw, db),
        ) else {
            for j in 0..GROUP {
                self.row::<V>(r + j, dw, db, scaled);
            }
            return;
        };
        let rows: [RowGrad<V>; GROUP] = [g0, g1, g2, g3];
        let (head, store) = self.store.row::<V>(g0.dx);
        let mut alike = true;
        for g in &rows[1..] {
            alike &= self.store.row::<V>(g.dx) == (head, store);
        }
        if !alike {
            for g in &rows {
                self.write_row(g);
            }
            return;
        }
        let len = self.p.len;
        match (store == Store::Stream, !dw.0.is_null(), !db.0.is_null()) {
            (false, true, false) => grad_rows::<V, false, true, false>(&rows, len, head),
            (false, false, true) => grad_rows::<V, false, false, true>(&rows, len, head),
            (false, true, true) => grad_rows::<V, false, true, true>(&rows, len, head),
            (true, true, false) => grad_rows::<V, true, true, false>(&rows, len, head),
            (true, false, true) => grad_rows::<V, true, false, true>(&rows, len, head),
            (true, true, true) => grad_rows::<V, true, true, true>(&rows, len, head),
            (_, false, false) => unreachable!("no column sums: rows go one by one"),
        }
    }
}

/// Adds the `len` `Elem` partial sums at `part` into the f64 sums at `total` and clears them.
#[inline(always)]
unsafe fn fold<T: Float>(total: Ptr<f64>, part: Ptr<T>, len: usize) {
    let total = std::slice::from_raw_parts_mut(total.0, len);
    let part = std::slice::from_raw_parts_mut(part.0, len);
    for (t, p) in total.iter_mut().zip(part.iter_mut()) {
        *t += p.to_f64();
        *p = T::ZERO;
    }
}

impl<T: Float> Kernel<T> for Backward<'_, T> {
    type Output = ();
    #[inline(always)]
    fn run<V: Vector<Elem = T>>(self) {
        let len = self.p.len;
        let mut scaled = Vec::new();
        // The block's `Elem` partial sums of up to COLUMN_FOLD_ROWS rows (cleared by each fold):
        // dweight's, then dbias's STAGGER elements past its end. Two buffers of 4 KiB each put
        // dbias[i] 16 bytes past dweight[i] modulo 4 KiB, and each load of dbias[i] waited for
        // the store to dweight[i] (4K aliasing: LayerNorm's 4096x1024 backward ~1.5x slower, one
        // thread, AVX-512).
        let wanted = |sums: Ptr<f64>| !sums.0.is_null();
        let any = wanted(self.dweight) || wanted(self.dbias);
        let mut parts = vec![T::ZERO; if any { 2 * len + STAGGER } else { 0 }];
        let base = parts.as_mut_ptr();
        let part = |sums: Ptr<f64>, at: usize| {
            Ptr(if wanted(sums) {
                base.wrapping_add(at)
            } else {
                std::ptr::null_mut()
            })
        };
        let (dw, db) = (part(self.dweight, 0), part(self.dbias, len + STAGGER));
        // Without column sums the groups gained nothing (rows of 64: 20% slower, AVX-512).
        let grouped = (!dw.0.is_null() || !db.0.is_null())
            && len * std::mem::size_of::<T>() <= GROUP_MAX_ROW_BYTES;
        let mut r = self.rows.start;
        while r < self.rows.end {
            let fold_end = (r + COLUMN_FOLD_ROWS).min(self.rows.end);
            unsafe {
                while grouped && r + GROUP <= fold_end {
                    self.group::<V>(r, dw, db, &mut scaled);
                    r += GROUP;
                }
                while r < fold_end {
                    self.row::<V>(r, dw, db, &mut scaled);
                    r += 1;
                }
                if !dw.0.is_null() {
                    fold(self.dweight, dw, len);
                }
                if !db.0.is_null() {
                    fold(self.dbias, db, len);
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
    check_len("dy", dy.len(), x.len())?;
    check_len("dx", dx.len(), x.len())?;
    match (p.norm, mean, rstd) {
        (_, None, None)
        | (NormKind::Layer, Some(_), Some(_))
        | (NormKind::Rms | NormKind::Crms, None, Some(_)) => {}
        (NormKind::Layer, ..) => {
            return Err(Error::Value(
                "mean and rstd: give both saved statistics or neither".into(),
            ))
        }
        _ => return Err(Error::Value("mean: the RMS norms save only rstd".into())),
    }
    for (s, name) in [(mean, "mean"), (rstd, "rstd")] {
        if let Some(s) = s {
            check_len(name, s.len(), rows)?;
        }
    }
    for (s, name) in [(&dweight, "dweight"), (&dbias, "dbias")] {
        if let Some(s) = s {
            check_len(name, s.len(), p.len)?;
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
    let run = |rows: Range<usize>, dweight: Ptr<f64>, dbias: Ptr<f64>| {
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
    if dweight.is_none() && dbias.is_none() {
        let null = Ptr(std::ptr::null_mut());
        driver::for_each_row_block(rows, len, |r| run(r, null, null));
        return Ok(());
    }
    let (want_w, want_b) = (dweight.is_some(), dbias.is_some());
    let width = len * (want_w as usize + want_b as usize);
    // dweight's sums first, then dbias's.
    let sums = driver::block_column_sums(rows, width, |r, acc| {
        let (at, null) = (Ptr(acc.as_mut_ptr()), Ptr(std::ptr::null_mut()));
        let dw = if want_w { at } else { null };
        let db = if want_b {
            Ptr(at.at(width - len))
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

// The public functions are tested in tests/norms.rs; this one needs the private row kernels.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::isa::{self, TEST_LOCK};
    use crate::norms::Forward;

    /// Deterministic values in [-1, 1) that differ from row to row.
    fn values(n: usize, step: f32) -> Vec<f32> {
        (0..n).map(|i| ((i as f32 * step) % 2.0) - 1.0).collect()
    }

    #[test]
    fn streaming_stores_write_the_same_bits() {
        // Outputs past Store's size threshold are written with streaming stores, aligned per row
        // by a head piece; force that path on small rows of odd lengths (misaligned row starts).
        let _guard = TEST_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let previous = isa::active();
        for isa in isa::supported() {
            isa::set_active(isa).unwrap();
            for len in [1, 7, 17, 33, 100] {
                let rows = 9;
                let x = values(rows * len, 0.37);
                let dy = values(rows * len, 0.61);
                let w = values(len, 0.83);
                for norm in [NormKind::Rms, NormKind::Layer, NormKind::Crms] {
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
        }
        isa::set_active(previous).unwrap();
    }
}
