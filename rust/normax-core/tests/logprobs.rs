//! logprobs / linear_logprobs and their backward against the definitions written in f64 (log
//! softmax(x / T) at the target, its entropy, the gradient of g_logp * logprob + g_H * entropy),
//! on every ISA: temperatures, ignored rows, -inf logits, large margins, special values, errors,
//! and the linear form equal to the rows form of its logits for every block shape.

mod common;

use common::{each_isa, Lcg};
use normax_core::cross_entropy::LinearGrads;
use normax_core::logprobs::{
    linear_logprobs, linear_logprobs_backward, logprobs, logprobs_backward, LogprobGrads,
    LogprobOptions,
};
use normax_core::lse::IN_CACHE_MAX_LEN;
use normax_core::{Error, Float};

/// (logprob, entropy, gradient row) of one row in f64; zero terms where p = 0. The log-sum-exp
/// as m + log1p(the sum below one max element) and 1 - p_y as -expm1(logprob), so a dominant
/// target's results are relatively accurate here too.
fn reference(x: &[f64], y: usize, t: f64, (gl, gh): (f64, f64)) -> (f64, f64, Vec<f64>) {
    let z: Vec<f64> = x.iter().map(|v| v / t).collect();
    let top = (0..z.len()).fold(0, |a, c| if z[c] > z[a] { c } else { a });
    let m = z[top];
    let rest: f64 = (0..z.len())
        .filter(|&c| c != top)
        .map(|c| (z[c] - m).exp())
        .sum();
    let rel = rest.ln_1p();
    let d: Vec<f64> = z.iter().map(|v| (m - v) + rel).collect(); // lse - z
    let p: Vec<f64> = d.iter().map(|v| (-v).exp()).collect();
    let h: f64 = (0..z.len())
        .filter(|&c| p[c] > 0.0)
        .map(|c| p[c] * d[c])
        .sum();
    let grad = (0..z.len())
        .map(|c| {
            let own = if c == y { -(-d[c]).exp_m1() } else { -p[c] };
            let spread = if p[c] > 0.0 { p[c] * (h - d[c]) } else { 0.0 };
            (gl * own - gh * spread) / t
        })
        .collect();
    (-d[y], h, grad)
}

fn opts(ignore_index: i64, temperature: f64) -> LogprobOptions {
    LogprobOptions {
        ignore_index,
        temperature,
    }
}

fn cast<T: Float>(v: &[f64]) -> Vec<T> {
    v.iter().map(|&a| T::from_f64(a)).collect()
}

fn close(a: f64, b: f64, tol: f64, what: &str) {
    assert!(
        (a - b).abs() <= tol * (1.0 + b.abs()) || (a.is_nan() && b.is_nan()) || a == b,
        "{what}: {a} vs {b}"
    );
}

/// Runs the rows form in T on x (f64, rounded to T first) and checks it against the reference of
/// the rounded logits.
fn check_rows<T: Float>(x: &[f64], c: usize, target: &[i64], t: f64, tol: f64) {
    let rows = target.len();
    let xt: Vec<T> = cast(x);
    let xr: Vec<f64> = xt.iter().map(|v| v.to_f64()).collect();
    let o = opts(-100, t);
    let (mut lp, mut ent) = (vec![T::ZERO; rows], vec![T::ZERO; rows]);
    logprobs(&xt, rows, c, target, &o, &mut lp, Some(&mut ent)).unwrap();
    let gl: Vec<f64> = (0..rows).map(|r| 0.5 + r as f64 * 0.25).collect();
    let gh: Vec<f64> = (0..rows).map(|r| -0.3 + r as f64 * 0.1).collect();
    let (glt, ght): (Vec<T>, Vec<T>) = (cast(&gl), cast(&gh));
    for which in 0..3 {
        let grads = LogprobGrads {
            logprob: (which != 2).then_some(&glt[..]),
            entropy: (which != 1).then_some(&ght[..]),
        };
        let mut grad = vec![T::NAN; xt.len()];
        logprobs_backward(&xt, rows, c, target, &o, grads, &mut grad).unwrap();
        for r in 0..rows {
            let row = &xr[r * c..(r + 1) * c];
            let g = &grad[r * c..(r + 1) * c];
            if target[r] == -100 {
                assert_eq!((lp[r].to_f64(), ent[r].to_f64()), (0.0, 0.0));
                assert!(g.iter().all(|v| v.to_f64() == 0.0));
                continue;
            }
            let gs = (
                if which != 2 { gl[r] } else { 0.0 },
                if which != 1 { gh[r] } else { 0.0 },
            );
            let (l, h, dx) = reference(row, target[r] as usize, t, gs);
            close(lp[r].to_f64(), l, tol, "logprob");
            close(ent[r].to_f64(), h, tol, "entropy");
            for (a, b) in g.iter().zip(&dx) {
                close(a.to_f64(), *b, tol, "grad");
            }
        }
    }
}

#[test]
fn rows_match_the_f64_definition() {
    let mut rng = Lcg(7);
    each_isa(|isa| {
        for &c in &[1usize, 3, 17, 64, 1000, 5003] {
            for &t in &[1.0, 0.7, 2.5] {
                let rows = 5;
                let x = rng.vec(rows * c, 6.0);
                let target: Vec<i64> = (0..rows)
                    .map(|r| if r == 2 { -100 } else { rng.below(c) as i64 })
                    .collect();
                check_rows::<f64>(&x, c, &target, t, 1e-12);
                // f32: the rounded logits' results within a few f32 ULP of the row's scale.
                check_rows::<f32>(&x, c, &target, t, 3e-6);
                let _ = isa;
            }
        }
    });
}

#[test]
fn rows_past_the_in_cache_length_take_the_two_pass_sums() {
    let mut rng = Lcg(5);
    let c = IN_CACHE_MAX_LEN + 37;
    let x = rng.vec(2 * c, 8.0);
    let target = [c as i64 - 1, 5];
    each_isa(|_| {
        check_rows::<f64>(&x, c, &target, 1.0, 1e-11);
        check_rows::<f32>(&x, c, &target, 0.9, 2e-5);
    });
}

#[test]
fn large_margins_keep_the_targets_gradient() {
    // p_y rounds to 1 past a margin of ~17 (f32) / ~37 (f64): the gradient -g expm1(logprob)
    // must stay the other classes' probability, relatively accurate, not 0.
    each_isa(|isa| {
        for &margin in &[20.0, 45.0] {
            for &t in &[1.0, 0.6] {
                let c = 100;
                let mut x = vec![0.0; c];
                x[3] = margin;
                let (l, h, dx) = reference(&x, 3, t, (1.0, 1.0));
                for tol in [1e-5, 1e-13] {
                    let (lp, ent, g) = if tol > 1e-10 {
                        run_one::<f32>(&x, 3, t)
                    } else {
                        run_one::<f64>(&x, 3, t)
                    };
                    assert!(lp < 0.0 && g[3] != 0.0, "{} margin {margin}", isa.name());
                    assert!((lp - l).abs() <= tol * l.abs(), "logprob {lp} vs {l}");
                    assert!((ent - h).abs() <= tol * h.abs(), "entropy {ent} vs {h}");
                    assert!(
                        (g[3] - dx[3]).abs() <= tol * dx[3].abs(),
                        "{} vs {}",
                        g[3],
                        dx[3]
                    );
                }
            }
        }
    });
}

/// One row through the rows form in T with g_logp = g_H = 1: (logprob, entropy, gradient).
fn run_one<T: Float>(x: &[f64], y: i64, t: f64) -> (f64, f64, Vec<f64>) {
    let xt: Vec<T> = cast(x);
    let (mut lp, mut ent) = ([T::ZERO], [T::ZERO]);
    let o = opts(-100, t);
    logprobs(&xt, 1, x.len(), &[y], &o, &mut lp, Some(&mut ent)).unwrap();
    let ones = [T::ONE];
    let grads = LogprobGrads {
        logprob: Some(&ones[..]),
        entropy: Some(&ones[..]),
    };
    let mut g = vec![T::ZERO; x.len()];
    logprobs_backward(&xt, 1, x.len(), &[y], &o, grads, &mut g).unwrap();
    let g = g.iter().map(|v| v.to_f64()).collect();
    (lp[0].to_f64(), ent[0].to_f64(), g)
}

#[test]
fn special_values() {
    let ninf = f64::NEG_INFINITY;
    each_isa(|_| {
        // -inf logits: probability 0, no NaN from 0 * inf, in the entropy or the gradient.
        let x = [1.0, ninf, 0.5, ninf];
        let (l, h, dx) = reference(&x, 0, 1.0, (1.0, 1.0));
        let (lp, ent, g) = run_one::<f32>(&x, 0, 1.0);
        close(lp, l, 1e-6, "logprob");
        close(ent, h, 1e-6, "entropy");
        for (a, b) in g.iter().zip(&dx) {
            close(*a, *b, 1e-6, "grad");
        }
        // A -inf target: logprob -inf, gradient g_logp there.
        let (lp, _, g) = run_one::<f64>(&x, 1, 1.0);
        assert_eq!((lp, g[1]), (ninf, 1.0));
        // Huge values take the exact path, with the same results as shifted ones.
        let big = [1e30, 1e30 - 1e15, 1e30];
        let (lp, ent, g) = run_one::<f64>(&big, 0, 1.0);
        close(lp, -(2.0f64).ln(), 1e-12, "huge logprob");
        close(ent, (2.0f64).ln(), 1e-12, "huge entropy");
        close(g[1], 0.0, 1e-12, "huge grad");
        // NaN, +inf, all -inf: NaN results and gradients.
        for row in [[1.0, f64::NAN, 0.0], [1.0, f64::INFINITY, 0.0], [ninf; 3]] {
            let (lp, ent, g) = run_one::<f32>(&row, 0, 1.0);
            assert!(lp.is_nan() && ent.is_nan() && g.iter().all(|v| v.is_nan()));
        }
    });
}

#[test]
fn errors_name_the_argument() {
    let x = [0.0f32; 6];
    let (mut lp, mut g) = ([0.0f32; 2], [0.0f32; 6]);
    for t in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        let e = logprobs(&x, 2, 3, &[0, 1], &opts(-100, t), &mut lp, None).unwrap_err();
        assert!(matches!(&e, Error::Value(m) if m.starts_with("temperature: must be a finite")));
    }
    let e = logprobs(&x, 2, 3, &[0, 3], &opts(-100, 1.0), &mut lp, None).unwrap_err();
    assert!(matches!(&e, Error::Index(m) if m.starts_with("target: class index 3 at position 1")));
    let short = [1.0f32];
    let grads = LogprobGrads {
        logprob: Some(&short[..]),
        entropy: None,
    };
    let e = logprobs_backward(&x, 2, 3, &[0, 1], &opts(-100, 1.0), grads, &mut g).unwrap_err();
    assert!(matches!(&e, Error::Value(m) if m.contains("grad_logprob")));
    let mut out = (vec![0.0f32; 4], vec![0.0f32; 6]);
    let no = LogprobGrads {
        logprob: None,
        entropy: None,
    };
    let grads_out = LinearGrads {
        dhidden: &mut out.0,
        dweight: &mut out.1,
        dbias: None,
    };
    let h = [0.0f32; 4];
    let e = linear_logprobs_backward(
        &h,
        &x,
        None,
        &[0, 1],
        (2, 2, 3),
        &opts(-100, 1.0),
        Some(0),
        no,
        grads_out,
    )
    .unwrap_err();
    assert!(matches!(&e, Error::Value(m) if m.contains("chunk_size")));
}

#[test]
fn linear_equals_the_rows_form_of_its_logits() {
    let mut rng = Lcg(11);
    let (n, h, v) = (37, 9, 300);
    let hidden = rng.vec(n * h, 1.0);
    let weight = rng.vec(v * h, 1.0);
    let bias = rng.vec(v, 0.5);
    let target: Vec<i64> = (0..n)
        .map(|r| if r % 7 == 3 { -1 } else { rng.below(v) as i64 })
        .collect();
    let gl = rng.vec(n, 1.0);
    let gh = rng.vec(n, 1.0);
    // The explicit logits in f64 and the rows form's f64 results on them.
    let logits: Vec<f64> = (0..n * v)
        .map(|i| {
            let (r, c) = (i / v, i % v);
            (0..h)
                .map(|k| hidden[r * h + k] * weight[c * h + k])
                .sum::<f64>()
                + bias[c]
        })
        .collect();
    each_isa(|isa| {
        for t in [1.0, 1.7] {
            let o = opts(-1, t);
            let (mut lp, mut ent) = (vec![0.0; n], vec![0.0; n]);
            logprobs(&logits, n, v, &target, &o, &mut lp, Some(&mut ent)).unwrap();
            let grads = LogprobGrads {
                logprob: Some(&gl[..]),
                entropy: Some(&gh[..]),
            };
            let mut g = vec![0.0; n * v];
            logprobs_backward(&logits, n, v, &target, &o, grads, &mut g).unwrap();
            // dhidden = G W, dweight = G^T hidden, dbias = column sums of G.
            let dh: Vec<f64> = (0..n * h)
                .map(|i| {
                    (0..v)
                        .map(|c| g[i / h * v + c] * weight[c * h + i % h])
                        .sum()
                })
                .collect();
            let dw: Vec<f64> = (0..v * h)
                .map(|i| {
                    (0..n)
                        .map(|r| g[r * v + i / h] * hidden[r * h + i % h])
                        .sum()
                })
                .collect();
            let db: Vec<f64> = (0..v).map(|c| (0..n).map(|r| g[r * v + c]).sum()).collect();
            // Whole rows in one block, rows in blocks, vocabulary blocks, single elements.
            for chunk in [None, Some(2 * v), Some(1000), Some(7), Some(1)] {
                let (mut lp2, mut ent2) = (vec![0.0; n], vec![0.0; n]);
                let shape = (n, h, v);
                let b = Some(&bias[..]);
                linear_logprobs(
                    &hidden,
                    &weight,
                    b,
                    &target,
                    shape,
                    &o,
                    chunk,
                    &mut lp2,
                    Some(&mut ent2),
                )
                .unwrap();
                let mut out = (vec![0.0; n * h], vec![0.0; v * h], vec![0.0; v]);
                let grads_out = LinearGrads {
                    dhidden: &mut out.0,
                    dweight: &mut out.1,
                    dbias: Some(&mut out.2),
                };
                linear_logprobs_backward(
                    &hidden, &weight, b, &target, shape, &o, chunk, grads, grads_out,
                )
                .unwrap();
                let what = format!("{} T={t} chunk={chunk:?}", isa.name());
                for (pairs, name) in [
                    ((&lp2, &lp), "logprob"),
                    ((&ent2, &ent), "entropy"),
                    ((&out.0, &dh), "dhidden"),
                    ((&out.1, &dw), "dweight"),
                    ((&out.2, &db), "dbias"),
                ] {
                    for (a, b) in pairs.0.iter().zip(pairs.1.iter()) {
                        close(*a, *b, 1e-11, &format!("{what} {name}"));
                    }
                }
            }
        }
    });
}
