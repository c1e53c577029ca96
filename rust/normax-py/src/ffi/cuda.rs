//! The "CUDA" platform's handlers (feature "cuda"): the CPU targets' operands, attributes and
//! results, run by normax-cuda's kernels on XLA's stream.
//!
//! A handler passes XLA's device addresses to the kernels as they are (nothing here reads device
//! memory), launches on the call's `CUstream` (`XLA_FFI_Stream_Get`) and device
//! (`XLA_FFI_DeviceOrdinal_Get`), and only enqueues: nothing synchronizes the stream, so the
//! kernels run in XLA's order inside the compiled program. Scratch memory (the norm backward's
//! workspace and recomputed statistics, int32 class ids widened to int64, the gradient's unit
//! scale, PowerNorm's float32 pad mask) comes from XLA's allocator
//! (`XLA_FFI_DeviceMemory_Allocate`) and is given back when the handler returns, as XLA's own
//! scratch allocator does: XLA reuses that memory in its stream's order, after the kernels
//! enqueued here. (normax-cuda's split-row statistics use stream-ordered `cuMemAllocAsync`, as on
//! every CUDA path.) The handlers declare no traits: the first call on a device compiles and loads
//! the kernels, which must not happen inside a CUDA-graph capture, so XLA does not put them in
//! its command buffers.
//!
//! What differs from the CPU targets, stated once:
//! - float32, float16 and bfloat16 (float32 arithmetic); float64 is an error naming the dtype
//!   (the `normax.jax` family code casts 16-bit floats to float32 and keeps float64 off the GPU).
//!   Class weights and the norms' statistics are float32.
//! - The reduced axis is the last one (`inner` 1): another axis is an error, moved last in jnp.
//! - logsumexp without `b` (its sign is 1, 0 for an all -inf row, NaN for NaN).
//! - cross_entropy: no stablemax variant, and (until normax-cuda's kernels take them) no
//!   temperature other than 1, token weights or statistics: each an error naming it; a class id
//!   out of range that is not `ignore_index` gives that row a NaN loss and gradient (as
//!   `jnp.take_along_axis`'s fill): the device cannot raise without the host synchronizing,
//!   which these handlers never do.
//! - PowerNorm: the per-channel factors and sums are float32; the pad mask (bool) is widened to
//!   the kernels' float32 mask in XLA's scratch.
//! - No handlers for the vocabulary-parallel cross-entropy (its CUDA backward takes the sum of
//!   the class weights and the mean's scale as values the host computed, which a handler cannot
//!   read from XLA's device buffers without synchronizing) nor for the linear cross-entropies
//!   (normax-cuda has no matmul: the CUDA path's linear CE runs its matmuls in torch or CuPy).

use super::api::{XLA_FFI_DATA_TYPE_BF16, XLA_FFI_DATA_TYPE_F16};
use super::batch::Batch;
use super::frame::{ffi_handler, Buffer, DType, Frame, Raw};
use super::norms::norm_attrs;
use super::Target;
use normax_core::spec::{CeOptions, NormKind, Reduction};
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

/// A floating-point operand or result as the kernels take it: XLA's device address.
fn floats(b: &Raw<'_>) -> Result<Buf, Error> {
    Ok(Buf {
        ptr: b.address(),
        dtype: kernel_dtype(b.name(), b.dtype())?,
        len: b.len(),
    })
}

/// An optional floating-point operand or result: None where absent (0 elements).
fn floats_opt(b: &Raw<'_>) -> Result<Option<Buf>, Error> {
    (b.len() > 0).then(|| floats(b)).transpose()
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

/// Batch element `b`'s view of `buf`: all of it where `shared` by every element, else its part.
fn element(buf: Buf, shared: bool, b: usize, count: usize) -> Buf {
    if shared {
        buf
    } else {
        part(buf, b, count)
    }
}

/// [`element`] of an optional buffer.
fn part_of(buf: Option<Buf>, shared: bool, b: usize, count: usize) -> Option<Buf> {
    buf.map(|w| element(w, shared, b, count))
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
    f(stream(frame)?, floats(&x)?, floats(&y)?, rows, cols, log)
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
    let (x, lse, sign) = (floats(&a)?, floats(&lse)?, floats(&sign)?);
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
    let refused = [
        (
            frame.attr_bool("stablemax")?,
            "stablemax: the CUDA kernels have no stablemax cross-entropy",
        ),
        (
            frame.attr_f64("temperature")? != 1.0,
            "temperature: the CUDA handler takes only 1.0",
        ),
        (
            frame.attr_bool("with_stats")?,
            "return_stats: the CUDA handler gives no statistics",
        ),
        (
            frame.operand(3, "token_weight")?.len() > 0,
            "token_weight: the CUDA handler takes none",
        ),
    ];
    if let Some((_, message)) = refused.iter().find(|(refuse, _)| *refuse) {
        return Err(Error::Value((*message).into()));
    }
    super::cross_entropy::ce_options(frame, Reduction::None)
}

/// Device memory for `count` elements of `size` bytes from XLA, given back when dropped.
fn scratch<'f>(frame: &'f Frame, count: usize, size: usize) -> Result<Scratch<'f>, Error> {
    let bytes = count
        .checked_mul(size)
        .ok_or_else(|| Error::Value(format!("{count} scratch elements overflow")))?;
    frame.allocate(bytes, 16)
}

type Scratch<'f> = super::frame::DeviceMemory<'f>;

/// An error unless `b` holds elements of `dtype` (normax-cuda's check, made before anything is
/// enqueued).
fn expect_dtype(name: &str, b: Buf, dtype: cu::DType) -> Result<(), Error> {
    if b.dtype != dtype {
        return Err(Error::Value(format!(
            "{name}: expected {dtype:?} elements, got {:?}",
            b.dtype
        )));
    }
    Ok(())
}

/// The class ids (int64, or int32 widened into `widened`) or probabilities (the logits' dtype)
/// of `target`, whose shape must be `rows_dims` (ids) or `logits_dims` (probabilities).
fn ce_target<'f>(
    frame: &'f Frame,
    s: Stream,
    (target, logits): (&Buffer<'_>, Buf),
    (rows_dims, logits_dims): (&[i64], &[i64]),
    widened: &mut Option<Scratch<'f>>,
) -> Result<cu::CeTarget, Error> {
    match target.dtype() {
        DType::S64 | DType::S32 => target.expect_same(rows_dims)?,
        _ => {
            target.expect_same(logits_dims)?;
            let probs = floats(target)?;
            expect_dtype("target", probs, logits.dtype)?;
            return Ok(cu::Target::Probs(probs));
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
    // The refusals first: a call with statistics has more results.
    let mut opts = ce_options(frame)?;
    frame.expect_arity(4, 1 + usize::from(with_grad))?;
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
        Some(floats(&g)?)
    } else {
        None
    };
    let x = floats(&logits)?;
    let (loss, weight_buf) = (floats(&loss)?, floats_opt(&weight)?);
    let shared = weight_buf.is_none() || !batch.is_batched("weight", weight.leading(1)?)?;
    // Every option checked before anything is allocated or enqueued (with one batch element's
    // weights where they are per element).
    let count = batch.count;
    CeOptions {
        weight: part_of(weight_buf, shared, 0, count.max(1)),
        ..opts
    }
    .check(cols)?;
    expect_dtype("loss", loss, cu::DType::F32)?;
    if let Some(g) = grad {
        expect_dtype("grad", g, x.dtype)?;
    }
    if cols == 0 && loss.len > 0 {
        return Err(Error::Value("logits: the class axis is empty".into()));
    }
    let s = stream(frame)?;
    let mut widened = None;
    let t = ce_target(frame, s, (&target, x), (rows_dims, dims), &mut widened)?;
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
        return cu::cross_entropy(
            s,
            x,
            t,
            &opts,
            &Default::default(),
            loss,
            grad.and_then(scaled),
            rows,
            cols,
        );
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
        cu::cross_entropy(
            s,
            part(x, b, count),
            tb,
            &opts,
            &Default::default(),
            lb,
            gb,
            lb.len,
            cols,
        )?;
    }
    Ok(())
}

/// Whether a parameter or its gradient (base shape (L,) or (C,)) is one for the whole batch (or
/// absent: 0 elements) rather than one per batch element.
fn shared(batch: &Batch<'_>, p: &Raw<'_>) -> Result<bool, Error> {
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
    let (xb, yb) = (floats(&x)?, floats(&y)?);
    let (mb, rb) = (floats(&mean)?, floats(&rstd)?);
    let (w, bi) = (floats_opt(&weight)?, floats_opt(&bias)?);
    let cols = x.dim_from_end(0)?;
    let s = stream(frame)?;
    let (w_shared, b_shared) = (shared(&batch, &weight)?, shared(&batch, &bias)?);
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

/// The saved (mean, rstd) of the rows of `x`, float32; where the forward saved none (empty
/// operands), recomputed into `stats` (XLA's scratch) by the forward kernel, statistics only.
fn saved_stats<'f>(
    frame: &'f Frame,
    s: Stream,
    (kind, eps): (NormKind, f64),
    (mean, rstd): (&Buffer<'_>, &Buffer<'_>),
    x: &Buffer<'_>,
    stats: &mut Option<Scratch<'f>>,
) -> Result<(Option<Buf>, Buf), Error> {
    let row_dims = &x.dims()[..x.rank() - 1];
    let layer = kind == NormKind::Layer;
    if rstd.len() > 0 && (mean.len() > 0 || !layer) {
        rstd.expect_same(row_dims)?;
        // The mean is read by layer_norm only (the RMS kinds' is 0).
        let m = if layer {
            mean.expect_same(row_dims)?;
            Some(floats(mean)?)
        } else {
            None
        };
        return Ok((m, floats(rstd)?));
    }
    let (rows, cols) = (
        row_dims.iter().map(|&d| d as usize).product(),
        x.dim_from_end(0)?,
    );
    let memory = stats.insert(scratch(frame, 2 * rows, 4)?);
    let f32s = |ptr| Buf {
        ptr,
        dtype: cu::DType::F32,
        len: rows,
    };
    let (m, r) = (f32s(memory.ptr), f32s(memory.ptr + 4 * rows as u64));
    let xb = floats(x)?;
    cu::norm_forward(
        s,
        kind,
        xb,
        None,
        None,
        None,
        Some(m),
        Some(r),
        rows,
        cols,
        eps,
    )?;
    Ok((layer.then_some(m), r))
}

fn norm_backward(frame: &Frame) -> Result<(), Error> {
    frame.expect_arity(6, 3)?;
    let (kind, eps) = norm_attrs(frame)?;
    let (dy, x) = (frame.operand(0, "dy")?, frame.operand(1, "x")?);
    // Operand 3, the bias, does not enter the gradients; it keeps the forward's operand order.
    let weight = frame.operand(2, "weight")?;
    let (mean, rstd) = (frame.operand(4, "mean")?, frame.operand(5, "rstd")?);
    let batch = Batch::of(&x, 2)?;
    let dims = x.dims();
    let row_dims = &dims[..dims.len() - 1];
    dy.expect_same(dims)?;
    let dx = frame.result(0, "dx")?;
    dx.expect_same(dims)?;
    let (dweight, dbias) = (frame.result(1, "dweight")?, frame.result(2, "dbias")?);
    let shared = [
        shared(&batch, &weight)?,
        shared(&batch, &dweight)?,
        shared(&batch, &dbias)?,
    ];
    let (dyb, xb, dxb, w) = (
        floats(&dy)?,
        floats(&x)?,
        floats(&dx)?,
        floats_opt(&weight)?,
    );
    let dw = floats_opt(&dweight)?;
    let db = floats_opt(&dbias)?;
    let cols = x.dim_from_end(0)?;
    let rows = row_dims.iter().map(|&d| d as usize).product();
    let s = stream(frame)?;
    let mut stats = None;
    let saved = (&mean, &rstd);
    let (m, r) = saved_stats(frame, s, (kind, eps), saved, &x, &mut stats)?;
    let wanted = dw.is_some() || db.is_some();
    if shared.iter().all(|&sh| sh) {
        let need = cu::norm_workspace(s, kind, rows, cols, wanted)?;
        let ws = scratch(frame, need, 4)?;
        let grads = param_grads(dw, db, &ws, need);
        return cu::norm_backward(s, kind, dyb, xb, w, m, r, dxb, grads, rows, cols);
    }
    // A parameter or its gradient per batch element: one call per element over its own rows,
    // each writing (not adding to) its parameter gradients.
    let count = batch.count;
    if count == 0 {
        return Ok(());
    }
    let summed = [(dw, shared[1], "dweight"), (db, shared[2], "dbias")];
    if let Some((_, _, name)) = summed
        .iter()
        .find(|(g, sh, _)| g.is_some() && *sh && count > 1)
    {
        return Err(Error::Value(format!(
            "{name}: the CUDA handler sums a parameter gradient over the whole batch only where \
             the weight is shared too"
        )));
    }
    let rows = rows / count;
    let need = cu::norm_workspace(s, kind, rows, cols, wanted)?;
    let ws = scratch(frame, need, 4)?;
    for b in 0..count {
        let grads = param_grads(
            part_of(dw, shared[1], b, count),
            part_of(db, shared[2], b, count),
            &ws,
            need,
        );
        let (dyp, xp, dxp) = (part(dyb, b, count), part(xb, b, count), part(dxb, b, count));
        let (mp, rp) = (m.map(|m| part(m, b, count)), part(r, b, count));
        let wb = part_of(w, shared[0], b, count);
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

/// PowerNorm's layout of one batch element (x's last two axes) and eps.
fn power_shape(frame: &Frame, x: &Buffer<'_>) -> Result<(cu::PowerShape, f32), Error> {
    let (tokens, channels) = (x.dim_from_end(1)?, x.dim_from_end(0)?);
    let shape = cu::PowerShape {
        tokens,
        channels,
        groups: frame.attr_usize("groups")?,
    };
    let eps = frame.attr_f64("eps")? as f32;
    // Checked before anything (the pad mask's widening) is enqueued.
    shape.check(eps)?;
    Ok((shape, eps))
}

/// An error unless a per-channel result holds `per_element` values per batch element.
fn expect_per_element(b: &Raw<'_>, count: usize, per_element: usize) -> Result<(), Error> {
    if b.len() != count * per_element {
        return Err(Error::Value(format!(
            "{}: expected {per_element} values per batch element, got shape {:?}",
            b.name(),
            b.dims()
        )));
    }
    Ok(())
}

/// A per-channel operand per batch element: (buffer or None, shared by every element).
fn per_channel(batch: &Batch<'_>, b: &Buffer<'_>) -> Result<(Option<Buf>, bool), Error> {
    Ok((floats_opt(b)?, shared(batch, b)?))
}

fn power_norm_forward(frame: &Frame) -> Result<(), Error> {
    frame.expect_arity(4, 2)?;
    let x = frame.operand(0, "x")?;
    let pad = frame.operand(1, "pad_mask")?;
    let (scale, shift) = (frame.operand(2, "scale")?, frame.operand(3, "shift")?);
    let (sumsq, y) = (frame.result(0, "sumsq")?, frame.result(1, "y")?);
    let batch = Batch::of(&x, 2)?;
    let (shape, eps) = power_shape(frame, &x)?;
    let count = batch.count;
    let want_y = y.len() > 0;
    if want_y {
        y.expect_same(x.dims())?;
        if scale.len() == 0 || shift.len() == 0 {
            return Err(Error::Value("y: needs both scale and shift".into()));
        }
    }
    // As the CPU target: the statistics (and the pad mask, read only for them) where `stats`.
    let stats = frame.attr_bool("stats")?;
    let ss = floats_opt(&sumsq)?;
    if stats != ss.is_some() {
        return Err(Error::Value(format!(
            "sumsq: {} values with stats = {stats}",
            sumsq.len()
        )));
    }
    if stats {
        expect_per_element(&sumsq, count, shape.channels)?;
    }
    let use_pad = stats && pad.len() > 0;
    let (sc, sh) = (per_channel(&batch, &scale)?, per_channel(&batch, &shift)?);
    let (xb, yb) = (floats(&x)?, want_y.then(|| floats(&y)).transpose()?);
    let pad_shared = !use_pad || !batch.is_batched("pad_mask", pad.leading(1)?)?;
    if use_pad && pad.dtype() != DType::Pred {
        return Err(Error::Value(format!(
            "pad_mask: expected bool, got {:?}",
            pad.dtype()
        )));
    }
    let s = stream(frame)?;
    // The mask as the float32 per token the kernels read, in XLA's scratch.
    let mut mask_memory = None;
    let mask = if use_pad {
        let memory = mask_memory.insert(scratch(frame, pad.len(), 4)?);
        let out = Buf {
            ptr: memory.ptr,
            dtype: cu::DType::F32,
            len: pad.len(),
        };
        cu::widen_pad_mask(s, pad.address(), out)?;
        Some(out)
    } else {
        None
    };
    for b in 0..count {
        let out = match (yb, sc.0, sh.0) {
            (Some(y), Some(scale), Some(shift)) => Some(cu::PowerOut {
                scale: element(scale, sc.1, b, count),
                shift: element(shift, sh.1, b, count),
                y: part(y, b, count),
            }),
            _ => None,
        };
        let (xp, padp) = (part(xb, b, count), part_of(mask, pad_shared, b, count));
        let ssp = ss.map(|q| part(q, b, count));
        cu::power_norm_forward(s, xp, shape, eps, padp, ssp, out)?;
    }
    Ok(())
}

fn power_norm_backward(frame: &Frame) -> Result<(), Error> {
    frame.expect_arity(6, 2)?;
    let (dy, x) = (frame.operand(0, "dy")?, frame.operand(1, "x")?);
    let weight = frame.operand(2, "weight")?;
    let zscale = frame.operand(3, "zscale")?;
    let (ema, dscale) = (frame.operand(4, "ema")?, frame.operand(5, "dscale")?);
    let (dx, sums) = (frame.result(0, "dx")?, frame.result(1, "sums")?);
    dy.expect_same(x.dims())?;
    dx.expect_same(x.dims())?;
    let batch = Batch::of(&x, 2)?;
    let (shape, eps) = power_shape(frame, &x)?;
    let count = batch.count;
    expect_per_element(&sums, count, 3 * shape.channels)?;
    let (dyb, xb) = (floats(&dy)?, floats(&x)?);
    let (dxb, sumsb) = (floats(&dx)?, floats(&sums)?);
    let w = per_channel(&batch, &weight)?;
    let (z, e) = (per_channel(&batch, &zscale)?, per_channel(&batch, &ema)?);
    let d = per_channel(&batch, &dscale)?;
    let required = |(f, shared): (Option<Buf>, bool), name: &str, b| {
        part_of(f, shared, b, count).ok_or_else(|| {
            Error::Value(format!("{name}: expected one value per channel, got none"))
        })
    };
    let s = stream(frame)?;
    for b in 0..count {
        let grad = cu::PowerGradIn {
            weight: part_of(w.0, w.1, b, count),
            zscale: required(z, "zscale", b)?,
            ema: required(e, "ema", b)?,
            dscale: required(d, "dscale", b)?,
        };
        let (dyp, xp) = (part(dyb, b, count), part(xb, b, count));
        let (dxp, sp) = (part(dxb, b, count), part(sumsb, b, count));
        cu::power_norm_backward(s, dyp, xp, shape, eps, grad, dxp, sp)?;
    }
    Ok(())
}

ffi_handler!(softmax_handler, softmax);
ffi_handler!(log_softmax_handler, log_softmax);
ffi_handler!(stablemax_handler, stablemax);
ffi_handler!(log_stablemax_handler, log_stablemax);
ffi_handler!(logsumexp_handler, logsumexp);
ffi_handler!(cross_entropy_handler, cross_entropy);
ffi_handler!(norm_forward_handler, norm_forward);
ffi_handler!(norm_backward_handler, norm_backward);
ffi_handler!(power_norm_forward_handler, power_norm_forward);
ffi_handler!(power_norm_backward_handler, power_norm_backward);

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
    ("normax_power_norm_forward", power_norm_forward_handler),
    ("normax_power_norm_backward", power_norm_backward_handler),
];
