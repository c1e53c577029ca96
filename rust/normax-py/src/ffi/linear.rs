//! CPU handler of `normax_linear_cross_entropy`: the cross-entropy of the logits
//! `hidden @ weight.T + bias`, computed block by block and never all held
//! (`normax_core::cross_entropy::linear_cross_entropy`).
//!
//! Operands (absent = empty): hidden (N, H), weight (V, H), bias (V,), target (N,) int32/int64,
//! class_weight (V,). Attributes: the CE attributes, reduction, chunk_size (0: the kernel's
//! choice), with_grad. Results: loss ((N,) for "none", else ()), and with_grad dhidden (N, H),
//! dweight (V, H), dbias (V,) or empty: the gradients of the loss (of the sum of the losses
//! for "none"). Leading batch dims: one call per batch element.
//!
//! The linear kernel takes no class weights; with them the handler runs the vocabulary-parallel
//! kernels on the whole vocabulary as one shard (statistics, combine, and for the gradients a
//! second pass over the logits blocks from each row's log-sum-exp).

use super::batch::{opt_parts_mut, parts_mut, Batch, PerBatch};
use super::cross_entropy::{ce_options, class_ids};
use super::frame::{by_float, ffi_handler, Element, Frame};
use super::vocab_parallel::chunk_size;
use super::Target;
use normax_core::cross_entropy::{self as k, LinearGrads, Shard, ShardLinear};
use normax_core::spec::{CeOptions, GradOutput, Reduction};
use normax_core::{Error, Float};

fn linear_typed<T: Float + Element>(frame: &Frame, with_grad: bool) -> Result<(), Error> {
    let hidden = frame.operand(0, "hidden")?;
    let weight = frame.operand(1, "linear_weight")?;
    let bias = frame.operand(2, "linear_bias")?;
    let target = frame.operand(3, "target")?;
    let class_weight = frame.operand(4, "weight")?;
    let batch = Batch::of(&hidden, 2)?;
    let (n, h, v) = (
        hidden.dim_from_end(1)?,
        hidden.dim_from_end(0)?,
        weight.dim_from_end(1)?,
    );
    let hs = hidden.per_batch::<T>(&batch, 2)?;
    let ws = weight.per_batch::<T>(&batch, 2)?;
    let bs = bias.per_batch_opt::<T>(&batch, 1)?;
    let cw = class_weight.per_batch_opt::<T>(&batch, 1)?;
    let ids = class_ids(&target, target.dims())?;
    let ts = if batch.is_batched("target", target.leading(1)?)? {
        PerBatch::parts("target", &ids[..], batch.count)?
    } else {
        PerBatch::shared(&ids[..])
    };
    let reduction = Reduction::parse(frame.attr_str("reduction")?)?;
    let opts = ce_options::<&[T]>(frame, reduction)?;
    let chunk = chunk_size(frame)?;
    let loss = frame.result(0, "loss")?;
    let losses = parts_mut("loss", loss.slice_mut::<T>()?, batch.count)?;
    let (mut dhs, mut dws, mut dbs) = (Vec::new(), Vec::new(), Vec::new());
    if with_grad {
        let dh = frame.result(1, "dhidden")?;
        let dw = frame.result(2, "dlinear_weight")?;
        let db = frame.result(3, "dlinear_bias")?;
        dh.expect_same(hidden.dims())?;
        if bs.is_some() != (db.len() > 0) {
            return Err(Error::Value(
                "dlinear_bias: give it exactly when linear_bias is given".into(),
            ));
        }
        dhs = parts_mut("dhidden", dh.slice_mut::<T>()?, batch.count)?;
        dws = parts_mut("dlinear_weight", dw.slice_mut::<T>()?, batch.count)?;
        let db = bs.is_some().then_some(db.slice_mut::<T>()?);
        dbs = opt_parts_mut("dlinear_bias", db, batch.count)?;
    }
    let mut grads = dhs.into_iter().zip(dws).zip(dbs);
    for (g, l) in losses.into_iter().enumerate() {
        let o = CeOptions {
            weight: cw.map(|w| w.at(g)),
            ..opts
        };
        let grads = grads.next().map(|((dhidden, dweight), dbias)| LinearGrads {
            dhidden,
            dweight,
            dbias,
        });
        let (hs, ws, bs, t) = (hs.at(g), ws.at(g), bs.map(|b| b.at(g)), ts.at(g));
        if o.weight.is_some() {
            let lin = ShardLinear {
                hidden: hs,
                weight: ws,
                bias: bs,
                h,
            };
            weighted(lin, (n, v), t, &o, chunk, grads, l)?;
        } else {
            let grads = grads.map(|g| (GradOutput::Scalar(1.0), g));
            k::linear_cross_entropy(hs, ws, bs, t, (n, h, v), &o, chunk, grads, l, None)?;
        }
    }
    Ok(())
}

/// The loss (and gradients) with class weights: the vocabulary as one shard of the
/// vocabulary-parallel kernels.
fn weighted<T: Float>(
    lin: ShardLinear<T>,
    (rows, classes): (usize, usize),
    target: &[i64],
    opts: &CeOptions<&[T]>,
    chunk: Option<usize>,
    grads: Option<LinearGrads<T>>,
    loss: &mut [T],
) -> Result<(), Error> {
    let shard = Shard {
        start: 0,
        len: classes,
    };
    let fields = k::vocab_parallel_fields(opts.label_smoothing);
    let mut packed = vec![T::ZERO; rows * fields];
    // The statistics sum the shard's terms; z-loss and the reduction apply in the combine.
    let stats = CeOptions {
        z_loss: 0.0,
        reduction: Reduction::Sum,
        ..*opts
    };
    k::vocab_parallel_linear_stats(lin, rows, shard, target, &stats, chunk, &mut packed)?;
    let mut lse = vec![0.0; 2 * rows];
    let shards = [shard];
    let stride = rows * fields;
    let denom =
        k::vocab_parallel_combine(&packed, stride, &shards, rows, target, opts, loss, &mut lse)?;
    if let Some(g) = grads {
        let go = GradOutput::Scalar(1.0);
        k::vocab_parallel_linear_backward(
            lin, rows, shard, classes, target, opts, chunk, &lse, denom, go, g.dhidden, g.dweight,
            g.dbias,
        )?;
    }
    Ok(())
}

fn linear_cross_entropy(frame: &Frame) -> Result<(), Error> {
    let with_grad = frame.attr_bool("with_grad")?;
    frame.expect_arity(5, if with_grad { 4 } else { 1 })?;
    let hidden = frame.operand(0, "hidden")?;
    by_float!(hidden, linear_typed(frame, with_grad))
}

ffi_handler!(linear_cross_entropy_handler, linear_cross_entropy);

/// This family's CPU targets.
pub(crate) const TARGETS: &[Target] =
    &[("normax_linear_cross_entropy", linear_cross_entropy_handler)];
