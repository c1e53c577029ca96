//! Cross-entropy and linear cross-entropy against torch's definition written in f64: losses,
//! gradients (central differences), special values, errors and thread-count independence.

mod common;

use common::Lcg;
use normax_core::cross_entropy::{
    cross_entropy, cross_entropy_with_grad, cross_entropy_with_grad_inplace, linear_block,
    linear_cross_entropy, LinearGrads,
};
use normax_core::lse::IN_CACHE_MAX_LEN;
use normax_core::spec::{CeOptions, GradOutput, Reduction, Target};
use normax_core::{isa, threads, Error, Float};

enum Tgt {
    Hard(Vec<i64>),
    Soft(Vec<f64>),
}

struct Case {
    rows: usize,
    c: usize,
    x: Vec<f64>,
    target: Tgt,
    weight: Option<Vec<f64>>,
    opts: (i64, Reduction, f64, f64, Option<f64>),
}

/// torch's definition, written the obvious way in f64: per-row losses and their mean weights.
fn reference_rows(case: &Case, x: &[f64]) -> (Vec<f64>, Vec<f64>) {
    let (ignore, _, eps, z, cap) = case.opts;
    let c = case.c;
    let w = |k: usize| case.weight.as_ref().map_or(1.0, |w| w[k]);
    let mut losses = vec![];
    let mut denoms = vec![];
    for r in 0..case.rows {
        let row: Vec<f64> = x[r * c..(r + 1) * c]
            .iter()
            .map(|&v| cap.map_or(v, |s| s * (v / s).tanh()))
            .collect();
        let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = m + row.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
        let logp: Vec<f64> = row.iter().map(|v| v - lse).collect();
        let smooth: f64 = (0..c).map(|k| -w(k) * logp[k]).sum();
        match &case.target {
            Tgt::Hard(t) => {
                if t[r] == ignore {
                    losses.push(0.0);
                    denoms.push(0.0);
                    continue;
                }
                let y = t[r] as usize;
                let nll = -w(y) * logp[y];
                losses.push((1.0 - eps) * nll + eps / c as f64 * smooth + z * lse * lse);
                denoms.push(w(y));
            }
            Tgt::Soft(t) => {
                let l: f64 = (0..c)
                    .map(|k| -w(k) * ((1.0 - eps) * t[r * c + k] + eps / c as f64) * logp[k])
                    .sum();
                losses.push(l + z * lse * lse);
                denoms.push(1.0);
            }
        }
    }
    (losses, denoms)
}

/// The reduced reference loss, scaled per row by `g` for reduction none (a scalar to differentiate).
fn reference(case: &Case, x: &[f64], g: &[f64]) -> Vec<f64> {
    let (losses, denoms) = reference_rows(case, x);
    match case.opts.1 {
        Reduction::None => losses.iter().zip(g).map(|(l, g)| l * g).collect(),
        Reduction::Sum => vec![losses.iter().sum::<f64>() * g[0]],
        Reduction::Mean => {
            vec![losses.iter().sum::<f64>() / denoms.iter().sum::<f64>() * g[0]]
        }
    }
}

fn options<'a>(case: &'a Case, w: &'a Option<Vec<f64>>) -> CeOptions<&'a [f64]> {
    let (ignore_index, reduction, label_smoothing, z_loss, softcap) = case.opts;
    CeOptions {
        weight: w.as_deref(),
        ignore_index,
        reduction,
        label_smoothing,
        z_loss,
        softcap,
        ..CeOptions::default()
    }
}

/// Runs the kernel in f64: (loss, grad).
fn kernel(case: &Case, g: &[f64]) -> (Vec<f64>, Vec<f64>) {
    let w = case.weight.clone();
    let opts = options(case, &w);
    let mut loss = vec![0.0; opts.reduction.loss_len(case.rows)];
    let mut grad = vec![0.0; case.x.len()];
    let target = match &case.target {
        Tgt::Hard(t) => Target::Classes(&t[..]),
        Tgt::Soft(t) => Target::Probs(&t[..]),
    };
    let go = if opts.reduction == Reduction::None {
        GradOutput::Rows(g)
    } else {
        GradOutput::Scalar(g[0])
    };
    cross_entropy_with_grad(
        &case.x, &mut grad, case.rows, case.c, target, &opts, go, &mut loss,
    )
    .unwrap();
    (loss, grad)
}

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a.is_nan() && b.is_nan()) || a == b || (a - b).abs() <= tol * (1.0 + b.abs())
}

fn random_case(
    rng: &mut Lcg,
    rows: usize,
    c: usize,
    soft: bool,
    opts: (i64, Reduction, f64, f64, Option<f64>),
    weighted: bool,
) -> Case {
    let x = rng.vec(rows * c, 4.0);
    let target = if soft {
        let mut t: Vec<f64> = rng.vec(rows * c, 1.0).iter().map(|v| v.abs()).collect();
        for r in 0..rows {
            let s: f64 = t[r * c..(r + 1) * c].iter().sum();
            t[r * c..(r + 1) * c].iter_mut().for_each(|v| *v /= s);
        }
        Tgt::Soft(t)
    } else {
        Tgt::Hard(
            (0..rows)
                .map(|r| {
                    if r % 3 == 1 {
                        opts.0
                    } else {
                        rng.below(c) as i64
                    }
                })
                .collect(),
        )
    };
    let weight = weighted.then(|| rng.vec(c, 1.0).iter().map(|v| 0.5 + v.abs()).collect());
    Case {
        rows,
        c,
        x,
        target,
        weight,
        opts,
    }
}

/// Loss against the reference and gradient against central differences of the reference.
fn check_case(case: &Case) {
    let g: Vec<f64> = (0..case.rows).map(|i| 0.5 + i as f64 * 0.25).collect();
    let (loss, grad) = kernel(case, &g);
    let want = reference(case, &case.x, &vec![1.0; case.rows]);
    for (a, b) in loss.iter().zip(&want) {
        assert!(close(*a, *b, 1e-12), "loss {a} vs {b}");
    }
    let total = |x: &[f64]| reference(case, x, &g).iter().sum::<f64>();
    let mut x = case.x.clone();
    for i in 0..x.len() {
        let h = 1e-5;
        let v = x[i];
        x[i] = v + h;
        let up = total(&x);
        x[i] = v - h;
        let down = total(&x);
        x[i] = v;
        let fd = (up - down) / (2.0 * h);
        // Central differences: truncation ~h^2 * x''' and rounding ~1e-16 / h.
        assert!(
            (grad[i] - fd).abs() <= 1e-7 * (1.0 + fd.abs()),
            "grad[{i}] {} vs {fd}",
            grad[i]
        );
    }
}

#[test]
fn matches_reference_over_options() {
    let mut rng = Lcg(1);
    let reds = [Reduction::Mean, Reduction::Sum, Reduction::None];
    for &c in &[1usize, 2, 3, 17, 40] {
        for &soft in &[false, true] {
            for (k, &red) in reds.iter().enumerate() {
                for &(eps, z, cap) in &[
                    (0.0, 0.0, None),
                    (0.1, 0.0, None),
                    (0.0, 1e-3, None),
                    (0.2, 1e-2, Some(2.5)),
                ] {
                    for &weighted in &[false, true] {
                        let ignore = if soft { -100 } else { [-100, 0, 1][k] };
                        let case =
                            random_case(&mut rng, 7, c, soft, (ignore, red, eps, z, cap), weighted);
                        check_case(&case);
                    }
                }
            }
        }
    }
}

#[test]
fn long_rows_use_the_two_pass_path() {
    // Longer than IN_CACHE_MAX_LEN: pass 1 is the two-pass sum.
    let mut rng = Lcg(2);
    let c = IN_CACHE_MAX_LEN + 37;
    for &(eps, cap) in &[(0.0, None), (0.1, Some(3.0))] {
        let case = random_case(
            &mut rng,
            2,
            c,
            false,
            (-100, Reduction::Sum, eps, 1e-3, cap),
            false,
        );
        let g = [1.0];
        let (loss, grad) = kernel(&case, &g);
        assert!(close(loss[0], reference(&case, &case.x, &g)[0], 1e-12));
        let sum: f64 = grad.iter().sum();
        // Without smoothing/cap each row's gradient sums to 2 z lse (softmax sums to one).
        if cap.is_none() && eps == 0.0 {
            assert!(sum.abs() < 1.0);
        }
        assert!(grad.iter().all(|v| v.is_finite()));
    }
}

#[test]
fn f32_matches_f64() {
    let _g = common::lock();
    let mut rng = Lcg(3);
    for isa in isa::supported() {
        isa::set_active(isa).unwrap();
        for &c in &[1usize, 5, 33, 1000] {
            for &(eps, z, cap) in &[(0.0, 0.0, None), (0.1, 1e-4, Some(5.0))] {
                let case = random_case(
                    &mut rng,
                    9,
                    c,
                    false,
                    (-100, Reduction::None, eps, z, cap),
                    true,
                );
                let g = vec![1.0; case.rows];
                let (loss64, grad64) = kernel(&case, &g);
                let x32: Vec<f32> = case.x.iter().map(|&v| v as f32).collect();
                let w32: Vec<f32> = case
                    .weight
                    .as_ref()
                    .unwrap()
                    .iter()
                    .map(|&v| v as f32)
                    .collect();
                let Tgt::Hard(t) = &case.target else {
                    unreachable!()
                };
                let opts = CeOptions {
                    weight: Some(&w32[..]),
                    ignore_index: -100,
                    reduction: Reduction::None,
                    label_smoothing: eps,
                    z_loss: z,
                    softcap: cap,
                    ..CeOptions::default()
                };
                let mut loss = vec![0f32; case.rows];
                let mut grad = vec![0f32; x32.len()];
                cross_entropy_with_grad(
                    &x32,
                    &mut grad,
                    case.rows,
                    c,
                    Target::Classes(t),
                    &opts,
                    GradOutput::Scalar(1.0),
                    &mut loss,
                )
                .unwrap();
                // f32 inputs are the f64 ones rounded: errors of a few f32 ULP of the row's scale.
                for (a, b) in loss.iter().zip(&loss64) {
                    assert!(
                        (*a as f64 - b).abs() <= 2e-6 * (1.0 + b.abs()),
                        "{} loss {a} vs {b}",
                        isa.name()
                    );
                }
                for (a, b) in grad.iter().zip(&grad64) {
                    assert!(
                        (*a as f64 - b).abs() <= 2e-6,
                        "{} grad {a} vs {b}",
                        isa.name()
                    );
                }
            }
        }
    }
    isa::set_active(isa::best()).unwrap();
}

#[test]
fn special_values_follow_torch() {
    let _g = common::lock();
    let inf = f64::INFINITY;
    let x = vec![
        1.0,
        2.0,
        -inf,
        0.5, // -inf off the target: finite
        -inf,
        0.0,
        1.0,
        2.0, // -inf at the target: +inf loss
        1e30,
        0.0,
        -1e30,
        3.0, // huge: the exact path, target is the max
        f64::NAN,
        0.0,
        1.0,
        2.0, // NaN: NaN loss and gradient
        inf,
        0.0,
        1.0,
        2.0, // +inf: NaN (as torch's log_softmax)
        -inf,
        -inf,
        -inf,
        -inf, // nothing but -inf: NaN
    ];
    let t = vec![0i64, 0, 0, 1, 1, 2];
    let mut loss = vec![0.0; 6];
    let mut grad = vec![0.0; 24];
    let opts = CeOptions {
        reduction: Reduction::None,
        ..CeOptions::default()
    };
    cross_entropy_with_grad(
        &x,
        &mut grad,
        6,
        4,
        Target::Classes(&t),
        &opts,
        GradOutput::Scalar(1.0),
        &mut loss,
    )
    .unwrap();
    let lse0 = (1f64.exp() + 2f64.exp() + 0.5f64.exp()).ln();
    assert!(close(loss[0], lse0 - 1.0, 1e-14));
    assert_eq!(grad[2], 0.0);
    assert_eq!(loss[1], inf);
    assert!(grad[4..8].iter().all(|v| v.is_finite()));
    assert_eq!(grad[4], -1.0);
    assert_eq!(loss[2], 0.0);
    assert_eq!(&grad[8..12], &[0.0, 0.0, 0.0, 0.0]);
    for r in 3..6 {
        assert!(loss[r].is_nan());
        assert!(grad[r * 4..r * 4 + 4].iter().all(|v| v.is_nan()));
    }
    // f32: 1e30 stays finite where the answer is.
    let x32: Vec<f32> = vec![1e30, -1e30, 0.0, 1e30];
    let mut l32 = [0f32; 2];
    let o32 = CeOptions {
        reduction: Reduction::None,
        ..CeOptions::default()
    };
    cross_entropy(&x32, 2, 2, Target::Classes(&[0, 0]), &o32, &mut l32).unwrap();
    assert_eq!(l32, [0.0, 1e30]);
    // Equal huge values: lse - x is log(C) exactly, not lost to the rounding of -1e30 + log(C).
    let flat = [-1e30f32; 4];
    let mut l1 = [0f32; 1];
    let mut g1 = [0f32; 4];
    let o1 = CeOptions::default();
    cross_entropy_with_grad(
        &flat,
        &mut g1,
        1,
        4,
        Target::Classes(&[2]),
        &o1,
        GradOutput::Scalar(1.0),
        &mut l1,
    )
    .unwrap();
    assert_eq!(l1[0], 4f32.ln());
    assert_eq!(g1, [0.25, 0.25, -0.75, 0.25]);
    // A dominant target: the loss log(1 + 3 e^-20) ~ 6e-9 keeps its relative accuracy (lse
    // refined as max + log1p(rest)), in place (from the stored terms) and not.
    let want = (3.0 * (-20f64).exp()).ln_1p();
    for inplace in [false, true] {
        let mut x = [20f32, 0.0, 0.0, 0.0];
        let (mut l, mut g) = ([0f32; 1], [0f32; 4]);
        if inplace {
            cross_entropy_with_grad_inplace(
                &mut x,
                1,
                4,
                Target::Classes(&[0]),
                &o1,
                GradOutput::Scalar(1.0),
                &mut l,
            )
            .unwrap();
        } else {
            cross_entropy_with_grad(
                &x,
                &mut g,
                1,
                4,
                Target::Classes(&[0]),
                &o1,
                GradOutput::Scalar(1.0),
                &mut l,
            )
            .unwrap();
        }
        assert!(
            (l[0] as f64 / want - 1.0).abs() < 1e-6,
            "{} vs {want}",
            l[0]
        );
        let mut only = [0f32];
        cross_entropy(
            &[20f32, 0.0, 0.0, 0.0],
            1,
            4,
            Target::Classes(&[0]),
            &o1,
            &mut only,
        )
        .unwrap();
        assert_eq!(only[0], l[0]);
    }
}

#[test]
fn mean_over_nothing_is_nan_with_zero_gradient() {
    let x = vec![0.5; 6];
    let t = vec![-100i64; 3];
    for eps in [0.0, 0.3] {
        let opts = CeOptions {
            label_smoothing: eps,
            ..CeOptions::default()
        };
        let mut loss = [0.0];
        let mut grad = vec![1.0; 6];
        cross_entropy_with_grad(
            &x,
            &mut grad,
            3,
            2,
            Target::Classes(&t),
            &opts,
            GradOutput::Scalar(1.0),
            &mut loss,
        )
        .unwrap();
        assert!(loss[0].is_nan());
        assert!(grad.iter().all(|&v| v == 0.0));
    }
    let mut loss = [0.0];
    cross_entropy::<f64>(
        &[],
        0,
        5,
        Target::Classes(&[]),
        &CeOptions::default(),
        &mut loss,
    )
    .unwrap();
    assert!(loss[0].is_nan());
}

#[test]
fn bad_input_is_an_error() {
    let x = vec![0.0; 6];
    let mut loss = [0.0];
    let o = CeOptions::default();
    let e = cross_entropy(&x, 2, 3, Target::Classes(&[0, 3]), &o, &mut loss).unwrap_err();
    assert!(
        matches!(&e, Error::Index(m) if m.contains("class index 3 at position 1")),
        "{e}"
    );
    let e = cross_entropy(&x, 2, 3, Target::Classes(&[-1, 0]), &o, &mut loss).unwrap_err();
    assert!(matches!(e, Error::Index(_)));
    for (eps, z, cap) in [
        (-0.1, 0.0, None),
        (1.5, 0.0, None),
        (0.0, -1.0, None),
        (0.0, 0.0, Some(0.0)),
    ] {
        let o = CeOptions {
            label_smoothing: eps,
            z_loss: z,
            softcap: cap,
            ..CeOptions::default()
        };
        assert!(matches!(
            cross_entropy(&x, 2, 3, Target::Classes(&[0, 1]), &o, &mut loss),
            Err(Error::Value(_))
        ));
    }
    let w = [1.0, 2.0];
    let o = CeOptions {
        weight: Some(&w[..]),
        ..CeOptions::default()
    };
    assert!(cross_entropy(&x, 2, 3, Target::Classes(&[0, 1]), &o, &mut loss).is_err());
    assert!(cross_entropy(
        &x,
        2,
        3,
        Target::Classes(&[0]),
        &CeOptions::default(),
        &mut loss
    )
    .is_err());
}

#[test]
fn same_result_for_any_thread_count_and_in_place() {
    let _g = common::lock();
    isa::set_active(isa::best()).unwrap();
    let mut rng = Lcg(4);
    let (rows, c) = (3000, 67);
    let x: Vec<f32> = rng.vec(rows * c, 6.0).iter().map(|&v| v as f32).collect();
    let t: Vec<i64> = (0..rows).map(|_| rng.below(c) as i64).collect();
    let opts = CeOptions {
        label_smoothing: 0.05,
        ..CeOptions::default()
    };
    let run = |threads: usize| {
        threads::set_num_threads(threads).unwrap();
        let mut loss = [0f32];
        let mut grad = vec![0f32; x.len()];
        cross_entropy_with_grad(
            &x,
            &mut grad,
            rows,
            c,
            Target::Classes(&t),
            &opts,
            GradOutput::Scalar(1.0),
            &mut loss,
        )
        .unwrap();
        (loss[0], grad)
    };
    let one = run(1);
    let three = run(3);
    assert_eq!(one.0.to_bits(), three.0.to_bits());
    assert!(one.1 == three.1);
    let mut inplace = x.clone();
    let mut loss = [0f32];
    cross_entropy_with_grad_inplace(
        &mut inplace,
        rows,
        c,
        Target::Classes(&t),
        &opts,
        GradOutput::Scalar(1.0),
        &mut loss,
    )
    .unwrap();
    assert_eq!(loss[0].to_bits(), three.0.to_bits());
    assert!(inplace == three.1);
    threads::set_num_threads(std::thread::available_parallelism().map_or(1, |n| n.get())).unwrap();
}

fn linear_reference(
    hidden: &[f64],
    weight: &[f64],
    bias: Option<&[f64]>,
    (n, h, v): (usize, usize, usize),
) -> Vec<f64> {
    let mut x = vec![0.0; n * v];
    for i in 0..n {
        for j in 0..v {
            x[i * v + j] = bias.map_or(0.0, |b| b[j])
                + (0..h)
                    .map(|k| hidden[i * h + k] * weight[j * h + k])
                    .sum::<f64>();
        }
    }
    x
}

#[test]
fn linear_matches_logits_then_cross_entropy() {
    let _g = common::lock();
    let mut rng = Lcg(5);
    let (n, h, v) = (37, 9, 50);
    let hidden = rng.vec(n * h, 1.0);
    let weight = rng.vec(v * h, 1.0);
    let bias = rng.vec(v, 1.0);
    for &(eps, z, cap, red) in &[
        (0.0, 0.0, None, Reduction::Mean),
        (0.1, 1e-3, Some(3.0), Reduction::Sum),
        (0.3, 0.0, None, Reduction::None),
    ] {
        for with_bias in [false, true] {
            let b = with_bias.then_some(&bias[..]);
            let logits = linear_reference(&hidden, &weight, b, (n, h, v));
            let t: Vec<i64> = (0..n)
                .map(|i| {
                    if i % 5 == 2 {
                        -100
                    } else {
                        rng.below(v) as i64
                    }
                })
                .collect();
            let opts = CeOptions {
                ignore_index: -100,
                reduction: red,
                label_smoothing: eps,
                z_loss: z,
                softcap: cap,
                weight: None,
                ..CeOptions::default()
            };
            let go: Vec<f64> = (0..n).map(|i| 1.0 + 0.1 * i as f64).collect();
            let gout = if red == Reduction::None {
                GradOutput::Rows(&go[..])
            } else {
                GradOutput::Scalar(0.7)
            };
            let mut want_loss = vec![0.0; red.loss_len(n)];
            let mut dlogits = vec![0.0; n * v];
            cross_entropy_with_grad(
                &logits,
                &mut dlogits,
                n,
                v,
                Target::Classes(&t),
                &opts,
                gout,
                &mut want_loss,
            )
            .unwrap();
            // dhidden = dlogits @ weight, dweight = dlogits^T @ hidden, dbias = column sums.
            let want_dh: Vec<f64> = (0..n * h)
                .map(|e| {
                    (0..v)
                        .map(|j| dlogits[e / h * v + j] * weight[j * h + e % h])
                        .sum()
                })
                .collect();
            let want_dw: Vec<f64> = (0..v * h)
                .map(|e| {
                    (0..n)
                        .map(|i| dlogits[i * v + e / h] * hidden[i * h + e % h])
                        .sum()
                })
                .collect();
            let want_db: Vec<f64> = (0..v)
                .map(|j| (0..n).map(|i| dlogits[i * v + j]).sum())
                .collect();
            // One block, then vocabulary blocks of several shapes (and rows blocks).
            for chunk in [None, Some(v * 10), Some(64), Some(7), Some(1)] {
                for threads in [1, 2] {
                    threads::set_num_threads(threads).unwrap();
                    let mut loss = vec![0.0; want_loss.len()];
                    let (mut dh, mut dw, mut db) =
                        (vec![9.0; n * h], vec![9.0; v * h], vec![9.0; v]);
                    let grads = LinearGrads {
                        dhidden: &mut dh,
                        dweight: &mut dw,
                        dbias: with_bias.then_some(&mut db[..]),
                    };
                    linear_cross_entropy(
                        &hidden,
                        &weight,
                        b,
                        &t,
                        (n, h, v),
                        &opts,
                        chunk,
                        Some((gout, grads)),
                        &mut loss,
                        None,
                    )
                    .unwrap();
                    let ok =
                        |a: &[f64], b: &[f64]| a.iter().zip(b).all(|(a, b)| close(*a, *b, 1e-11));
                    assert!(
                        ok(&loss, &want_loss),
                        "{chunk:?} loss {loss:?} vs {want_loss:?}"
                    );
                    assert!(ok(&dh, &want_dh), "{chunk:?} dhidden");
                    assert!(ok(&dw, &want_dw), "{chunk:?} dweight");
                    if with_bias {
                        assert!(ok(&db, &want_db), "{chunk:?} dbias");
                    }
                    let mut loss_only = vec![0.0; want_loss.len()];
                    linear_cross_entropy(
                        &hidden,
                        &weight,
                        b,
                        &t,
                        (n, h, v),
                        &opts,
                        chunk,
                        None,
                        &mut loss_only,
                        None,
                    )
                    .unwrap();
                    assert!(ok(&loss_only, &want_loss), "{chunk:?} loss only");
                }
            }
        }
    }
    threads::set_num_threads(std::thread::available_parallelism().map_or(1, |n| n.get())).unwrap();
}

#[test]
fn linear_block_respects_the_budget() {
    assert_eq!(linear_block(8192, 32768, None), (512, 32768));
    assert_eq!(linear_block(10, 100, None), (10, 100));
    let (r, c) = linear_block(8192, 128256, Some(1 << 20));
    assert!(r * c <= 1 << 20 && r == 128);
    assert_eq!(linear_block(5, 10, Some(1)), (1, 1));
    assert_eq!(linear_block(0, 10, None), (1, 10));
}
