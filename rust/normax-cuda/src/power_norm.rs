//! PowerNorm's passes over the tokens (kernels/power_norm.cu), the GPU counterpart of
//! normax-core's `power_norm_forward` / `power_norm_backward`. The per-channel bookkeeping (batch
//! variance, running statistics, warmup) stays with the caller, on the host: these functions take
//! the per-channel factors as float32 device arrays and return per-channel sums as float32 device
//! arrays, which the caller reads back (one host synchronization per training call).

use crate::device::{launch, launch_2d, params, with_device, Device, Scratch};
use crate::ops::{check, kernel, plan, size, vector_width, Variant};
use crate::{Buf, DType, Error, Result, Stream};

/// `tokens` rows of `channels` (channels last), each row's channels in `groups` equal groups.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PowerShape {
    pub tokens: usize,
    pub channels: usize,
    pub groups: usize,
}

impl PowerShape {
    /// The element count, after checking the grouping and `eps`.
    fn check(&self, eps: f32) -> Result<usize> {
        if self.channels == 0 {
            return Err(Error::Value("x: the channel axis is empty".into()));
        }
        if self.groups == 0 || self.channels % self.groups != 0 {
            return Err(Error::Value(format!(
                "group_num: {} does not divide the {} channels",
                self.groups, self.channels
            )));
        }
        if !(eps >= 0.0 && eps.is_finite()) {
            return Err(Error::Value(format!(
                "eps: must be a finite number >= 0, got {eps}"
            )));
        }
        size(self.tokens, self.channels)
    }

    fn group_len(&self) -> usize {
        self.channels / self.groups
    }
}

/// The grid of a column pass: `tiles` blocks of 32 channels times `parts` blocks of `per_part`
/// tokens; each part writes its own partial column sums (added later in part order).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ColumnPlan {
    pub tiles: u32,
    pub parts: u32,
    pub per_part: usize,
}

/// Enough parts to give every SM a few blocks, but no more than one per 32 tokens.
pub fn column_plan(tokens: usize, channels: usize, sms: u32) -> Result<ColumnPlan> {
    let tiles = channels.div_ceil(32).max(1);
    let parts = (8 * sms.max(1) as usize)
        .div_ceil(tiles)
        .clamp(1, tokens.div_ceil(32).max(1));
    let per_part = tokens.div_ceil(parts).max(1);
    let parts = tokens.div_ceil(per_part).max(1);
    if tiles > i32::MAX as usize || parts > 65535 {
        return Err(Error::Value(format!(
            "too many channels or tokens for one launch: {tokens} x {channels}"
        )));
    }
    Ok(ColumnPlan {
        tiles: tiles as u32,
        parts: parts as u32,
        per_part,
    })
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
    let cg = shape.group_len();
    let vec = vector_width(x.dtype, cg, &[x.ptr]);
    let p = plan(rows, cg, vec, d.sms, false)?;
    let f = kernel(d, "power_norm", "power_scale", x.dtype, Variant::Vec(vec))?;
    let (rows_i, cg_i) = (rows as i64, cg as i64);
    // Safety: x has tokens*channels = rows*cg elements (checked by the caller); `out` rows floats.
    unsafe {
        launch(
            f,
            p.grid,
            p.block,
            s,
            &mut params![x.ptr, out, rows_i, cg_i, eps],
        )
    }
}

/// out[c] = sum of the `parts` partial rows of `cols` floats, in part order.
fn sum_parts(
    d: &mut Device,
    s: Stream,
    part: u64,
    parts: u32,
    cols: usize,
    out: u64,
) -> Result<()> {
    let f = d.function("power_norm", "power_sum_parts")?;
    let (parts_i, cols_i) = (parts as i32, cols as i64);
    // Safety: parts*cols partials in, cols floats out.
    unsafe {
        launch(
            f,
            cols.div_ceil(256) as u32,
            (256, 1),
            s,
            &mut params![part, parts_i, cols_i, out],
        )
    }
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
    if let Some(p) = &pad {
        check("pad_mask", p, DType::F32, shape.tokens)?;
    }
    if let Some(q) = &sumsq {
        check("sumsq", q, DType::F32, shape.channels)?;
    }
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
        let pad_ptr = pad.map_or(0u64, |p| p.ptr);
        let (scale, shift, y) =
            out.map_or((0u64, 0u64, 0u64), |o| (o.scale.ptr, o.shift.ptr, o.y.ptr));
        let f = kernel(d, "power_norm", "power_forward", x.dtype, Variant::Plain)?;
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
        // scales and parts*channels partials; grid (tiles, parts) of 32x8 threads.
        unsafe { launch_2d(f, (cp.tiles, cp.parts), (32, 8), s, &mut p)? };
        if let (Some(part), Some(q)) = (&part, sumsq) {
            sum_parts(d, s, part.ptr, cp.parts, shape.channels, q.ptr)?;
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
    if let Some(w) = &c.weight {
        check("weight", w, DType::F32, ch)?;
    }
    check("zscale", &c.zscale, DType::F32, ch)?;
    check("ema", &c.ema, DType::F32, ch)?;
    check("dscale", &c.dscale, DType::F32, ch)?;
    check("sums", &sums, DType::F32, 3 * ch)?;
    let weight = c.weight.map_or(0u64, |w| w.ptr);
    with_device(s.device, |d| {
        let rows = shape.tokens * shape.groups;
        let cg = shape.group_len();
        let scales = Scratch::new(rows * 4, s)?;
        if rows > 0 {
            let vec = vector_width(x.dtype, cg, &[x.ptr, dy.ptr, dx.ptr]);
            let p = plan(rows, cg, vec, d.sms, false)?;
            let f = kernel(
                d,
                "power_norm",
                "power_backward",
                x.dtype,
                Variant::Vec(vec),
            )?;
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
            unsafe { launch(f, p.grid, p.block, s, &mut a)? };
        }
        let cp = column_plan(shape.tokens, ch, d.sms)?;
        let part = Scratch::new(cp.parts as usize * 3 * ch * 4, s)?;
        let f = kernel(d, "power_norm", "power_param_part", x.dtype, Variant::Plain)?;
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
        unsafe { launch_2d(f, (cp.tiles, cp.parts), (32, 8), s, &mut a)? };
        sum_parts(d, s, part.ptr, cp.parts, 3 * ch, sums.ptr)
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
    fn column_plans_cover_every_token_once() {
        for &(tokens, channels) in &[
            (0, 1),
            (1, 1),
            (31, 7),
            (33, 64),
            (4096, 1024),
            (16384, 4096),
            (100_000, 17),
            (5, 1 << 20),
        ] {
            for sms in [1, 8, 132] {
                let p = column_plan(tokens, channels, sms).unwrap();
                let parts = p.parts as usize;
                assert!(p.per_part >= 1 && parts >= 1, "{tokens}x{channels}: {p:?}");
                assert!(parts * p.per_part >= tokens, "{tokens}x{channels}: {p:?}");
                // No empty part: the last one starts before the end (or there is only one).
                assert!(parts == 1 || (parts - 1) * p.per_part < tokens, "{p:?}");
                assert!(
                    p.tiles as usize * 32 >= channels
                        && (p.tiles as usize - 1) * 32 < channels.max(1)
                );
                assert!(parts <= 8 * sms as usize && parts <= 65535);
                assert!(
                    parts <= tokens.div_ceil(32).max(1),
                    "{tokens}x{channels}: {p:?}"
                );
            }
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
        let value = |r: Result<()>| matches!(r, Err(Error::Value(_)));
        // The grouping, eps and the channel count.
        let bad_groups = PowerShape { groups: 4, ..shape };
        assert!(value(power_norm_forward(
            S,
            x,
            bad_groups,
            1e-5,
            None,
            Some(buf(DType::F32, 6)),
            None
        )));
        let no_groups = PowerShape { groups: 0, ..shape };
        assert!(value(power_norm_forward(
            S,
            x,
            no_groups,
            1e-5,
            None,
            Some(buf(DType::F32, 6)),
            None
        )));
        assert!(value(power_norm_forward(
            S,
            x,
            shape,
            f32::NAN,
            None,
            Some(buf(DType::F32, 6)),
            None
        )));
        assert!(value(power_norm_forward(
            S,
            x,
            shape,
            -1.0,
            None,
            Some(buf(DType::F32, 6)),
            None
        )));
        let empty = PowerShape {
            channels: 0,
            groups: 1,
            ..shape
        };
        assert!(value(power_norm_forward(
            S,
            buf(DType::F32, 0),
            empty,
            1e-5,
            None,
            None,
            None
        )));
        // Lengths and dtypes of every buffer.
        assert!(value(power_norm_forward(
            S,
            buf(DType::F32, 23),
            shape,
            1e-5,
            None,
            Some(buf(DType::F32, 6)),
            None
        )));
        assert!(value(power_norm_forward(
            S,
            x,
            shape,
            1e-5,
            Some(buf(DType::F32, 3)),
            Some(buf(DType::F32, 6)),
            None
        )));
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
            scale: buf(DType::F32, 6),
            shift: buf(DType::F32, 6),
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
            weight: Some(buf(DType::F32, 5)),
            zscale: buf(DType::F32, 6),
            ema: buf(DType::F32, 6),
            dscale: buf(DType::F32, 6),
        };
        let sums = buf(DType::F32, 18);
        assert!(value(power_norm_backward(
            S, x, x, shape, 1e-5, grad, x, sums
        )));
        let grad = PowerGradIn {
            weight: None,
            ..grad
        };
        assert!(value(power_norm_backward(
            S,
            x,
            x,
            shape,
            1e-5,
            grad,
            x,
            buf(DType::F32, 12)
        )));
        assert!(value(power_norm_backward(
            S,
            buf(DType::F16, 24),
            x,
            shape,
            1e-5,
            grad,
            x,
            sums
        )));
        let null = Buf { ptr: 0, ..x };
        assert!(value(power_norm_backward(
            S, x, null, shape, 1e-5, grad, x, sums
        )));
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

    /// Every kernel name the functions above ask for is defined by the module (NVRTC needed:
    /// skipped without it). The names are in the cubin's symbol table.
    #[test]
    fn the_module_defines_every_kernel_asked_for() {
        let Ok(image) = crate::compile::compile("power_norm", "sm_80") else {
            eprintln!("NVRTC not found: skipped");
            return;
        };
        let has = |name: &str| image.windows(name.len()).any(|w| w == name.as_bytes());
        assert!(has("power_sum_parts"));
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let t = dtype.kernel_name();
            for v in [1, 16 / dtype.size()] {
                assert!(has(&format!("power_scale_{t}_v{v}\0")), "{t} v{v}");
                assert!(has(&format!("power_backward_{t}_v{v}\0")), "{t} v{v}");
            }
            assert!(has(&format!("power_forward_{t}\0")));
            assert!(has(&format!("power_param_part_{t}\0")));
        }
        assert!(!has("power_scale_f32_v8\0"), "the check can fail");
    }
}
