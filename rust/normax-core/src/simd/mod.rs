//! One vector trait, one implementation per ISA (a file each), and the math written once on top.
//!
//! Kernels are generic over [`Vector`]; `crate::isa::dispatch` is the single place that picks the
//! implementation at run time and enters a `#[target_feature]` function so everything inlines
//! into code compiled for that ISA.

use crate::float::Float;

#[cfg(target_arch = "x86_64")]
pub mod avx2;
#[cfg(target_arch = "x86_64")]
pub mod avx512;
#[cfg(target_arch = "aarch64")]
pub mod neon;
pub mod scalar;

/// The widest vector we have (AVX-512 f32): partial loads go through a buffer this long.
pub const MAX_LANES: usize = 16;

/// A SIMD vector of `Elem`. Every method is `#[inline(always)]` in the implementations.
pub trait Vector: Copy {
    type Elem: Float;
    /// A lane mask, as produced by comparisons.
    type Mask: Copy;
    const LANES: usize;

    fn splat(v: Self::Elem) -> Self;
    /// # Safety
    /// `p` must be valid for reading `LANES` elements.
    unsafe fn load(p: *const Self::Elem) -> Self;
    /// # Safety
    /// `p` must be valid for writing `LANES` elements.
    unsafe fn store(self, p: *mut Self::Elem);

    fn add(self, o: Self) -> Self;
    fn sub(self, o: Self) -> Self;
    fn mul(self, o: Self) -> Self;
    fn div(self, o: Self) -> Self;
    /// self * b + c
    fn mul_add(self, b: Self, c: Self) -> Self;
    /// Lane-wise max; NaN handling is unspecified (callers detect NaN with `gt_or_nan`).
    fn max(self, o: Self) -> Self;
    fn min(self, o: Self) -> Self;
    /// Round to nearest, ties to even.
    fn round(self) -> Self;
    /// Moves the low bits of the representation into the exponent field: for
    /// v = ROUND_MAGIC + BIAS + k (k integral in [-BIAS, BIAS]) this is 2^k, exactly 0 at k = -BIAS.
    fn exponent_bits(self) -> Self;
    /// Hints that `p` will be read soon; never faults, any address allowed.
    #[inline(always)]
    fn prefetch(_p: *const Self::Elem) {}
    fn reduce_add(self) -> Self::Elem;
    fn reduce_max(self) -> Self::Elem;
    /// Lanes where self > o or either is NaN.
    fn gt_or_nan(self, o: Self) -> Self::Mask;
    /// Lanes where self < o (false for NaN).
    fn lt(self, o: Self) -> Self::Mask;
    /// self where `m` is set, 0 elsewhere.
    fn keep(self, m: Self::Mask) -> Self;
    fn mask_or(a: Self::Mask, b: Self::Mask) -> Self::Mask;
    fn mask_none() -> Self::Mask;
    fn mask_any(m: Self::Mask) -> bool;
    /// Stores bypassing the caches (non-temporal), for outputs too large to stay cached: saves the
    /// read-for-ownership of each line. Plain `store` where the ISA has nothing better.
    ///
    /// # Safety
    /// `p` must be valid for writing `LANES` elements and aligned to `LANES` elements.
    #[inline(always)]
    unsafe fn store_stream(self, p: *mut Self::Elem) {
        self.store(p)
    }
    /// Orders the streaming stores before this thread's later stores (call after a run of them).
    #[inline(always)]
    fn stream_fence() {}
}

/// Loads `n < LANES` elements, the other lanes set to `fill`.
///
/// # Safety
/// `p` must be valid for reading `n` elements.
#[inline(always)]
pub unsafe fn load_partial<V: Vector>(p: *const V::Elem, n: usize, fill: V::Elem) -> V {
    let mut buf = [fill; MAX_LANES];
    std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), n);
    V::load(buf.as_ptr())
}

/// Stores the first `n < LANES` lanes.
///
/// # Safety
/// `p` must be valid for writing `n` elements.
#[inline(always)]
pub unsafe fn store_partial<V: Vector>(v: V, p: *mut V::Elem, n: usize) {
    let mut buf = [V::Elem::ZERO; MAX_LANES];
    v.store(buf.as_mut_ptr());
    std::ptr::copy_nonoverlapping(buf.as_ptr(), p, n);
}

/// Splits exp(x) = m * 2^n, m in [sqrt(1/2), sqrt(2)], for |x| within the Cody-Waite range.
#[inline(always)]
pub fn exp_parts<V: Vector>(x: V) -> (V, V) {
    let n = x.mul(V::splat(V::Elem::LOG2E)).round();
    (exp_reduced(x, n), n)
}

/// exp(x - n ln2) for integral n = round(x log2 e): Cody-Waite reduction, then the polynomial.
#[inline(always)]
pub fn exp_reduced<V: Vector>(x: V, n: V) -> V {
    let (t, q) = reduce(x, n, V::Elem::ONE);
    q.mul_add(t, V::splat(V::Elem::ONE))
}

/// exp(x - n ln2) * SUBNORMAL_LOW (2^-SUBNORMAL_STEP), at the cost of [`exp_reduced`]: the polynomial's
/// coefficients are scaled instead (exactly: a power of two, no intermediate subnormal). A caller
/// scaling the result by 2^(k + SUBNORMAL_STEP) next, a normal number built from its bits, gets
/// exp(x - n ln2) * 2^k with a single rounding, gradual underflow included.
#[inline(always)]
pub fn exp_reduced_low<V: Vector>(x: V, n: V) -> V {
    let (t, q) = reduce(x, n, V::Elem::SUBNORMAL_LOW);
    q.mul_add(t, V::splat(V::Elem::SUBNORMAL_LOW))
}

/// t = x - n ln2 (Cody-Waite) and q(t), with exp(t) = 1 + t * q(t); q scaled by `scale` (a power
/// of two: constant, folded into the coefficients).
#[inline(always)]
fn reduce<V: Vector>(x: V, n: V, scale: V::Elem) -> (V, V) {
    let t = n.mul_add(V::splat(-V::Elem::LN2_HI), x);
    let t = n.mul_add(V::splat(-V::Elem::LN2_LO), t);
    let poly = V::Elem::EXP_POLY;
    let mut q = V::splat(poly[poly.len() - 1] * scale);
    for &c in poly[..poly.len() - 1].iter().rev() {
        q = q.mul_add(t, V::splat(c * scale));
    }
    (t, q)
}

/// tanh(x) for every x (NaN stays NaN), as -e / (2 + e) with e = expm1(-2x).
///
/// expm1 is formed as 2^n * (t q(t)) + (2^n - 1) from the exp reduction, never as exp - 1, so
/// small |x| keep full relative accuracy. Beyond |x| = 19.5 tanh rounds to +-1 in f32 and f64.
#[inline(always)]
pub fn tanh<V: Vector>(x: V) -> V {
    let bound = V::splat(V::Elem::from_f64(19.5));
    let nan = x.gt_or_nan(x);
    let y = x
        .max(V::splat(V::Elem::ZERO).sub(bound))
        .min(bound)
        .mul(V::splat(V::Elem::from_f64(-2.0)));
    let n = y.mul(V::splat(V::Elem::LOG2E)).round();
    let (t, q) = reduce(y, n, V::Elem::ONE);
    let p = pow2(n);
    let e = t.mul(q).mul_add(p, p.sub(V::splat(V::Elem::ONE)));
    let r = V::splat(V::Elem::ZERO)
        .sub(e)
        .div(e.add(V::splat(V::Elem::from_f64(2.0))));
    select_nan::<V>(r, x, nan)
}

/// 2^k for integral k in [-BIAS, BIAS], exactly 0 at k = -BIAS.
#[inline(always)]
pub fn pow2<V: Vector>(k: V) -> V {
    k.add(V::splat(V::Elem::ROUND_MAGIC + V::Elem::BIAS))
        .exponent_bits()
}

/// v * 2^k for integral k, correct into the subnormal range: two normal factors, one rounding.
#[inline(always)]
pub fn ldexp<V: Vector>(v: V, k: V) -> V {
    let k = k
        .max(V::splat(V::Elem::LDEXP_MIN))
        .min(V::splat(V::Elem::LDEXP_MAX));
    let half = k.mul(V::splat(V::Elem::from_f64(0.5))).round();
    v.mul(pow2(half)).mul(pow2(k.sub(half)))
}

/// exp(x) for every x: -inf gives 0, overflow +inf, NaN stays NaN; results below the normal
/// range are the gradual-underflow subnormals (`ldexp`'s two factors), 0 only below half the
/// smallest subnormal.
#[inline(always)]
pub fn exp<V: Vector>(x: V) -> V {
    // Beyond these bounds the result is 0 or inf anyway; clamping keeps the reduction exact.
    let bound = V::Elem::from_f64(V::Elem::LDEXP_MAX.to_f64() * std::f64::consts::LN_2 + 2.0);
    let nan = x.gt_or_nan(x); // only NaN lanes compare unordered with themselves
    let xc = x.max(V::splat(-bound)).min(V::splat(bound));
    let (m, n) = exp_parts(xc);
    let y = ldexp(m, n);
    select_nan::<V>(y, x, nan)
}

/// Where `mask` is set, take `x` (NaN) instead of `y`.
#[inline(always)]
fn select_nan<V: Vector>(y: V, x: V, mask: V::Mask) -> V {
    if V::mask_any(mask) {
        // Rare: rebuild lane by lane so NaN inputs propagate.
        let mut ys = [V::Elem::ZERO; MAX_LANES];
        let mut xs = [V::Elem::ZERO; MAX_LANES];
        unsafe {
            y.store(ys.as_mut_ptr());
            x.store(xs.as_mut_ptr());
        }
        for i in 0..V::LANES {
            if xs[i].is_nan() {
                ys[i] = xs[i];
            }
        }
        unsafe { V::load(ys.as_ptr()) }
    } else {
        y
    }
}
