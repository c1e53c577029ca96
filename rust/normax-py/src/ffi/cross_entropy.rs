//! CPU handler of `normax_cross_entropy`: logits (N, C), target (N,) class ids (int32/int64) or
//! (N, C) probabilities, class weight (C,) or empty, token weight (N,) or empty -> per-row loss
//! (N,), with the attribute `with_grad` each row's gradient (N, C), with `with_stats` each row's
//! lse (N,), entropy (N,) and correct (N,) bool. Attributes: the CE attributes (temperature
//! included), stablemax, with_grad, with_stats. Leading batch dims are more rows, unless the
//! class weight has them too: then each batch element is its own call.
//!
//! `stablemax` scores rows by StableMax as `normax.cross_entropy(normalizer="stablemax")`
//! does: the softmax cross-entropy of phi = sign(u) log1p(|u|) of the tempered, softcapped
//! logits u, in float64, its gradient times dphi/dx.

use super::batch::{opt_parts_mut, parts_mut, Batch, PerBatch};
use super::frame::{by_float, ffi_handler, Buffer, DType, Element, Frame};
use super::Target;
use normax_core::cross_entropy::{self as k, CeLogits, CeStats};
use normax_core::spec::{CeOptions, GradOutput, Reduction, Target as Labels};
use normax_core::{Error, Float};
use std::borrow::Cow;

/// The cross-entropy attributes shared by every CE target (ignore_index, label_smoothing,
/// z_loss, softcap: 0.0 for none, temperature), with `reduction` and no class or token weights
/// yet (the kernels check the values).
pub(super) fn ce_options<W>(frame: &Frame, reduction: Reduction) -> Result<CeOptions<W>, Error> {
    let softcap = frame.attr_f64("softcap")?;
    Ok(CeOptions {
        weight: None,
        ignore_index: frame.attr_i64("ignore_index")?,
        reduction,
        label_smoothing: frame.attr_f64("label_smoothing")?,
        z_loss: frame.attr_f64("z_loss")?,
        softcap: (softcap != 0.0).then_some(softcap),
        temperature: frame.attr_f64("temperature")?,
        token_weight: None,
        stablemax: false,
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

/// One call's inputs: its rows of logits, their targets, the class and token weights.
struct Rows<'a, T> {
    logits: &'a [T],
    rows: usize,
    classes: usize,
    target: Labels<&'a [i64], &'a [T]>,
    weight: Option<&'a [T]>,
    token_weight: Option<&'a [T]>,
}

/// One call's outputs: the losses, the gradient and the statistics where asked for.
struct Outputs<'a, T> {
    loss: &'a mut [T],
    grad: Option<&'a mut [T]>,
    stats: Option<CeStats<'a, T>>,
}

fn run<T: Float>(
    r: Rows<'_, T>,
    opts: &CeOptions<&[T]>,
    stable: bool,
    out: Outputs<'_, T>,
) -> Result<(), Error> {
    let o = CeOptions {
        weight: r.weight,
        token_weight: r.token_weight,
        ..*opts
    };
    if stable {
        return run_stable(r, &o, out);
    }
    let x = match out.grad {
        None => CeLogits::Loss(r.logits),
        Some(g) => CeLogits::Grad(r.logits, g),
    };
    let (dims, go) = ((r.rows, r.classes), GradOutput::Scalar(1.0));
    k::cross_entropy_into(x, dims, r.target, &o, go, out.loss, out.stats)
}

pub(super) fn widen<T: Float>(s: &[T]) -> Vec<f64> {
    s.iter().map(|v| v.to_f64()).collect()
}

/// The StableMax cross-entropy as a softmax one over phi (see the module docs).
fn run_stable<T: Float>(
    r: Rows<'_, T>,
    opts: &CeOptions<&[T]>,
    out: Outputs<'_, T>,
) -> Result<(), Error> {
    opts.check(r.classes)?; // the temperature is applied here, before the kernel sees it
    let (cap, inv_t) = (opts.softcap, 1.0 / opts.temperature);
    let grad = out.grad;
    let mut chain = Vec::with_capacity(if grad.is_some() { r.logits.len() } else { 0 });
    let phi: Vec<f64> = r
        .logits
        .iter()
        .map(|v| {
            let (x, dcap) = match cap {
                Some(s) => {
                    let u = (v.to_f64() * inv_t / s).tanh();
                    (s * u, 1.0 - u * u)
                }
                None => (v.to_f64() * inv_t, 1.0),
            };
            if grad.is_some() {
                chain.push(dcap * inv_t / (1.0 + x.abs()));
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
    let token_weight = r.token_weight.map(widen);
    let o = CeOptions {
        weight: weight.as_deref(),
        token_weight: token_weight.as_deref(),
        softcap: None,
        temperature: 1.0,
        ignore_index: opts.ignore_index,
        reduction: opts.reduction,
        label_smoothing: opts.label_smoothing,
        z_loss: opts.z_loss,
        stablemax: false,
    };
    let loss = out.loss;
    let mut loss64 = vec![0.0; loss.len()];
    let (n, c) = (r.rows, r.classes);
    let mut g64 = vec![0.0; if grad.is_some() { phi.len() } else { 0 }];
    let (mut lse64, mut entropy64) = (vec![0.0; n], vec![0.0; n]);
    let stats = out.stats;
    let mut correct = vec![false; if stats.is_some() { n } else { 0 }];
    let stats64 = stats.is_some().then_some(CeStats {
        lse: &mut lse64,
        entropy: &mut entropy64,
        correct: &mut correct,
    });
    // phi increases with x: its argmax (`correct`) is the logits' own.
    let x = match grad {
        None => CeLogits::Loss(&phi[..]),
        Some(_) => CeLogits::Grad(&phi[..], &mut g64[..]),
    };
    let go = GradOutput::Scalar(1.0);
    k::cross_entropy_into(x, (n, c), target, &o, go, &mut loss64, stats64)?;
    if let Some(g) = grad {
        check_len("grad", g.len(), g64.len())?;
        for ((g, d), ch) in g.iter_mut().zip(&g64).zip(&chain) {
            *g = T::from_f64(d * ch);
        }
    }
    narrow("loss", loss, &loss64)?;
    if let Some(s) = stats {
        narrow("lse", s.lse, &lse64)?;
        narrow("entropy", s.entropy, &entropy64)?;
        check_len("correct", s.correct.len(), correct.len())?;
        s.correct.copy_from_slice(&correct);
    }
    Ok(())
}

/// `from` rounded into `to`, of the same length.
fn narrow<T: Float>(name: &str, to: &mut [T], from: &[f64]) -> Result<(), Error> {
    check_len(name, to.len(), from.len())?;
    for (t, v) in to.iter_mut().zip(from) {
        *t = T::from_f64(*v);
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

/// Results `first`, `first + 1`, `first + 2`: lse, entropy, correct, each `row_dims`, cut per
/// batch element of `groups`.
pub(super) fn stats_parts<'a, T: Float + Element>(
    frame: &Frame<'a>,
    first: usize,
    row_dims: &[i64],
    groups: usize,
) -> Result<Vec<CeStats<'a, T>>, Error> {
    let (lse, entropy, correct) = (
        frame.result(first, "lse")?,
        frame.result(first + 1, "entropy")?,
        frame.result(first + 2, "correct")?,
    );
    for b in [&lse, &entropy, &correct] {
        b.expect_same(row_dims)?;
    }
    let lse = parts_mut("lse", lse.slice_mut::<T>()?, groups)?;
    let entropy = parts_mut("entropy", entropy.slice_mut::<T>()?, groups)?;
    let correct = parts_mut("correct", correct.bools_mut()?, groups)?;
    Ok(lse
        .into_iter()
        .zip(entropy)
        .zip(correct)
        .map(|((lse, entropy), correct)| CeStats {
            lse,
            entropy,
            correct,
        })
        .collect())
}

fn cross_entropy_typed<T: Float + Element>(
    frame: &Frame,
    with_grad: bool,
    with_stats: bool,
) -> Result<(), Error> {
    let logits = frame.operand(0, "logits")?;
    let target = frame.operand(1, "target")?;
    let weight = frame.operand(2, "weight")?;
    let token_weight = frame.operand(3, "token_weight")?;
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
    let tw = token_weight.slice_opt::<T>()?;
    if tw.is_some() {
        token_weight.expect_same(row_dims)?;
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
    let mut stats = if with_stats {
        stats_parts::<T>(frame, 1 + usize::from(with_grad), row_dims, groups)?
    } else {
        Vec::new()
    }
    .into_iter();
    let opts = ce_options::<&[T]>(frame, Reduction::None)?;
    let stable = frame.attr_bool("stablemax")?;
    let x = PerBatch::parts("logits", logits.slice::<T>()?, groups)?;
    let tws = tw
        .map(|t| PerBatch::parts("token_weight", t, groups))
        .transpose()?;
    let targets = match ids.as_deref() {
        Some(t) => Labels::Classes(PerBatch::parts("target", t, groups)?),
        None => {
            target.expect_same(logits.dims())?;
            Labels::Probs(PerBatch::parts("target", target.slice::<T>()?, groups)?)
        }
    };
    let losses = parts_mut("loss", loss.slice_mut::<T>()?, groups)?;
    let grads = opt_parts_mut("grad", grad, groups)?;
    for (b, (loss, grad)) in losses.into_iter().zip(grads).enumerate() {
        let rows = Rows {
            logits: x.at(b),
            rows: loss.len(),
            classes,
            target: match &targets {
                Labels::Classes(t) => Labels::Classes(t.at(b)),
                Labels::Probs(p) => Labels::Probs(p.at(b)),
            },
            weight: w.map(|w| w.at(b)),
            token_weight: tws.map(|t| t.at(b)),
        };
        let out = Outputs {
            loss,
            grad,
            stats: stats.next(),
        };
        run(rows, &opts, stable, out)?;
    }
    Ok(())
}

fn cross_entropy(frame: &Frame) -> Result<(), Error> {
    let with_grad = frame.attr_bool("with_grad")?;
    let with_stats = frame.attr_bool("with_stats")?;
    let results = 1 + usize::from(with_grad) + 3 * usize::from(with_stats);
    frame.expect_arity(4, results)?;
    let logits = frame.operand(0, "logits")?;
    by_float!(logits, cross_entropy_typed(frame, with_grad, with_stats))
}

ffi_handler!(cross_entropy_handler, cross_entropy);

/// This family's CPU targets.
pub(crate) const TARGETS: &[Target] = &[("normax_cross_entropy", cross_entropy_handler)];
