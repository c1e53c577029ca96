//! The column kernels (inner > 1: the reduced axis is not the last) against the row kernels on
//! the same data transposed to rows, on every ISA, in f32 and f64: tails of every width, columns
//! of one element, and columns with NaN, +inf, -inf, dominant, huge and tiny values.

mod common;

use common::{each_isa, sum_compensated, ulp_f32, ulp_f64, Rng};
use normax_core::softmax::{
    log_softmax, log_softmax_backward, log_softmax_inplace, logsumexp, softmax, softmax_backward,
    softmax_inplace,
};
use normax_core::stablemax::{log_stablemax, log_stablemax_inplace, stablemax, stablemax_inplace};
use normax_core::{Error, Float, Layout};

/// (outer, len, inner): vector tails of every width for 4, 8 and 16 lanes, len 1 and 2, a long
/// column.
const SHAPES: &[(usize, usize, usize)] = &[
    (2, 37, 5),
    (3, 1, 17),
    (2, 2, 9),
    (2, 64, 16),
    (1, 33, 40),
    (2, 300, 64),
    (1, 4097, 19),
    (1, 3, 100),
];

fn ulp<T: Float>(v: f64) -> f64 {
    if std::mem::size_of::<T>() == 4 {
        ulp_f32(v)
    } else {
        ulp_f64(v)
    }
}

fn eps<T: Float>() -> f64 {
    if std::mem::size_of::<T>() == 4 {
        f32::EPSILON as f64
    } else {
        f64::EPSILON
    }
}

/// Random columns, with special ones among them (by column index, in even groups): NaN, +inf,
/// all -inf, one -inf, one dominant element, huge (beyond the exp's split limit), tiny (far
/// below 0); in odd groups some increasing columns.
fn data<T: Float>(outer: usize, len: usize, inner: usize, seed: u64) -> Vec<T> {
    let mut rng = Rng(seed);
    let mut x: Vec<f64> = (0..outer * len * inner).map(|_| rng.normal(5.0)).collect();
    let huge = if std::mem::size_of::<T>() == 4 {
        1e30
    } else {
        1e200
    };
    let tiny = if std::mem::size_of::<T>() == 4 {
        -5000.0
    } else {
        -1e5
    };
    for o in (0..outer).step_by(2) {
        for j in 0..inner {
            let at = |i: usize| (o * len + i) * inner + j;
            match j % 8 {
                1 => x[at(len / 2)] = f64::NAN,
                2 => x[at(len - 1)] = f64::INFINITY,
                3 => (0..len).for_each(|i| x[at(i)] = f64::NEG_INFINITY),
                4 => x[at(0)] = f64::NEG_INFINITY,
                5 => x[at(len / 3)] += 40.0,
                6 => (0..len).for_each(|i| x[at(i)] *= huge),
                7 => (0..len).for_each(|i| x[at(i)] += tiny),
                _ => {}
            }
        }
    }
    // Increasing columns: the running max (and its exponent) rises in every block of rows.
    for o in (1..outer).step_by(2) {
        for j in (0..inner).step_by(4) {
            (0..len).for_each(|i| x[(o * len + i) * inner + j] = i as f64 * 0.37 - 50.0);
        }
    }
    x.into_iter().map(T::from_f64).collect()
}

/// (outer, len, inner) data as (outer * inner) contiguous rows of `len`, and back.
fn to_rows<T: Copy>(x: &[T], (outer, len, inner): (usize, usize, usize)) -> Vec<T> {
    let mut rows = x.to_vec();
    for o in 0..outer {
        for i in 0..len {
            for j in 0..inner {
                rows[(o * inner + j) * len + i] = x[(o * len + i) * inner + j];
            }
        }
    }
    rows
}

fn from_rows<T: Copy>(rows: &[T], (outer, len, inner): (usize, usize, usize)) -> Vec<T> {
    let mut x = rows.to_vec();
    for o in 0..outer {
        for i in 0..len {
            for j in 0..inner {
                x[(o * len + i) * inner + j] = rows[(o * inner + j) * len + i];
            }
        }
    }
    x
}

/// Every element of `got` within `tol(i)` of the f64 reference `want`, where that is finite; where
/// it is not, the same bits as the row path's `row` (NaN for NaN, equal infinities).
fn check<T: Float>(what: &str, got: &[T], row: &[T], want: &[f64], tol: impl Fn(usize) -> f64) {
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let (g, r) = (g.to_f64(), row[i].to_f64());
        let ok = if w.is_finite() && r.is_finite() {
            (g - w).abs() <= tol(i)
        } else {
            g.to_bits() == r.to_bits() || (g.is_nan() && r.is_nan())
        };
        assert!(ok, "{what}: element {i}: {g} vs {w} (row path {r})");
    }
}

fn s64(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 + x
    } else {
        1.0 / (1.0 - x)
    }
}

/// The f64 reference of `name` over the `len` axis of `x`, the log of each column's sum (of
/// exp(x), or of s(x) for the stablemax family) at every element, and a bound on the reference's
/// own rounding (it matters for f64 inputs: x - max rounds).
fn reference<T: Float>(
    name: &str,
    x: &[T],
    (outer, len, inner): (usize, usize, usize),
) -> [Vec<f64>; 3] {
    let mut out = [
        vec![f64::NAN; x.len()],
        vec![f64::NAN; x.len()],
        vec![0.0; x.len()],
    ];
    let e = f64::EPSILON;
    for o in 0..outer {
        for j in 0..inner {
            let at: Vec<usize> = (0..len).map(|i| (o * len + i) * inner + j).collect();
            let col: Vec<f64> = at.iter().map(|&k| x[k].to_f64()).collect();
            let max = col.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b));
            let stable = name.contains("stablemax");
            let sum = if stable {
                sum_compensated(col.iter().map(|&v| s64(v)))
            } else {
                sum_compensated(col.iter().map(|&v| (v - max).exp()))
            };
            for (&k, &v) in at.iter().zip(&col) {
                let big = v.abs() + max.abs() + 1.0;
                let (y, ln_sum, err) = match name {
                    "softmax" => {
                        let y = (v - max).exp() / sum;
                        (y, max + sum.ln(), 4.0 * e * big * y)
                    }
                    "log_softmax" => ((v - max) - sum.ln(), max + sum.ln(), 4.0 * e * big),
                    "stablemax" => (s64(v) / sum, sum.ln(), 4.0 * e * s64(v) / sum),
                    _ => (s64(v).ln() - sum.ln(), sum.ln(), 4.0 * e * big),
                };
                out[0][k] = y;
                out[1][k] = ln_sum;
                out[2][k] = if err.is_nan() { 0.0 } else { err };
            }
        }
    }
    out
}

type MapFn<T> = fn(&[T], &mut [T], Layout) -> Result<(), Error>;
type InplaceFn<T> = fn(&mut [T], Layout) -> Result<(), Error>;

fn maps_match_rows<T: Float>() {
    let ops: [(&str, MapFn<T>, InplaceFn<T>); 4] = [
        ("softmax", softmax::<T>, softmax_inplace::<T>),
        ("log_softmax", log_softmax::<T>, log_softmax_inplace::<T>),
        ("stablemax", stablemax::<T>, stablemax_inplace::<T>),
        (
            "log_stablemax",
            log_stablemax::<T>,
            log_stablemax_inplace::<T>,
        ),
    ];
    each_isa(|isa| {
        for &shape in SHAPES {
            let (outer, len, inner) = shape;
            let x = data::<T>(outer, len, inner, 11 + len as u64);
            let rows = to_rows(&x, shape);
            let (cl, rl) = (
                Layout { outer, len, inner },
                Layout::rows(outer * inner, len),
            );
            let mut lse = vec![T::ZERO; outer * inner];
            logsumexp(&rows, None, &mut lse, None, rl).unwrap();
            let mut lse_col = vec![T::ZERO; outer * inner];
            logsumexp(&x, None, &mut lse_col, None, cl).unwrap();
            let what = format!("{isa:?} {} {shape:?} logsumexp", std::any::type_name::<T>());
            let want_lse: Vec<f64> = (0..outer * inner)
                .map(|r| {
                    let (o, j) = (r / inner, r % inner);
                    reference("log_softmax", &x, shape)[1][o * len * inner + j]
                })
                .collect();
            check(&what, &lse_col, &lse, &want_lse, |i| {
                2.0 * ulp::<T>(want_lse[i]) + 1e-6 * eps::<T>()
            });
            for (name, op, inplace) in ops {
                let what = format!("{isa:?} {} {shape:?} {name}", std::any::type_name::<T>());
                let mut yr = vec![T::ZERO; x.len()];
                op(&rows, &mut yr, rl).unwrap();
                let row = from_rows(&yr, shape);
                let mut y = vec![T::ZERO; x.len()];
                op(&x, &mut y, cl).unwrap();
                let [want, ln_sum, err] = reference(name, &x, shape);
                // The row path's bounds (tests/softmax.rs, tests/stablemax.rs): the exp within 2
                // ULP, the sum 1, product and reciprocal 0.5 each; the log's within 2 ULP of the
                // result and of the log of the sum.
                let tol = |i: usize| {
                    err[i]
                        + match name {
                            "softmax" | "stablemax" => 5.0 * ulp::<T>(want[i]),
                            _ => 2.0 * ulp::<T>(want[i]) + 2.0 * ulp::<T>(ln_sum[i]),
                        }
                };
                check(&what, &y, &row, &want, tol);
                // In place (out is x): the same bits as out of place.
                let mut z = x.clone();
                inplace(&mut z, cl).unwrap();
                let same = z
                    .iter()
                    .zip(&y)
                    .all(|(a, b)| a.to_f64().to_bits() == b.to_f64().to_bits());
                assert!(same, "{what}: in place differs");
            }
        }
    });
}

#[test]
fn column_maps_match_rows_f32() {
    maps_match_rows::<f32>();
}

#[test]
fn column_maps_match_rows_f64() {
    maps_match_rows::<f64>();
}

type BackwardFn<T> = fn(&[T], &[T], &mut [T], Layout) -> Result<(), Error>;

fn backwards_match_rows<T: Float>() {
    let ops: [(&str, BackwardFn<T>, MapFn<T>); 2] = [
        ("softmax_backward", softmax_backward::<T>, softmax::<T>),
        (
            "log_softmax_backward",
            log_softmax_backward::<T>,
            log_softmax::<T>,
        ),
    ];
    each_isa(|isa| {
        for &shape in SHAPES {
            let (outer, len, inner) = shape;
            let mut rng = Rng(5 + len as u64);
            let x: Vec<T> = (0..outer * len * inner)
                .map(|_| T::from_f64(rng.normal(2.0)))
                .collect();
            let dy: Vec<T> = (0..x.len()).map(|_| T::from_f64(rng.normal(1.0))).collect();
            let (cl, rl) = (
                Layout { outer, len, inner },
                Layout::rows(outer * inner, len),
            );
            for (name, op, fwd) in ops {
                let what = format!("{isa:?} {} {shape:?} {name}", std::any::type_name::<T>());
                let mut y = vec![T::ZERO; x.len()];
                fwd(&x, &mut y, cl).unwrap();
                let (yr, dyr) = (to_rows(&y, shape), to_rows(&dy, shape));
                let mut dxr = vec![T::ZERO; x.len()];
                op(&yr, &dyr, &mut dxr, rl).unwrap();
                let want = from_rows(&dxr, shape);
                let mut dx = vec![T::ZERO; x.len()];
                op(&y, &dy, &mut dx, cl).unwrap();
                // The column's sum in f64 (|terms|): the bound of its rounding in either order.
                let scale = |i: usize| {
                    let (o, j) = (i / (len * inner), i % inner);
                    let col = (0..len).map(|k| (o * len + k) * inner + j);
                    let s: f64 = if name == "softmax_backward" {
                        col.map(|k| (y[k].to_f64() * dy[k].to_f64()).abs()).sum()
                    } else {
                        col.map(|k| dy[k].to_f64().abs()).sum()
                    };
                    let (yi, dyi) = (y[i].to_f64(), dy[i].to_f64());
                    if name == "softmax_backward" {
                        yi.abs() * (dyi.abs() + s)
                    } else {
                        dyi.abs() + yi.exp() * s
                    }
                };
                let want64: Vec<f64> = want.iter().map(|v| v.to_f64()).collect();
                check(&what, &dx, &want, &want64, |i| 8.0 * eps::<T>() * scale(i));
            }
        }
    });
}

#[test]
fn column_backwards_match_rows() {
    backwards_match_rows::<f32>();
    backwards_match_rows::<f64>();
}

#[test]
fn weighted_logsumexp_columns_match_rows() {
    let shape = (2, 37, 21);
    let (outer, len, inner) = shape;
    let mut rng = Rng(9);
    let x = rng.vec_f32(outer * len * inner, 3.0);
    let b: Vec<f32> = (0..x.len()).map(|_| rng.normal(1.0) as f32).collect();
    each_isa(|isa| {
        let (mut v, mut s) = (vec![0f32; outer * inner], vec![0f32; outer * inner]);
        let (mut vr, mut sr) = (v.clone(), s.clone());
        let cl = Layout { outer, len, inner };
        logsumexp(&x, Some(&b), &mut v, Some(&mut s), cl).unwrap();
        let (xr, br) = (to_rows(&x, shape), to_rows(&b, shape));
        let rl = Layout::rows(outer * inner, len);
        logsumexp(&xr, Some(&br), &mut vr, Some(&mut sr), rl).unwrap();
        assert_eq!((v, s), (vr, sr), "{isa:?}");
    });
}

/// Columns `cols` of an (1, len, inner) array as a contiguous (1, len, cols.len()) array.
fn take_columns<T: Copy>(x: &[T], len: usize, inner: usize, cols: &[usize]) -> Vec<T> {
    (0..len)
        .flat_map(|i| cols.iter().map(move |&c| x[i * inner + c]))
        .collect()
}

/// An output of 32 MiB or more is written with streaming stores, the column groups aligned to the
/// output's vectors (a head group first when it is not): the same bits as the plain stores of a
/// small array holding the same columns, at the head, the tail and with the output misaligned.
fn streamed_columns_match<T: Float>(len: usize, shift: usize) {
    let inner = 4096;
    let mut rng = Rng(31);
    let mut x: Vec<T> = (0..len * inner)
        .map(|_| T::from_f64(rng.normal(3.0)))
        .collect();
    let mut dy: Vec<T> = (0..len * inner)
        .map(|_| T::from_f64(rng.normal(1.0)))
        .collect();
    x[(len / 2) * inner + 3] = T::NAN;
    (0..len).for_each(|i| x[i * inner + 20] = T::NEG_INFINITY);
    x[inner - 2] = T::INFINITY;
    dy[7] = T::from_f64(1e3);
    let cols: Vec<usize> = (0..40).chain(inner - 40..inner).collect();
    let (xs, dys) = (
        take_columns(&x, len, inner, &cols),
        take_columns(&dy, len, inner, &cols),
    );
    let (big, small) = (
        Layout {
            outer: 1,
            len,
            inner,
        },
        Layout {
            outer: 1,
            len,
            inner: cols.len(),
        },
    );
    let maps: [(&str, MapFn<T>); 4] = [
        ("softmax", softmax::<T>),
        ("log_softmax", log_softmax::<T>),
        ("stablemax", stablemax::<T>),
        ("log_stablemax", log_stablemax::<T>),
    ];
    let backwards: [(&str, BackwardFn<T>); 2] = [
        ("softmax_backward", softmax_backward::<T>),
        ("log_softmax_backward", log_softmax_backward::<T>),
    ];
    let mut buf = vec![T::ZERO; len * inner + shift];
    let mut want = vec![T::ZERO; xs.len()];
    let same = |name: &str, got: &[T], want: &[T]| {
        let got = take_columns(got, len, inner, &cols);
        let bits = |v: &[T]| v.iter().map(|e| e.to_f64().to_bits()).collect::<Vec<_>>();
        assert!(bits(&got) == bits(want), "{name}: len {len}, shift {shift}");
    };
    each_isa(|isa| {
        for (name, op) in maps {
            op(&x, &mut buf[shift..], big).unwrap();
            op(&xs, &mut want, small).unwrap();
            same(&format!("{isa:?} {name}"), &buf[shift..], &want);
        }
        for (name, op) in backwards {
            op(&x, &dy, &mut buf[shift..], big).unwrap();
            op(&xs, &dys, &mut want, small).unwrap();
            same(&format!("{isa:?} {name}"), &buf[shift..], &want);
        }
        let mut inplace = x.clone();
        softmax_inplace(&mut inplace, big).unwrap();
        softmax(&xs, &mut want, small).unwrap();
        same(&format!("{isa:?} softmax_inplace"), &inplace, &want);
    });
}

#[test]
fn streamed_column_outputs_give_the_same_bits() {
    streamed_columns_match::<f32>(2100, 0);
    streamed_columns_match::<f32>(2100, 1);
    streamed_columns_match::<f64>(1100, 3);
}
