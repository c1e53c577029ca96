//! CPU handlers of the log-probabilities (`normax_core::logprobs`), in the operand order of the
//! JAX adapter (normax/jax/_logprobs.py).
//!
//! - `normax_logprobs`: logits (N, C), target (N,) int32/int64 -> logprob (N,), lse (N,) and,
//!   with the attribute `with_entropy`, entropy (N,). lse is each row's log-sum-exp of
//!   logits / T, which the adapter's tangent rule needs: z_y - logprob where the logprob is
//!   finite, summed directly (float64) in the rare rows where it is not, 0 in ignored rows.
//!   Leading batch dims are more rows.
//! - `normax_linear_logprobs`: hidden (N, H), weight (V, H), bias (V,) or empty, target (N,) ->
//!   logprob (N,) and with `with_entropy` entropy (N,).
//! - `normax_linear_logprobs_backward`: the same operands, then g_logp (N,) and g_H (N,), each
//!   empty for zeros (its terms skipped) -> dhidden (N, H), dweight (V, H), dbias (V,) or empty.
//!
//! Attributes: temperature, ignore_index; the linear ones chunk_size (0: the kernel's choice).
//! The linear targets run each batch element (leading dims) as its own call.

use super::batch::{opt_parts_mut, parts_mut, Batch, PerBatch};
use super::cross_entropy::class_ids;
use super::frame::{by_float, ffi_handler, Element, Frame};
use super::vocab_parallel::chunk_size;
use super::Target;
use normax_core::cross_entropy::LinearGrads;
use normax_core::logprobs::{self as k, LogprobGrads, LogprobOptions};
use normax_core::{Error, Float};

fn options(frame: &Frame) -> Result<LogprobOptions, Error> {
    Ok(LogprobOptions {
        ignore_index: frame.attr_i64("ignore_index")?,
        temperature: frame.attr_f64("temperature")?,
    })
}

/// Each row's log-sum-exp of x / T (see the module docs), rows x classes.
fn row_lse<T: Float>(
    x: &[T],
    classes: usize,
    target: &[i64],
    opts: &LogprobOptions,
    logprob: &[T],
    lse: &mut [T],
) {
    let inv_t = 1.0 / opts.temperature;
    for (r, ((out, &y), lp)) in lse.iter_mut().zip(target).zip(logprob).enumerate() {
        let row = &x[r * classes..(r + 1) * classes];
        let value = if y == opts.ignore_index {
            0.0
        } else if lp.to_f64().is_finite() {
            row[y as usize].to_f64() * inv_t - lp.to_f64()
        } else {
            let top = row
                .iter()
                .fold(f64::NEG_INFINITY, |m, v| m.max(v.to_f64() * inv_t));
            // NaN for a row with NaN, +inf or only -inf, as its logprob.
            let sum: f64 = row.iter().map(|v| (v.to_f64() * inv_t - top).exp()).sum();
            top + sum.ln()
        };
        *out = T::from_f64(value);
    }
}

fn logprobs_typed<T: Float + Element>(frame: &Frame, with_entropy: bool) -> Result<(), Error> {
    let logits = frame.operand(0, "logits")?;
    let target = frame.operand(1, "target")?;
    let classes = logits.dim_from_end(0)?;
    let row_dims = &logits.dims()[..logits.rank() - 1];
    let ids = class_ids(&target, row_dims)?;
    let opts = options(frame)?;
    let x = logits.slice::<T>()?;
    let (logprob, lse) = (frame.result(0, "logprob")?, frame.result(1, "lse")?);
    logprob.expect_same(row_dims)?;
    lse.expect_same(row_dims)?;
    let entropy = if with_entropy {
        let e = frame.result(2, "entropy")?;
        e.expect_same(row_dims)?;
        Some(e.slice_mut::<T>()?)
    } else {
        None
    };
    let (logprob, lse) = (logprob.slice_mut::<T>()?, lse.slice_mut::<T>()?);
    k::logprobs(x, ids.len(), classes, &ids, &opts, logprob, entropy)?;
    row_lse(x, classes, &ids, &opts, logprob, lse);
    Ok(())
}

fn logprobs(frame: &Frame) -> Result<(), Error> {
    let with_entropy = frame.attr_bool("with_entropy")?;
    frame.expect_arity(2, 2 + usize::from(with_entropy))?;
    let logits = frame.operand(0, "logits")?;
    by_float!(logits, logprobs_typed(frame, with_entropy))
}

/// The linear operands per batch element: hidden, weight, bias, class ids.
struct LinearInputs<'a, T> {
    batch: Batch<'a>,
    hidden: PerBatch<'a, T>,
    weight: PerBatch<'a, T>,
    bias: Option<PerBatch<'a, T>>,
    dims: (usize, usize, usize),
}

fn linear_inputs<'a, T: Element>(frame: &Frame<'a>) -> Result<LinearInputs<'a, T>, Error> {
    let hidden = frame.operand(0, "hidden")?;
    let weight = frame.operand(1, "linear_weight")?;
    let bias = frame.operand(2, "linear_bias")?;
    let batch = Batch::of(&hidden, 2)?;
    Ok(LinearInputs {
        dims: (
            hidden.dim_from_end(1)?,
            hidden.dim_from_end(0)?,
            weight.dim_from_end(1)?,
        ),
        hidden: hidden.per_batch(&batch, 2)?,
        weight: weight.per_batch(&batch, 2)?,
        bias: bias.per_batch_opt(&batch, 1)?,
        batch,
    })
}

/// The class ids per batch element, shared where the target has no batch dims.
fn batched_ids<'a: 'b, 'b>(
    frame: &Frame<'a>,
    batch: &Batch<'_>,
    ids: &'b mut std::borrow::Cow<'a, [i64]>,
) -> Result<PerBatch<'b, i64>, Error> {
    let target = frame.operand(3, "target")?;
    let batched = batch.is_batched("target", target.leading(1)?)?;
    *ids = class_ids(&target, target.dims())?;
    let ids: &'b [i64] = ids;
    if batched {
        PerBatch::parts("target", ids, batch.count)
    } else {
        Ok(PerBatch::shared(ids))
    }
}

fn linear_typed<T: Float + Element>(frame: &Frame, with_entropy: bool) -> Result<(), Error> {
    let lin = linear_inputs::<T>(frame)?;
    let mut ids = Default::default();
    let ts = batched_ids(frame, &lin.batch, &mut ids)?;
    let (opts, chunk) = (options(frame)?, chunk_size(frame)?);
    let count = lin.batch.count;
    let logprob = frame.result(0, "logprob")?;
    let logprobs = parts_mut("logprob", logprob.slice_mut::<T>()?, count)?;
    let entropy = match with_entropy {
        true => Some(frame.result(1, "entropy")?.slice_mut::<T>()?),
        false => None,
    };
    let entropies = opt_parts_mut("entropy", entropy, count)?;
    for (g, (lp, e)) in logprobs.into_iter().zip(entropies).enumerate() {
        let (h, w, b) = (
            lin.hidden.at(g),
            lin.weight.at(g),
            lin.bias.map(|b| b.at(g)),
        );
        k::linear_logprobs(h, w, b, ts.at(g), lin.dims, &opts, chunk, lp, e)?;
    }
    Ok(())
}

fn linear_logprobs(frame: &Frame) -> Result<(), Error> {
    let with_entropy = frame.attr_bool("with_entropy")?;
    frame.expect_arity(4, 1 + usize::from(with_entropy))?;
    let hidden = frame.operand(0, "hidden")?;
    by_float!(hidden, linear_typed(frame, with_entropy))
}

fn linear_backward_typed<T: Float + Element>(frame: &Frame) -> Result<(), Error> {
    let lin = linear_inputs::<T>(frame)?;
    let mut ids = Default::default();
    let ts = batched_ids(frame, &lin.batch, &mut ids)?;
    let (opts, chunk) = (options(frame)?, chunk_size(frame)?);
    let batch = &lin.batch;
    let g_logp = frame
        .operand(4, "grad_logprob")?
        .per_batch_opt::<T>(batch, 1)?;
    let g_entropy = frame
        .operand(5, "grad_entropy")?
        .per_batch_opt::<T>(batch, 1)?;
    let (dh, dw, db) = (
        frame.result(0, "dhidden")?,
        frame.result(1, "dlinear_weight")?,
        frame.result(2, "dlinear_bias")?,
    );
    if lin.bias.is_some() != (db.len() > 0) {
        return Err(Error::Value(
            "dlinear_bias: give it exactly when linear_bias is given".into(),
        ));
    }
    let dhs = parts_mut("dhidden", dh.slice_mut::<T>()?, batch.count)?;
    let dws = parts_mut("dlinear_weight", dw.slice_mut::<T>()?, batch.count)?;
    let db = lin.bias.is_some().then_some(db.slice_mut::<T>()?);
    let dbs = opt_parts_mut("dlinear_bias", db, batch.count)?;
    for (g, ((dhidden, dweight), dbias)) in dhs.into_iter().zip(dws).zip(dbs).enumerate() {
        let grads = LogprobGrads {
            logprob: g_logp.map(|p| p.at(g)),
            entropy: g_entropy.map(|p| p.at(g)),
        };
        let out = LinearGrads {
            dhidden,
            dweight,
            dbias,
        };
        let (h, w, b) = (
            lin.hidden.at(g),
            lin.weight.at(g),
            lin.bias.map(|b| b.at(g)),
        );
        k::linear_logprobs_backward(h, w, b, ts.at(g), lin.dims, &opts, chunk, grads, out)?;
    }
    Ok(())
}

fn linear_logprobs_backward(frame: &Frame) -> Result<(), Error> {
    frame.expect_arity(6, 3)?;
    let hidden = frame.operand(0, "hidden")?;
    by_float!(hidden, linear_backward_typed(frame))
}

ffi_handler!(logprobs_handler, logprobs);
ffi_handler!(linear_logprobs_handler, linear_logprobs);
ffi_handler!(linear_logprobs_backward_handler, linear_logprobs_backward);

/// This family's CPU targets.
pub(crate) const TARGETS: &[Target] = &[
    ("normax_logprobs", logprobs_handler),
    ("normax_linear_logprobs", linear_logprobs_handler),
    (
        "normax_linear_logprobs_backward",
        linear_logprobs_backward_handler,
    ),
];
