//! AArch64 NEON (Advanced SIMD, in every AArch64 CPU: Apple Silicon, Graviton, Ampere):
//! 4 x f32, 2 x f64. Masks are the all-ones / all-zeros lanes NEON comparisons produce.

use super::Vector;
use super::{F32_MANTISSA, F32_SPLIT_OFFSET, F32_SQRT_HALF};
use super::{F64_MANTISSA, F64_SPLIT_OFFSET, F64_SQRT_HALF};
use std::arch::aarch64::*;

#[derive(Clone, Copy)]
pub struct F32x4(float32x4_t);
#[derive(Clone, Copy)]
pub struct F64x2(float64x2_t);

impl Vector for F32x4 {
    type Elem = f32;
    type Mask = uint32x4_t;
    const LANES: usize = 4;

    #[inline(always)]
    fn splat(v: f32) -> Self {
        unsafe { F32x4(vdupq_n_f32(v)) }
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        F32x4(vld1q_f32(p))
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        vst1q_f32(p, self.0)
    }
    #[inline(always)]
    fn add(self, o: Self) -> Self {
        unsafe { F32x4(vaddq_f32(self.0, o.0)) }
    }
    #[inline(always)]
    fn sub(self, o: Self) -> Self {
        unsafe { F32x4(vsubq_f32(self.0, o.0)) }
    }
    #[inline(always)]
    fn mul(self, o: Self) -> Self {
        unsafe { F32x4(vmulq_f32(self.0, o.0)) }
    }
    #[inline(always)]
    fn div(self, o: Self) -> Self {
        unsafe { F32x4(vdivq_f32(self.0, o.0)) }
    }
    #[inline(always)]
    fn mul_add(self, b: Self, c: Self) -> Self {
        // vfmaq(c, a, b) = c + a * b, fused
        unsafe { F32x4(vfmaq_f32(c.0, self.0, b.0)) }
    }
    #[inline(always)]
    fn max(self, o: Self) -> Self {
        unsafe { F32x4(vmaxq_f32(self.0, o.0)) }
    }
    #[inline(always)]
    fn min(self, o: Self) -> Self {
        unsafe { F32x4(vminq_f32(self.0, o.0)) }
    }
    #[inline(always)]
    fn round(self) -> Self {
        // FRINTN: to nearest, ties to even
        unsafe { F32x4(vrndnq_f32(self.0)) }
    }
    #[inline(always)]
    fn exponent_bits(self) -> Self {
        unsafe {
            F32x4(vreinterpretq_f32_u32(vshlq_n_u32::<23>(
                vreinterpretq_u32_f32(self.0),
            )))
        }
    }
    #[inline(always)]
    fn split_sqrt2(self) -> (Self, Self) {
        unsafe {
            let t = vaddq_u32(vreinterpretq_u32_f32(self.0), vdupq_n_u32(F32_SPLIT_OFFSET));
            let m = vaddq_u32(
                vandq_u32(t, vdupq_n_u32(F32_MANTISSA)),
                vdupq_n_u32(F32_SQRT_HALF),
            );
            let k = vcvtq_f32_u32(vshrq_n_u32::<23>(t));
            (
                F32x4(vreinterpretq_f32_u32(m)),
                F32x4(vsubq_f32(k, vdupq_n_f32(127.0))),
            )
        }
    }
    #[inline(always)]
    fn reduce_add(self) -> f32 {
        // Pairwise, as the x86 implementations add halves: (a0 + a1) + (a2 + a3).
        unsafe { vaddvq_f32(self.0) }
    }
    #[inline(always)]
    fn reduce_max(self) -> f32 {
        unsafe { vmaxvq_f32(self.0) }
    }
    #[inline(always)]
    fn gt_or_nan(self, o: Self) -> uint32x4_t {
        // not (self <= o): true where self > o or either is NaN
        unsafe { vmvnq_u32(vcleq_f32(self.0, o.0)) }
    }
    #[inline(always)]
    fn lt(self, o: Self) -> uint32x4_t {
        unsafe { vcltq_f32(self.0, o.0) }
    }
    #[inline(always)]
    fn keep(self, m: uint32x4_t) -> Self {
        unsafe {
            F32x4(vreinterpretq_f32_u32(vandq_u32(
                vreinterpretq_u32_f32(self.0),
                m,
            )))
        }
    }
    #[inline(always)]
    fn mask_or(a: uint32x4_t, b: uint32x4_t) -> uint32x4_t {
        unsafe { vorrq_u32(a, b) }
    }
    #[inline(always)]
    fn mask_none() -> uint32x4_t {
        unsafe { vdupq_n_u32(0) }
    }
    #[inline(always)]
    fn mask_any(m: uint32x4_t) -> bool {
        unsafe { vmaxvq_u32(m) != 0 }
    }
}

impl Vector for F64x2 {
    type Elem = f64;
    type Mask = uint64x2_t;
    const LANES: usize = 2;

    #[inline(always)]
    fn splat(v: f64) -> Self {
        unsafe { F64x2(vdupq_n_f64(v)) }
    }
    #[inline(always)]
    unsafe fn load(p: *const f64) -> Self {
        F64x2(vld1q_f64(p))
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f64) {
        vst1q_f64(p, self.0)
    }
    #[inline(always)]
    fn add(self, o: Self) -> Self {
        unsafe { F64x2(vaddq_f64(self.0, o.0)) }
    }
    #[inline(always)]
    fn sub(self, o: Self) -> Self {
        unsafe { F64x2(vsubq_f64(self.0, o.0)) }
    }
    #[inline(always)]
    fn mul(self, o: Self) -> Self {
        unsafe { F64x2(vmulq_f64(self.0, o.0)) }
    }
    #[inline(always)]
    fn div(self, o: Self) -> Self {
        unsafe { F64x2(vdivq_f64(self.0, o.0)) }
    }
    #[inline(always)]
    fn mul_add(self, b: Self, c: Self) -> Self {
        unsafe { F64x2(vfmaq_f64(c.0, self.0, b.0)) }
    }
    #[inline(always)]
    fn max(self, o: Self) -> Self {
        unsafe { F64x2(vmaxq_f64(self.0, o.0)) }
    }
    #[inline(always)]
    fn min(self, o: Self) -> Self {
        unsafe { F64x2(vminq_f64(self.0, o.0)) }
    }
    #[inline(always)]
    fn round(self) -> Self {
        unsafe { F64x2(vrndnq_f64(self.0)) }
    }
    #[inline(always)]
    fn exponent_bits(self) -> Self {
        unsafe {
            F64x2(vreinterpretq_f64_u64(vshlq_n_u64::<52>(
                vreinterpretq_u64_f64(self.0),
            )))
        }
    }
    #[inline(always)]
    fn split_sqrt2(self) -> (Self, Self) {
        unsafe {
            let t = vaddq_u64(vreinterpretq_u64_f64(self.0), vdupq_n_u64(F64_SPLIT_OFFSET));
            let m = vaddq_u64(
                vandq_u64(t, vdupq_n_u64(F64_MANTISSA)),
                vdupq_n_u64(F64_SQRT_HALF),
            );
            let k = vcvtq_f64_u64(vshrq_n_u64::<52>(t));
            (
                F64x2(vreinterpretq_f64_u64(m)),
                F64x2(vsubq_f64(k, vdupq_n_f64(1023.0))),
            )
        }
    }
    #[inline(always)]
    fn reduce_add(self) -> f64 {
        unsafe { vaddvq_f64(self.0) }
    }
    #[inline(always)]
    fn reduce_max(self) -> f64 {
        unsafe { vmaxvq_f64(self.0) }
    }
    #[inline(always)]
    fn gt_or_nan(self, o: Self) -> uint64x2_t {
        unsafe { vreinterpretq_u64_u32(vmvnq_u32(vreinterpretq_u32_u64(vcleq_f64(self.0, o.0)))) }
    }
    #[inline(always)]
    fn lt(self, o: Self) -> uint64x2_t {
        unsafe { vcltq_f64(self.0, o.0) }
    }
    #[inline(always)]
    fn keep(self, m: uint64x2_t) -> Self {
        unsafe {
            F64x2(vreinterpretq_f64_u64(vandq_u64(
                vreinterpretq_u64_f64(self.0),
                m,
            )))
        }
    }
    #[inline(always)]
    fn mask_or(a: uint64x2_t, b: uint64x2_t) -> uint64x2_t {
        unsafe { vorrq_u64(a, b) }
    }
    #[inline(always)]
    fn mask_none() -> uint64x2_t {
        unsafe { vdupq_n_u64(0) }
    }
    #[inline(always)]
    fn mask_any(m: uint64x2_t) -> bool {
        unsafe { vmaxvq_u32(vreinterpretq_u32_u64(m)) != 0 }
    }
}
