//! PowerNorm (Shen et al. 2020) works on tokens (rows) of `channels` values in `groups` equal
//! groups: each group is scaled by 1/sqrt(mean(x^2) + eps) (RMSNorm without weight), then each
//! channel by a per-channel factor that depends on batch statistics over tokens. The per-channel
//! bookkeeping (running statistics, warmup) is O(channels) and lives with the caller; here are the
//! two passes over the tokens.

use super::{clamp_rstd, grad, opt_ptr, scaled_mean_square, Stats};
use crate::driver::{self, Ptr};
use crate::float::Float;
use crate::isa::{dispatch, Kernel};
use crate::rows::{add_n, for_each_vector, load_n, row_sums, store_n, sum_squares};
use crate::simd::Vector;
use crate::spec::{check_eps, check_len, size};
use crate::Error;
use std::ops::Range;

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
        check_eps(eps)?;
        size(self.tokens, self.channels)
    }
}

/// 1/sqrt(mean(x^2) + eps) of one channel group (the group scaling); a group whose squares
/// over- or underflow `Elem` is measured scaled (see `Stats::extreme`).
#[inline(always)]
unsafe fn group_scale<V: Vector>(x: *const V::Elem, len: usize, eps: f64) -> V {
    let ss = sum_squares::<V>(x, len);
    let mut rstd = 1.0 / (ss / len as f64 + eps).sqrt();
    if (Stats { mean: 0.0, rstd }).extreme::<V::Elem>() {
        if let Some((ms, k)) = scaled_mean_square(x, len) {
            let ek = eps * k * k;
            // ek past the f64 range dwarfs ms (at most 4): rstd is 1/sqrt(eps).
            rstd = if ek.is_finite() {
                k / (ms + ek).sqrt()
            } else {
                1.0 / eps.sqrt()
            };
        }
    }
    V::splat(V::Elem::from_f64(clamp_rstd::<V::Elem>(rstd)))
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
    check_len("x", x.len(), size)?;
    if let Some(p) = pad {
        check_len("pad_mask", p.len(), l.tokens)?;
    }
    if let Some(s) = &sumsq {
        check_len("sumsq", s.len(), l.channels)?;
    }
    let (scale, shift, y): (&[T], &[T], Ptr<T>) = match out {
        Some(o) => {
            check_len("scale", o.scale.len(), l.channels)?;
            check_len("shift", o.shift.len(), l.channels)?;
            check_len("y", o.y.len(), size)?;
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
    check_len("x", x.len(), size)?;
    check_len("dy", dy.len(), size)?;
    check_len("dx", dx.len(), size)?;
    if let Some(w) = c.weight {
        check_len("weight", w.len(), l.channels)?;
    }
    check_len("zscale", c.zscale.len(), l.channels)?;
    check_len("ema", c.ema.len(), l.channels)?;
    check_len("dscale", c.dscale.len(), l.channels)?;
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
