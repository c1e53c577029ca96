//! The "CUDA" platform's handlers (feature "cuda"): the CPU targets' operands, attributes and
//! results, run by normax-cuda's kernels on XLA's stream.
//!
//! A handler passes XLA's device addresses to the kernels as they are (nothing here reads device
//! memory), launches on the call's `CUstream` (`XLA_FFI_Stream_Get`) and device
//! (`XLA_FFI_DeviceOrdinal_Get`), and only enqueues: nothing synchronizes the stream, so the
//! kernels run in XLA's order inside the compiled program. Scratch memory (the norm backward's
//! workspace, int32 class ids widened to int64, the gradient's unit scale) comes from XLA's
//! allocator (`XLA_FFI_DeviceMemory_Allocate`) and is given back when the handler returns, as
//! XLA's own scratch allocator does: XLA reuses that memory in its stream's order, after the
//! kernels enqueued here. (normax-cuda's split-row statistics use stream-ordered
//! `cuMemAllocAsync`, as on every CUDA path.)
//!
//! What differs from the CPU targets, stated once:
//! - float32, float16 and bfloat16 (float32 arithmetic); float64 is an error naming the dtype
//!   (the `normax.jax` family code casts 16-bit floats to float32 and keeps float64 off the GPU).
//!   Class weights and the norms' statistics are float32.
//! - The reduced axis is the last one (`inner` 1): another axis is an error, moved last in jnp.
//! - logsumexp without `b` (its sign is 1, 0 for an all -inf row, NaN for NaN).
//! - cross_entropy: no stablemax variant; a class id out of range that is not `ignore_index`
//!   scores as an ignored row (loss 0, gradient 0): the device cannot raise without the host
//!   synchronizing, which these handlers never do.
//! - No handlers for PowerNorm, the vocabulary-parallel and the linear cross-entropies: their
//!   CUDA paths keep state or matmuls in the caller's library (PowerNorm's float64 state on the
//!   host, the linear CE's matmul in torch or CuPy), which a handler on XLA's stream has not got.

use super::api::{XLA_FFI_DATA_TYPE_BF16, XLA_FFI_DATA_TYPE_F16};
use super::batch::Batch;
use super::frame::{ffi_handler, Buffer, BufferMut, DType, Frame};
use super::Target;
use normax_core::spec::{check_eps, CeOptions, NormKind, Reduction};
use normax_core::Error;
use normax_cuda::{self as cu, Buf, Indices, Stream};

/// The call's device and XLA's stream on it.
fn stream(frame: &Frame) -> Result<Stream, Error> {
    Ok(Stream {
        device: frame.device_ordinal()?,
        handle: frame.stream()? as u64,
    })
}

/// The kernels' element type of buffer `name`'s dtype.
fn kernel_dtype(name: &str, dtype: DType) -> Result<cu::DType, Error> {
    match dtype {
        DType::F32 => Ok(cu::DType::F32),
        DType::Other(XLA_FFI_DATA_TYPE_F16) => Ok(cu::DType::F16),
        DType::Other(XLA_FFI_DATA_TYPE_BF16) => Ok(cu::DType::BF16),
        d => Err(Error::Value(format!(
            "{name}: the CUDA kernels take float32, float16 or bfloat16, got {d:?}"
        ))),
    }
}

/// A floating-point operand as the kernels take it: XLA's device address.
fn floats(b: &Buffer<'_>) -> Result<Buf, Error> {
    Ok(Buf {
        ptr: b.address(),
        dtype: kernel_dtype(b.name(), b.dtype())?,
        len: b.len(),
    })
}

/// An optional floating-point operand: None where absent (0 elements).
fn floats_opt(b: &Buffer<'_>) -> Result<Option<Buf>, Error> {
    (b.len() > 0).then(|| floats(b)).transpose()
}

/// A floating-point result as the kernels take it.
fn floats_out(b: &BufferMut<'_>) -> Result<Buf, Error> {
    Ok(Buf {
        ptr: b.address(),
        dtype: kernel_dtype(b.name(), b.dtype())?,
        len: b.len(),
    })
}

/// The `b`-th of `count` equal parts of `buf`: one batch element's rows or parameters.
fn part(buf: Buf, b: usize, count: usize) -> Buf {
    let len = buf.len / count;
    let offset = (b * len * buf.dtype.size()) as u64;
    Buf {
        ptr: buf.ptr + offset,
        len,
        ..buf
    }
}

/// As [`part`], for a buffer that is either per batch element or `shared` by all.
fn part_of(buf: Option<Buf>, shared: bool, b: usize, count: usize) -> Option<Buf> {
    buf.map(|w| if shared { w } else { part(w, b, count) })
}

/// (rows, cols) of an operand of base shape (outer, L, inner) reduced over L: the kernels reduce
/// contiguous rows, so inner must be 1; leading batch dims are more rows.
fn rows_of(x: &Buffer<'_>) -> Result<(usize, usize), Error> {
    let (inner, len) = (x.dim_from_end(0)?, x.dim_from_end(1)?);
    if inner != 1 {
        return Err(Error::Value(format!(
            "{}: the CUDA kernels reduce the last axis, got shape {:?} (inner {inner})",
            x.name(),
            x.dims()
        )));
    }
    let rows = x.leading(2)?.iter().map(|&d| d as usize).product();
    Ok((rows, len))
}

/// softmax, log_softmax, stablemax, log_stablemax as normax-cuda runs them.
type RowMap = fn(Stream, Buf, Buf, usize, usize, bool) -> cu::Result<()>;

fn map(frame: &Frame, f: RowMap, log: bool) -> Result<(), Error> {
    frame.expect_arity(1, 1)?;
    let x = frame.operand(0, "x")?;
    let y = frame.result(0, "y")?;
    y.expect_same(x.dims())?;
    let (rows, cols) = rows_of(&x)?;
    f(
        stream(frame)?,
        floats(&x)?,
        floats_out(&y)?,
        rows,
        cols,
        log,
    )
}

fn softmax(frame: &Frame) -> Result<(), Error> {
    map(frame, cu::softmax, false)
}

fn log_softmax(frame: &Frame) -> Result<(), Error> {
    map(frame, cu::softmax, true)
}

fn stablemax(frame: &Frame) -> Result<(), Error> {
    map(frame, cu::stablemax, false)
}

fn log_stablemax(frame: &Frame) -> Result<(), Error> {
    map(frame, cu::stablemax, true)
}

fn logsumexp(frame: &Frame) -> Result<(), Error> {
    frame.expect_arity(2, 2)?;
    let a = frame.operand(0, "a")?;
    if frame.operand(1, "b")?.len() > 0 {
        return Err(Error::Value(
            "b: the CUDA logsumexp takes no weights (b=)".into(),
        ));
    }
    let (rows, cols) = rows_of(&a)?;
    let (lse, sign) = (frame.result(0, "lse")?, frame.result(1, "sign")?);
    let mut reduced = a.leading(2)?.to_vec();
    reduced.push(1);
    lse.expect_same(&reduced)?;
    sign.expect_same(&reduced)?;
    let (x, lse, sign) = (floats(&a)?, floats_out(&lse)?, floats_out(&sign)?);
    let s = stream(frame)?;
    if cols == 0 && rows > 0 && lse.dtype == cu::DType::F32 && sign.dtype == cu::DType::F32 {
        // An empty sum: lse -inf, sign 0, as on the CPU (no kernel reduces an empty row).
        cu::fill_f32(s, lse, f32::NEG_INFINITY)?;
        return cu::fill_f32(s, sign, 0.0);
    }
    cu::logsumexp(s, x, lse, Some(sign), rows, cols)
}

/// The cross-entropy attributes as normax-cuda's options (per-row losses: no reduction).
fn ce_options(frame: &Frame) -> Result<CeOptions<Buf>, Error> {
    if frame.attr_bool("stablemax")? {
        return Err(Error::Value(
            "stablemax: the CUDA kernels have no stablemax cross-entropy".into(),
        ));
    }
    let softcap = frame.attr_f64("softcap")?;
    Ok(CeOptions {
        weight: None,
        ignore_index: frame.attr_i64("ignore_index")?,
        reduction: Reduction::None,
        label_smoothing: frame.attr_f64("label_smoothing")?,
        z_loss: frame.attr_f64("z_loss")?,
        softcap: (softcap != 0.0).then_some(softcap),
    })
}

/// Device memory for `count` elements of `size` bytes from XLA, given back when dropped.
fn scratch<'f>(frame: &'f Frame, count: usize, size: usize) -> Result<Scratch<'f>, Error> {
    let bytes = count
        .checked_mul(size)
        .ok_or_else(|| Error::Value(format!("{count} scratch elements overflow")))?;
    frame.allocate(bytes, 16)
}

type Scratch<'f> = super::frame::DeviceMemory<'f>;

/// The class ids (int64, or int32 widened into `widened`) or probabilities of `target`, whose
/// shape must be `rows_dims` (ids) or `logits_dims` (probabilities).
fn ce_target<'f>(
    frame: &'f Frame,
    s: Stream,
    target: &Buffer<'_>,
    (rows_dims, logits_dims): (&[i64], &[i64]),
    widened: &mut Option<Scratch<'f>>,
) -> Result<cu::CeTarget, Error> {
    match target.dtype() {
        DType::S64 | DType::S32 => target.expect_same(rows_dims)?,
        _ => {
            target.expect_same(logits_dims)?;
            return Ok(cu::Target::Probs(floats(target)?));
        }
    }
    let len = target.len();
    if target.dtype() == DType::S64 {
        let ptr = target.address();
        return Ok(cu::Target::Classes(Indices { ptr, len }));
    }
    let ids = widened.insert(scratch(frame, len, 8)?);
    let out = Indices { ptr: ids.ptr, len };
    cu::widen_class_ids(s, target.address(), out)?;
    Ok(cu::Target::Classes(out))
}

fn cross_entropy(frame: &Frame) -> Result<(), Error> {
    let with_grad = frame.attr_bool("with_grad")?;
    frame.expect_arity(3, 1 + usize::from(with_grad))?;
    let mut opts = ce_options(frame)?;
    let logits = frame.operand(0, "logits")?;
    let (target, weight) = (frame.operand(1, "target")?, frame.operand(2, "weight")?);
    let batch = Batch::of(&logits, 2)?;
    let (dims, cols) = (logits.dims(), logits.dim_from_end(0)?);
    let rows_dims = &dims[..dims.len() - 1];
    let loss = frame.result(0, "loss")?;
    loss.expect_same(rows_dims)?;
    let grad = if with_grad {
        let g = frame.result(1, "grad")?;
        g.expect_same(dims)?;
        Some(floats_out(&g)?)
    } else {
        None
    };
    let x = floats(&logits)?;
    let (loss, weight_buf) = (floats_out(&loss)?, floats_opt(&weight)?);
    let shared = weight_buf.is_none() || !batch.is_batched("weight", weight.leading(1)?)?;
    // Every option checked before anything is allocated or enqueued (with one batch element's
    // weights where they are per element).
    let count = batch.count;
    CeOptions {
        weight: part_of(weight_buf, shared, 0, count.max(1)),
        ..opts
    }
    .check(cols)?;
    let s = stream(frame)?;
    let mut widened = None;
    let t = ce_target(frame, s, &target, (rows_dims, dims), &mut widened)?;
    // The per-row gradient, d(loss_row)/d(logits_row): a scale of 1 for every row.
    let unit = match grad {
        Some(_) => {
            let one = scratch(frame, 1, 4)?;
            let ptr = one.ptr;
            let scale = Buf {
                ptr,
                dtype: cu::DType::F32,
                len: 1,
            };
            cu::fill_f32(s, scale, 1.0)?;
            Some((one, scale))
        }
        None => None,
    };
    let scaled = |g: Buf| unit.as_ref().map(|(_, scale)| (g, *scale, 0));
    if shared {
        opts.weight = weight_buf;
        let rows = loss.len;
        return cu::cross_entropy(s, x, t, &opts, loss, grad.and_then(scaled), rows, cols);
    }
    // Class weights per batch element: one launch sequence each, over that element's rows.
    for b in 0..count {
        opts.weight = part_of(weight_buf, false, b, count);
        let tb = match t {
            cu::Target::Classes(ids) => {
                let len = ids.len / count;
                let ptr = ids.ptr + (b * len * 8) as u64;
                cu::Target::Classes(Indices { ptr, len })
            }
            cu::Target::Probs(p) => cu::Target::Probs(part(p, b, count)),
        };
        let lb = part(loss, b, count);
        let gb = grad.map(|g| part(g, b, count)).and_then(scaled);
        cu::cross_entropy(s, part(x, b, count), tb, &opts, lb, gb, lb.len, cols)?;
    }
    Ok(())
}

/// The norm attributes: the kind and a checked eps.
fn norm_attrs(frame: &Frame) -> Result<(NormKind, f64), Error> {
    let kind = NormKind::parse(frame.attr_str("kind")?)?;
    let eps = frame.attr_f64("eps")?;
    check_eps(eps)?;
    Ok((kind, eps))
}

/// Whether a norm parameter (base shape (L,)) is shared by the batch (or absent).
fn shared_param(batch: &Batch<'_>, p: &Buffer<'_>) -> Result<bool, Error> {
    Ok(p.len() == 0 || !batch.is_batched(p.name(), p.leading(1)?)?)
}

fn norm_forward(frame: &Frame) -> Result<(), Error> {
    frame.expect_arity(3, 3)?;
    let (kind, eps) = norm_attrs(frame)?;
    let x = frame.operand(0, "x")?;
    let (weight, bias) = (frame.operand(1, "weight")?, frame.operand(2, "bias")?);
    let batch = Batch::of(&x, 2)?;
    let dims = x.dims();
    let stats_dims = &dims[..dims.len() - 1];
    let y = frame.result(0, "y")?;
    y.expect_same(dims)?;
    let (mean, rstd) = (frame.result(1, "mean")?, frame.result(2, "rstd")?);
    mean.expect_same(stats_dims)?;
    rstd.expect_same(stats_dims)?;
    let (xb, yb) = (floats(&x)?, floats_out(&y)?);
    let (mb, rb) = (floats_out(&mean)?, floats_out(&rstd)?);
    let (w, bi) = (floats_opt(&weight)?, floats_opt(&bias)?);
    let cols = x.dim_from_end(0)?;
    let s = stream(frame)?;
    let (w_shared, b_shared) = (shared_param(&batch, &weight)?, shared_param(&batch, &bias)?);
    if w_shared && b_shared {
        let rows = mb.len;
        let (y, m, r) = (Some(yb), Some(mb), Some(rb));
        return cu::norm_forward(s, kind, xb, w, bi, y, m, r, rows, cols, eps);
    }
    let count = batch.count;
    for b in 0..count {
        let (wb, bb) = (
            part_of(w, w_shared, b, count),
            part_of(bi, b_shared, b, count),
        );
        let (m, r) = (part(mb, b, count), part(rb, b, count));
        let (xp, yp) = (part(xb, b, count), Some(part(yb, b, count)));
        cu::norm_forward(s, kind, xp, wb, bb, yp, Some(m), Some(r), m.len, cols, eps)?;
    }
    Ok(())
}

/// The results of a norm backward: dx and, where the parameter is given, its gradient.
struct NormGrads {
    dx: Buf,
    dweight: Option<Buf>,
    dbias: Option<Buf>,
}

fn norm_grads(frame: &Frame, x: &Buffer<'_>, params: [&Buffer<'_>; 2]) -> Result<NormGrads, Error> {
    let dx = frame.result(0, "dx")?;
    dx.expect_same(x.dims())?;
    let mut grads = [None, None];
    for (i, (p, name)) in params.iter().zip(["dweight", "dbias"]).enumerate() {
        let g = frame.result(1 + i, name)?;
        g.expect_same(p.dims())?;
        grads[i] = (p.len() > 0).then(|| floats_out(&g)).transpose()?;
    }
    Ok(NormGrads {
        dx: floats_out(&dx)?,
        dweight: grads[0],
        dbias: grads[1],
    })
}

fn norm_backward(frame: &Frame) -> Result<(), Error> {
    frame.expect_arity(6, 3)?;
    let (kind, _) = norm_attrs(frame)?;
    let (dy, x) = (frame.operand(0, "dy")?, frame.operand(1, "x")?);
    let (weight, bias) = (frame.operand(2, "weight")?, frame.operand(3, "bias")?);
    let (mean, rstd) = (frame.operand(4, "mean")?, frame.operand(5, "rstd")?);
    let batch = Batch::of(&x, 2)?;
    let dims = x.dims();
    dy.expect_same(dims)?;
    mean.expect_same(&dims[..dims.len() - 1])?;
    rstd.expect_same(&dims[..dims.len() - 1])?;
    let g = norm_grads(frame, &x, [&weight, &bias])?;
    let (dyb, xb, w) = (floats(&dy)?, floats(&x)?, floats_opt(&weight)?);
    // The mean is read by layer_norm only (the RMS kinds' is 0).
    let m = (kind == NormKind::Layer)
        .then(|| floats(&mean))
        .transpose()?;
    let r = floats(&rstd)?;
    let cols = x.dim_from_end(0)?;
    let s = stream(frame)?;
    let (w_shared, b_shared) = (shared_param(&batch, &weight)?, shared_param(&batch, &bias)?);
    let wanted = g.dweight.is_some() || g.dbias.is_some();
    if w_shared && b_shared {
        let rows = r.len;
        let need = cu::norm_workspace(s, kind, rows, cols, wanted)?;
        let ws = scratch(frame, need, 4)?;
        let grads = param_grads(g.dweight, g.dbias, &ws, need);
        return cu::norm_backward(s, kind, dyb, xb, w, m, r, g.dx, grads, rows, cols);
    }
    // Parameters per batch element: each element's gradient sums its own rows only.
    let count = batch.count;
    if count == 0 {
        return Ok(());
    }
    let rows = r.len / count;
    let need = cu::norm_workspace(s, kind, rows, cols, wanted)?;
    let ws = scratch(frame, need, 4)?;
    for b in 0..count {
        let grads = param_grads(
            part_of(g.dweight, w_shared, b, count),
            part_of(g.dbias, b_shared, b, count),
            &ws,
            need,
        );
        let (dyp, xp, dxp) = (
            part(dyb, b, count),
            part(xb, b, count),
            part(g.dx, b, count),
        );
        let (mp, rp) = (m.map(|m| part(m, b, count)), part(r, b, count));
        let wb = part_of(w, w_shared, b, count);
        cu::norm_backward(s, kind, dyp, xp, wb, mp, rp, dxp, grads, rows, cols)?;
    }
    Ok(())
}

/// normax-cuda's parameter-gradient outputs with the workspace of `need` float32s (XLA's).
fn param_grads(
    dweight: Option<Buf>,
    dbias: Option<Buf>,
    ws: &Scratch<'_>,
    need: usize,
) -> cu::NormParamGrads {
    let workspace = (need > 0).then_some(Buf {
        ptr: ws.ptr,
        dtype: cu::DType::F32,
        len: need,
    });
    cu::NormParamGrads {
        dweight,
        dbias,
        workspace,
    }
}

ffi_handler!(softmax_handler, softmax);
ffi_handler!(log_softmax_handler, log_softmax);
ffi_handler!(stablemax_handler, stablemax);
ffi_handler!(log_stablemax_handler, log_stablemax);
ffi_handler!(logsumexp_handler, logsumexp);
ffi_handler!(cross_entropy_handler, cross_entropy);
ffi_handler!(norm_forward_handler, norm_forward);
ffi_handler!(norm_backward_handler, norm_backward);

/// The CUDA targets.
pub(crate) const TARGETS: &[Target] = &[
    ("normax_softmax", softmax_handler),
    ("normax_log_softmax", log_softmax_handler),
    ("normax_stablemax", stablemax_handler),
    ("normax_log_stablemax", log_stablemax_handler),
    ("normax_logsumexp", logsumexp_handler),
    ("normax_cross_entropy", cross_entropy_handler),
    ("normax_norm_forward", norm_forward_handler),
    ("normax_norm_backward", norm_backward_handler),
];
