//! cuda_norm_forward, cuda_norm_backward and cuda_norm_workspace: rms_norm, crms_norm and
//! layer_norm by `options.kind`, over the (rows, cols) contiguous rows.

use super::{Call, CudaStream};
use crate::errors::to_py;
use crate::options::NormOptions;
use normax_cuda as cu;
use pyo3::prelude::*;

type Pair<'py> = (Option<Bound<'py, PyAny>>, Option<Bound<'py, PyAny>>);

/// y (into `out`, where given) of x, with `params` = (weight, bias); the float32 statistics
/// `stats` = (mean, rstd) are written where given.
#[pyfunction]
fn cuda_norm_forward(
    options: &NormOptions,
    x: &Bound<'_, PyAny>,
    params: Pair<'_>,
    out: Option<Bound<'_, PyAny>>,
    stats: Pair<'_>,
    shape: (usize, usize),
    stream: &CudaStream,
) -> PyResult<()> {
    let (c, (rows, cols)) = (Call::new(stream), shape);
    let xb = c.buf(x, "x")?;
    let weight = c.opt(params.0.as_ref(), "weight")?;
    let bias = c.opt(params.1.as_ref(), "bias")?;
    let out = c.opt(out.as_ref(), "out")?;
    let mean = c.opt(stats.0.as_ref(), "mean")?;
    let rstd = c.opt(stats.1.as_ref(), "rstd")?;
    let (kind, eps) = (options.kind, options.eps);
    c.run(x.py(), |s| {
        cu::norm_forward(s, kind, xb, weight, bias, out, mean, rstd, rows, cols, eps)
    })
}

/// float32 elements of the workspace `cuda_norm_backward` needs for `shape` on the stream's
/// device (0: none, as without parameters).
#[pyfunction]
fn cuda_norm_workspace(
    py: Python<'_>,
    options: &NormOptions,
    shape: (usize, usize),
    has_params: bool,
    stream: &CudaStream,
) -> PyResult<usize> {
    let (s, kind, (rows, cols)) = (Call::new(stream).stream, options.kind, shape);
    py.detach(|| cu::norm_workspace(s, kind, rows, cols, has_params))
        .map_err(to_py)
}

/// dx of `inputs` = (dy, x, weight or None) from the forward's `saved` = (mean or None, rstd)
/// into `outputs` = (dx, (dweight, dbias) where wanted, workspace): float32, at least
/// `cuda_norm_workspace` elements; None without parameter gradients.
#[pyfunction]
fn cuda_norm_backward(
    options: &NormOptions,
    inputs: (Bound<'_, PyAny>, Bound<'_, PyAny>, Option<Bound<'_, PyAny>>),
    saved: (Option<Bound<'_, PyAny>>, Bound<'_, PyAny>),
    outputs: (Bound<'_, PyAny>, Pair<'_>, Option<Bound<'_, PyAny>>),
    shape: (usize, usize),
    stream: &CudaStream,
) -> PyResult<()> {
    let (c, (rows, cols)) = (Call::new(stream), shape);
    let (dx, dparams, workspace) = &outputs;
    let dy = c.buf(&inputs.0, "dy")?;
    let x = c.buf(&inputs.1, "x")?;
    let weight = c.opt(inputs.2.as_ref(), "weight")?;
    let mean = c.opt(saved.0.as_ref(), "mean")?;
    let rstd = c.buf(&saved.1, "rstd")?;
    let dxb = c.buf(dx, "dx")?;
    let grads = cu::NormParamGrads {
        dweight: c.opt(dparams.0.as_ref(), "dweight")?,
        dbias: c.opt(dparams.1.as_ref(), "dbias")?,
        workspace: c.opt(workspace.as_ref(), "workspace")?,
    };
    let kind = options.kind;
    c.run(dx.py(), |s| {
        cu::norm_backward(s, kind, dy, x, weight, mean, rstd, dxb, grads, rows, cols)
    })
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(cuda_norm_forward, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_norm_backward, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_norm_workspace, m)?)
}
