//! stablemax / log_stablemax against the paper's definition in f64, on every ISA.

mod common;

use normax_core::stablemax::{log_stablemax, stablemax};
use normax_core::Layout;

fn s(x: f64) -> f64 {
    if x >= 0.0 {
        x + 1.0
    } else {
        1.0 / (1.0 - x)
    }
}

fn reference(x: &[f64]) -> Vec<f64> {
    let total: f64 = x.iter().map(|&v| s(v)).sum();
    x.iter().map(|&v| s(v) / total).collect()
}

#[test]
fn matches_the_definition_on_every_isa() {
    // 1037 elements: full vectors, folds and a partial tail on every ISA.
    let x: Vec<f32> = (0..1037)
        .map(|i| ((i * 7919) % 2001) as f32 / 50.0 - 20.0)
        .collect();
    let x64: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    let want = reference(&x64);
    common::each_isa(|isa| {
        let mut y = vec![0f32; x.len()];
        stablemax(&x, &mut y, Layout::rows(1, x.len())).unwrap();
        for (g, w) in y.iter().zip(&want) {
            // A few f32 roundings: s(x), the sum, 1 / sum, the product.
            assert!(((*g as f64 - w) / w).abs() < 5e-7, "{isa:?}: {g} vs {w}");
        }
        let mut l = vec![0f32; x.len()];
        log_stablemax(&x, &mut l, Layout::rows(1, x.len())).unwrap();
        for (g, w) in l.iter().zip(&want) {
            assert!(
                ((*g as f64 - w.ln()) / w.ln()).abs() < 5e-7,
                "{isa:?}: {g} vs {}",
                w.ln()
            );
        }
    });
}

#[test]
fn special_rows() {
    common::each_isa(|isa| {
        let mut y = [0f64; 3];
        stablemax(&[f64::NAN, 0.0, 1.0], &mut y, Layout::rows(1, 3)).unwrap();
        assert!(y.iter().all(|v| v.is_nan()), "{isa:?}");
        stablemax(&[f64::INFINITY, 0.0, 1.0], &mut y, Layout::rows(1, 3)).unwrap();
        assert!(y.iter().all(|v| v.is_nan()), "{isa:?}");
        stablemax(&[f64::NEG_INFINITY, 0.0, 1.0], &mut y, Layout::rows(1, 3)).unwrap();
        assert_eq!(y, [0.0, 1.0 / 3.0, 2.0 / 3.0], "{isa:?}");
        // f32 partial sums would overflow: the row is redone in f64.
        let mut z = [0f32; 2];
        stablemax(&[3e38f32, 3e38], &mut z, Layout::rows(1, 2)).unwrap();
        assert_eq!(z, [0.5, 0.5], "{isa:?}");
        // A dominant element: log y = -log1p(rest / s(max)), not log s - log sum rounded.
        log_stablemax(&[1e7f32, 0.0], &mut z, Layout::rows(1, 2)).unwrap();
        let want = -(1.0f64 / (1e7 + 1.0)).ln_1p();
        assert!(
            ((z[0] as f64 - want) / want).abs() < 1e-6,
            "{isa:?}: {} vs {want}",
            z[0]
        );
    });
}

#[test]
fn long_rows_are_chunked_with_the_same_result() {
    // 2^18 + 3 elements: split into chunks whose sums combine.
    let n = (1 << 18) + 3;
    let x: Vec<f64> = (0..n)
        .map(|i| ((i * 31) % 997) as f64 / 10.0 - 50.0)
        .collect();
    let mut y = vec![0f64; n];
    let mut l = vec![0f64; n];
    stablemax(&x, &mut y, Layout::rows(1, n)).unwrap();
    log_stablemax(&x, &mut l, Layout::rows(1, n)).unwrap();
    let want = reference(&x);
    for i in (0..n).step_by(997) {
        assert!(((y[i] - want[i]) / want[i]).abs() < 1e-13);
        assert!(((l[i] - want[i].ln()) / want[i].ln()).abs() < 1e-13);
    }
}
