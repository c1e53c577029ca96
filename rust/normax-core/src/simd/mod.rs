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
    /// For positive normal `self`: (m, k) with self = m * 2^k, m in [sqrt(1/2), sqrt(2)) and k
    /// integral (log1p's reduction, from the representation's bits; other inputs give
    /// unspecified lanes).
    fn split_sqrt2(self) -> (Self, Self);
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

/// The bits of sqrt(1/2), the mantissa mask, and what `Vector::split_sqrt2` adds to a
/// representation so that its exponent field holds k + bias and its mantissa field m's.
pub(crate) const F32_SQRT_HALF: u32 = 0x3f35_04f3;
pub(crate) const F32_MANTISSA: u32 = 0x007f_ffff;
pub(crate) const F32_SPLIT_OFFSET: u32 = 0x3f80_0000 - F32_SQRT_HALF;
pub(crate) const F64_SQRT_HALF: u64 = 0x3fe6_a09e_667f_3bcd;
pub(crate) const F64_MANTISSA: u64 = 0x000f_ffff_ffff_ffff;
pub(crate) const F64_SPLIT_OFFSET: u64 = 0x3ff0_0000_0000_0000 - F64_SQRT_HALF;
/// 1.5 * 2^52 (`Float::ROUND_MAGIC`): its bits plus an integer n < 2^51 are 1.5 * 2^52 + n,
/// so an exponent field converts to f64 without a 64-bit integer conversion (AVX2, AVX-512F).
#[cfg(target_arch = "x86_64")]
pub(crate) const F64_ROUND_MAGIC_BITS: u64 = 0x4338_0000_0000_0000;
#[cfg(target_arch = "x86_64")]
pub(crate) const F64_ROUND_MAGIC_BIASED: f64 = 6_755_399_441_055_744.0 + 1023.0;

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

/// log1p(x) = log(1 + x) for every x: -1 gives -inf, below -1 NaN, +inf stays +inf, NaN stays NaN.
/// f32 lanes: [`log1p_parts_f32`], within 2 ULP of the correctly rounded result; f64 lanes:
/// std's `ln_1p` lane by lane (see `Float::log1p_parts`).
#[inline(always)]
pub fn log1p<V: Vector>(x: V) -> V {
    let (hi, lo) = V::Elem::log1p_parts(x);
    hi.add(lo)
}

/// log1p(x) = hi + lo on f32 lanes, unrounded: hi = k * LN2_HI is a multiple of 2^-9 (|hi| < 2^7),
/// so a caller subtracting a constant that is one too gets hi - c exactly and rounds once
/// (log_stablemax's log s(x) - log(sum)). hi + lo is within 2 ULP of the correctly rounded
/// log1p for every float32 (the sweep of tests/log1p.rs).
///
/// u = 1 + x rounded, with its rounding error c (TwoSum: exact), u = m 2^k (`split_sqrt2`), so
/// log1p(x) = k ln2 + log1p(f + d) with f = m - 1 (exact) and d = c 2^-k (|d| <= 2^-24). Then
/// log1p(f + d) = log1p(f) + d / (1 + f), the division as d (1 - f + f^2) (the f^3 d left out is
/// below 0.1 ULP of the result), and log1p(f) = f - f^2 / 2 + f^3 P(f) with P a near-minimax
/// fit on f in [sqrt(1/2) - 1, sqrt(2) - 1] (relative error 2^-27 in the result with its f32
/// coefficients). Where 1 + x is exact and k = 0, f + d is x itself: small x keep full
/// relative accuracy (log1p(x) = x below 2^-24). x <= -1, +inf and NaN: hi is std's value, lo 0.
#[inline(always)]
pub fn log1p_parts_f32<V: Vector<Elem = f32>>(x: V) -> (V, V) {
    const POLY: [f32; 8] = [
        0.333_333_3,
        -0.250_008_23,
        0.200_012_27,
        -0.166_233_57,
        0.142_017_62,
        -0.131_601_94,
        0.127_615_5,
        -0.076_344_3,
    ];
    let one = V::splat(1.0);
    let u = one.add(x);
    let b = u.sub(one);
    let c = one.sub(u.sub(b)).add(x.sub(b));
    let (m, k) = u.split_sqrt2();
    let f = m.sub(one);
    // 2^-k; for k = 127, 128 (u near the largest float) 2^-126: d is far below the result's ULP.
    let d = c.mul(pow2(V::splat(0.0).sub(k).max(V::splat(-126.0))));
    let d = d.mul(one.sub(f.mul(one.sub(f))));
    let mut p = V::splat(POLY[POLY.len() - 1]);
    for &coef in POLY[..POLY.len() - 1].iter().rev() {
        p = p.mul_add(f, V::splat(coef));
    }
    let tail = f.mul(f).mul(p.mul_add(f, V::splat(-0.5)));
    let lo = f.add(tail.add(k.mul_add(V::splat(f32::LN2_LO), d)));
    let hi = k.mul(V::splat(f32::LN2_HI));
    // The reduction assumed u normal and finite.
    let outside = V::mask_or(
        x.gt_or_nan(V::splat(f32::MAX)),
        x.lt(V::splat(-0.999_999_94)),
    );
    if !V::mask_any(outside) {
        return (hi, lo);
    }
    let mut his = [0f32; MAX_LANES];
    let mut los = [0f32; MAX_LANES];
    let mut xs = [0f32; MAX_LANES];
    unsafe {
        hi.store(his.as_mut_ptr());
        lo.store(los.as_mut_ptr());
        x.store(xs.as_mut_ptr());
    }
    for i in 0..V::LANES {
        if !(xs[i] <= f32::MAX && xs[i] >= -0.999_999_94) {
            his[i] = (xs[i] as f64).ln_1p() as f32;
            los[i] = 0.0;
        }
    }
    unsafe { (V::load(his.as_ptr()), V::load(los.as_ptr())) }
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
