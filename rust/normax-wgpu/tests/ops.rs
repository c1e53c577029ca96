//! Each wgpu op against normax-core's CPU result, in float32.
//!
//! Tolerances: the CPU kernels are within a few ULP of the correctly rounded value; the GPU
//! rounds x - max (an absolute error of up to half an ULP of |x|, which exp turns into a relative
//! one), and Vulkan allows exp and log errors of 3 + 2|x| ULP. For the inputs here (|x| below ~30
//! unless a test says otherwise) that is below ~100 ULP of float32, about 6e-6 relative: the
//! tolerances are 2e-5 relative, plus an absolute term where a result can be near zero.
//!
//! Without an adapter (no GPU, no lavapipe) every test prints "skipped: no wgpu adapter" and
//! passes; CI installs Mesa's lavapipe so they run there.

use normax_core::cross_entropy as cpu_ce;
use normax_core::spec::{NormKind, Target};
use normax_core::{norms, softmax as cpu, Layout};
use normax_wgpu as gpu;

macro_rules! require_adapter {
    () => {
        // Only a missing adapter skips; an adapter that fails is a failure. Written to stderr
        // directly: libtest hides eprintln! output of passing tests.
        if let Err(gpu::Error::NoDevice(e)) = gpu::adapter_info() {
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "skipped: {e}");
            return;
        }
    };
}

/// Deterministic N(0, sd) values (xorshift + Box-Muller): no rand dependency.
fn normal(n: usize, sd: f32, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        ((s >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    (0..n)
        .map(|_| {
            let (u, v) = (next(), next());
            ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32 * sd
        })
        .collect()
}

/// |a - b| <= atol + rtol |b| elementwise; NaN matches NaN, infinities match exactly.
#[track_caller]
fn assert_close(what: &str, got: &[f32], want: &[f32], rtol: f32, atol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&a, &b)) in got.iter().zip(want).enumerate() {
        let ok = if b.is_nan() || a.is_nan() {
            a.is_nan() && b.is_nan()
        } else if b.is_infinite() || a.is_infinite() {
            a == b
        } else {
            (a - b).abs() <= atol + rtol * b.abs()
        };
        assert!(ok, "{what}: element {i}: wgpu {a} vs cpu {b}");
    }
}

fn layout(rows: usize, cols: usize) -> Layout {
    Layout {
        outer: rows,
        len: cols,
        inner: 1,
    }
}

fn cpu_softmax(x: &[f32], rows: usize, cols: usize, log: bool) -> Vec<f32> {
    let mut y = vec![0.0; x.len()];
    if log {
        cpu::log_softmax(x, &mut y, layout(rows, cols)).unwrap();
    } else {
        cpu::softmax(x, &mut y, layout(rows, cols)).unwrap();
    }
    y
}

fn cpu_lse(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut y = vec![0.0; rows];
    cpu::logsumexp(x, None, &mut y, None, layout(rows, cols)).unwrap();
    y
}

fn check_softmax_family(x: &[f32], rows: usize, cols: usize, what: &str) {
    let s = gpu::softmax(x, rows, cols).unwrap();
    assert_close(
        &format!("softmax {what}"),
        &s,
        &cpu_softmax(x, rows, cols, false),
        2e-5,
        1e-30,
    );
    let l = gpu::log_softmax(x, rows, cols).unwrap();
    assert_close(
        &format!("log_softmax {what}"),
        &l,
        &cpu_softmax(x, rows, cols, true),
        2e-5,
        2e-5,
    );
    let e = gpu::logsumexp(x, rows, cols).unwrap();
    assert_close(
        &format!("logsumexp {what}"),
        &e,
        &cpu_lse(x, rows, cols),
        2e-5,
        2e-5,
    );
}

#[test]
fn adapter_is_described() {
    require_adapter!();
    let name = gpu::adapter_info().unwrap();
    assert!(!name.is_empty());
    eprintln!("wgpu adapter: {name}");
}

#[test]
fn softmax_family_matches_cpu() {
    require_adapter!();
    for (i, &(rows, cols)) in [
        (1, 1),
        (3, 1),
        (1, 1000),
        (7, 255),
        (5, 256),
        (6, 257),
        (4, 4096),
        (2, 70_001),
    ]
    .iter()
    .enumerate()
    {
        let x = normal(rows * cols, 5.0, i as u64 + 1);
        check_softmax_family(&x, rows, cols, &format!("{rows}x{cols}"));
    }
}

#[test]
fn softmax_rows_sum_to_one() {
    require_adapter!();
    let (rows, cols) = (3, 10_000);
    let x = normal(rows * cols, 3.0, 42);
    let y = gpu::softmax(&x, rows, cols).unwrap();
    for r in 0..rows {
        let s: f64 = y[r * cols..(r + 1) * cols].iter().map(|&v| v as f64).sum();
        assert!((s - 1.0).abs() < 1e-5, "row {r} sums to {s}");
    }
}

#[test]
fn softmax_special_values_match_cpu() {
    require_adapter!();
    let (inf, nan) = (f32::INFINITY, f32::NAN);
    let rows: [[f32; 4]; 9] = [
        [1.0, nan, 2.0, 3.0],
        [1.0, inf, 2.0, 3.0],
        [-inf, -inf, -inf, -inf],
        [-inf, 0.0, -inf, 1.0],
        [3e38, -3e38, 3e38, 0.0],
        [-3e38, -3e38, -3e38, -3e38],
        [1e30, 1e30 + 1e24, 1e30, -1e30],
        [-inf, inf, 0.0, 0.0],
        [-1e-30, 0.0, 1e-30, 5e-39],
    ];
    let x: Vec<f32> = rows.iter().flatten().copied().collect();
    // Values near 1e30 round in x - max by ~1e23 absolute: compared in relative terms only
    // where the CPU result is not tiny.
    check_softmax_family(&x, rows.len(), 4, "special rows");
}

#[test]
fn empty_inputs() {
    // No device needed for these.
    assert_eq!(gpu::softmax(&[], 0, 5).unwrap(), Vec::<f32>::new());
    assert_eq!(gpu::softmax(&[], 3, 0).unwrap(), Vec::<f32>::new());
    assert_eq!(
        gpu::logsumexp(&[], 2, 0).unwrap(),
        vec![f32::NEG_INFINITY; 2]
    );
    assert_eq!(
        gpu::layer_norm(&[], 0, 4, None, None, 1e-5).unwrap(),
        Vec::<f32>::new()
    );
}

#[test]
fn bad_arguments_are_errors() {
    assert!(matches!(
        gpu::softmax(&[1.0; 5], 2, 3),
        Err(gpu::Error::Value(_))
    ));
    assert!(matches!(
        gpu::rms_norm(&[1.0; 6], 2, 3, Some(&[1.0; 2]), 1e-6),
        Err(gpu::Error::Value(_))
    ));
    assert!(matches!(
        gpu::layer_norm(&[1.0; 6], 2, 3, None, None, -1.0),
        Err(gpu::Error::Value(_))
    ));
    let o = gpu::CeOptions {
        label_smoothing: 1.5,
        ..Default::default()
    };
    assert!(matches!(
        gpu::cross_entropy(&[0.0; 6], 2, 3, &[0, 1], &o, None),
        Err(gpu::Error::Value(_))
    ));
    let e = gpu::cross_entropy(&[0.0; 6], 2, 3, &[0, 3], &Default::default(), None);
    match e {
        Err(gpu::Error::Index(m)) => assert!(m.contains("class index 3 at position 1"), "{m}"),
        other => panic!("expected an index error, got {other:?}"),
    }
}

#[test]
fn chunked_rows_match_one_chunk() {
    require_adapter!();
    let (rows, cols) = (37, 300);
    let x = normal(rows * cols, 2.0, 7);
    let w = normal(cols, 1.0, 8);
    let whole_s = gpu::softmax(&x, rows, cols).unwrap();
    let whole_n = gpu::layer_norm(&x, rows, cols, Some(&w), Some(&w), 1e-5).unwrap();
    let t: Vec<i64> = (0..rows as i64).map(|r| (r * 7) % cols as i64).collect();
    let o = gpu::CeOptions {
        reduction: gpu::Reduction::None,
        ..Default::default()
    };
    let whole_ce =
        gpu::cross_entropy(&x, rows, cols, &t, &o, Some(gpu::GradOutput::Scalar(1.0))).unwrap();
    gpu::set_chunk_rows_limit(5);
    let chunk_s = gpu::softmax(&x, rows, cols);
    let chunk_n = gpu::layer_norm(&x, rows, cols, Some(&w), Some(&w), 1e-5);
    let chunk_ce = gpu::cross_entropy(&x, rows, cols, &t, &o, Some(gpu::GradOutput::Scalar(1.0)));
    gpu::set_chunk_rows_limit(0);
    // The same kernels on the same rows: identical results.
    assert_eq!(chunk_s.unwrap(), whole_s);
    assert_eq!(chunk_n.unwrap(), whole_n);
    assert_eq!(chunk_ce.unwrap(), whole_ce);
}

#[test]
fn more_rows_than_one_dispatch_dimension() {
    require_adapter!();
    // 65535 workgroups per dimension is the usual limit: this needs the second dimension.
    let (rows, cols) = (70_000, 3);
    let x = normal(rows * cols, 4.0, 11);
    let e = gpu::logsumexp(&x, rows, cols).unwrap();
    assert_close(
        "logsumexp 70000 rows",
        &e,
        &cpu_lse(&x, rows, cols),
        2e-5,
        2e-5,
    );
}

fn cpu_norm(
    norm: NormKind,
    x: &[f32],
    cols: usize,
    weight: Option<&[f32]>,
    bias: Option<&[f32]>,
    eps: f32,
) -> Vec<f32> {
    let p = norms::Params {
        norm,
        len: cols,
        eps: eps as f64,
        weight,
        bias,
    };
    let mut y = vec![0.0; x.len()];
    norms::forward(&p, x, &mut y, None, None).unwrap();
    y
}

#[test]
fn norms_match_cpu() {
    require_adapter!();
    for (i, &(rows, cols)) in [(1, 1), (4, 1), (3, 7), (5, 256), (6, 1000), (2, 40_000)]
        .iter()
        .enumerate()
    {
        let seed = 100 + i as u64;
        let x: Vec<f32> = normal(rows * cols, 3.0, seed)
            .iter()
            .map(|v| v + 1.5)
            .collect();
        let w = normal(cols, 1.0, seed + 50);
        let b = normal(cols, 1.0, seed + 60);
        let what = format!("{rows}x{cols}");
        for (weight, eps) in [(None, 1e-6f32), (Some(&w[..]), 1e-5), (Some(&w[..]), 0.0)] {
            let g = gpu::rms_norm(&x, rows, cols, weight, eps).unwrap();
            let c = cpu_norm(NormKind::Rms, &x, cols, weight, None, eps);
            assert_close(&format!("rms_norm {what}"), &g, &c, 2e-5, 1e-5);
            for bias in [None, Some(&b[..])] {
                let g = gpu::layer_norm(&x, rows, cols, weight, bias, eps).unwrap();
                let c = cpu_norm(NormKind::Layer, &x, cols, weight, bias, eps);
                assert_close(&format!("layer_norm {what}"), &g, &c, 2e-5, 2e-5);
            }
        }
    }
}

#[test]
fn layer_norm_is_stable_for_a_large_mean() {
    require_adapter!();
    // mean 1e4, spread 1e-2: E[x^2] - E[x]^2 would lose every digit in float32.
    let (rows, cols) = (3, 4096);
    let x: Vec<f32> = normal(rows * cols, 1e-2, 5)
        .iter()
        .map(|v| v + 1e4)
        .collect();
    let g = gpu::layer_norm(&x, rows, cols, None, None, 0.0).unwrap();
    let c = cpu_norm(NormKind::Layer, &x, cols, None, None, 0.0);
    // x itself carries ulp(1e4) ~ 1e-3 of rounding, 0.1 std: the centred values agree to ~1e-4.
    assert_close("layer_norm mean 1e4", &g, &c, 1e-4, 1e-4);
}

#[test]
fn norm_special_rows_match_cpu() {
    require_adapter!();
    let x = [
        0.0,
        0.0,
        0.0,
        0.0,
        1.0,
        f32::NAN,
        2.0,
        3.0,
        5.0,
        5.0,
        5.0,
        5.0,
    ];
    for eps in [0.0, 1e-5] {
        let g = gpu::rms_norm(&x, 3, 4, None, eps).unwrap();
        let c = cpu_norm(NormKind::Rms, &x, 4, None, None, eps);
        assert_close("rms_norm special", &g, &c, 2e-5, 1e-5);
        let g = gpu::layer_norm(&x, 3, 4, None, None, eps).unwrap();
        let c = cpu_norm(NormKind::Layer, &x, 4, None, None, eps);
        assert_close("layer_norm special", &g, &c, 2e-5, 1e-5);
    }
}

struct Case {
    weight: bool,
    smoothing: f64,
    z: f64,
    cap: Option<f64>,
    reduction: gpu::Reduction,
}

fn check_ce(x: &[f32], rows: usize, cols: usize, t: &[i64], w: &[f32], case: &Case, what: &str) {
    let opts = gpu::CeOptions {
        weight: case.weight.then_some(w),
        ignore_index: -100,
        reduction: case.reduction,
        label_smoothing: case.smoothing,
        z_loss: case.z,
        softcap: case.cap,
        ..gpu::CeOptions::default()
    };
    let g_out = 0.75;
    let (loss, grad) = gpu::cross_entropy(
        x,
        rows,
        cols,
        t,
        &opts,
        Some(gpu::GradOutput::Scalar(g_out)),
    )
    .unwrap();
    let (loss_only, none) = gpu::cross_entropy(x, rows, cols, t, &opts, None).unwrap();
    assert!(none.is_none());
    // The same kernel with its gradient writes switched off: the same losses.
    assert_close(
        &format!("loss without grad {what}"),
        &loss_only,
        &loss,
        0.0,
        0.0,
    );
    let mut closs = vec![0.0; loss.len()];
    let mut cgrad = vec![0.0; x.len()];
    cpu_ce::cross_entropy_with_grad(
        x,
        &mut cgrad,
        rows,
        cols,
        Target::Classes(t),
        &opts,
        gpu::GradOutput::Scalar(g_out),
        &mut closs,
    )
    .unwrap();
    assert_close(&format!("loss {what}"), &loss, &closs, 2e-5, 2e-5);
    // Gradients scale with 1 / rows for a mean: the absolute term follows their size. Gradients
    // that are 0 exactly (one class) come out as a rounding residue of p * A - w * (b + ct).
    let gmax = cgrad
        .iter()
        .filter(|v| v.is_finite())
        .fold(0.0f32, |m, v| m.max(v.abs()));
    assert_close(
        &format!("grad {what}"),
        &grad.unwrap(),
        &cgrad,
        2e-5,
        2e-6 * gmax + 1e-7,
    );
}

#[test]
fn cross_entropy_matches_cpu_for_every_option() {
    require_adapter!();
    let reductions = [
        gpu::Reduction::None,
        gpu::Reduction::Sum,
        gpu::Reduction::Mean,
    ];
    for (i, &(rows, cols)) in [(1, 1), (3, 2), (9, 257), (4, 3000)].iter().enumerate() {
        let seed = 300 + i as u64;
        let x = normal(rows * cols, 4.0, seed);
        let w: Vec<f32> = normal(cols, 1.0, seed + 1)
            .iter()
            .map(|v| v.abs() + 0.1)
            .collect();
        for weight in [false, true] {
            for ignore in [false, true] {
                let t: Vec<i64> = (0..rows)
                    .map(|r| {
                        if ignore && r % 3 == 1 {
                            -100
                        } else {
                            ((r * 31 + 5) % cols) as i64
                        }
                    })
                    .collect();
                for (smoothing, z, cap) in [
                    (0.0, 0.0, None),
                    (0.1, 0.0, None),
                    (0.0, 1e-3, None),
                    (0.0, 0.0, Some(5.0)),
                    (0.2, 1e-2, Some(3.0)),
                    (1.0, 0.0, None),
                ] {
                    for &reduction in &reductions {
                        let case = Case {
                            weight,
                            smoothing,
                            z,
                            cap,
                            reduction,
                        };
                        let what = format!(
                            "{rows}x{cols} w={weight} ignore={ignore} eps={smoothing} z={z} \
                             cap={cap:?} {reduction:?}"
                        );
                        check_ce(&x, rows, cols, &t, &w, &case, &what);
                    }
                }
            }
        }
    }
}

#[test]
fn cross_entropy_special_rows_match_cpu() {
    require_adapter!();
    let (inf, nan) = (f32::INFINITY, f32::NAN);
    let x = [
        0.0, -inf, 1.0, 2.0, // -inf off the target
        -inf, 0.0, 1.0, 2.0, // -inf target logit: loss +inf
        nan, 0.0, 1.0, 2.0, // NaN row
        inf, 0.0, 1.0, 2.0, // +inf row (finite once capped)
        -inf, -inf, -inf, -inf, // nothing but -inf
        3e38, -3e38, 1e30, 0.0, // huge values
        nan, nan, nan, nan, // ignored: 0 whatever it holds
    ];
    let t = [0, 0, 1, 1, 2, 0, -100];
    let w = [1.0, 2.0, 0.5, 1.5];
    for cap in [None, Some(10.0)] {
        for smoothing in [0.0, 0.1] {
            let case = Case {
                weight: true,
                smoothing,
                z: 1e-3,
                cap,
                reduction: gpu::Reduction::None,
            };
            let what = format!("special rows cap={cap:?} eps={smoothing}");
            check_ce(&x, 7, 4, &t, &w, &case, &what);
        }
    }
}

#[test]
fn cross_entropy_per_row_grad_output_and_all_ignored() {
    require_adapter!();
    let (rows, cols) = (5, 17);
    let x = normal(rows * cols, 2.0, 77);
    let t: Vec<i64> = vec![3, -100, 16, 0, 5];
    let g: Vec<f32> = vec![0.5, 2.0, -1.0, 0.0, 3.0];
    let opts = gpu::CeOptions {
        reduction: gpu::Reduction::None,
        ..Default::default()
    };
    let (loss, grad) =
        gpu::cross_entropy(&x, rows, cols, &t, &opts, Some(gpu::GradOutput::Rows(&g))).unwrap();
    let mut closs = vec![0.0; rows];
    let mut cgrad = vec![0.0; rows * cols];
    cpu_ce::cross_entropy_with_grad(
        &x,
        &mut cgrad,
        rows,
        cols,
        Target::Classes(&t),
        &opts,
        gpu::GradOutput::Rows(&g),
        &mut closs,
    )
    .unwrap();
    assert_close("loss per-row grad_output", &loss, &closs, 2e-5, 2e-5);
    assert_close(
        "grad per-row grad_output",
        &grad.unwrap(),
        &cgrad,
        2e-5,
        1e-6,
    );

    // Every row ignored: the mean is 0 / 0 = NaN, the gradient zero (as the CPU).
    let all = vec![-100i64; rows];
    let (loss, grad) = gpu::cross_entropy(
        &x,
        rows,
        cols,
        &all,
        &Default::default(),
        Some(gpu::GradOutput::Scalar(1.0)),
    )
    .unwrap();
    assert!(loss[0].is_nan());
    assert!(grad.unwrap().iter().all(|&v| v == 0.0));
}

#[test]
fn a_row_longer_than_a_buffer_is_an_error() {
    require_adapter!();
    // Buffers are at most 128 MiB (2^25 float32): one more element cannot be bound. The check
    // comes before any copy (the zeroed vector is never touched).
    let n = (1 << 25) + 1;
    let x = vec![0.0f32; n];
    match gpu::softmax(&x, 1, n) {
        Err(gpu::Error::Value(m)) => assert!(m.contains("exceeds the largest buffer"), "{m}"),
        other => panic!("expected a Value error, got {:?}", other.map(|v| v.len())),
    }
}
