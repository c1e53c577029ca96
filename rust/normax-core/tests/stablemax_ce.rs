//! The StableMax cross-entropy (`CeOptions::stablemax`) on every ISA against its definition in
//! f64: the softmax cross-entropy of phi(x) = sign(x) log1p(|x|), x the logits divided by the
//! temperature and capped, the gradient chained through phi' = 1 / (1 + |x|).

mod common;

use common::{each_isa, Lcg};
use normax_core::cross_entropy::{
    cross_entropy, cross_entropy_with_grad, cross_entropy_with_grad_inplace,
};
use normax_core::spec::{CeOptions, GradOutput, Reduction, Target};

/// (loss summed over the rows, d loss / d logits) in f64.
fn reference(x: &[f64], t: &[i64], classes: usize, o: &CeOptions<&[f64]>) -> (f64, Vec<f64>) {
    let (eps, inv_t) = (o.label_smoothing, 1.0 / o.temperature);
    let mut total = 0.0;
    let mut grad = vec![0.0; x.len()];
    for (r, &y) in t.iter().enumerate() {
        let row = &x[r * classes..(r + 1) * classes];
        let (mut z, mut chain) = (vec![0.0; classes], vec![0.0; classes]);
        for (c, &v) in row.iter().enumerate() {
            let (xc, dcap) = match o.softcap {
                Some(s) => {
                    let u = (v * inv_t / s).tanh();
                    (s * u, 1.0 - u * u)
                }
                None => (v * inv_t, 1.0),
            };
            z[c] = xc.signum() * xc.abs().ln_1p();
            chain[c] = dcap * inv_t / (1.0 + xc.abs());
        }
        let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = m + z.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
        let w = |c: usize| o.weight.map_or(1.0, |w| w[c]);
        let w_sum: f64 = (0..classes).map(w).sum();
        let y = y as usize;
        let smooth: f64 = (0..classes).map(|c| w(c) * (lse - z[c])).sum();
        total += (1.0 - eps) * w(y) * (lse - z[y])
            + eps / classes as f64 * smooth
            + o.z_loss * lse * lse;
        let a = (1.0 - eps) * w(y) + eps * w_sum / classes as f64 + 2.0 * o.z_loss * lse;
        for c in 0..classes {
            let onehot = if c == y { 1.0 } else { 0.0 };
            let g = (z[c] - lse).exp() * a - w(c) * (eps / classes as f64 + (1.0 - eps) * onehot);
            grad[r * classes + c] = g * chain[c];
        }
    }
    (total, grad)
}

#[test]
fn stablemax_loss_and_gradient_match_the_definition_on_every_isa() {
    let (rows, classes) = (6, 301);
    let mut rng = Lcg(11);
    let x64: Vec<f64> = rng.vec(rows * classes, 30.0);
    let x32: Vec<f32> = x64.iter().map(|&v| v as f32).collect();
    let x64: Vec<f64> = x32.iter().map(|&v| v as f64).collect();
    // A dominant target in row 0 (its loss near 0), the others anywhere.
    let t: Vec<i64> = (0..rows).map(|r| ((r * 97) % classes) as i64).collect();
    let mut x32 = x32;
    x32[t[0] as usize] = 1e6;
    let x64: Vec<f64> = {
        let mut v = x64;
        v[t[0] as usize] = 1e6;
        v
    };
    let w64: Vec<f64> = (0..classes).map(|c| 0.5 + (c % 7) as f64 / 4.0).collect();
    let w32: Vec<f32> = w64.iter().map(|&v| v as f32).collect();
    let cases: [(f64, Option<f64>, f64, f64, bool); 5] = [
        (1.0, None, 0.0, 0.0, false),
        (2.0, None, 0.0, 0.0, false),
        (1.0, Some(20.0), 0.0, 0.0, false),
        (0.7, Some(15.0), 0.1, 1e-3, true),
        (1.0, None, 0.2, 0.0, true),
    ];
    for (temperature, softcap, eps, z_loss, weighted) in cases {
        let o64 = CeOptions {
            weight: weighted.then_some(&w64[..]),
            reduction: Reduction::Sum,
            label_smoothing: eps,
            z_loss,
            softcap,
            temperature,
            stablemax: true,
            ..Default::default()
        };
        let o32 = CeOptions {
            weight: weighted.then_some(&w32[..]),
            reduction: Reduction::Sum,
            label_smoothing: eps,
            z_loss,
            softcap,
            temperature,
            stablemax: true,
            ..Default::default()
        };
        let (want, want_grad) = reference(&x64, &t, classes, &o64);
        let gmax = want_grad.iter().fold(0.0f64, |m, g| m.max(g.abs()));
        each_isa(|isa| {
            let mut loss = [0f32];
            let mut grad = vec![0f32; x32.len()];
            let target = Target::Classes(&t[..]);
            let go = GradOutput::Scalar(1.0);
            let go64 = GradOutput::Scalar(1.0);
            cross_entropy_with_grad(&x32, &mut grad, rows, classes, target, &o32, go, &mut loss)
                .unwrap();
            let case = (temperature, softcap, eps, z_loss, weighted);
            let err = (loss[0] as f64 - want).abs() / want.abs();
            assert!(err < 2e-6, "{isa:?} {case:?}: loss {} vs {want}", loss[0]);
            for (i, (&g, &w)) in grad.iter().zip(&want_grad).enumerate() {
                let tol = 1e-5 * w.abs() + 1e-6 * gmax;
                assert!(
                    (g as f64 - w).abs() <= tol,
                    "{isa:?} {case:?}: grad[{i}] {g} vs {w}"
                );
            }
            let mut loss_only = [0f32];
            cross_entropy(&x32, rows, classes, target, &o32, &mut loss_only).unwrap();
            assert_eq!(loss_only, loss, "{isa:?} {case:?}");
            // float64 logits: within a few ULP of the reference.
            let mut loss64 = [0f64];
            let mut grad64 = vec![0f64; x64.len()];
            let t64 = Target::Classes(&t[..]);
            cross_entropy_with_grad(
                &x64,
                &mut grad64,
                rows,
                classes,
                t64,
                &o64,
                go64,
                &mut loss64,
            )
            .unwrap();
            assert!(
                (loss64[0] - want).abs() <= 1e-12 * want.abs(),
                "{isa:?} {case:?}"
            );
            for (&g, &w) in grad64.iter().zip(&want_grad) {
                assert!(
                    (g - w).abs() <= 1e-12 * w.abs() + 1e-15 * gmax,
                    "{isa:?} {case:?}"
                );
            }
        });
    }
}

#[test]
fn stablemax_dominant_target_keeps_its_loss() {
    // A margin of 1e7: the loss is s(rest) / s(max) ~ 1e-7, not 0 and not phi's rounding.
    let x = [1e7f32, 0.5, -3.0, 0.0];
    let s = |v: f64| if v >= 0.0 { 1.0 + v } else { 1.0 / (1.0 - v) };
    let want = ((s(0.5) + s(-3.0) + s(0.0)) / s(1e7)).ln_1p();
    let opts = CeOptions::<&[f32]> {
        reduction: Reduction::Sum,
        stablemax: true,
        ..Default::default()
    };
    each_isa(|isa| {
        let mut loss = [0f32];
        cross_entropy(&x, 1, 4, Target::Classes(&[0]), &opts, &mut loss).unwrap();
        let err = (loss[0] as f64 - want).abs() / want;
        assert!(err < 1e-4, "{isa:?}: {} vs {want}", loss[0]);
    });
}

/// Per-row (losses, gradient) of `x` (rows x classes) with reduction None, and the same in place.
fn per_row<T: normax_core::float::Float>(
    x: &[T],
    t: &[i64],
    classes: usize,
    o: &CeOptions<&[T]>,
) -> (Vec<T>, Vec<T>) {
    let rows = t.len();
    let (mut loss, mut grad) = (vec![T::ZERO; rows], vec![T::ZERO; x.len()]);
    let target = Target::Classes(t);
    let go = GradOutput::Scalar(1.0);
    cross_entropy_with_grad(x, &mut grad, rows, classes, target, o, go, &mut loss).unwrap();
    let (mut in_place, mut loss_in_place) = (x.to_vec(), vec![T::ZERO; rows]);
    cross_entropy_with_grad_inplace(
        &mut in_place,
        rows,
        classes,
        target,
        o,
        go,
        &mut loss_in_place,
    )
    .unwrap();
    let bits = |v: &[T]| v.iter().map(|g| g.to_f64().to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&in_place), bits(&grad), "in place");
    assert_eq!(bits(&loss_in_place), bits(&loss), "in place");
    (loss, grad)
}

/// [`reference`] for one row, a hard target, no smoothing and no softcap, where it holds for
/// -inf logits too (s = 0: no term of theirs is inf times 0).
fn reference_hard(row: &[f64], y: usize, o: &CeOptions<&[f64]>) -> (f64, Vec<f64>) {
    let s = |v: f64| if v >= 0.0 { 1.0 + v } else { 1.0 / (1.0 - v) };
    let x: Vec<f64> = row.iter().map(|v| v / o.temperature).collect();
    let sum: f64 = x.iter().map(|&v| s(v)).sum();
    let lse = sum.ln();
    let w_y = o.weight.map_or(1.0, |w| w[y]);
    let loss = w_y * (lse - s(x[y]).ln()) + o.z_loss * lse * lse;
    let a = w_y + 2.0 * o.z_loss * lse;
    let grad = (0..x.len())
        .map(|c| {
            let chain = 1.0 / (o.temperature * (1.0 + x[c].abs()));
            let onehot = if c == y { w_y } else { 0.0 };
            (s(x[c]) / sum * a - onehot) * chain
        })
        .collect();
    (loss, grad)
}

#[test]
fn stablemax_rows_at_the_edges_match_the_definition() {
    // Rows the sums of s(x) serve (ties with the target, -inf, all far below 0, a sum of 4e33)
    // and rows they hand back to phi (a gradient factor a / sum below float32's normal range, float32 sums that overflow, NaN), with a temperature, class weights
    // and a z-loss; every row's loss and gradient against the f64 definition.
    let classes = 37;
    let mut rng = Lcg(5);
    let mut rows: Vec<Vec<f64>> = Vec::new();
    let base = |rng: &mut Lcg| -> Vec<f64> { rng.vec(classes, 8.0) };
    let mut ties = base(&mut rng);
    for c in [3, 9, 20, 36] {
        ties[c] = 5.0;
    }
    rows.push(ties);
    let mut neg_inf = base(&mut rng);
    neg_inf[1] = f64::NEG_INFINITY;
    neg_inf[30] = f64::NEG_INFINITY;
    rows.push(neg_inf);
    rows.push(base(&mut rng).iter().map(|v| -1e20 * (2.0 + v)).collect());
    rows.push(base(&mut rng).iter().map(|v| -1e33 * (9.0 + v)).collect());
    let mut huge = base(&mut rng);
    huge[7] = 3e33;
    huge[8] = 1e33;
    rows.push(huge);
    let mut past_f32 = base(&mut rng);
    for c in [0, 5, 6] {
        past_f32[c] = 1e38;
    }
    rows.push(past_f32);
    let t: Vec<i64> = vec![9, 4, 11, 2, 8, 5];
    let x64: Vec<f64> = rows.concat();
    let x32: Vec<f32> = x64.iter().map(|&v| v as f32).collect();
    let x64: Vec<f64> = x32.iter().map(|&v| v as f64).collect();
    let w64: Vec<f64> = (0..classes).map(|c| 0.5 + (c % 5) as f64 / 3.0).collect();
    let w32: Vec<f32> = w64.iter().map(|&v| v as f32).collect();
    for (temperature, z_loss, weighted) in [(1.0, 0.0, false), (0.5, 1e-3, true)] {
        let o64 = CeOptions {
            weight: weighted.then_some(&w64[..]),
            reduction: Reduction::None,
            z_loss,
            temperature,
            stablemax: true,
            ..Default::default()
        };
        let o32 = CeOptions {
            weight: weighted.then_some(&w32[..]),
            reduction: Reduction::None,
            z_loss,
            temperature,
            stablemax: true,
            ..Default::default()
        };
        each_isa(|isa| {
            let (loss32, grad32) = per_row(&x32, &t, classes, &o32);
            let (loss64, grad64) = per_row(&x64, &t, classes, &o64);
            for (r, &y) in t.iter().enumerate() {
                let row = &x64[r * classes..(r + 1) * classes];
                let (want, want_grad) = reference_hard(row, y as usize, &o64);
                let gmax = want_grad.iter().fold(0.0f64, |m, g| m.max(g.abs()));
                let case = (isa, r, temperature);
                let l32 = loss32[r] as f64;
                // The last row (float32 sums overflow) takes phi's path, which rounds phi(2e38)
                // = 88.2 to float32.
                let phi_ulp = if r == 5 {
                    88.2 * f32::EPSILON as f64
                } else {
                    0.0
                };
                assert!(
                    (l32 - want).abs() <= 2e-6 * want.abs() + phi_ulp,
                    "{case:?}: {l32} vs {want}"
                );
                assert!((loss64[r] - want).abs() <= 1e-12 * want.abs(), "{case:?}");
                for c in 0..classes {
                    let (w, i) = (want_grad[c], r * classes + c);
                    let g = grad32[i] as f64;
                    assert!(
                        (g - w).abs() <= 1e-5 * w.abs() + 1e-6 * gmax,
                        "{case:?} grad[{c}] {g} vs {w}"
                    );
                    assert!(
                        (grad64[i] - w).abs() <= 1e-12 * w.abs() + 1e-15 * gmax,
                        "{case:?} f64 grad[{c}] {} vs {w}",
                        grad64[i]
                    );
                }
            }
        });
    }
    // NaN in a row: its loss and gradient are NaN, the other rows' are not.
    let mut x = x32.clone();
    x[classes + 3] = f32::NAN;
    let o = CeOptions::<&[f32]> {
        reduction: Reduction::None,
        stablemax: true,
        ..Default::default()
    };
    each_isa(|isa| {
        let (loss, grad) = per_row(&x, &t, classes, &o);
        assert!(loss[1].is_nan(), "{isa:?}");
        assert!(
            grad[classes..2 * classes].iter().all(|g| g.is_nan()),
            "{isa:?}"
        );
        assert!(
            loss.iter()
                .enumerate()
                .all(|(r, l)| r == 1 || l.is_finite()),
            "{isa:?}"
        );
    });
}
