//! CPU handlers of the normalizations: `normax_norm_forward` / `_backward` (RMSNorm, LayerNorm,
//! CRMSNorm over the last axis; attributes kind and eps) and `normax_power_norm_forward` /
//! `_backward` (PowerNorm's passes, as `_core.power_norm_forward` / `_backward`; attributes
//! groups and eps, the forward's stats; the channels are x's last dim).
//!
//! The statistics (mean, rstd, PowerNorm's sums) are computed in float64 by the kernels and
//! returned in the input dtype, since XLA without x64 has no float64 arrays.

use super::batch::{opt_parts_mut, parts_mut, Batch, PerBatch};
use super::frame::{by_float, ffi_handler, Element, Frame};
use super::Target;
use normax_core::norms::{self as k, Params, PowerGrad, PowerLayout, PowerOutput};
use normax_core::spec::{check_eps, NormKind};
use normax_core::{Error, Float};

fn narrow<T: Float>(from: &[f64], to: &mut [T]) {
    for (t, f) in to.iter_mut().zip(from) {
        *t = T::from_f64(*f);
    }
}

fn widen<T: Float>(s: &[T]) -> Vec<f64> {
    s.iter().map(|v| v.to_f64()).collect()
}

/// The norm's kind and eps attributes (the CPU and CUDA targets').
pub(super) fn norm_attrs(frame: &Frame) -> Result<(NormKind, f64), Error> {
    let eps = frame.attr_f64("eps")?;
    check_eps(eps)?;
    Ok((NormKind::parse(frame.attr_str("kind")?)?, eps))
}

/// The number of separate calls: one per batch element where a parameter (operand or result)
/// is per batch element, else one for all the rows.
fn groups(batch: &Batch<'_>, per_element: &[bool]) -> usize {
    if per_element.iter().any(|&p| p) {
        batch.count
    } else {
        1
    }
}

fn is_per_element<T>(p: &Option<PerBatch<'_, T>>) -> bool {
    p.as_ref().is_some_and(|p| !p.is_shared())
}

fn forward_typed<T: Float + Element>(frame: &Frame) -> Result<(), Error> {
    let x = frame.operand(0, "x")?;
    let (weight, bias) = (frame.operand(1, "weight")?, frame.operand(2, "bias")?);
    let (norm, eps) = norm_attrs(frame)?;
    let len = x.dim_from_end(0)?;
    let batch = Batch::of(&x, 2)?;
    let w = weight.per_batch_opt::<T>(&batch, 1)?;
    let b = bias.per_batch_opt::<T>(&batch, 1)?;
    let y = frame.result(0, "y")?;
    y.expect_same(x.dims())?;
    let row_dims = &x.dims()[..x.rank() - 1];
    let (mean, rstd) = (frame.result(1, "mean")?, frame.result(2, "rstd")?);
    mean.expect_same(row_dims)?;
    rstd.expect_same(row_dims)?;
    let n = groups(&batch, &[is_per_element(&w), is_per_element(&b)]);
    let xs = PerBatch::parts("x", x.slice::<T>()?, n)?;
    let ys = parts_mut("y", y.slice_mut::<T>()?, n)?;
    let (mean, rstd) = (mean.slice_mut::<T>()?, rstd.slice_mut::<T>()?);
    let (mut m64, mut r64) = (vec![0.0; mean.len()], vec![0.0; rstd.len()]);
    let ms = parts_mut("mean", &mut m64, n)?;
    let rs = parts_mut("rstd", &mut r64, n)?;
    for (g, ((y, m), r)) in ys.into_iter().zip(ms).zip(rs).enumerate() {
        let p = Params {
            norm,
            len,
            eps,
            weight: w.map(|w| w.at(g)),
            bias: b.map(|b| b.at(g)),
        };
        k::forward(&p, xs.at(g), y, Some(m), Some(r))?;
    }
    narrow(&m64, mean);
    narrow(&r64, rstd);
    Ok(())
}

fn norm_forward(frame: &Frame) -> Result<(), Error> {
    frame.expect_arity(3, 3)?;
    let x = frame.operand(0, "x")?;
    by_float!(x, forward_typed(frame))
}

fn backward_typed<T: Float + Element>(frame: &Frame) -> Result<(), Error> {
    let (dy, x) = (frame.operand(0, "dy")?, frame.operand(1, "x")?);
    // Operand 3, the bias, does not enter the gradients; it keeps the forward's operand order.
    let weight = frame.operand(2, "weight")?;
    let (mean, rstd) = (frame.operand(4, "mean")?, frame.operand(5, "rstd")?);
    let (norm, eps) = norm_attrs(frame)?;
    let len = x.dim_from_end(0)?;
    dy.expect_same(x.dims())?;
    let batch = Batch::of(&x, 2)?;
    let row_dims = &x.dims()[..x.rank() - 1];
    let w = weight.per_batch_opt::<T>(&batch, 1)?;
    // Saved statistics: LayerNorm both, the RMS norms rstd only; empty: recomputed.
    let saved = |s: &super::frame::Buffer<'_>, used: bool| -> Result<Option<Vec<f64>>, Error> {
        if !used || s.len() == 0 {
            return Ok(None);
        }
        s.expect_same(row_dims)?;
        Ok(Some(widen(s.slice::<T>()?)))
    };
    let rstd64 = saved(&rstd, true)?;
    let mean64 = saved(&mean, norm == NormKind::Layer && rstd64.is_some())?;
    let dx = frame.result(0, "dx")?;
    dx.expect_same(x.dims())?;
    let (dweight, dbias) = (frame.result(1, "dweight")?, frame.result(2, "dbias")?);
    let dw = (dweight.len() > 0).then_some(dweight.slice_mut::<T>()?);
    let db = (dbias.len() > 0).then_some(dbias.slice_mut::<T>()?);
    let per_element = [
        is_per_element(&w),
        dw.as_ref().is_some_and(|d| d.len() != len),
        db.as_ref().is_some_and(|d| d.len() != len),
    ];
    let n = groups(&batch, &per_element);
    let (dys, xs) = (
        PerBatch::parts("dy", dy.slice::<T>()?, n)?,
        PerBatch::parts("x", x.slice::<T>()?, n)?,
    );
    let ms = mean64
        .as_deref()
        .map(|m| PerBatch::parts("mean", m, n))
        .transpose()?;
    let rs = rstd64
        .as_deref()
        .map(|r| PerBatch::parts("rstd", r, n))
        .transpose()?;
    let dxs = parts_mut("dx", dx.slice_mut::<T>()?, n)?;
    let dws = opt_parts_mut("dweight", dw, n)?;
    let dbs = opt_parts_mut("dbias", db, n)?;
    for (g, ((dx, dw), db)) in dxs.into_iter().zip(dws).zip(dbs).enumerate() {
        let p = Params {
            norm,
            len,
            eps,
            weight: w.map(|w| w.at(g)),
            bias: None,
        };
        let (m, r) = (ms.map(|m| m.at(g)), rs.map(|r| r.at(g)));
        k::backward(&p, dys.at(g), xs.at(g), m, r, dx, dw, db)?;
    }
    Ok(())
}

fn norm_backward(frame: &Frame) -> Result<(), Error> {
    frame.expect_arity(6, 3)?;
    let x = frame.operand(1, "x")?;
    by_float!(x, backward_typed(frame))
}

/// PowerNorm's layout: the tokens and channels of x, the groups and eps attributes.
fn power_layout(
    frame: &Frame,
    tokens: usize,
    channels: usize,
) -> Result<(PowerLayout, f64), Error> {
    let l = PowerLayout {
        tokens,
        channels,
        groups: frame.attr_usize("groups")?,
    };
    Ok((l, frame.attr_f64("eps")?))
}

/// Operands: x (tokens, C), pad_mask (tokens,) bool or empty, scale (C,) or empty, shift (C,)
/// or empty. Attribute stats: whether to sum the batch statistics, over the tokens the pad mask
/// keeps (without stats the mask is not read: every token is normalized). Results: sumsq (C,)
/// with stats, else empty; y like x or empty (the normalization, which needs scale and shift).
/// Leading batch dims: one call per element.
fn power_forward_typed<T: Float + Element>(frame: &Frame) -> Result<(), Error> {
    let x = frame.operand(0, "x")?;
    let pad = frame.operand(1, "pad_mask")?;
    let (scale, shift) = (frame.operand(2, "scale")?, frame.operand(3, "shift")?);
    let (sumsq, y) = (frame.result(0, "sumsq")?, frame.result(1, "y")?);
    let batch = Batch::of(&x, 2)?;
    let (tokens, c) = (x.dim_from_end(1)?, x.dim_from_end(0)?);
    let (l, eps) = power_layout(frame, tokens, c)?;
    let stats = frame.attr_bool("stats")?;
    if stats != (sumsq.len() > 0) {
        return Err(Error::Value(format!(
            "sumsq: expected {} values (stats = {stats}), got {}",
            if stats { c * batch.count } else { 0 },
            sumsq.len()
        )));
    }
    let n = batch.count;
    let xs = PerBatch::parts("x", x.slice::<T>()?, n)?;
    let pads = if stats { pad.bools()? } else { Vec::new() };
    let pads = match pads.is_empty() {
        true => None,
        false if batch.is_batched("pad_mask", pad.leading(1)?)? => {
            Some(PerBatch::parts("pad_mask", &pads[..], n)?)
        }
        false => Some(PerBatch::shared(&pads[..])),
    };
    let want_y = y.len() > 0;
    if want_y {
        y.expect_same(x.dims())?;
    }
    let (sc, sh) = (
        scale.per_batch_opt::<T>(&batch, 1)?,
        shift.per_batch_opt::<T>(&batch, 1)?,
    );
    let sumsq = (sumsq.len() > 0).then_some(sumsq.slice_mut::<T>()?);
    let mut s64 = vec![0.0; sumsq.as_ref().map_or(0, |s| s.len())];
    let ss = opt_parts_mut("sumsq", sumsq.is_some().then_some(&mut s64[..]), n)?;
    let ys = opt_parts_mut("y", want_y.then_some(y.slice_mut::<T>()?), n)?;
    for (g, (s, y)) in ss.into_iter().zip(ys).enumerate() {
        let out = match (y, sc, sh) {
            (Some(y), Some(sc), Some(sh)) => Some(PowerOutput {
                scale: sc.at(g),
                shift: sh.at(g),
                y,
            }),
            (Some(_), ..) => {
                return Err(Error::Value("y: needs both scale and shift".into()));
            }
            (None, ..) => None,
        };
        k::power_norm_forward(xs.at(g), l, eps, pads.map(|p| p.at(g)), s, out)?;
    }
    if let Some(s) = sumsq {
        narrow(&s64, s);
    }
    Ok(())
}

fn power_norm_forward(frame: &Frame) -> Result<(), Error> {
    frame.expect_arity(4, 2)?;
    let x = frame.operand(0, "x")?;
    by_float!(x, power_forward_typed(frame))
}

/// Operands: dy, x (tokens, C), weight (C,) or empty, zscale, ema, dscale (C,). Results: dx
/// like x, sums (3C,): per channel the sums of g_hat * z, dy * z and dy.
fn power_backward_typed<T: Float + Element>(frame: &Frame) -> Result<(), Error> {
    let (dy, x) = (frame.operand(0, "dy")?, frame.operand(1, "x")?);
    let weight = frame.operand(2, "weight")?;
    let zscale = frame.operand(3, "zscale")?;
    let (ema, dscale) = (frame.operand(4, "ema")?, frame.operand(5, "dscale")?);
    let (dx, sums) = (frame.result(0, "dx")?, frame.result(1, "sums")?);
    dy.expect_same(x.dims())?;
    dx.expect_same(x.dims())?;
    let batch = Batch::of(&x, 2)?;
    let (tokens, c) = (x.dim_from_end(1)?, x.dim_from_end(0)?);
    let (l, eps) = power_layout(frame, tokens, c)?;
    let n = batch.count;
    let (dys, xs) = (
        PerBatch::parts("dy", dy.slice::<T>()?, n)?,
        PerBatch::parts("x", x.slice::<T>()?, n)?,
    );
    let w = weight.per_batch_opt::<T>(&batch, 1)?;
    let z = zscale.per_batch::<T>(&batch, 1)?;
    let e = ema.per_batch::<T>(&batch, 1)?;
    let d = dscale.per_batch::<T>(&batch, 1)?;
    let dxs = parts_mut("dx", dx.slice_mut::<T>()?, n)?;
    let sums = parts_mut("sums", sums.slice_mut::<T>()?, n)?;
    if let Some(out) = sums.first() {
        if out.len() != 3 * c {
            let got = out.len();
            return Err(Error::Value(format!(
                "sums: expected {} values (3 * channels), got {got}",
                3 * c
            )));
        }
    }
    for (g, (dx, out)) in dxs.into_iter().zip(sums).enumerate() {
        let grad = PowerGrad {
            weight: w.map(|w| w.at(g)),
            zscale: z.at(g),
            ema: e.at(g),
            dscale: d.at(g),
        };
        let s = k::power_norm_backward(dys.at(g), xs.at(g), l, eps, &grad, dx)?;
        narrow(&s, out);
    }
    Ok(())
}

fn power_norm_backward(frame: &Frame) -> Result<(), Error> {
    frame.expect_arity(6, 2)?;
    let x = frame.operand(1, "x")?;
    by_float!(x, power_backward_typed(frame))
}

ffi_handler!(norm_forward_handler, norm_forward);
ffi_handler!(norm_backward_handler, norm_backward);
ffi_handler!(power_norm_forward_handler, power_norm_forward);
ffi_handler!(power_norm_backward_handler, power_norm_backward);

/// This family's CPU targets.
pub(crate) const TARGETS: &[Target] = &[
    ("normax_norm_forward", norm_forward_handler),
    ("normax_norm_backward", norm_backward_handler),
    ("normax_power_norm_forward", power_norm_forward_handler),
    ("normax_power_norm_backward", power_norm_backward_handler),
];
