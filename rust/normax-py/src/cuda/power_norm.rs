//! cuda_power_norm_forward and cuda_power_norm_backward: PowerNorm's passes over the tokens.
//! x is (tokens, channels); the per-channel factors and sums are float32 device arrays.

use super::Call;
use normax_cuda::{self as cu, PowerGradIn, PowerOut, PowerShape};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (x, tokens, channels, groups, eps, pad, sumsq, scale, shift, y, device, stream_handle))]
fn cuda_power_norm_forward(
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    tokens: usize,
    channels: usize,
    groups: usize,
    eps: f32,
    pad: Option<&Bound<'_, PyAny>>,
    sumsq: Option<&Bound<'_, PyAny>>,
    scale: Option<&Bound<'_, PyAny>>,
    shift: Option<&Bound<'_, PyAny>>,
    y: Option<&Bound<'_, PyAny>>,
    device: i32,
    stream_handle: u64,
) -> PyResult<()> {
    let c = Call::new(device, stream_handle);
    let x = c.buf(x, "x")?;
    let pad = c.opt(pad, "pad_mask")?;
    let sumsq = c.opt(sumsq, "sumsq")?;
    let out = match (
        c.opt(scale, "scale")?,
        c.opt(shift, "shift")?,
        c.opt(y, "y")?,
    ) {
        (Some(scale), Some(shift), Some(y)) => Some(PowerOut { scale, shift, y }),
        (None, None, None) => None,
        _ => {
            return Err(PyValueError::new_err(
                "y: scale, shift and y are given together or not at all",
            ))
        }
    };
    let shape = PowerShape {
        tokens,
        channels,
        groups,
    };
    c.run(py, |s| {
        cu::power_norm_forward(s, x, shape, eps, pad, sumsq, out)
    })
}

#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (dy, x, tokens, channels, groups, eps, weight, zscale, ema, dscale, dx, sums, device, stream_handle))]
fn cuda_power_norm_backward(
    py: Python<'_>,
    dy: &Bound<'_, PyAny>,
    x: &Bound<'_, PyAny>,
    tokens: usize,
    channels: usize,
    groups: usize,
    eps: f32,
    weight: Option<&Bound<'_, PyAny>>,
    zscale: &Bound<'_, PyAny>,
    ema: &Bound<'_, PyAny>,
    dscale: &Bound<'_, PyAny>,
    dx: &Bound<'_, PyAny>,
    sums: &Bound<'_, PyAny>,
    device: i32,
    stream_handle: u64,
) -> PyResult<()> {
    let c = Call::new(device, stream_handle);
    let dy = c.buf(dy, "dy")?;
    let x = c.buf(x, "x")?;
    let grad = PowerGradIn {
        weight: c.opt(weight, "weight")?,
        zscale: c.buf(zscale, "zscale")?,
        ema: c.buf(ema, "ema")?,
        dscale: c.buf(dscale, "dscale")?,
    };
    let dx = c.buf(dx, "dx")?;
    let sums = c.buf(sums, "sums")?;
    let shape = PowerShape {
        tokens,
        channels,
        groups,
    };
    c.run(py, |s| {
        cu::power_norm_backward(s, dy, x, shape, eps, grad, dx, sums)
    })
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(cuda_power_norm_forward, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_power_norm_backward, m)?)
}
