//! PowerNorm's passes over the tokens (kernels/power_norm.cu), the GPU counterpart of
//! normax-core's `power_norm_forward` / `power_norm_backward`. The per-channel bookkeeping (batch
//! variance, running statistics, warmup) stays with the caller, on the host: these functions take
//! the per-channel factors as float32 device arrays and return per-channel sums as float32 device
//! arrays, which the caller reads back (one host synchronization per training call).

use crate::device::{params, with_device, Device, Scratch};
use crate::launch::{check, check_opt, column_plan, launch_flat, ptr, size, sum_parts, RowLaunch};
use crate::table::{KernelKey, Op, Variant};
use crate::{Buf, DType, Error, Result, Stream};

/// The kernel adding the partial column sums.
const SUM: Op = Op::PowerSumParts;

/// `tokens` rows of `channels` (channels last), each row's channels in `groups` equal groups.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PowerShape {
    pub tokens: usize,
    pub channels: usize,
    pub groups: usize,
}

impl PowerShape {
    /// The element count, after checking the grouping and `eps`.
    pub fn check(&self, eps: f32) -> Result<usize> {
        if self.channels == 0 {
            return Err(Error::Value("x: the channel axis is empty".into()));
        }
        if self.groups == 0 || self.channels % self.groups != 0 {
            return Err(Error::Value(format!(
                "group_num: {} does not divide the {} channels",
                self.groups, self.channels
            )));
        }
        normax_core::spec::check_eps(eps as f64)?;
        size(self.tokens, self.channels)
    }

    fn group_len(&self) -> usize {
        self.channels / self.groups
    }
}

/// The output of [`power_norm_forward`]: y = u * scale + shift per channel (scale, shift float32,
/// `channels` each; y like x).
#[derive(Clone, Copy, Debug)]
pub struct PowerOut {
    pub scale: Buf,
    pub shift: Buf,
    pub y: Buf,
}

/// Per-channel float32 inputs of [`power_norm_backward`] (`channels` each), as normax-core's
/// `PowerGrad`: g = dy * weight (None: ones), z = u * zscale, g_hat = g - ema * z,
/// du = g_hat * dscale.
#[derive(Clone, Copy, Debug)]
pub struct PowerGradIn {
    pub weight: Option<Buf>,
    pub zscale: Buf,
    pub ema: Buf,
    pub dscale: Buf,
}

/// s = 1/sqrt(mean(x^2 over the group) + eps) of every (token, group), into `out`.
fn group_scales(
    d: &mut Device,
    s: Stream,
    x: Buf,
    shape: PowerShape,
    eps: f32,
    out: u64,
) -> Result<()> {
    let rows = shape.tokens * shape.groups;
    if rows == 0 {
        return Ok(());
    }
    let mut r = RowLaunch::new(d, s, x.dtype, rows, shape.group_len(), &[x.ptr], false)?;
    let (rows_i, cg_i, _, _) = r.dims();
    // Safety: x has tokens*channels = rows*cg elements (checked by the caller); `out` rows floats.
    unsafe { r.run_vec(Op::PowerScale, &mut params![x.ptr, out, rows_i, cg_i, eps]) }
}

/// PowerNorm's forward passes over the tokens of `x` (tokens x channels, f32/f16/bf16). With u the
/// group scaling of x, as asked:
/// - `sumsq`: per channel, the float32 sum of u^2 over the tokens `pad` does not mark (`pad`:
///   float32 per token, nonzero = padding; the caller divides by the count);
/// - `out`: y = u * scale + shift.
///
/// x is read twice (the group scales, then the column pass that does both when both are asked).
#[allow(clippy::too_many_arguments)]
pub fn power_norm_forward(
    s: Stream,
    x: Buf,
    shape: PowerShape,
    eps: f32,
    pad: Option<Buf>,
    sumsq: Option<Buf>,
    out: Option<PowerOut>,
) -> Result<()> {
    let n = shape.check(eps)?;
    check("x", &x, x.dtype, n)?;
    check_opt("pad_mask", pad, DType::F32, shape.tokens)?;
    check_opt("sumsq", sumsq, DType::F32, shape.channels)?;
    if let Some(o) = &out {
        check("scale", &o.scale, DType::F32, shape.channels)?;
        check("shift", &o.shift, DType::F32, shape.channels)?;
        check("y", &o.y, x.dtype, n)?;
    }
    if sumsq.is_none() && (out.is_none() || n == 0) {
        return Ok(());
    }
    with_device(s.device, |d| {
        let scales = Scratch::new(shape.tokens * shape.groups * 4, s)?;
        group_scales(d, s, x, shape, eps, scales.ptr)?;
        let cp = column_plan(shape.tokens, shape.channels, d.sms)?;
        let part = match sumsq {
            Some(_) => Some(Scratch::new(cp.parts as usize * shape.channels * 4, s)?),
            None => None,
        };
        let part_ptr = part.as_ref().map_or(0u64, |p| p.ptr);
        let pad_ptr = ptr(pad);
        let (scale, shift, y) =
            out.map_or((0u64, 0u64, 0u64), |o| (o.scale.ptr, o.shift.ptr, o.y.ptr));
        let f = d.kernel(KernelKey::new(Op::PowerForward, x.dtype, Variant::Plain))?;
        let (tokens_i, channels_i, cg_i, per_part_i) = (
            shape.tokens as i64,
            shape.channels as i64,
            shape.group_len() as i64,
            cp.per_part as i64,
        );
        let mut p = params![
            x.ptr, scales.ptr, pad_ptr, tokens_i, channels_i, cg_i, per_part_i, scale, shift, y,
            part_ptr
        ];
        // Safety: every buffer checked above (null where absent); the scratch holds the group
        // scales and parts*channels partials.
        unsafe { cp.run(f, s, &mut p)? };
        if let (Some(part), Some(q)) = (&part, sumsq) {
            sum_parts(d, s, SUM, part.ptr, cp.parts, shape.channels, q.ptr)?;
        }
        Ok(())
    })
}

/// PowerNorm's backward pass over the tokens: with u, s the group scaling of `x` (recomputed) and
/// the factors of `c`, writes dx = s * (du - u * mean over the group of du * u) and into `sums`
/// (float32, 3 * channels) per channel the sums over all tokens of g_hat * z, dy * z (dweight)
/// and dy (dbias), in that order.
#[allow(clippy::too_many_arguments)]
pub fn power_norm_backward(
    s: Stream,
    dy: Buf,
    x: Buf,
    shape: PowerShape,
    eps: f32,
    c: PowerGradIn,
    dx: Buf,
    sums: Buf,
) -> Result<()> {
    let n = shape.check(eps)?;
    check("x", &x, x.dtype, n)?;
    check("dy", &dy, x.dtype, n)?;
    check("dx", &dx, x.dtype, n)?;
    let ch = shape.channels;
    check_opt("weight", c.weight, DType::F32, ch)?;
    check("zscale", &c.zscale, DType::F32, ch)?;
    check("ema", &c.ema, DType::F32, ch)?;
    check("dscale", &c.dscale, DType::F32, ch)?;
    check("sums", &sums, DType::F32, 3 * ch)?;
    let weight = ptr(c.weight);
    with_device(s.device, |d| {
        let rows = shape.tokens * shape.groups;
        let cg = shape.group_len();
        let scales = Scratch::new(rows * 4, s)?;
        if rows > 0 {
            // The per-channel floats too: read 16 bytes at a time beside the rows.
            let bufs = [
                x.ptr,
                dy.ptr,
                dx.ptr,
                weight,
                c.zscale.ptr,
                c.ema.ptr,
                c.dscale.ptr,
            ];
            let mut r = RowLaunch::new(d, s, x.dtype, rows, cg, &bufs, false)?;
            let (rows_i, cg_i, groups_i) = (rows as i64, cg as i64, shape.groups as i32);
            let mut a = params![
                dy.ptr,
                x.ptr,
                weight,
                c.zscale.ptr,
                c.ema.ptr,
                c.dscale.ptr,
                dx.ptr,
                scales.ptr,
                rows_i,
                cg_i,
                groups_i,
                eps
            ];
            // Safety: every buffer checked above; the scratch holds one scale per row.
            unsafe { r.run_vec(Op::PowerBackward, &mut a)? };
        }
        let cp = column_plan(shape.tokens, ch, d.sms)?;
        let part = Scratch::new(cp.parts as usize * 3 * ch * 4, s)?;
        let f = d.kernel(KernelKey::new(Op::PowerParamPart, x.dtype, Variant::Plain))?;
        let (tokens_i, channels_i, cg_i, per_part_i) = (
            shape.tokens as i64,
            ch as i64,
            cg as i64,
            cp.per_part as i64,
        );
        let mut a = params![
            dy.ptr,
            x.ptr,
            scales.ptr,
            weight,
            c.zscale.ptr,
            c.ema.ptr,
            tokens_i,
            channels_i,
            cg_i,
            per_part_i,
            part.ptr
        ];
        // Safety: as above; parts*3*channels floats of partials; the scales written above (none
        // are read when there are no tokens).
        unsafe { cp.run(f, s, &mut a)? };
        sum_parts(d, s, SUM, part.ptr, cp.parts, 3 * ch, sums.ptr)
    })
}

/// A boolean pad mask at `mask` (`out.len` bytes of device memory, nonzero = padding) as the
/// float32 mask of [`power_norm_forward`], into `out`.
pub fn widen_pad_mask(s: Stream, mask: u64, out: Buf) -> Result<()> {
    check("pad_mask", &out, DType::F32, out.len)?;
    if out.len == 0 {
        return Ok(());
    }
    if mask == 0 {
        return Err(Error::Value("pad_mask: null device address".into()));
    }
    with_device(s.device, |d| {
        let f = d.kernel(KernelKey::untyped(Op::PowerWidenMask))?;
        let n = out.len as i64;
        // Safety: `mask` holds n bytes and `out` n floats (the caller's buffers).
        unsafe { launch_flat(f, out.len, s, &mut params![mask, n, out.ptr]) }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Stream = Stream {
        device: 0,
        handle: 0,
    };

    fn buf(dtype: DType, len: usize) -> Buf {
        Buf {
            ptr: 256,
            dtype,
            len,
        }
    }

    #[test]
    fn bad_arguments_are_value_errors_before_any_cuda_call() {
        let shape = PowerShape {
            tokens: 4,
            channels: 6,
            groups: 2,
        };
        let x = buf(DType::F32, 24);
        let f32s = |len| buf(DType::F32, len);
        let value = |r: Result<()>| matches!(r, Err(Error::Value(_)));
        let sumsq_of = |x, shape, eps, pad| {
            value(power_norm_forward(
                S,
                x,
                shape,
                eps,
                pad,
                Some(f32s(6)),
                None,
            ))
        };
        // The grouping, eps and the channel count.
        assert!(sumsq_of(x, PowerShape { groups: 4, ..shape }, 1e-5, None));
        assert!(sumsq_of(x, PowerShape { groups: 0, ..shape }, 1e-5, None));
        assert!(sumsq_of(x, shape, f32::NAN, None));
        assert!(sumsq_of(x, shape, -1.0, None));
        let empty = PowerShape {
            channels: 0,
            groups: 1,
            ..shape
        };
        assert!(value(power_norm_forward(
            S,
            f32s(0),
            empty,
            1e-5,
            None,
            None,
            None
        )));
        // Lengths and dtypes of every buffer.
        assert!(sumsq_of(f32s(23), shape, 1e-5, None));
        assert!(sumsq_of(x, shape, 1e-5, Some(f32s(3))));
        assert!(value(power_norm_forward(
            S,
            x,
            shape,
            1e-5,
            None,
            Some(buf(DType::F16, 6)),
            None
        )));
        let out = PowerOut {
            scale: f32s(6),
            shift: f32s(6),
            y: buf(DType::F16, 24),
        };
        assert!(value(power_norm_forward(
            S,
            x,
            shape,
            1e-5,
            None,
            None,
            Some(out)
        )));
        let grad = PowerGradIn {
            weight: Some(f32s(5)),
            zscale: f32s(6),
            ema: f32s(6),
            dscale: f32s(6),
        };
        let backward =
            |dy, x, grad, sums| value(power_norm_backward(S, dy, x, shape, 1e-5, grad, x, sums));
        assert!(backward(x, x, grad, f32s(18)));
        let grad = PowerGradIn {
            weight: None,
            ..grad
        };
        assert!(backward(x, x, grad, f32s(12)));
        assert!(backward(buf(DType::F16, 24), x, grad, f32s(18)));
        assert!(backward(x, Buf { ptr: 0, ..x }, grad, f32s(18)));
    }

    #[test]
    fn nothing_asked_is_nothing_done() {
        // No CUDA call at all (this machine may have no driver): Ok, not Unavailable.
        let shape = PowerShape {
            tokens: 2,
            channels: 4,
            groups: 1,
        };
        assert_eq!(
            power_norm_forward(S, buf(DType::F32, 8), shape, 1e-5, None, None, None),
            Ok(())
        );
    }
}
