//! What every test file shares: the loop over the ISAs this CPU supports (the ISA and the
//! thread count are process-wide, so tests that set them take turns) and the deterministic
//! generators (no dev-dependency).
#![allow(dead_code)] // each test file uses its own part

use normax_core::{isa, Isa};
use std::sync::{Mutex, MutexGuard};

static GLOBAL: Mutex<()> = Mutex::new(());

/// Held by a test while it sets the ISA or the thread count.
pub fn lock() -> MutexGuard<'static, ()> {
    GLOBAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `f` once per ISA this CPU supports, restoring the active one.
pub fn each_isa(mut f: impl FnMut(Isa)) {
    let _guard = lock();
    let before = isa::active();
    for isa in isa::supported() {
        isa::set_active(isa).unwrap();
        f(isa);
    }
    isa::set_active(before).unwrap();
}

/// A small deterministic generator (xorshift) with normal-ish samples: no dev-dependency needed.
pub struct Rng(pub u64);
impl Rng {
    pub fn next_f64(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Sum of 4 uniforms, scaled to standard deviation `sd`.
    pub fn normal(&mut self, sd: f64) -> f64 {
        let s: f64 = (0..4).map(|_| self.next_f64()).sum::<f64>() - 2.0;
        s * sd * 3f64.sqrt()
    }
    pub fn vec_f32(&mut self, n: usize, sd: f64) -> Vec<f32> {
        (0..n).map(|_| self.normal(sd) as f32).collect()
    }
}

/// Deterministic pseudo-random numbers in [-1, 1) (no extra dev-dependency).
pub struct Lcg(pub u64);
impl Lcg {
    pub fn next(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
    }
    pub fn vec(&mut self, n: usize, scale: f64) -> Vec<f64> {
        (0..n).map(|_| self.next() * scale).collect()
    }
    pub fn below(&mut self, n: usize) -> usize {
        (((self.next() + 1.0) / 2.0) * n as f64) as usize % n.max(1)
    }
}

/// A deterministic pseudo-random sequence in [-1, 1).
pub fn noise(n: usize, seed: u64) -> Vec<f64> {
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

/// One ULP of f32 at |v| (the smallest subnormal below the normal range).
pub fn ulp_f32(v: f64) -> f64 {
    let a = (v as f32).abs();
    if a < f32::MIN_POSITIVE {
        f32::from_bits(1) as f64
    } else {
        (f32::from_bits(a.to_bits() + 1) - a) as f64
    }
}

/// One ULP of f64 at |v| (the smallest subnormal below the normal range).
pub fn ulp_f64(v: f64) -> f64 {
    let a = v.abs();
    if a < f64::MIN_POSITIVE {
        f64::from_bits(1)
    } else {
        f64::from_bits(a.to_bits() + 1) - a
    }
}

/// Neumaier's compensated sum: a reference sum whose error does not grow with the length.
pub fn sum_compensated(values: impl Iterator<Item = f64>) -> f64 {
    let (mut s, mut c) = (0.0f64, 0.0f64);
    for v in values {
        let t = s + v;
        c += if s.abs() >= v.abs() {
            (s - t) + v
        } else {
            (v - t) + s
        };
        s = t;
    }
    s + c
}
