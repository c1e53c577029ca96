//! The portable fallback: one lane, plain Rust arithmetic (no libm fma call on targets without it).

use super::Vector;
use crate::float::Float;

#[derive(Clone, Copy, Debug)]
pub struct Scalar<T>(pub T);

impl<T: Float> Vector for Scalar<T> {
    type Elem = T;
    type Mask = bool;
    const LANES: usize = 1;

    #[inline(always)]
    fn splat(v: T) -> Self {
        Scalar(v)
    }
    #[inline(always)]
    unsafe fn load(p: *const T) -> Self {
        Scalar(*p)
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut T) {
        *p = self.0
    }
    #[inline(always)]
    fn add(self, o: Self) -> Self {
        Scalar(self.0 + o.0)
    }
    #[inline(always)]
    fn sub(self, o: Self) -> Self {
        Scalar(self.0 - o.0)
    }
    #[inline(always)]
    fn mul(self, o: Self) -> Self {
        Scalar(self.0 * o.0)
    }
    #[inline(always)]
    fn div(self, o: Self) -> Self {
        Scalar(self.0 / o.0)
    }
    #[inline(always)]
    fn mul_add(self, b: Self, c: Self) -> Self {
        Scalar(self.0 * b.0 + c.0)
    }
    #[inline(always)]
    fn max(self, o: Self) -> Self {
        Scalar(if self.0 > o.0 { self.0 } else { o.0 })
    }
    #[inline(always)]
    fn min(self, o: Self) -> Self {
        Scalar(if self.0 < o.0 { self.0 } else { o.0 })
    }
    #[inline(always)]
    fn round(self) -> Self {
        Scalar(self.0.round_even())
    }
    #[inline(always)]
    fn exponent_bits(self) -> Self {
        Scalar(T::exponent_bits(self.0))
    }
    #[inline(always)]
    fn split_sqrt2(self) -> (Self, Self) {
        let (m, k) = T::split_sqrt2(self.0);
        (Scalar(m), Scalar(k))
    }
    #[inline(always)]
    fn reduce_add(self) -> T {
        self.0
    }
    #[inline(always)]
    fn reduce_max(self) -> T {
        self.0
    }
    #[inline(always)]
    fn gt_or_nan(self, o: Self) -> bool {
        !(self.0 <= o.0)
    }
    #[inline(always)]
    fn lt(self, o: Self) -> bool {
        self.0 < o.0
    }
    #[inline(always)]
    fn keep(self, m: bool) -> Self {
        Scalar(if m { self.0 } else { T::ZERO })
    }
    #[inline(always)]
    fn mask_or(a: bool, b: bool) -> bool {
        a | b
    }
    #[inline(always)]
    fn mask_none() -> bool {
        false
    }
    #[inline(always)]
    fn mask_any(m: bool) -> bool {
        m
    }
}
