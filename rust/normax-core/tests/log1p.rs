//! The kernels' log1p on every ISA this CPU supports: a dense sweep of float32's domain (all of
//! it with NORMAX_TEST_LOG1P_STRIDE=1) against the correctly rounded f32 result (f64's log1p
//! rounded), and float64 against std.

mod common;

use common::{lock, ulp_f32, Rng};
use normax_core::isa;
use normax_core::stablemax::log1p_slice;

/// Runs `f` with each supported ISA active, restoring the active one.
fn per_isa(mut f: impl FnMut(normax_core::Isa)) {
    let before = isa::active();
    for isa in isa::supported() {
        isa::set_active(isa).unwrap();
        f(isa);
    }
    isa::set_active(before).unwrap();
}

#[test]
fn log1p_f32_dense_sweep_within_2_ulp() {
    // Every 7th float32 in (-1, +inf) (460M inputs), in blocks, the reference computed once per
    // block for all ISAs. NORMAX_TEST_LOG1P_STRIDE=1 sweeps all 3.2e9 (minutes: not the CI
    // default); .ci/run thins it further where the tests run emulated (qemu).
    let stride: u32 = std::env::var("NORMAX_TEST_LOG1P_STRIDE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(7);
    let _guard = lock();
    let isas = isa::supported();
    let mut worst = vec![(0.0f64, 0.0f32); isas.len()];
    // [0, f32::MAX] and [-0, -0.99999994] as bit ranges.
    let ranges = [
        (0u32, f32::MAX.to_bits()),
        (0x8000_0000u32, (-0.999_999_94f32).to_bits()),
    ];
    let block = 1u32 << 20;
    let mut xs = Vec::with_capacity(block as usize);
    let mut refs = Vec::with_capacity(block as usize);
    let mut ys = vec![0f32; block as usize];
    for (lo, hi) in ranges {
        let mut b = lo as u64;
        while b <= hi as u64 {
            xs.clear();
            while xs.len() < block as usize && b <= hi as u64 {
                xs.push(f32::from_bits(b as u32));
                b += stride as u64;
            }
            refs.clear();
            refs.extend(xs.iter().map(|&x| (x as f64).ln_1p() as f32 as f64));
            let ys = &mut ys[..xs.len()];
            let mut k = 0;
            per_isa(|_| {
                log1p_slice(&xs, ys).unwrap();
                for ((&x, &y), &r) in xs.iter().zip(ys.iter()).zip(&refs) {
                    let err = ((y as f64) - r).abs() / ulp_f32(r);
                    if err > worst[k].0 || err.is_nan() {
                        worst[k] = (err, x);
                    }
                }
                k += 1;
            });
        }
    }
    for (isa, (err, x)) in isas.iter().zip(&worst) {
        eprintln!("log1p f32 {isa:?}: at most {err} ULP (at x = {x:e})");
        assert!(*err <= 2.0, "{isa:?}: log1p({x:e}) is {err} ULP off");
    }
}

#[test]
fn log1p_f32_edges() {
    let xs = [
        -1.0f32,
        -2.0,
        f32::NEG_INFINITY,
        f32::INFINITY,
        f32::NAN,
        0.0,
        -0.0,
        f32::from_bits(1),
        -f32::from_bits(1),
        f32::MAX,
        -0.999_999_94,
        1e-30,
    ];
    let mut ys = [0f32; 12];
    let _guard = lock();
    per_isa(|isa| {
        log1p_slice(&xs, &mut ys).unwrap();
        assert_eq!(ys[0], f32::NEG_INFINITY, "{isa:?}");
        assert!(
            ys[1].is_nan() && ys[2].is_nan() && ys[4].is_nan(),
            "{isa:?}: {ys:?}"
        );
        assert_eq!(ys[3], f32::INFINITY, "{isa:?}");
        assert_eq!((ys[5], ys[6]), (0.0, 0.0), "{isa:?}");
        // Below 2^-24 log1p(x) rounds to x itself, subnormals included.
        assert_eq!((ys[7], ys[8], ys[11]), (xs[7], xs[8], xs[11]), "{isa:?}");
        assert_eq!(ys[9], (f32::MAX as f64).ln_1p() as f32, "{isa:?}");
        assert_eq!(ys[10], (xs[10] as f64).ln_1p() as f32, "{isa:?}");
    });
}

#[test]
fn log1p_f64_is_std() {
    // float64 runs std's ln_1p lane by lane on every ISA: bit for bit, edges included.
    let mut rng = Rng(7);
    let mut xs: Vec<f64> = (0..100_000)
        .map(|_| (rng.next_f64() * 80.0 - 40.0).exp() - 0.5)
        .collect();
    xs.extend([-1.0, -2.0, f64::INFINITY, f64::NAN, 0.0, 1e-300, f64::MAX]);
    let mut ys = vec![0f64; xs.len()];
    let _guard = lock();
    per_isa(|isa| {
        log1p_slice(&xs, &mut ys).unwrap();
        for (&x, &y) in xs.iter().zip(&ys) {
            let r = x.ln_1p();
            assert!(
                y.to_bits() == r.to_bits() || (y.is_nan() && r.is_nan()),
                "{isa:?}: log1p({x}) = {y}, std {r}"
            );
        }
    });
}
