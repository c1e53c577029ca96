//! cuda_power_norm_forward and cuda_power_norm_backward: PowerNorm's passes over the tokens.
//! x is (tokens, channels); the per-channel factors and sums are float32 device arrays.

use super::{Call, CudaStream};
use crate::options::PowerNormOptions;
use normax_cuda::{self as cu, Buf, PowerGradIn, PowerOut, PowerShape};
use pyo3::prelude::*;

type Any<'py> = Bound<'py, PyAny>;

fn shape(options: &PowerNormOptions, x: &Buf) -> PowerShape {
    PowerShape {
        tokens: x.len / options.channels.max(1),
        channels: options.channels,
        groups: options.groups,
    }
}

/// Sums of u^2 into `sumsq` and/or, with `out` = (scale, shift, y), y = u * scale + shift.
#[pyfunction]
fn cuda_power_norm_forward(
    options: &PowerNormOptions,
    x: &Any<'_>,
    pad: Option<Any<'_>>,
    sumsq: Option<Any<'_>>,
    out: Option<(Any<'_>, Any<'_>, Any<'_>)>,
    stream: &CudaStream,
) -> PyResult<()> {
    let c = Call::new(stream);
    let xb = c.buf(x, "x")?;
    let pad = c.opt(pad.as_ref(), "pad_mask")?;
    let sumsq = c.opt(sumsq.as_ref(), "sumsq")?;
    let out = match &out {
        Some((scale, shift, y)) => Some(PowerOut {
            scale: c.buf(scale, "scale")?,
            shift: c.buf(shift, "shift")?,
            y: c.buf(y, "y")?,
        }),
        None => None,
    };
    let (sh, eps) = (shape(options, &xb), options.eps as f32);
    c.run(x.py(), |s| {
        cu::power_norm_forward(s, xb, sh, eps, pad, sumsq, out)
    })
}

/// dx and the per-channel sums (`outs` = (dx, sums)) from `saved` = (zscale, ema, dscale).
#[pyfunction]
fn cuda_power_norm_backward(
    options: &PowerNormOptions,
    inputs: (Any<'_>, Any<'_>, Option<Any<'_>>),
    saved: (Any<'_>, Any<'_>, Any<'_>),
    outs: (Any<'_>, Any<'_>),
    stream: &CudaStream,
) -> PyResult<()> {
    let c = Call::new(stream);
    let dy = c.buf(&inputs.0, "dy")?;
    let x = c.buf(&inputs.1, "x")?;
    let grad = PowerGradIn {
        weight: c.opt(inputs.2.as_ref(), "weight")?,
        zscale: c.buf(&saved.0, "zscale")?,
        ema: c.buf(&saved.1, "ema")?,
        dscale: c.buf(&saved.2, "dscale")?,
    };
    let dx = c.buf(&outs.0, "dx")?;
    let sums = c.buf(&outs.1, "sums")?;
    let (sh, eps) = (shape(options, &x), options.eps as f32);
    c.run(outs.0.py(), |s| {
        cu::power_norm_backward(s, dy, x, sh, eps, grad, dx, sums)
    })
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(cuda_power_norm_forward, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_power_norm_backward, m)?)
}
