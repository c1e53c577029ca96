//! AVX2 + FMA: 8 x f32, 4 x f64.

use super::Vector;
use super::{F32_MANTISSA, F32_SPLIT_OFFSET, F32_SQRT_HALF};
use super::{F64_MANTISSA, F64_SPLIT_OFFSET, F64_SQRT_HALF};
use super::{F64_ROUND_MAGIC_BIASED, F64_ROUND_MAGIC_BITS};
use std::arch::x86_64::*;

#[derive(Clone, Copy)]
pub struct F32x8(__m256);
#[derive(Clone, Copy)]
pub struct F64x4(__m256d);

impl Vector for F32x8 {
    type Elem = f32;
    type Mask = __m256;
    const LANES: usize = 8;

    #[inline(always)]
    fn splat(v: f32) -> Self {
        unsafe { F32x8(_mm256_set1_ps(v)) }
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        F32x8(_mm256_loadu_ps(p))
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        _mm256_storeu_ps(p, self.0)
    }
    #[inline(always)]
    fn add(self, o: Self) -> Self {
        unsafe { F32x8(_mm256_add_ps(self.0, o.0)) }
    }
    #[inline(always)]
    fn sub(self, o: Self) -> Self {
        unsafe { F32x8(_mm256_sub_ps(self.0, o.0)) }
    }
    #[inline(always)]
    fn mul(self, o: Self) -> Self {
        unsafe { F32x8(_mm256_mul_ps(self.0, o.0)) }
    }
    #[inline(always)]
    fn div(self, o: Self) -> Self {
        unsafe { F32x8(_mm256_div_ps(self.0, o.0)) }
    }
    #[inline(always)]
    fn mul_add(self, b: Self, c: Self) -> Self {
        unsafe { F32x8(_mm256_fmadd_ps(self.0, b.0, c.0)) }
    }
    #[inline(always)]
    fn max(self, o: Self) -> Self {
        unsafe { F32x8(_mm256_max_ps(self.0, o.0)) }
    }
    #[inline(always)]
    fn min(self, o: Self) -> Self {
        unsafe { F32x8(_mm256_min_ps(self.0, o.0)) }
    }
    #[inline(always)]
    fn round(self) -> Self {
        unsafe {
            F32x8(_mm256_round_ps::<
                { _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC },
            >(self.0))
        }
    }
    #[inline(always)]
    fn exponent_bits(self) -> Self {
        unsafe {
            F32x8(_mm256_castsi256_ps(_mm256_slli_epi32::<23>(
                _mm256_castps_si256(self.0),
            )))
        }
    }
    #[inline(always)]
    fn split_sqrt2(self) -> (Self, Self) {
        unsafe {
            let t = _mm256_add_epi32(
                _mm256_castps_si256(self.0),
                _mm256_set1_epi32(F32_SPLIT_OFFSET as i32),
            );
            let m = _mm256_add_epi32(
                _mm256_and_si256(t, _mm256_set1_epi32(F32_MANTISSA as i32)),
                _mm256_set1_epi32(F32_SQRT_HALF as i32),
            );
            let k = _mm256_cvtepi32_ps(_mm256_srli_epi32::<23>(t));
            (
                F32x8(_mm256_castsi256_ps(m)),
                F32x8(_mm256_sub_ps(k, _mm256_set1_ps(127.0))),
            )
        }
    }
    #[inline(always)]
    fn prefetch(p: *const f32) {
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p as *const i8) }
    }
    #[inline(always)]
    fn reduce_add(self) -> f32 {
        unsafe {
            let s = _mm_add_ps(
                _mm256_castps256_ps128(self.0),
                _mm256_extractf128_ps::<1>(self.0),
            );
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_movehdup_ps(s));
            _mm_cvtss_f32(s)
        }
    }
    #[inline(always)]
    fn reduce_max(self) -> f32 {
        unsafe {
            let s = _mm_max_ps(
                _mm256_castps256_ps128(self.0),
                _mm256_extractf128_ps::<1>(self.0),
            );
            let s = _mm_max_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_max_ss(s, _mm_movehdup_ps(s));
            _mm_cvtss_f32(s)
        }
    }
    #[inline(always)]
    fn gt_or_nan(self, o: Self) -> __m256 {
        unsafe { _mm256_cmp_ps::<_CMP_NLE_UQ>(self.0, o.0) }
    }
    #[inline(always)]
    fn lt(self, o: Self) -> __m256 {
        unsafe { _mm256_cmp_ps::<_CMP_LT_OQ>(self.0, o.0) }
    }
    #[inline(always)]
    fn keep(self, m: __m256) -> Self {
        unsafe { F32x8(_mm256_and_ps(self.0, m)) }
    }
    #[inline(always)]
    fn mask_or(a: __m256, b: __m256) -> __m256 {
        unsafe { _mm256_or_ps(a, b) }
    }
    #[inline(always)]
    fn mask_none() -> __m256 {
        unsafe { _mm256_setzero_ps() }
    }
    #[inline(always)]
    fn mask_any(m: __m256) -> bool {
        unsafe { _mm256_movemask_ps(m) != 0 }
    }
    #[inline(always)]
    unsafe fn store_stream(self, p: *mut f32) {
        _mm256_stream_ps(p, self.0)
    }
    #[inline(always)]
    fn stream_fence() {
        unsafe { _mm_sfence() }
    }
}

impl Vector for F64x4 {
    type Elem = f64;
    type Mask = __m256d;
    const LANES: usize = 4;

    #[inline(always)]
    fn splat(v: f64) -> Self {
        unsafe { F64x4(_mm256_set1_pd(v)) }
    }
    #[inline(always)]
    unsafe fn load(p: *const f64) -> Self {
        F64x4(_mm256_loadu_pd(p))
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f64) {
        _mm256_storeu_pd(p, self.0)
    }
    #[inline(always)]
    fn add(self, o: Self) -> Self {
        unsafe { F64x4(_mm256_add_pd(self.0, o.0)) }
    }
    #[inline(always)]
    fn sub(self, o: Self) -> Self {
        unsafe { F64x4(_mm256_sub_pd(self.0, o.0)) }
    }
    #[inline(always)]
    fn mul(self, o: Self) -> Self {
        unsafe { F64x4(_mm256_mul_pd(self.0, o.0)) }
    }
    #[inline(always)]
    fn div(self, o: Self) -> Self {
        unsafe { F64x4(_mm256_div_pd(self.0, o.0)) }
    }
    #[inline(always)]
    fn mul_add(self, b: Self, c: Self) -> Self {
        unsafe { F64x4(_mm256_fmadd_pd(self.0, b.0, c.0)) }
    }
    #[inline(always)]
    fn max(self, o: Self) -> Self {
        unsafe { F64x4(_mm256_max_pd(self.0, o.0)) }
    }
    #[inline(always)]
    fn min(self, o: Self) -> Self {
        unsafe { F64x4(_mm256_min_pd(self.0, o.0)) }
    }
    #[inline(always)]
    fn round(self) -> Self {
        unsafe {
            F64x4(_mm256_round_pd::<
                { _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC },
            >(self.0))
        }
    }
    #[inline(always)]
    fn exponent_bits(self) -> Self {
        unsafe {
            F64x4(_mm256_castsi256_pd(_mm256_slli_epi64::<52>(
                _mm256_castpd_si256(self.0),
            )))
        }
    }
    #[inline(always)]
    fn split_sqrt2(self) -> (Self, Self) {
        unsafe {
            let t = _mm256_add_epi64(
                _mm256_castpd_si256(self.0),
                _mm256_set1_epi64x(F64_SPLIT_OFFSET as i64),
            );
            let m = _mm256_add_epi64(
                _mm256_and_si256(t, _mm256_set1_epi64x(F64_MANTISSA as i64)),
                _mm256_set1_epi64x(F64_SQRT_HALF as i64),
            );
            // No 64-bit integer conversion in AVX2: the biased exponent into ROUND_MAGIC's low
            // bits.
            let k = _mm256_add_epi64(
                _mm256_srli_epi64::<52>(t),
                _mm256_set1_epi64x(F64_ROUND_MAGIC_BITS as i64),
            );
            (
                F64x4(_mm256_castsi256_pd(m)),
                F64x4(_mm256_sub_pd(
                    _mm256_castsi256_pd(k),
                    _mm256_set1_pd(F64_ROUND_MAGIC_BIASED),
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
        unsafe {
            let s = _mm_add_pd(
                _mm256_castpd256_pd128(self.0),
                _mm256_extractf128_pd::<1>(self.0),
            );
            _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)))
        }
    }
    #[inline(always)]
    fn reduce_max(self) -> f64 {
        unsafe {
            let s = _mm_max_pd(
                _mm256_castpd256_pd128(self.0),
                _mm256_extractf128_pd::<1>(self.0),
            );
            _mm_cvtsd_f64(_mm_max_sd(s, _mm_unpackhi_pd(s, s)))
        }
    }
    #[inline(always)]
    fn gt_or_nan(self, o: Self) -> __m256d {
        unsafe { _mm256_cmp_pd::<_CMP_NLE_UQ>(self.0, o.0) }
    }
    #[inline(always)]
    fn lt(self, o: Self) -> __m256d {
        unsafe { _mm256_cmp_pd::<_CMP_LT_OQ>(self.0, o.0) }
    }
    #[inline(always)]
    fn keep(self, m: __m256d) -> Self {
        unsafe { F64x4(_mm256_and_pd(self.0, m)) }
    }
    #[inline(always)]
    fn mask_or(a: __m256d, b: __m256d) -> __m256d {
        unsafe { _mm256_or_pd(a, b) }
    }
    #[inline(always)]
    fn mask_none() -> __m256d {
        unsafe { _mm256_setzero_pd() }
    }
    #[inline(always)]
    fn mask_any(m: __m256d) -> bool {
        unsafe { _mm256_movemask_pd(m) != 0 }
    }
    #[inline(always)]
    unsafe fn store_stream(self, p: *mut f64) {
        _mm256_stream_pd(p, self.0)
    }
    #[inline(always)]
    fn stream_fence() {
        unsafe { _mm_sfence() }
    }
}
