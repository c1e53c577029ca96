//! CPU handler of `normax_cross_entropy`: logits (N, C), target (N,) class ids (int32/int64) or
//! (N, C) probabilities, class weight (C,) or empty -> per-row loss (N,) and, with the attribute
//! `with_grad`, each row's gradient (N, C). Leading batch dims are more rows, unless the class
//! weight has them too: then each batch element is its own call.
//!
//! `stablemax` scores rows by StableMax as `normax.cross_entropy(normalizer="stablemax")`
//! does: the softmax cross-entropy of phi = sign(x) log1p(|x|) of the (softcapped) logits, in
//! float64, its gradient times dphi/dx.

use super::batch::{opt_parts_mut, parts_mut, Batch, PerBatch};
use super::frame::{by_float, ffi_handler, Buffer, DType, Element, Frame};
use super::Target;
use normax_core::cross_entropy as k;
use normax_core::spec::{CeOptions, GradOutput, Reduction, Target as Labels};
use normax_core::{Error, Float};
use std::borrow::Cow;

/// The cross-entropy attributes shared by every CE target (ignore_index, label_smoothing,
/// z_loss, softcap: 0.0 for none), with `reduction` and no class weights yet (the kernels
/// check the values).
pub(super) fn ce_options<W>(frame: &Frame, reduction: Reduction) -> Result<CeOptions<W>, Error> {
    let softcap = frame.attr_f64("softcap")?;
    Ok(CeOptions {
        weight: None,
        ignore_index: frame.attr_i64("ignore_index")?,
        reduction,
        label_smoothing: frame.attr_f64("label_smoothing")?,
        z_loss: frame.attr_f64("z_loss")?,
        softcap: (softcap != 0.0).then_some(softcap),
        ..CeOptions::default()
    })
}

/// The class ids of `target` (int32 widened to int64), checked to have `dims`.
pub(super) fn class_ids<'a>(target: &Buffer<'a>, dims: &[i64]) -> Result<Cow<'a, [i64]>, Error> {
    target.expect_same(dims)?;
    match target.dtype() {
        DType::S32 | DType::S64 => target.indices(),
        d => Err(Error::Value(format!(
            "{}: expected int32 or int64 class ids, got {d:?}",
            target.name()
        ))),
    }
}

/// One call's inputs: its rows of logits, their targets and the class weights.
struct Rows<'a, T> {
    logits: &'a [T],
    rows: usize,
    classes: usize,
    target: Labels<&'a [i64], &'a [T]>,
    weight: Option<&'a [T]>,
}

fn run<T: Float>(
    r: Rows<'_, T>,
    opts: &CeOptions<&[T]>,
    stable: bool,
    loss: &mut [T],
    grad: Option<&mut [T]>,
) -> Result<(), Error> {
    let o = CeOptions {
        weight: r.weight,
        ..*opts
    };
    if stable {
        return run_stable(r, &o, loss, grad);
    }
    let (x, n, c) = (r.logits, r.rows, r.classes);
    match grad {
        None => k::cross_entropy(x, n, c, r.target, &o, loss),
        Some(g) => {
            k::cross_entropy_with_grad(x, g, n, c, r.target, &o, GradOutput::Scalar(1.0), loss)
        }
    }
}

pub(super) fn widen<T: Float>(s: &[T]) -> Vec<f64> {
    s.iter().map(|v| v.to_f64()).collect()
}

/// The StableMax cross-entropy as a softmax one over phi (see the module docs).
fn run_stable<T: Float>(
    r: Rows<'_, T>,
    opts: &CeOptions<&[T]>,
    loss: &mut [T],
    grad: Option<&mut [T]>,
) -> Result<(), Error> {
    let cap = opts.softcap;
    let mut chain = Vec::with_capacity(if grad.is_some() { r.logits.len() } else { 0 });
    let phi: Vec<f64> = r
        .logits
        .iter()
        .map(|v| {
            let (x, dcap) = match cap {
                Some(s) => {
                    let u = (v.to_f64() / s).tanh();
                    (s * u, 1.0 - u * u)
                }
                None => (v.to_f64(), 1.0),
            };
            if grad.is_some() {
                chain.push(dcap / (1.0 + x.abs()));
            }
            x.signum() * x.abs().ln_1p()
        })
        .collect();
    let probs;
    let target = match r.target {
        Labels::Classes(t) => Labels::Classes(t),
        Labels::Probs(p) => {
            probs = widen(p);
            Labels::Probs(&probs[..])
        }
    };
    let weight = r.weight.map(widen);
    let o = CeOptions {
        weight: weight.as_deref(),
        softcap: None,
        ignore_index: opts.ignore_index,
        reduction: opts.reduction,
        label_smoothing: opts.label_smoothing,
        z_loss: opts.z_loss,
        temperature: opts.temperature,
        token_weight: None,
    };
    let mut loss64 = vec![0.0; loss.len()];
    let (n, c) = (r.rows, r.classes);
    match grad {
        None => k::cross_entropy(&phi, n, c, target, &o, &mut loss64)?,
        Some(g) => {
            let mut g64 = vec![0.0; phi.len()];
            let go = GradOutput::Scalar(1.0);
            k::cross_entropy_with_grad(&phi, &mut g64, n, c, target, &o, go, &mut loss64)?;
            check_len("grad", g.len(), g64.len())?;
            for ((g, d), ch) in g.iter_mut().zip(&g64).zip(&chain) {
                *g = T::from_f64(d * ch);
            }
        }
    }
    check_len("loss", loss.len(), loss64.len())?;
    for (l, v) in loss.iter_mut().zip(&loss64) {
        *l = T::from_f64(*v);
    }
    Ok(())
}

fn check_len(name: &str, got: usize, want: usize) -> Result<(), Error> {
    if got != want {
        return Err(Error::Value(format!(
            "{name}: {got} values, expected {want}"
        )));
    }
    Ok(())
}

fn cross_entropy_typed<T: Float + Element>(frame: &Frame, with_grad: bool) -> Result<(), Error> {
    let logits = frame.operand(0, "logits")?;
    let target = frame.operand(1, "target")?;
    let weight = frame.operand(2, "weight")?;
    let classes = logits.dim_from_end(0)?;
    let batch = Batch::of(&logits, 2)?;
    let row_dims = &logits.dims()[..logits.rank() - 1];
    let ids = match target.dtype() {
        DType::F32 | DType::F64 => None,
        _ => Some(class_ids(&target, row_dims)?),
    };
    let w = weight.per_batch_opt::<T>(&batch, 1)?;
    if let Some(w) = &w {
        check_len("weight", w.at(0).len(), classes)?;
    }
    // Fold every row into one call unless the class weights differ per batch element.
    let groups = match &w {
        Some(w) if !w.is_shared() => batch.count,
        _ => 1,
    };
    let loss = frame.result(0, "loss")?;
    loss.expect_same(row_dims)?;
    let grad = if with_grad {
        let g = frame.result(1, "grad")?;
        g.expect_same(logits.dims())?;
        Some(g.slice_mut::<T>()?)
    } else {
        None
    };
    let opts = ce_options::<&[T]>(frame, Reduction::None)?;
    let stable = frame.attr_bool("stablemax")?;
    let x = PerBatch::parts("logits", logits.slice::<T>()?, groups)?;
    let targets = match ids.as_deref() {
        Some(t) => Labels::Classes(PerBatch::parts("target", t, groups)?),
        None => {
            target.expect_same(logits.dims())?;
            Labels::Probs(PerBatch::parts("target", target.slice::<T>()?, groups)?)
        }
    };
    let losses = parts_mut("loss", loss.slice_mut::<T>()?, groups)?;
    let grads = opt_parts_mut("grad", grad, groups)?;
    for (b, (l, g)) in losses.into_iter().zip(grads).enumerate() {
        let rows = Rows {
            logits: x.at(b),
            rows: l.len(),
            classes,
            target: match &targets {
                Labels::Classes(t) => Labels::Classes(t.at(b)),
                Labels::Probs(p) => Labels::Probs(p.at(b)),
            },
            weight: w.map(|w| w.at(b)),
        };
        run(rows, &opts, stable, l, g)?;
    }
    Ok(())
}

fn cross_entropy(frame: &Frame) -> Result<(), Error> {
    let with_grad = frame.attr_bool("with_grad")?;
    frame.expect_arity(3, 1 + usize::from(with_grad))?;
    let logits = frame.operand(0, "logits")?;
    by_float!(logits, cross_entropy_typed(frame, with_grad))
}

ffi_handler!(cross_entropy_handler, cross_entropy);

/// This family's CPU targets.
pub(crate) const TARGETS: &[Target] = &[("normax_cross_entropy", cross_entropy_handler)];
