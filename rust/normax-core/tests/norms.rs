//! RMSNorm, LayerNorm, CRMSNorm and PowerNorm's passes against their definitions in f64, on every
//! ISA this CPU supports.

mod common;

use common::{each_isa, noise};
use normax_core::norms::{
    backward, forward, forward_inplace, power_norm_backward, power_norm_forward, Params, PowerGrad,
    PowerLayout, PowerOutput,
};
use normax_core::spec::NormKind;
use normax_core::{threads, Float, Isa};

fn cast<T: Float>(v: &[f64]) -> Vec<T> {
    v.iter().map(|&a| T::from_f64(a)).collect()
}

fn widen<T: Float>(v: &[T]) -> Vec<f64> {
    v.iter().map(|a| a.to_f64()).collect()
}

/// Row statistics straight from the definitions, in f64: (mean, rstd).
fn ref_stats(norm: NormKind, x: &[f64], eps: f64) -> (f64, f64) {
    let n = x.len() as f64;
    let sq: f64 = x.iter().map(|v| v * v).sum();
    match norm {
        NormKind::Rms => (0.0, 1.0 / (sq / n + eps).sqrt()),
        NormKind::Crms => {
            let s: f64 = x.iter().sum();
            (0.0, 1.0 / ((sq + s * s) / (n + 1.0) + eps).sqrt())
        }
        NormKind::Layer => {
            let m = x.iter().sum::<f64>() / n;
            let var = x.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / n;
            (m, 1.0 / (var + eps).sqrt())
        }
    }
}

fn ref_forward(
    norm: NormKind,
    x: &[f64],
    w: Option<&[f64]>,
    b: Option<&[f64]>,
    eps: f64,
) -> Vec<f64> {
    let (m, r) = ref_stats(norm, x, eps);
    (0..x.len())
        .map(|i| (x[i] - m) * r * w.map_or(1.0, |w| w[i]) + b.map_or(0.0, |b| b[i]))
        .collect()
}

/// dx of one row from the chain rule written out: y_i = (x_i - m) r w_i (+ b_i).
fn ref_backward(norm: NormKind, dy: &[f64], x: &[f64], w: Option<&[f64]>, eps: f64) -> Vec<f64> {
    let n = x.len() as f64;
    let (m, r) = ref_stats(norm, x, eps);
    let g: Vec<f64> = (0..x.len())
        .map(|i| dy[i] * w.map_or(1.0, |w| w[i]))
        .collect();
    let gx: f64 = g.iter().zip(x).map(|(g, x)| g * (x - m)).sum();
    let sg: f64 = g.iter().sum();
    let sx: f64 = x.iter().sum();
    (0..x.len())
        .map(|j| match norm {
            NormKind::Layer => r * (g[j] - sg / n) - (x[j] - m) * r.powi(3) * gx / n,
            NormKind::Rms => r * g[j] - x[j] * r.powi(3) * gx / n,
            NormKind::Crms => r * g[j] - (x[j] + sx) * r.powi(3) * gx / (n + 1.0),
        })
        .collect()
}

/// Largest |a - e| / (|e| + floor).
fn err(a: &[f64], e: &[f64], floor: f64) -> f64 {
    assert_eq!(a.len(), e.len());
    a.iter()
        .zip(e)
        .map(|(a, e)| (a - e).abs() / (e.abs() + floor))
        .fold(0.0, f64::max)
}

const NORMS: [NormKind; 3] = [NormKind::Rms, NormKind::Layer, NormKind::Crms];

#[test]
fn reference_backward_matches_finite_differences() {
    let (x, dy, w) = (noise(9, 1), noise(9, 2), noise(9, 3));
    for norm in NORMS {
        let dx = ref_backward(norm, &dy, &x, Some(&w), 1e-3);
        let loss = |x: &[f64]| -> f64 {
            let y = ref_forward(norm, x, Some(&w), None, 1e-3);
            y.iter().zip(&dy).map(|(y, d)| y * d).sum()
        };
        for j in 0..x.len() {
            let h = 1e-6;
            let (mut xp, mut xm) = (x.clone(), x.clone());
            xp[j] += h;
            xm[j] -= h;
            let fd = (loss(&xp) - loss(&xm)) / (2.0 * h);
            assert!((fd - dx[j]).abs() < 1e-7, "{norm:?} {j}: {fd} vs {}", dx[j]);
        }
    }
}

fn check_forward<T: Float>(isa: Isa, tol: f64) {
    for len in [1, 7, 8, 9, 33, 64, 1000, 4097] {
        let rows = 3;
        let x = noise(rows * len, len as u64);
        let (w, b) = (noise(len, 7), noise(len, 8));
        for norm in NORMS {
            for (weight, bias) in [(false, false), (true, false), (true, true)] {
                let bias = bias && norm == NormKind::Layer;
                let (wt, bt) = (cast::<T>(&w), cast::<T>(&b));
                let p = Params {
                    norm,
                    len,
                    eps: 1e-5,
                    weight: weight.then_some(&wt[..]),
                    bias: bias.then_some(&bt[..]),
                };
                let xt = cast::<T>(&x);
                let mut y = vec![T::ZERO; x.len()];
                let (mut mean, mut rstd) = (vec![0.0; rows], vec![0.0; rows]);
                forward(&p, &xt, &mut y, Some(&mut mean), Some(&mut rstd)).unwrap();
                let xw = widen(&xt);
                for r in 0..rows {
                    let row = &xw[r * len..(r + 1) * len];
                    let (wr, br) = (widen(&wt), widen(&bt));
                    let e = ref_forward(
                        norm,
                        row,
                        weight.then_some(&wr[..]),
                        bias.then_some(&br[..]),
                        1e-5,
                    );
                    let got = widen(&y[r * len..(r + 1) * len]);
                    let what = format!("{isa:?} {norm:?} len {len} w {weight} b {bias}");
                    assert!(err(&got, &e, 1.0) < tol, "{what}: {}", err(&got, &e, 1.0));
                    let (m, s) = ref_stats(norm, row, 1e-5);
                    assert!((mean[r] - m).abs() <= tol * (1.0 + m.abs()), "{what} mean");
                    assert!((rstd[r] - s).abs() <= tol * s, "{what} rstd");
                }
                // In place gives the same bits.
                let mut inplace = xt.clone();
                forward_inplace(&p, &mut inplace, None, None).unwrap();
                assert!(inplace
                    .iter()
                    .zip(&y)
                    .all(|(a, b)| a.to_f64().to_bits() == b.to_f64().to_bits()));
            }
        }
    }
}

#[test]
fn forward_matches_the_definition_on_every_isa() {
    // f32: the kernels round a few times per element (x - m0, *r, fma with weight, bias) and
    // the statistics are exact to f64 level; 1e-6 relative (about 8 units of 2^-24) bounds it.
    each_isa(|i| check_forward::<f32>(i, 1e-6));
    each_isa(|i| check_forward::<f64>(i, 1e-14));
}

#[test]
fn variance_is_stable_far_from_zero() {
    // mean 1e4, spread 1e-2: E[x^2] - E[x]^2 would lose every digit in f32.
    each_isa(|isa| {
        for len in [7, 64, 4096] {
            let x: Vec<f32> = noise(len, 5)
                .iter()
                .map(|v| (1e4 + 1e-2 * v) as f32)
                .collect();
            let xw = widen(&x);
            let p = Params::<f32> {
                norm: NormKind::Layer,
                len,
                eps: 0.0,
                weight: None,
                bias: None,
            };
            let mut y = vec![0.0f32; len];
            let (mut m, mut r) = ([0.0], [0.0]);
            forward(&p, &x, &mut y, Some(&mut m), Some(&mut r)).unwrap();
            let (em, er) = ref_stats(NormKind::Layer, &xw, 0.0);
            assert!(
                (r[0] / er - 1.0).abs() < 1e-5,
                "{isa:?} {len}: rstd {} vs {er}",
                r[0]
            );
            assert!((m[0] - em).abs() < 1e-9 * em, "{isa:?} {len}: mean");
            let e = ref_forward(NormKind::Layer, &xw, None, None, 0.0);
            assert!(err(&widen(&y), &e, 1.0) < 2e-5, "{isa:?} {len}");
        }
    });
}

/// The 99.9th percentile of the error of `y` against `e`, in ULP of each value (f32 or f64).
fn ulp_percentile_999<T: Float>(y: &[T], e: &[f64]) -> f64 {
    let eps = 1.5 / T::ROUND_MAGIC.to_f64(); // 2^-23 or 2^-52: ROUND_MAGIC is 1.5 * 2^mantissa
    let mut errs: Vec<f64> = y
        .iter()
        .zip(e)
        .map(|(y, e)| {
            // the ULP at |e|: 2^floor(log2 |e|) * eps
            let ulp = 2f64.powi(e.abs().max(1e-300).log2().floor() as i32) * eps;
            (y.to_f64() - e).abs() / ulp
        })
        .collect();
    errs.sort_by(|a, b| a.partial_cmp(b).unwrap());
    errs[errs.len() * 999 / 1000]
}

fn check_layer_norm_ulp<T: Float>(isa: Isa, bound: f64) {
    // (name, offset, uniform instead of normal)
    let dists = [
        ("zero-mean normal", 0.0, false),
        ("uniform [-1, 1)", 0.0, true),
        ("offset normal", 3.0, false),
        ("large offset", 100.0, false),
    ];
    for (name, offset, uniform) in dists {
        for len in [1000, 1024, 4096] {
            let rows = 64;
            let mut rng = common::Rng(len as u64 + 7);
            let x: Vec<T> = (0..rows * len)
                .map(|_| {
                    let v = if uniform {
                        rng.next_f64() * 2.0 - 1.0
                    } else {
                        rng.normal(1.0)
                    };
                    T::from_f64(offset + if offset > 10.0 { 0.1 * v } else { v })
                })
                .collect();
            let xw = widen(&x);
            let p = Params::<T> {
                norm: NormKind::Layer,
                len,
                eps: 1e-5,
                weight: None,
                bias: None,
            };
            let mut y = vec![T::ZERO; rows * len];
            forward(&p, &x, &mut y, None, None).unwrap();
            let e: Vec<f64> = xw
                .chunks(len)
                .flat_map(|r| ref_forward(NormKind::Layer, r, None, None, 1e-5))
                .collect();
            let u = ulp_percentile_999(&y, &e);
            assert!(
                u <= bound,
                "{isa:?} {} {name} len {len}: 99.9th percentile {u} ULP",
                std::any::type_name::<T>()
            );
        }
    }
}

#[test]
fn layer_norm_is_within_a_few_ulp_on_every_distribution() {
    // An output near 0 has an ULP of ~1e-12 of the row's std, so the row mean must be that
    // accurate: with plain f32 partial sums it was off by ~1e-8 (59-103 ULP at the 99.9th
    // percentile on zero-mean and uniform rows). Measured after the compensated mean: 1.6-1.9 ULP
    // in f32 (torch 12-33, JAX 8.5-25 on the same rows; both ~1e3-5e5 with an offset).
    each_isa(|i| check_layer_norm_ulp::<f32>(i, 3.0));
    // (f64 is not checked this way: the mean itself rounded to f64 is already ~100 ULP for f64
    // outputs near 0, in any implementation that keeps the statistics in f64.)
}

#[test]
fn zero_rows_are_finite_with_eps() {
    for norm in NORMS {
        let p = Params::<f32> {
            norm,
            len: 5,
            eps: 1e-6,
            weight: None,
            bias: None,
        };
        let (x, dy) = (vec![0.0f32; 10], vec![1.0f32; 10]);
        let mut y = vec![f32::NAN; 10];
        forward(&p, &x, &mut y, None, None).unwrap();
        assert!(y.iter().all(|&v| v == 0.0), "{norm:?}");
        let mut dx = vec![f32::NAN; 10];
        backward(&p, &dy, &x, None, None, &mut dx, None, None).unwrap();
        assert!(dx.iter().all(|v| v.is_finite()), "{norm:?}");
    }
}

fn check_backward<T: Float>(isa: Isa, tol: f64) {
    for (rows, len) in [(5, 1), (3, 7), (40, 33), (4, 1000), (300, 64)] {
        let (x, dy) = (noise(rows * len, 11), noise(rows * len, 12));
        let w = noise(len, 13);
        let (xt, dyt, wt) = (cast::<T>(&x), cast::<T>(&dy), cast::<T>(&w));
        let (xw, dyw, ww) = (widen(&xt), widen(&dyt), widen(&wt));
        for norm in NORMS {
            for weight in [false, true] {
                let bias = norm == NormKind::Layer;
                let bt = cast::<T>(&noise(len, 14));
                let p = Params {
                    norm,
                    len,
                    eps: 1e-5,
                    weight: weight.then_some(&wt[..]),
                    bias: bias.then_some(&bt[..]),
                };
                let mut dx = vec![T::ZERO; x.len()];
                let mut dw = vec![T::ZERO; len];
                let mut db = vec![T::ZERO; len];
                backward(
                    &p,
                    &dyt,
                    &xt,
                    None,
                    None,
                    &mut dx,
                    Some(&mut dw),
                    bias.then_some(&mut db[..]),
                )
                .unwrap();
                let (mut ew, mut eb) = (vec![0.0; len], vec![0.0; len]);
                let what = format!("{isa:?} {norm:?} {rows}x{len} w {weight}");
                for r in 0..rows {
                    let s = r * len..(r + 1) * len;
                    let e = ref_backward(
                        norm,
                        &dyw[s.clone()],
                        &xw[s.clone()],
                        weight.then_some(&ww[..]),
                        1e-5,
                    );
                    // dx is a difference of terms of the size of r * g: measure against that.
                    let scale = ref_stats(norm, &xw[s.clone()], 1e-5).1;
                    assert!(err(&widen(&dx[s.clone()]), &e, scale) < tol, "{what}: dx");
                    let xh = ref_forward(norm, &xw[s.clone()], None, None, 1e-5);
                    for j in 0..len {
                        ew[j] += dyw[r * len + j] * xh[j];
                        eb[j] += dyw[r * len + j];
                    }
                }
                assert!(err(&widen(&dw), &ew, 1.0) < tol * 10.0, "{what}: dweight");
                if bias {
                    assert!(err(&widen(&db), &eb, 1.0) < tol * 10.0, "{what}: dbias");
                }
                // Saved statistics give the same result as recomputed ones.
                let (mut mean, mut rstd) = (vec![0.0; rows], vec![0.0; rows]);
                let mut y = vec![T::ZERO; x.len()];
                forward(&p, &xt, &mut y, Some(&mut mean), Some(&mut rstd)).unwrap();
                let mut dx2 = vec![T::ZERO; x.len()];
                let saved_mean = (norm == NormKind::Layer).then_some(&mean[..]);
                backward(&p, &dyt, &xt, saved_mean, Some(&rstd), &mut dx2, None, None).unwrap();
                assert!(
                    dx.iter().zip(&dx2).all(|(a, b)| a.to_f64() == b.to_f64()),
                    "{what}: saved"
                );
            }
        }
    }
}

#[test]
fn backward_matches_the_chain_rule_on_every_isa() {
    // f32: the row sums are f64-accurate; dx rounds a few times per element (2e-6 relative to
    // r * |g|), dweight sums up to 300 rows in f32 blocks of 16 (1e-5 relative to its terms).
    each_isa(|i| check_backward::<f32>(i, 2e-6));
    each_isa(|i| check_backward::<f64>(i, 1e-13));
}

#[test]
fn column_sums_do_not_depend_on_the_thread_count() {
    let _guard = common::lock();
    let previous = threads::num_threads();
    // Rows of 96 go in groups of 4, their column sums through registers; 1000 keeps row by row.
    for (rows, len) in [(3001, 96), (301, 1000)] {
        let (x, dy) = (
            cast::<f32>(&noise(rows * len, 21)),
            cast::<f32>(&noise(rows * len, 22)),
        );
        let (w, b) = (cast::<f32>(&noise(len, 23)), cast::<f32>(&noise(len, 24)));
        for norm in [NormKind::Rms, NormKind::Layer] {
            let bias = norm == NormKind::Layer;
            let p = Params {
                norm,
                len,
                eps: 1e-6,
                weight: Some(&w[..]),
                bias: bias.then_some(&b[..]),
            };
            let run = |threads_n: usize| {
                threads::set_num_threads(threads_n).unwrap();
                let mut dx = vec![0.0f32; rows * len];
                let (mut dw, mut db) = (vec![0.0f32; len], vec![0.0f32; len]);
                let dbias = bias.then_some(&mut db[..]);
                backward(&p, &dy, &x, None, None, &mut dx, Some(&mut dw), dbias).unwrap();
                (dx, dw, db)
            };
            let one = run(1);
            for n in [2, 3, 5] {
                assert_eq!(run(n), one, "{norm:?} {rows}x{len}: {n} threads");
            }
        }
    }
    threads::set_num_threads(previous).unwrap();
}

#[test]
fn bad_shapes_are_errors() {
    let w = [1.0f32; 3];
    let p = Params {
        norm: NormKind::Rms,
        len: 4,
        eps: 1e-6,
        weight: Some(&w[..]),
        bias: None,
    };
    let x = [0.0f32; 8];
    let mut y = [0.0f32; 8];
    assert!(forward(&p, &x, &mut y, None, None).is_err());
    let p = Params::<f32> {
        norm: NormKind::Rms,
        len: 3,
        eps: 1e-6,
        weight: None,
        bias: None,
    };
    assert!(forward(&p, &x, &mut y, None, None).is_err());
    let p = Params::<f32> {
        norm: NormKind::Rms,
        len: 4,
        eps: -1.0,
        weight: None,
        bias: None,
    };
    assert!(forward(&p, &x, &mut y, None, None).is_err());
    let b = [0.0f32; 4];
    let p = Params::<f32> {
        norm: NormKind::Rms,
        len: 4,
        eps: 1e-6,
        weight: None,
        bias: Some(&b[..]),
    };
    assert!(forward(&p, &x, &mut y, None, None).is_err());
    let l = PowerLayout {
        tokens: 2,
        channels: 4,
        groups: 3,
    };
    assert!(power_norm_forward::<f32>(&x, l, 1e-5, None, None, None).is_err());
}

/// PowerNorm's passes against the equations in f64.
fn check_power<T: Float>(isa: Isa, tol: f64) {
    let (tokens, channels) = (37, 24);
    for groups in [1, 4] {
        let cg = channels / groups;
        let x = cast::<T>(&noise(tokens * channels, 31));
        let dy = cast::<T>(&noise(tokens * channels, 32));
        let pad: Vec<bool> = (0..tokens).map(|t| t % 5 == 3).collect();
        let (xw, dyw) = (widen(&x), widen(&dy));
        let eps = 1e-5;
        // Group scaling in f64.
        let mut u = vec![0.0; xw.len()];
        let mut s = vec![0.0; tokens * groups];
        for t in 0..tokens {
            for g in 0..groups {
                let o = t * channels + g * cg;
                let ms = xw[o..o + cg].iter().map(|v| v * v).sum::<f64>() / cg as f64;
                s[t * groups + g] = 1.0 / (ms + eps).sqrt();
                for i in 0..cg {
                    u[o + i] = xw[o + i] * s[t * groups + g];
                }
            }
        }
        let l = PowerLayout {
            tokens,
            channels,
            groups,
        };
        let scale = cast::<T>(&noise(channels, 33));
        let shift = cast::<T>(&noise(channels, 34));
        let mut y = vec![T::ZERO; x.len()];
        let mut sumsq = vec![0.0; channels];
        let out = PowerOutput {
            scale: &scale,
            shift: &shift,
            y: &mut y,
        };
        power_norm_forward(&x, l, eps, Some(&pad), Some(&mut sumsq), Some(out)).unwrap();
        for c in 0..channels {
            let e: f64 = (0..tokens)
                .filter(|&t| !pad[t])
                .map(|t| u[t * channels + c].powi(2))
                .sum();
            assert!((sumsq[c] - e).abs() < tol * e, "{isa:?} sumsq");
            for t in 0..tokens {
                let k = t * channels + c;
                let e = u[k] * scale[c].to_f64() + shift[c].to_f64();
                assert!(
                    (y[k].to_f64() - e).abs() < tol * (1.0 + e.abs()),
                    "{isa:?} y"
                );
            }
        }
        // Backward with arbitrary per-channel factors.
        let (w, zs, ema, ds) = (
            noise(channels, 35),
            noise(channels, 36),
            noise(channels, 37),
            noise(channels, 38),
        );
        let (wt, zst, emat, dst) = (
            cast::<T>(&w),
            cast::<T>(&zs),
            cast::<T>(&ema),
            cast::<T>(&ds),
        );
        let c = PowerGrad {
            weight: Some(&wt),
            zscale: &zst,
            ema: &emat,
            dscale: &dst,
        };
        let mut dx = vec![T::ZERO; x.len()];
        let sums = power_norm_backward(&dy, &x, l, eps, &c, &mut dx).unwrap();
        let (w, zs, ema, ds) = (widen(&wt), widen(&zst), widen(&emat), widen(&dst));
        let mut e_sums = vec![0.0; 3 * channels];
        for t in 0..tokens {
            for g in 0..groups {
                let o = t * channels + g * cg;
                let st = s[t * groups + g];
                let du: Vec<f64> = (0..cg)
                    .map(|i| {
                        let (k, ch) = (o + i, g * cg + i);
                        let z = u[k] * zs[ch];
                        let gh = dyw[k] * w[ch] - ema[ch] * z;
                        e_sums[ch] += gh * z;
                        e_sums[channels + ch] += dyw[k] * z;
                        e_sums[2 * channels + ch] += dyw[k];
                        gh * ds[ch]
                    })
                    .collect();
                let m: f64 = (0..cg).map(|i| du[i] * u[o + i]).sum::<f64>() / cg as f64;
                for i in 0..cg {
                    let e = st * (du[i] - u[o + i] * m);
                    let got = dx[o + i].to_f64();
                    assert!(
                        (got - e).abs() < tol * st * 10.0,
                        "{isa:?} g{groups} dx {got} vs {e}"
                    );
                }
            }
        }
        assert!(err(&sums, &e_sums, 1.0) < tol * 10.0, "{isa:?} column sums");
    }
}

#[test]
fn power_norm_passes_match_the_equations_on_every_isa() {
    each_isa(|i| check_power::<f32>(i, 2e-6));
    each_isa(|i| check_power::<f64>(i, 1e-13));
}
