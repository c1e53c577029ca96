//! CPU handler of `normax_linear_cross_entropy`: the cross-entropy of the logits
//! `hidden @ weight.T + bias`, computed block by block and never all held
//! (`normax_core::cross_entropy::linear_cross_entropy`).
//!
//! Operands (absent = empty): hidden (N, H), weight (V, H), bias (V,), target (N,) int32/int64,
//! class_weight (V,) (the kernel refuses class weights; the operand keeps the contract's
//! layout), and optionally a sixth, grad_output (() or (N,) for reduction "none"; absent: 1),
//! which scales the gradients. Attributes: the CE attributes, reduction, chunk_size (0: the
//! kernel's choice), with_grad. Results: loss ((N,) for "none", else ()), and with_grad
//! dhidden (N, H), dweight (V, H), dbias (V,) or empty. Leading batch dims: one call per batch
//! element.

use super::batch::{opt_parts_mut, parts_mut, Batch, PerBatch};
use super::cross_entropy::{ce_options, class_ids};
use super::frame::{by_float, ffi_handler, Element, Frame};
use super::vocab_parallel::{chunk_size, grad_output_of, per_batch_grad_output};
use super::Target;
use normax_core::cross_entropy::{self as k, LinearGrads};
use normax_core::spec::{GradOutput, Reduction};
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
    let go = match frame.operand_count() {
        6 => Some(frame.operand(5, "grad_output")?),
        _ => None,
    };
    let go = match go.filter(|g| g.len() > 0) {
        Some(g) => Some(per_batch_grad_output::<T>(&g, &batch)?),
        None => None,
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
        let o = normax_core::spec::CeOptions {
            weight: cw.map(|w| w.at(g)),
            ..opts
        };
        let grad_output = go.map_or(GradOutput::Scalar(1.0), |p| grad_output_of(p.at(g)));
        let grads = grads.next().map(|((dhidden, dweight), dbias)| {
            let g = LinearGrads {
                dhidden,
                dweight,
                dbias,
            };
            (grad_output, g)
        });
        let (hs, ws, bs) = (hs.at(g), ws.at(g), bs.map(|b| b.at(g)));
        k::linear_cross_entropy(hs, ws, bs, ts.at(g), (n, h, v), &o, chunk, grads, l)?;
    }
    Ok(())
}

fn linear_cross_entropy(frame: &Frame) -> Result<(), Error> {
    let with_grad = frame.attr_bool("with_grad")?;
    let results = if with_grad { 4 } else { 1 };
    if frame.operand_count() != 6 {
        frame.expect_arity(5, results)?;
    } else {
        frame.expect_arity(6, results)?;
    }
    let hidden = frame.operand(0, "hidden")?;
    by_float!(hidden, linear_typed(frame, with_grad))
}

ffi_handler!(linear_cross_entropy_handler, linear_cross_entropy);

/// This family's CPU targets.
pub(crate) const TARGETS: &[Target] =
    &[("normax_linear_cross_entropy", linear_cross_entropy_handler)];
