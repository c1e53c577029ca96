//! The element types the kernels run on (f32, f64) and the constants of their exp.

use crate::simd::{Vector, F32_MANTISSA, F32_SPLIT_OFFSET, F32_SQRT_HALF};
use crate::simd::{F64_MANTISSA, F64_SPLIT_OFFSET, F64_SQRT_HALF};
use std::fmt::Debug;
use std::ops::{Add, Div, Mul, Neg, Sub};

/// A floating-point element type with the constants of the exponent-splitting exp.
///
/// exp(x) = m * 2^n with n = round(x * log2 e), t = x - n ln2 (Cody-Waite: ln2 = LN2_HI + LN2_LO,
/// LN2_HI has trailing zero bits so n * LN2_HI is exact) and m = 1 + t * q(t).
pub trait Float:
    Copy
    + Send
    + Sync
    + PartialOrd
    + Debug
    + Default
    + 'static
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
{
    const ZERO: Self;
    const ONE: Self;
    const INFINITY: Self;
    const NEG_INFINITY: Self;
    const NAN: Self;
    const LOG2E: Self;
    const LN2_HI: Self;
    const LN2_LO: Self;
    /// q(t) coefficients c1..ck of m = 1 + t*(c1 + t*(c2 + ...)), lowest first.
    const EXP_POLY: &'static [Self];
    /// |x| up to which the Cody-Waite reduction stays accurate; rows reaching beyond it (or holding
    /// NaN/inf) take the exact max-subtracting path instead.
    const SPLIT_LIMIT: Self;
    /// 1.5 * 2^(mantissa bits): adding it rounds to an integer and leaves that integer in the low
    /// mantissa bits, ready for `Vector::exponent_bits`.
    const ROUND_MAGIC: Self;
    /// Exponent bias: 2^k is built from its bits for -BIAS <= k <= BIAS, with 2^-BIAS read as 0.
    const BIAS: Self;
    /// ldexp range: two factors of at most 2^(BIAS-1) cover every finite result.
    const LDEXP_MIN: Self;
    const LDEXP_MAX: Self;
    /// Mantissa bits + 2. A scaling by 2^k with k down to the subnormal cutoff (-BIAS - mantissa
    /// bits) is done in two steps, by 2^(k + SUBNORMAL_STEP) (normal, built from its bits) and by
    /// SUBNORMAL_LOW = 2^-SUBNORMAL_STEP: gradual underflow instead of a flush to 0.
    const SUBNORMAL_STEP: Self;
    const SUBNORMAL_LOW: Self;

    fn to_f64(self) -> f64;
    fn from_f64(v: f64) -> Self;
    fn is_nan(self) -> bool;
    fn round_even(self) -> Self;
    /// The representation shifted left by the mantissa width (see `Vector::exponent_bits`).
    fn exponent_bits(v: Self) -> Self;
    /// `Vector::split_sqrt2` of one element.
    fn split_sqrt2(v: Self) -> (Self, Self);
    /// log1p lane-wise as hi + lo, hi a multiple of 2^-9 below 2^7 in magnitude (or +-inf, NaN):
    /// the vector polynomial for f32 (`crate::simd::log1p_parts_f32`), std's `ln_1p` per lane
    /// for f64 (hi 0).
    fn log1p_parts<V: Vector<Elem = Self>>(x: V) -> (V, V);

    type Scalar: Vector<Elem = Self>;
    #[cfg(target_arch = "x86_64")]
    type Avx2: Vector<Elem = Self>;
    #[cfg(target_arch = "x86_64")]
    type Avx512: Vector<Elem = Self>;
    #[cfg(target_arch = "aarch64")]
    type Neon: Vector<Elem = Self>;
}

impl Float for f32 {
    const ZERO: f32 = 0.0;
    const ONE: f32 = 1.0;
    const INFINITY: f32 = f32::INFINITY;
    const NEG_INFINITY: f32 = f32::NEG_INFINITY;
    const NAN: f32 = f32::NAN;
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_375; // 355/512: 9 significant bits, n * LN2_HI exact for |n| < 2^15
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Near-minimax (Lawson-weighted least squares) on [-ln2/2, ln2/2]: 2e-9 relative error.
    const EXP_POLY: &'static [f32] = &[
        1.0,
        0.499_999_94,
        0.166_664_32,
        0.041_668,
        0.008_374_155_5,
        0.001_384_365_4,
    ];
    const SPLIT_LIMIT: f32 = 4096.0;
    const ROUND_MAGIC: f32 = 12_582_912.0;
    const BIAS: f32 = 127.0;
    const LDEXP_MIN: f32 = -252.0;
    const LDEXP_MAX: f32 = 254.0;
    const SUBNORMAL_STEP: f32 = 25.0;
    const SUBNORMAL_LOW: f32 = 1.0 / 33_554_432.0; // 2^-25

    #[inline(always)]
    fn to_f64(self) -> f64 {
        self as f64
    }
    #[inline(always)]
    fn from_f64(v: f64) -> f32 {
        v as f32
    }
    #[inline(always)]
    fn is_nan(self) -> bool {
        f32::is_nan(self)
    }
    #[inline(always)]
    fn round_even(self) -> f32 {
        self.round_ties_even()
    }
    #[inline(always)]
    fn exponent_bits(v: f32) -> f32 {
        f32::from_bits(v.to_bits() << 23)
    }
    #[inline(always)]
    fn split_sqrt2(v: f32) -> (f32, f32) {
        let t = v.to_bits().wrapping_add(F32_SPLIT_OFFSET);
        let m = f32::from_bits((t & F32_MANTISSA) + F32_SQRT_HALF);
        (m, (t >> 23) as f32 - 127.0)
    }
    #[inline(always)]
    fn log1p_parts<V: Vector<Elem = f32>>(x: V) -> (V, V) {
        crate::simd::log1p_parts_f32(x)
    }

    type Scalar = crate::simd::scalar::Scalar<f32>;
    #[cfg(target_arch = "x86_64")]
    type Avx2 = crate::simd::avx2::F32x8;
    #[cfg(target_arch = "x86_64")]
    type Avx512 = crate::simd::avx512::F32x16;
    #[cfg(target_arch = "aarch64")]
    type Neon = crate::simd::neon::F32x4;
}

impl Float for f64 {
    const ZERO: f64 = 0.0;
    const ONE: f64 = 1.0;
    const INFINITY: f64 = f64::INFINITY;
    const NEG_INFINITY: f64 = f64::NEG_INFINITY;
    const NAN: f64 = f64::NAN;
    const LOG2E: f64 = std::f64::consts::LOG2_E;
    const LN2_HI: f64 = 6.931_471_803_691_238_164_9e-1; // fdlibm: 32 trailing zero bits
    const LN2_LO: f64 = 1.908_214_929_270_587_700_02e-10;
    // Taylor to degree 13: truncation below 1e-17 on [-ln2/2, ln2/2].
    const EXP_POLY: &'static [f64] = &[
        1.0,
        1.0 / 2.0,
        1.0 / 6.0,
        1.0 / 24.0,
        1.0 / 120.0,
        1.0 / 720.0,
        1.0 / 5040.0,
        1.0 / 40320.0,
        1.0 / 362880.0,
        1.0 / 3628800.0,
        1.0 / 39916800.0,
        1.0 / 479001600.0,
        1.0 / 6227020800.0,
    ];
    const SPLIT_LIMIT: f64 = 65536.0;
    const ROUND_MAGIC: f64 = 6_755_399_441_055_744.0;
    const BIAS: f64 = 1023.0;
    const LDEXP_MIN: f64 = -2044.0;
    const LDEXP_MAX: f64 = 2046.0;
    const SUBNORMAL_STEP: f64 = 54.0;
    const SUBNORMAL_LOW: f64 = 1.0 / 18_014_398_509_481_984.0; // 2^-54

    #[inline(always)]
    fn to_f64(self) -> f64 {
        self
    }
    #[inline(always)]
    fn from_f64(v: f64) -> f64 {
        v
    }
    #[inline(always)]
    fn is_nan(self) -> bool {
        f64::is_nan(self)
    }
    #[inline(always)]
    fn round_even(self) -> f64 {
        self.round_ties_even()
    }
    #[inline(always)]
    fn exponent_bits(v: f64) -> f64 {
        f64::from_bits(v.to_bits() << 52)
    }
    #[inline(always)]
    fn split_sqrt2(v: f64) -> (f64, f64) {
        let t = v.to_bits().wrapping_add(F64_SPLIT_OFFSET);
        let m = f64::from_bits((t & F64_MANTISSA) + F64_SQRT_HALF);
        (m, (t >> 52) as f64 - 1023.0)
    }
    /// f64 stays on std's `ln_1p` (within 1 ULP): the float64 results keep the accuracy of the
    /// NumPy float64 references they are tested against, which a vector polynomial of f64
    /// degree would have to be proven to match.
    #[inline(always)]
    fn log1p_parts<V: Vector<Elem = f64>>(x: V) -> (V, V) {
        let mut buf = [0f64; crate::simd::MAX_LANES];
        let lo = unsafe {
            x.store(buf.as_mut_ptr());
            for v in &mut buf[..V::LANES] {
                *v = v.ln_1p();
            }
            V::load(buf.as_ptr())
        };
        (V::splat(0.0), lo)
    }

    type Scalar = crate::simd::scalar::Scalar<f64>;
    #[cfg(target_arch = "x86_64")]
    type Avx2 = crate::simd::avx2::F64x4;
    #[cfg(target_arch = "x86_64")]
    type Avx512 = crate::simd::avx512::F64x8;
    #[cfg(target_arch = "aarch64")]
    type Neon = crate::simd::neon::F64x2;
}
