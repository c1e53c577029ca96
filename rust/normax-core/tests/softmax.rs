//! The softmax family (softmax, log_softmax, logsumexp, the backwards) on every ISA this CPU
//! supports, against f64 references.

mod common;

use common::{each_isa, lock, sum_compensated, ulp_f32, ulp_f64, Rng};
use normax_core::softmax::{
    log_softmax, log_softmax_backward, logsumexp, softmax, softmax_backward, softmax_inplace,
};
use normax_core::{threads, Float, Layout};

fn ref_softmax(x: &[f32]) -> Vec<f64> {
    let m = x
        .iter()
        .map(|&v| v as f64)
        .fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = x.iter().map(|&v| (v as f64 - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|v| v / s).collect()
}

fn ref_lse(x: &[f32]) -> f64 {
    let m = x
        .iter()
        .map(|&v| v as f64)
        .fold(f64::NEG_INFINITY, f64::max);
    m + x.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln()
}

/// Row lengths around every vector and unroll boundary, the in-cache limit and beyond.
const LENGTHS: &[usize] = &[
    1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 67, 1000, 4097, 65537, 262_143, 262_145,
];

#[test]
fn softmax_family_matches_f64_reference() {
    each_isa(|isa| {
        let mut rng = Rng(7);
        for &len in LENGTHS {
            let rows = if len > 10_000 { 1 } else { 3 };
            let x = rng.vec_f32(rows * len, 5.0);
            let layout = Layout::rows(rows, len);
            let mut y = vec![0f32; x.len()];
            let mut ly = vec![0f32; x.len()];
            let mut lse = vec![0f32; rows];
            softmax(&x, &mut y, layout).unwrap();
            log_softmax(&x, &mut ly, layout).unwrap();
            logsumexp(&x, None, &mut lse, None, layout).unwrap();
            for r in 0..rows {
                let xr = &x[r * len..(r + 1) * len];
                let want = ref_softmax(xr);
                let want_lse = ref_lse(xr);
                assert!(((lse[r] as f64 - want_lse) / want_lse.abs().max(1.0)).abs() < 1e-6);
                for i in 0..len {
                    let (got, w) = (y[r * len + i] as f64, want[i]);
                    if w > 1e-30 {
                        // exp within 2 ULP, sum within 1, product and reciprocal 0.5 each.
                        let ulps = (got - w).abs() / ulp_f32(w);
                        assert!(
                            ulps <= 5.0,
                            "{isa:?} len {len}: softmax {got} vs {w} ({ulps} ULP)"
                        );
                    }
                    let lw = xr[i] as f64 - want_lse;
                    let lg = ly[r * len + i] as f64;
                    assert!(
                        (lg - lw).abs() <= 2.0 * ulp_f32(lw) + 2.0 * ulp_f32(want_lse),
                        "{isa:?} len {len}: log_softmax {lg} vs {lw}"
                    );
                }
            }
        }
    });
}

#[test]
fn special_values() {
    each_isa(|isa| {
        let nan = f32::NAN;
        let inf = f32::INFINITY;
        let cases: Vec<Vec<f32>> = vec![
            vec![1.0, nan, 2.0],
            vec![1.0, inf, 2.0],
            vec![-inf, -inf, -inf],
            vec![1e30, -1e30, 1e30],
            vec![3e38, 0.0, -3e38],
            vec![-1e30, -1e30 + 1e24, -inf],
            vec![0.0, -inf, 1.0],
        ];
        for x in cases {
            let n = x.len();
            let mut y = vec![0f32; n];
            let mut lse = [0f32];
            softmax(&x, &mut y, Layout::rows(1, n)).unwrap();
            logsumexp(&x, None, &mut lse, None, Layout::rows(1, n)).unwrap();
            let has_nan = x.iter().any(|v| v.is_nan());
            let has_inf = x.contains(&inf);
            let all_neg_inf = x.iter().all(|&v| v == -inf);
            if has_nan || has_inf || all_neg_inf {
                assert!(y.iter().all(|v| v.is_nan()), "{isa:?} {x:?}: {y:?}");
            } else {
                let want = ref_softmax(&x);
                for i in 0..n {
                    assert!(
                        (y[i] as f64 - want[i]).abs() <= 1e-6 * want[i] + 1e-37,
                        "{isa:?} {x:?}: {y:?}"
                    );
                }
            }
            let want_lse = if has_nan {
                f64::NAN
            } else if has_inf {
                f64::INFINITY
            } else if all_neg_inf {
                f64::NEG_INFINITY
            } else {
                ref_lse(&x)
            };
            if want_lse.is_nan() {
                assert!(lse[0].is_nan(), "{isa:?} {x:?}: {lse:?}");
            } else if want_lse.is_infinite() {
                assert_eq!(lse[0] as f64, want_lse, "{isa:?} {x:?}");
            } else {
                assert!(
                    ((lse[0] as f64 - want_lse) / want_lse.abs()).abs() < 1e-6,
                    "{isa:?} {x:?}: {lse:?}"
                );
            }
        }
        // -inf entries of a finite row are exactly 0.
        let x = [0.0f32, f32::NEG_INFINITY, 1.0];
        let mut y = [1f32; 3];
        softmax(&x, &mut y, Layout::rows(1, 3)).unwrap();
        assert_eq!(y[1], 0.0);
        // An empty reduction is -inf.
        let mut lse = [0f32; 2];
        logsumexp::<f32>(&[], None, &mut lse, None, Layout::rows(2, 0)).unwrap();
        assert_eq!(lse, [f32::NEG_INFINITY; 2]);
    });
}

// Strided layouts (the column kernels): tests/columns.rs.

#[test]
fn long_row_split_is_exact_and_thread_independent() {
    let _guard = lock();
    let len = 3 * (1 << 18) + 17;
    let mut rng = Rng(11);
    let x = rng.vec_f32(len, 4.0);
    let want = ref_softmax(&x);
    let want_lse = ref_lse(&x);
    let threads_before = threads::num_threads();
    let mut results = Vec::new();
    for t in [1, 2, 3] {
        threads::set_num_threads(t).unwrap();
        let mut y = vec![0f32; len];
        let mut lse = [0f32];
        softmax(&x, &mut y, Layout::rows(1, len)).unwrap();
        logsumexp(&x, None, &mut lse, None, Layout::rows(1, len)).unwrap();
        results.push((y, lse[0]));
    }
    threads::set_num_threads(threads_before).unwrap();
    assert!(((results[0].1 as f64 - want_lse) / want_lse).abs() < 1e-6);
    for (i, &w) in want.iter().enumerate() {
        if w > 1e-30 {
            assert!((results[0].0[i] as f64 - w).abs() / w < 1e-6, "element {i}");
        }
    }
    for r in &results[1..] {
        assert_eq!(r.0, results[0].0, "thread count changed the softmax");
        assert_eq!(r.1, results[0].1, "thread count changed the logsumexp");
    }
}

#[test]
fn in_place_equals_out_of_place() {
    each_isa(|isa| {
        let mut rng = Rng(5);
        for &len in &[5usize, 1000, 70_000] {
            let x = rng.vec_f32(2 * len, 2.0);
            let mut y = vec![0f32; x.len()];
            softmax(&x, &mut y, Layout::rows(2, len)).unwrap();
            let mut z = x.clone();
            softmax_inplace(&mut z, Layout::rows(2, len)).unwrap();
            assert_eq!(y, z, "{isa:?} len {len}");
        }
    });
}

#[test]
fn backwards_match_formulas() {
    each_isa(|isa| {
        let mut rng = Rng(9);
        for &len in &[1usize, 13, 1000] {
            let x: Vec<f64> = (0..len).map(|_| rng.normal(2.0)).collect();
            let dy: Vec<f64> = (0..len).map(|_| rng.normal(1.0)).collect();
            let mut y = vec![0f64; len];
            softmax(&x, &mut y, Layout::rows(1, len)).unwrap();
            let mut dx = vec![0f64; len];
            softmax_backward(&y, &dy, &mut dx, Layout::rows(1, len)).unwrap();
            let s: f64 = y.iter().zip(&dy).map(|(a, b)| a * b).sum();
            for i in 0..len {
                assert!((dx[i] - y[i] * (dy[i] - s)).abs() < 1e-13, "{isa:?}");
            }
            let mut ly = vec![0f64; len];
            log_softmax(&x, &mut ly, Layout::rows(1, len)).unwrap();
            log_softmax_backward(&ly, &dy, &mut dx, Layout::rows(1, len)).unwrap();
            let s: f64 = dy.iter().sum();
            for i in 0..len {
                assert!((dx[i] - (dy[i] - ly[i].exp() * s)).abs() < 1e-13, "{isa:?}");
            }
        }
    });
}

#[test]
fn weighted_logsumexp_signs() {
    let x = [1.0f64, 2.0, 3.0, f64::INFINITY];
    let b = [1.0f64, -1.0, 0.5, 0.0];
    let (mut out, mut sign) = ([0f64], [0f64]);
    logsumexp(&x, Some(&b), &mut out, Some(&mut sign), Layout::rows(1, 4)).unwrap();
    let s = 1f64.exp() - 2f64.exp() + 0.5 * 3f64.exp();
    assert!((out[0] - s.abs().ln()).abs() < 1e-14);
    assert_eq!(sign[0], s.signum());
}

#[test]
fn bad_lengths_are_errors() {
    let x = [0f32; 6];
    let mut y = [0f32; 5];
    assert!(softmax(&x, &mut y, Layout::rows(2, 3)).is_err());
    let mut y = [0f32; 6];
    assert!(softmax(&x, &mut y, Layout::rows(2, 4)).is_err());
    assert!(softmax(
        &x,
        &mut y,
        Layout {
            outer: usize::MAX,
            len: 2,
            inner: 2
        }
    )
    .is_err());
}

#[test]
fn two_pass_blocks_below_the_limit() {
    let len = 300_000; // beyond the in-cache limit: the (chunked) two-pass path
    let mut rng = Rng(13);
    let base = rng.vec_f32(len, 3.0);
    let cases: Vec<Vec<f32>> = vec![
        // A masked prefix of whole blocks at -1e9: negligible, the fast path stays.
        base.iter()
            .enumerate()
            .map(|(i, &v)| if i < 10_000 { -1e9 } else { v })
            .collect(),
        // Everything far below the limit, the values close together: the exact path.
        base.iter().map(|&v| v - 5000.0).collect(),
        // One block just below -limit, the rest just above: not negligible.
        base.iter()
            .enumerate()
            .map(|(i, &v)| {
                if i < 4096 {
                    -4100.0
                } else {
                    -4090.0 + v * 1e-3
                }
            })
            .collect(),
        // Whole blocks of -inf.
        base.iter()
            .enumerate()
            .map(|(i, &v)| {
                if i % 8192 < 4096 {
                    f32::NEG_INFINITY
                } else {
                    v
                }
            })
            .collect(),
    ];
    each_isa(|isa| {
        for (k, x) in cases.iter().enumerate() {
            let want = ref_softmax(x);
            let mut y = vec![0f32; len];
            softmax(x, &mut y, Layout::rows(1, len)).unwrap();
            let mut lse = [0f32];
            logsumexp(x, None, &mut lse, None, Layout::rows(1, len)).unwrap();
            let want_lse = ref_lse(x);
            assert!(
                ((lse[0] as f64 - want_lse) / want_lse.abs()).abs() < 1e-6,
                "{isa:?} case {k}"
            );
            for i in 0..len {
                assert!(
                    (y[i] as f64 - want[i]).abs() <= 1e-6 * want[i] + 1e-38,
                    "{isa:?} case {k} element {i}: {} vs {}",
                    y[i],
                    want[i]
                );
            }
        }
    });
}

#[test]
fn streaming_stores_give_the_same_bits() {
    // 4099 x 2305 f32 = 37.8 MB: past the streaming-store threshold; rows start unaligned.
    let (rows, len) = (4099, 2305);
    let mut rng = Rng(17);
    let x = rng.vec_f32(rows * len, 4.0);
    each_isa(|isa| {
        let mut y = vec![0f32; x.len()];
        let mut ly = vec![0f32; x.len()];
        softmax(&x, &mut y, Layout::rows(rows, len)).unwrap();
        log_softmax(&x, &mut ly, Layout::rows(rows, len)).unwrap();
        for r in [0, 1, 2, 1000, rows - 1] {
            let xr = &x[r * len..(r + 1) * len];
            let mut yr = vec![0f32; len];
            softmax(xr, &mut yr, Layout::rows(1, len)).unwrap();
            assert_eq!(
                &y[r * len..(r + 1) * len],
                &yr[..],
                "{isa:?} softmax row {r}"
            );
            log_softmax(xr, &mut yr, Layout::rows(1, len)).unwrap();
            assert_eq!(
                &ly[r * len..(r + 1) * len],
                &yr[..],
                "{isa:?} log_softmax row {r}"
            );
        }
    });
}

/// log_softmax and logsumexp of `x` in T, with 1 and 2 threads (bitwise the same), and the ULP of T.
fn long_row_results<T: Float>(x: &[f32]) -> (Vec<f64>, f64) {
    let x: Vec<T> = x.iter().map(|&v| T::from_f64(v as f64)).collect();
    let layout = Layout::rows(1, x.len());
    let before = threads::num_threads();
    let mut runs = Vec::new();
    for t in [1, 2] {
        threads::set_num_threads(t).unwrap();
        let mut y = vec![T::ZERO; x.len()];
        let mut lse = [T::ZERO];
        log_softmax(&x, &mut y, layout).unwrap();
        logsumexp(&x, None, &mut lse, None, layout).unwrap();
        runs.push((y, lse[0]));
    }
    threads::set_num_threads(before).unwrap();
    assert!(runs[0] == runs[1], "the thread count changed the result");
    let (y, lse) = runs.swap_remove(0);
    (y.iter().map(|v| v.to_f64()).collect(), lse.to_f64())
}

#[test]
fn long_rows_with_a_dominant_element_are_refined() {
    // Rows of 2^18 or more take the chunked two-pass path; one element dominates. The truth at it
    // is -log1p(rest), tiny: an unrefined log-sum-exp gave +1.4e-8 (f32) or ~1000 ULP here.
    let len = (1 << 18) + 1001;
    let k = 70_001; // in the second chunk
    let base = Rng(21).vec_f32(len, 1.0);
    // (the dominant value, the others' shift): lse = top + tiny, and an lse near 0.
    let cases = [(20.0f32, 0.0f32), (45.0, 0.0), (0.0, -30.0)];
    each_isa(|isa| {
        for (top, shift) in cases {
            let mut x: Vec<f32> = base.iter().map(|&v| v + shift).collect();
            x[k] = top;
            // f64 reference: x_i - top is exact (f32 values), exp within an ULP, a compensated sum.
            let rest = sum_compensated(
                x.iter()
                    .enumerate()
                    .filter(|&(i, _)| i != k)
                    .map(|(_, &v)| (v as f64 - top as f64).exp()),
            );
            let lse_rel = rest.ln_1p();
            let want_lse = top as f64 + lse_rel;
            for (name, (y, lse), ulp) in [
                (
                    "f32",
                    long_row_results::<f32>(&x),
                    ulp_f32 as fn(f64) -> f64,
                ),
                ("f64", long_row_results::<f64>(&x), ulp_f64),
            ] {
                let what = format!("{isa:?} {name} top {top} shift {shift}");
                assert!(y.iter().all(|&v| v <= 0.0), "{what}: log_softmax > 0");
                // Within 4 ULP of each result (the dominant one included), and of the lse: a few
                // roundings of x - max and log1p, nothing of the max's term.
                for (i, &v) in y.iter().enumerate() {
                    let want = (x[i] as f64 - top as f64) - lse_rel;
                    let ulps = (v - want).abs() / ulp(want);
                    assert!(
                        ulps <= 4.0,
                        "{what}: element {i}: {v} vs {want} ({ulps} ULP)"
                    );
                }
                let ulps = (lse - want_lse).abs() / ulp(want_lse);
                assert!(
                    ulps <= 4.0,
                    "{what}: logsumexp {lse} vs {want_lse} ({ulps} ULP)"
                );
            }
        }
    });
}

/// dx of `log_softmax_backward` against dy - exp(y) * sum(dy) in f64 for any y (it need not be a
/// log_softmax): y <= 0 takes the kernels' exponential with a fixed exponent, a vector with a lane
/// above 0 or NaN the general exp. Rows whose dy is one-hot (sum 1) show the exp itself,
/// subnormal results included; the long row takes the chunked path.
fn log_softmax_backward_of_any_y<T: Float>(ulp: fn(f64) -> f64) {
    let values = [
        -0.0,
        0.0,
        -1e-7,
        -0.3,
        -3.0,
        -20.0,
        -87.0,
        -88.5,
        -100.0,
        -103.5,
        -150.0,
        -700.0,
        -745.0,
        -800.0,
        0.3,
        1.0,
        50.0,
        1000.0,
        f64::NAN,
        f64::INFINITY,
        f64::NEG_INFINITY,
    ];
    let max = if std::mem::size_of::<T>() == 4 {
        f32::MAX as f64
    } else {
        f64::MAX
    };
    let eps = ulp(1.0);
    each_isa(|isa| {
        let mut rng = Rng(3);
        for len in [1usize, 7, 16, 17, 33, 1000, (1 << 18) + 5] {
            // (first value, one-hot dy, only values <= 0)
            for (start, one_hot, non_positive) in
                [(0, false, false), (5, true, true), (9, true, false)]
            {
                let pick: Vec<f64> = values
                    .iter()
                    .copied()
                    .filter(|&v| !non_positive || v <= 0.0)
                    .collect();
                let y: Vec<T> = (0..len)
                    .map(|i| T::from_f64(pick[(start + 4 * i) % pick.len()]))
                    .collect();
                let dy: Vec<T> = (0..len)
                    .map(|i| match (one_hot, i) {
                        (true, 0) => T::ONE,
                        (true, _) => T::ZERO,
                        _ => T::from_f64(rng.normal(1.0)),
                    })
                    .collect();
                let mut dx = vec![T::ZERO; len];
                log_softmax_backward(&y, &dy, &mut dx, Layout::rows(1, len)).unwrap();
                let s: f64 = dy.iter().map(|v| v.to_f64()).sum();
                // The bound of the sum's rounding in any order.
                let s_abs: f64 = dy.iter().map(|v| v.to_f64().abs()).sum();
                for i in 0..len {
                    let (yi, dyi, got) = (y[i].to_f64(), dy[i].to_f64(), dx[i].to_f64());
                    let term = yi.exp() * s;
                    let want = dyi - term;
                    let what = format!("{isa:?} len {len} y {yi} dy {dyi}: {got} vs {want}");
                    if want.is_nan() {
                        assert!(got.is_nan(), "{what}");
                    } else if term.abs() > 2.0 * max || want.is_infinite() {
                        assert_eq!(got, -term.signum() * f64::INFINITY, "{what}");
                    } else if term.abs() < max / 2.0 {
                        // exp within 2 ULP, the sum and the product rounded once each.
                        let e = yi.exp();
                        let bound = 4.0 * eps * (dyi.abs() + e * s_abs) + 2.0 * ulp(0.0);
                        assert!((got - want).abs() <= bound, "{what}");
                    }
                }
            }
        }
    });
}

#[test]
fn log_softmax_backward_takes_any_y() {
    log_softmax_backward_of_any_y::<f32>(ulp_f32);
    log_softmax_backward_of_any_y::<f64>(ulp_f64);
}

#[test]
fn backwards_with_streaming_stores_give_the_same_bits() {
    // 4099 x 2305 f32 = 37.8 MB: past the streaming-store threshold; rows start unaligned.
    let (rows, len) = (4099, 2305);
    let mut rng = Rng(19);
    let x = rng.vec_f32(rows * len, 4.0);
    let dy = rng.vec_f32(rows * len, 1.0);
    let (mut y, mut ly) = (vec![0f32; x.len()], vec![0f32; x.len()]);
    softmax(&x, &mut y, Layout::rows(rows, len)).unwrap();
    log_softmax(&x, &mut ly, Layout::rows(rows, len)).unwrap();
    each_isa(|isa| {
        type Backward = fn(&[f32], &[f32], &mut [f32], Layout) -> Result<(), normax_core::Error>;
        let ops: [(&str, Backward, &[f32]); 2] = [
            ("softmax_backward", softmax_backward, &y),
            ("log_softmax_backward", log_softmax_backward, &ly),
        ];
        for (name, op, y) in ops {
            let mut dx = vec![0f32; x.len()];
            op(y, &dy, &mut dx, Layout::rows(rows, len)).unwrap();
            for r in [0, 1, 2, 1000, rows - 1] {
                let at = r * len..(r + 1) * len;
                let mut dxr = vec![0f32; len];
                op(
                    &y[at.clone()],
                    &dy[at.clone()],
                    &mut dxr,
                    Layout::rows(1, len),
                )
                .unwrap();
                assert_eq!(&dx[at], &dxr[..], "{isa:?} {name} row {r}");
            }
        }
    });
}
