//! cuda_norm_forward and cuda_norm_backward: rms_norm, crms_norm and layer_norm by `kind`.

use super::Call;
use crate::errors::to_py;
use normax_cuda::{self as cu, NormKind};
use pyo3::prelude::*;

#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (kind, x, weight, bias, out, mean, rstd, rows, cols, eps, device, stream_handle))]
fn cuda_norm_forward(
    py: Python<'_>,
    kind: &str,
    x: &Bound<'_, PyAny>,
    weight: Option<&Bound<'_, PyAny>>,
    bias: Option<&Bound<'_, PyAny>>,
    out: Option<&Bound<'_, PyAny>>,
    mean: Option<&Bound<'_, PyAny>>,
    rstd: Option<&Bound<'_, PyAny>>,
    rows: usize,
    cols: usize,
    eps: f32,
    device: i32,
    stream_handle: u64,
) -> PyResult<()> {
    let kind = NormKind::parse(kind).map_err(to_py)?;
    let c = Call::new(device, stream_handle);
    let x = c.buf(x, "x")?;
    let weight = c.opt(weight, "weight")?;
    let bias = c.opt(bias, "bias")?;
    let out = c.opt(out, "out")?;
    let mean = c.opt(mean, "mean")?;
    let rstd = c.opt(rstd, "rstd")?;
    c.run(py, |s| {
        cu::norm_forward(s, kind, x, weight, bias, out, mean, rstd, rows, cols, eps)
    })
}

#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (kind, dy, x, weight, mean, rstd, dx, dweight, dbias, rows, cols, device, stream_handle))]
fn cuda_norm_backward(
    py: Python<'_>,
    kind: &str,
    dy: &Bound<'_, PyAny>,
    x: &Bound<'_, PyAny>,
    weight: Option<&Bound<'_, PyAny>>,
    mean: Option<&Bound<'_, PyAny>>,
    rstd: &Bound<'_, PyAny>,
    dx: &Bound<'_, PyAny>,
    dweight: Option<&Bound<'_, PyAny>>,
    dbias: Option<&Bound<'_, PyAny>>,
    rows: usize,
    cols: usize,
    device: i32,
    stream_handle: u64,
) -> PyResult<()> {
    let kind = NormKind::parse(kind).map_err(to_py)?;
    let c = Call::new(device, stream_handle);
    let dy = c.buf(dy, "dy")?;
    let x = c.buf(x, "x")?;
    let weight = c.opt(weight, "weight")?;
    let mean = c.opt(mean, "mean")?;
    let rstd = c.buf(rstd, "rstd")?;
    let dx = c.buf(dx, "dx")?;
    let dweight = c.opt(dweight, "dweight")?;
    let dbias = c.opt(dbias, "dbias")?;
    c.run(py, |s| {
        cu::norm_backward(
            s, kind, dy, x, weight, mean, rstd, dx, dweight, dbias, rows, cols,
        )
    })
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(cuda_norm_forward, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_norm_backward, m)?)
}
