//! The element functions of the kernels (exp, tanh) on every ISA this CPU supports, against
//! f64.

mod common;

use common::{each_isa, lock, ulp_f32, Rng};
use normax_core::isa::{self, dispatch, Kernel};
use normax_core::simd::{load_partial, store_partial, tanh, Vector};
use normax_core::softmax::exp_slice;

#[test]
fn exp_f32_dense_sweep_within_2_ulp() {
    // Every 7th float from the subnormal cutoff (exp(x) < 2^-150 rounds to 0 below -103.972)
    // to overflow (~30M values per ISA): results below 2^-126 are subnormal, and ulp_f32 is then
    // 2^-149, so gradual underflow is checked to 2 units of the smallest subnormal.
    // NORMAX_TEST_EXP_STRIDE thins the sweep where the tests run emulated (qemu, .ci/run).
    let stride: u32 = std::env::var("NORMAX_TEST_EXP_STRIDE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(7);
    let lo = -104.0f32;
    let hi = 88.72f32;
    let mut xs = Vec::new();
    let mut b = hi.to_bits();
    while f32::from_bits(b) > 0.0 {
        xs.push(f32::from_bits(b));
        b = b.saturating_sub(stride);
    }
    let mut b = 0x8000_0000u32;
    while f32::from_bits(b) >= lo {
        xs.push(f32::from_bits(b));
        b += stride;
    }
    let mut ys = vec![0f32; xs.len()];
    each_isa(|isa| {
        exp_slice(&xs, &mut ys).unwrap();
        let mut worst = (0.0f64, 0.0f32);
        for (&x, &y) in xs.iter().zip(&ys) {
            let r = (x as f64).exp();
            let err = ((y as f64) - r).abs() / ulp_f32(r);
            if err > worst.0 {
                worst = (err, x);
            }
        }
        assert!(
            worst.0 <= 2.0,
            "{isa:?}: exp({}) is {} ULP off",
            worst.1,
            worst.0
        );
    });
}

#[test]
fn exp_f64_sample_within_2_ulp() {
    // From below the subnormal cutoff (-745.13) to overflow: below -708.4 the results are
    // subnormal, where one ULP is 2^-1074.
    let mut rng = Rng(42);
    let xs: Vec<f64> = (0..2_000_000)
        .map(|_| rng.next_f64() * (709.7 + 746.0) - 746.0)
        .collect();
    let mut ys = vec![0f64; xs.len()];
    each_isa(|isa| {
        exp_slice(&xs, &mut ys).unwrap();
        for (&x, &y) in xs.iter().zip(&ys) {
            let r = x.exp();
            let ulp = f64::from_bits(r.to_bits() + 1) - r;
            // std's exp is itself within 1 ULP: 2 ULP of ours plus its own.
            assert!(
                (y - r).abs() <= 3.0 * ulp,
                "{isa:?}: exp({x}) = {y}, std {r}"
            );
        }
    });
}

#[test]
fn exp_rounds_gradually_into_the_subnormals() {
    // Subnormal results are the correctly rounded value within one unit of the smallest
    // subnormal, never flushed to 0 (the 2^n scaling is done in two steps).
    let xs32 = [-87.5f32, -90.0, -100.0, -103.0, -103.5, -103.97];
    let mut ys32 = [0f32; 6];
    let xs64 = [-709.0f64, -720.0, -740.0, -744.0, -745.0];
    let mut ys64 = [0f64; 5];
    each_isa(|isa| {
        exp_slice(&xs32, &mut ys32).unwrap();
        for (&x, &y) in xs32.iter().zip(&ys32) {
            let want = (x as f64).exp();
            assert!(y > 0.0 && y < f32::MIN_POSITIVE, "{isa:?}: exp({x}) = {y}");
            let tiny = f32::from_bits(1) as f64;
            assert!(
                ((y as f64) - want).abs() <= tiny,
                "{isa:?}: exp({x}) = {y}, want {want}"
            );
        }
        exp_slice(&xs64, &mut ys64).unwrap();
        for (&x, &y) in xs64.iter().zip(&ys64) {
            let want = x.exp();
            assert!(y > 0.0 && y < f64::MIN_POSITIVE, "{isa:?}: exp({x}) = {y}");
            let tiny = f64::from_bits(1);
            assert!(
                (y - want).abs() <= tiny,
                "{isa:?}: exp({x}) = {y}, std {want}"
            );
        }
    });
}

#[test]
fn exp_edges() {
    let xs = [
        f32::NEG_INFINITY,
        f32::INFINITY,
        f32::NAN,
        89.0,
        -104.0,
        0.0,
        -0.0,
        88.72283,
        f32::MAX,
        f32::MIN,
    ];
    let mut ys = [0f32; 10];
    each_isa(|isa| {
        exp_slice(&xs, &mut ys).unwrap();
        assert_eq!(ys[0], 0.0, "{isa:?}");
        assert_eq!(ys[1], f32::INFINITY, "{isa:?}");
        assert!(ys[2].is_nan(), "{isa:?}");
        assert_eq!(ys[3], f32::INFINITY, "{isa:?}");
        assert_eq!(ys[4], 0.0, "{isa:?}");
        assert_eq!(ys[5], 1.0, "{isa:?}");
        assert_eq!(ys[6], 1.0, "{isa:?}");
        assert!(ys[7].is_finite() && ys[7] > 3.4e38, "{isa:?}: {}", ys[7]);
        assert_eq!(ys[8], f32::INFINITY, "{isa:?}");
        assert_eq!(ys[9], 0.0, "{isa:?}");
    });
}

#[test]
fn tanh_is_accurate() {
    let _g = lock();
    for isa in isa::supported() {
        isa::set_active(isa).unwrap();
        let mut xs: Vec<f32> = (0..200_000)
            .map(|i| (i as f32 - 100_000.0) * 2.5e-4)
            .collect();
        xs.extend([
            0.0,
            -0.0,
            1e-30,
            -1e-30,
            9.0,
            30.0,
            -30.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
        ]);
        let mut ys = vec![0f32; xs.len()];
        struct K<'a>(&'a [f32], &'a mut [f32]);
        impl Kernel<f32> for K<'_> {
            type Output = ();
            fn run<V: Vector<Elem = f32>>(self) {
                for (x, y) in self.0.chunks(V::LANES).zip(self.1.chunks_mut(V::LANES)) {
                    unsafe {
                        let v = load_partial::<V>(x.as_ptr(), x.len(), 0.0);
                        store_partial(tanh(v), y.as_mut_ptr(), y.len());
                    }
                }
            }
        }
        dispatch(K(&xs, &mut ys));
        for (x, y) in xs.iter().zip(&ys) {
            let want = (*x as f64).tanh();
            if x.is_nan() {
                assert!(y.is_nan());
                continue;
            }
            let ulp = (want as f32).abs().max(f32::MIN_POSITIVE) * f32::EPSILON;
            assert!(
                ((*y as f64) - want).abs() <= 3.0 * ulp as f64,
                "{} tanh({x}) = {y}, want {want}",
                isa.name()
            );
        }
    }
    isa::set_active(isa::best()).unwrap();
}
