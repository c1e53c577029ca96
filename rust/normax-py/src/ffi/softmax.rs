//! CPU handlers of the softmax family: softmax, log_softmax, stablemax, log_stablemax (x of
//! base shape (outer, L, inner) into y like x) and logsumexp (a, b or empty -> lse, sign of
//! shape (outer, inner)). Leading batch dims are more outer rows.

use super::frame::{by_float, ffi_handler, unsupported_dtype, Buffer, DType, Element, Frame};
use super::Target;
use normax_core::{softmax as k, stablemax as s, Error, Float, Layout};

/// The (outer, len, inner) layout of `x`, base shape (outer, L, inner) with any leading dims
/// folded into outer.
fn layout(x: &Buffer<'_>) -> Result<Layout, Error> {
    let (inner, len) = (x.dim_from_end(0)?, x.dim_from_end(1)?);
    let outer = x.leading(2)?.iter().map(|&d| d as usize).product();
    Ok(Layout { outer, len, inner })
}

type MapFn<T> = fn(&[T], &mut [T], Layout) -> Result<(), Error>;

fn map_typed<T: Float + Element>(frame: &Frame, f: MapFn<T>) -> Result<(), Error> {
    let x = frame.operand(0, "x")?;
    let y = frame.result(0, "y")?;
    y.expect_same(x.dims())?;
    let l = layout(&x)?;
    f(x.slice::<T>()?, y.slice_mut::<T>()?, l)
}

fn map(frame: &Frame, f32_op: MapFn<f32>, f64_op: MapFn<f64>) -> Result<(), Error> {
    frame.expect_arity(1, 1)?;
    let x = frame.operand(0, "x")?;
    match x.dtype() {
        DType::F32 => map_typed(frame, f32_op),
        DType::F64 => map_typed(frame, f64_op),
        d => Err(unsupported_dtype(x.name(), d)),
    }
}

fn softmax(frame: &Frame) -> Result<(), Error> {
    map(frame, k::softmax, k::softmax)
}

fn log_softmax(frame: &Frame) -> Result<(), Error> {
    map(frame, k::log_softmax, k::log_softmax)
}

fn stablemax(frame: &Frame) -> Result<(), Error> {
    map(frame, s::stablemax, s::stablemax)
}

fn log_stablemax(frame: &Frame) -> Result<(), Error> {
    map(frame, s::log_stablemax, s::log_stablemax)
}

fn logsumexp_typed<T: Float + Element>(frame: &Frame) -> Result<(), Error> {
    let a = frame.operand(0, "a")?;
    let b = frame.operand(1, "b")?;
    let (lse, sign) = (frame.result(0, "lse")?, frame.result(1, "sign")?);
    let l = layout(&a)?;
    if b.len() > 0 {
        b.expect_same(a.dims())?;
    }
    let (rank, dims) = (a.rank(), a.dims());
    let mut reduced: Vec<usize> = dims[..rank - 2].iter().map(|&d| d as usize).collect();
    reduced.push(l.inner);
    lse.expect_dims(&reduced)?;
    sign.expect_dims(&reduced)?;
    let (xs, bs) = (a.slice::<T>()?, b.slice_opt::<T>()?);
    k::logsumexp(xs, bs, lse.slice_mut()?, Some(sign.slice_mut()?), l)
}

fn logsumexp(frame: &Frame) -> Result<(), Error> {
    frame.expect_arity(2, 2)?;
    let a = frame.operand(0, "a")?;
    by_float!(a, logsumexp_typed(frame))
}

ffi_handler!(softmax_handler, softmax);
ffi_handler!(log_softmax_handler, log_softmax);
ffi_handler!(stablemax_handler, stablemax);
ffi_handler!(log_stablemax_handler, log_stablemax);
ffi_handler!(logsumexp_handler, logsumexp);

/// This family's CPU targets.
pub(crate) const TARGETS: &[Target] = &[
    ("normax_softmax", softmax_handler),
    ("normax_log_softmax", log_softmax_handler),
    ("normax_stablemax", stablemax_handler),
    ("normax_log_stablemax", log_stablemax_handler),
    ("normax_logsumexp", logsumexp_handler),
];
