//! AVX-512F: 16 x f32, 8 x f64.

use super::Vector;
use super::{F32_MANTISSA, F32_SPLIT_OFFSET, F32_SQRT_HALF};
use super::{F64_MANTISSA, F64_SPLIT_OFFSET, F64_SQRT_HALF};
use super::{F64_ROUND_MAGIC_BIASED, F64_ROUND_MAGIC_BITS};
use std::arch::x86_64::*;

#[derive(Clone, Copy)]
pub struct F32x16(__m512);
#[derive(Clone, Copy)]
pub struct F64x8(__m512d);

const ROUND_NEAREST: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;

impl Vector for F32x16 {
    type Elem = f32;
    type Mask = __mmask16;
    const LANES: usize = 16;

    #[inline(always)]
    fn splat(v: f32) -> Self {
        unsafe { F32x16(_mm512_set1_ps(v)) }
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        F32x16(_mm512_loadu_ps(p))
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        _mm512_storeu_ps(p, self.0)
    }
    #[inline(always)]
    fn add(self, o: Self) -> Self {
        unsafe { F32x16(_mm512_add_ps(self.0, o.0)) }
    }
    #[inline(always)]
    fn sub(self, o: Self) -> Self {
        unsafe { F32x16(_mm512_sub_ps(self.0, o.0)) }
    }
    #[inline(always)]
    fn mul(self, o: Self) -> Self {
        unsafe { F32x16(_mm512_mul_ps(self.0, o.0)) }
    }
    #[inline(always)]
    fn div(self, o: Self) -> Self {
        unsafe { F32x16(_mm512_div_ps(self.0, o.0)) }
    }
    #[inline(always)]
    fn mul_add(self, b: Self, c: Self) -> Self {
        unsafe { F32x16(_mm512_fmadd_ps(self.0, b.0, c.0)) }
    }
    #[inline(always)]
    fn max(self, o: Self) -> Self {
        unsafe { F32x16(_mm512_max_ps(self.0, o.0)) }
    }
    #[inline(always)]
    fn min(self, o: Self) -> Self {
        unsafe { F32x16(_mm512_min_ps(self.0, o.0)) }
    }
    #[inline(always)]
    fn round(self) -> Self {
        unsafe { F32x16(_mm512_roundscale_ps::<ROUND_NEAREST>(self.0)) }
    }
    #[inline(always)]
    fn exponent_bits(self) -> Self {
        unsafe {
            F32x16(_mm512_castsi512_ps(_mm512_slli_epi32::<23>(
                _mm512_castps_si512(self.0),
            )))
        }
    }
    #[inline(always)]
    fn split_sqrt2(self) -> (Self, Self) {
        unsafe {
            let t = _mm512_add_epi32(
                _mm512_castps_si512(self.0),
                _mm512_set1_epi32(F32_SPLIT_OFFSET as i32),
            );
            let m = _mm512_add_epi32(
                _mm512_and_si512(t, _mm512_set1_epi32(F32_MANTISSA as i32)),
                _mm512_set1_epi32(F32_SQRT_HALF as i32),
            );
            let k = _mm512_cvtepi32_ps(_mm512_srli_epi32::<23>(t));
            (
                F32x16(_mm512_castsi512_ps(m)),
                F32x16(_mm512_sub_ps(k, _mm512_set1_ps(127.0))),
            )
        }
    }
    #[inline(always)]
    fn prefetch(p: *const f32) {
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p as *const i8) }
    }
    #[inline(always)]
    fn reduce_add(self) -> f32 {
        unsafe { _mm512_reduce_add_ps(self.0) }
    }
    #[inline(always)]
    fn reduce_max(self) -> f32 {
        unsafe { _mm512_reduce_max_ps(self.0) }
    }
    #[inline(always)]
    fn gt_or_nan(self, o: Self) -> __mmask16 {
        unsafe { _mm512_cmp_ps_mask::<_CMP_NLE_UQ>(self.0, o.0) }
    }
    #[inline(always)]
    fn lt(self, o: Self) -> __mmask16 {
        unsafe { _mm512_cmp_ps_mask::<_CMP_LT_OQ>(self.0, o.0) }
    }
    #[inline(always)]
    fn keep(self, m: __mmask16) -> Self {
        unsafe { F32x16(_mm512_maskz_mov_ps(m, self.0)) }
    }
    #[inline(always)]
    fn mask_or(a: __mmask16, b: __mmask16) -> __mmask16 {
        a | b
    }
    #[inline(always)]
    fn mask_none() -> __mmask16 {
        0
    }
    #[inline(always)]
    fn mask_any(m: __mmask16) -> bool {
        m != 0
    }
    #[inline(always)]
    unsafe fn store_stream(self, p: *mut f32) {
        _mm512_stream_ps(p, self.0)
    }
    #[inline(always)]
    fn stream_fence() {
        unsafe { _mm_sfence() }
    }
}

impl Vector for F64x8 {
    type Elem = f64;
    type Mask = __mmask8;
    const LANES: usize = 8;

    #[inline(always)]
    fn splat(v: f64) -> Self {
        unsafe { F64x8(_mm512_set1_pd(v)) }
    }
    #[inline(always)]
    unsafe fn load(p: *const f64) -> Self {
        F64x8(_mm512_loadu_pd(p))
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f64) {
        _mm512_storeu_pd(p, self.0)
    }
    #[inline(always)]
    fn add(self, o: Self) -> Self {
        unsafe { F64x8(_mm512_add_pd(self.0, o.0)) }
    }
    #[inline(always)]
    fn sub(self, o: Self) -> Self {
        unsafe { F64x8(_mm512_sub_pd(self.0, o.0)) }
    }
    #[inline(always)]
    fn mul(self, o: Self) -> Self {
        unsafe { F64x8(_mm512_mul_pd(self.0, o.0)) }
    }
    #[inline(always)]
    fn div(self, o: Self) -> Self {
        unsafe { F64x8(_mm512_div_pd(self.0, o.0)) }
    }
    #[inline(always)]
    fn mul_add(self, b: Self, c: Self) -> Self {
        unsafe { F64x8(_mm512_fmadd_pd(self.0, b.0, c.0)) }
    }
    #[inline(always)]
    fn max(self, o: Self) -> Self {
        unsafe { F64x8(_mm512_max_pd(self.0, o.0)) }
    }
    #[inline(always)]
    fn min(self, o: Self) -> Self {
        unsafe { F64x8(_mm512_min_pd(self.0, o.0)) }
    }
    #[inline(always)]
    fn round(self) -> Self {
        unsafe { F64x8(_mm512_roundscale_pd::<ROUND_NEAREST>(self.0)) }
    }
    #[inline(always)]
    fn exponent_bits(self) -> Self {
        unsafe {
            F64x8(_mm512_castsi512_pd(_mm512_slli_epi64::<52>(
                _mm512_castpd_si512(self.0),
            )))
        }
    }
    #[inline(always)]
    fn split_sqrt2(self) -> (Self, Self) {
        unsafe {
            let t = _mm512_add_epi64(
                _mm512_castpd_si512(self.0),
                _mm512_set1_epi64(F64_SPLIT_OFFSET as i64),
            );
            let m = _mm512_add_epi64(
                _mm512_and_si512(t, _mm512_set1_epi64(F64_MANTISSA as i64)),
                _mm512_set1_epi64(F64_SQRT_HALF as i64),
            );
            // No 64-bit integer conversion in AVX-512F: the biased exponent into ROUND_MAGIC's
            // low bits.
            let k = _mm512_add_epi64(
                _mm512_srli_epi64::<52>(t),
                _mm512_set1_epi64(F64_ROUND_MAGIC_BITS as i64),
            );
            (
                F64x8(_mm512_castsi512_pd(m)),
                F64x8(_mm512_sub_pd(
                    _mm512_castsi512_pd(k),
                    _mm512_set1_pd(F64_ROUND_MAGIC_BIASED),
                )),
            )
        }
    }
    #[inline(always)]
    fn prefetch(p: *const f64) {
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p as *const i8) }
    }
    #[inline(always)]
    fn reduce_add(self) -> f64 {
        unsafe { _mm512_reduce_add_pd(self.0) }
    }
    #[inline(always)]
    fn reduce_max(self) -> f64 {
        unsafe { _mm512_reduce_max_pd(self.0) }
    }
    #[inline(always)]
    fn gt_or_nan(self, o: Self) -> __mmask8 {
        unsafe { _mm512_cmp_pd_mask::<_CMP_NLE_UQ>(self.0, o.0) }
    }
    #[inline(always)]
    fn lt(self, o: Self) -> __mmask8 {
        unsafe { _mm512_cmp_pd_mask::<_CMP_LT_OQ>(self.0, o.0) }
    }
    #[inline(always)]
    fn keep(self, m: __mmask8) -> Self {
        unsafe { F64x8(_mm512_maskz_mov_pd(m, self.0)) }
    }
    #[inline(always)]
    fn mask_or(a: __mmask8, b: __mmask8) -> __mmask8 {
        a | b
    }
    #[inline(always)]
    fn mask_none() -> __mmask8 {
        0
    }
    #[inline(always)]
    fn mask_any(m: __mmask8) -> bool {
        m != 0
    }
    #[inline(always)]
    unsafe fn store_stream(self, p: *mut f64) {
        _mm512_stream_pd(p, self.0)
    }
    #[inline(always)]
    fn stream_fence() {
        unsafe { _mm_sfence() }
    }
}
