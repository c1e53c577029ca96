//! Bindings of the wgpu kernels (`normax_wgpu`, Cargo feature `wgpu`): array conversion only.
//!
//! python/normax/_backends/wgpu.py validates the user's arguments and hands over C-contiguous
//! float32 arrays of rows (2-d, the reduced axis last); here the dtype, contiguity and rank are
//! re-checked, the GIL is released while the device works, and errors become Python exceptions
//! (`errors::to_py`): no adapter or a device failure RuntimeError, a bad argument ValueError, a
//! class index IndexError.

use crate::arrays::{readonly, slice, slice_opt, Arr, Read};
use crate::errors::to_py;
use crate::options::{CeOptions, GradOutput, NormOptions};
use normax_core::spec::NormKind;
use normax_wgpu as g;
use numpy::{Element, IntoPyArray, PyArray1, PyArray2, PyArrayMethods, PyUntypedArrayMethods};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

/// The array checked to have `ndim` dimensions, then read-only (`arrays::readonly`).
fn read<'py, T: Element>(a: &Arr<'py>, name: &str, ndim: usize) -> PyResult<Read<'py, T>> {
    if a.ndim() != ndim {
        return Err(PyValueError::new_err(format!(
            "{name}: expected a {ndim}-d array, got {} dimensions",
            a.ndim()
        )));
    }
    readonly::<T>(a, name)
}

/// A 1-d float32 array that may be absent (weight, bias, per-row grad_output).
fn read_vec<'py>(a: Option<&Arr<'py>>, name: &str) -> PyResult<Option<Read<'py, f32>>> {
    a.map(|a| read::<f32>(a, name, 1)).transpose()
}

fn matrix<'py>(
    py: Python<'py>,
    y: Vec<f32>,
    rows: usize,
    cols: usize,
) -> PyResult<Bound<'py, PyArray2<f32>>> {
    y.into_pyarray(py).reshape([rows, cols])
}

/// The adapter in use, "name (backend, device type)"; RuntimeError when there is none.
#[pyfunction]
fn wgpu_adapter(py: Python<'_>) -> PyResult<String> {
    py.detach(g::adapter_info).map_err(to_py)
}

type RowsFn = fn(&[f32], usize, usize) -> Result<Vec<f32>, g::Error>;

/// `f` of the rows of a 2-d float32 array: (rows, cols, the result).
fn of_rows(py: Python<'_>, x: &Arr<'_>, f: RowsFn) -> PyResult<(usize, usize, Vec<f32>)> {
    let xr = read::<f32>(x, "x", 2)?;
    let (rows, cols) = (xr.shape()[0], xr.shape()[1]);
    let xs = slice(&xr, "x")?;
    let y = py.detach(|| f(xs, rows, cols)).map_err(to_py)?;
    Ok((rows, cols, y))
}

fn map_rows<'py>(py: Python<'py>, x: &Arr<'py>, f: RowsFn) -> PyResult<Bound<'py, PyArray2<f32>>> {
    let (rows, cols, y) = of_rows(py, x, f)?;
    matrix(py, y, rows, cols)
}

/// softmax of each row of a 2-d float32 array.
#[pyfunction]
fn wgpu_softmax<'py>(py: Python<'py>, x: &Arr<'py>) -> PyResult<Bound<'py, PyArray2<f32>>> {
    map_rows(py, x, g::softmax)
}

/// log_softmax of each row of a 2-d float32 array.
#[pyfunction]
fn wgpu_log_softmax<'py>(py: Python<'py>, x: &Arr<'py>) -> PyResult<Bound<'py, PyArray2<f32>>> {
    map_rows(py, x, g::log_softmax)
}

/// logsumexp of each row of a 2-d float32 array: one value per row.
#[pyfunction]
fn wgpu_logsumexp<'py>(py: Python<'py>, x: &Arr<'py>) -> PyResult<Bound<'py, PyArray1<f32>>> {
    let (_, _, y) = of_rows(py, x, g::logsumexp)?;
    Ok(y.into_pyarray(py))
}

/// rms_norm or layer_norm (by `options.kind`) of each row of a 2-d float32 array (weight None:
/// ones, bias None: zeros).
#[pyfunction]
#[pyo3(signature = (options, x, weight, bias))]
fn wgpu_norm<'py>(
    options: &NormOptions,
    x: &Arr<'py>,
    weight: Option<&Arr<'py>>,
    bias: Option<&Arr<'py>>,
) -> PyResult<Bound<'py, PyArray2<f32>>> {
    let py = x.py();
    let xr = read::<f32>(x, "x", 2)?;
    let (rows, cols) = (xr.shape()[0], xr.shape()[1]);
    let wr = read_vec(weight, "weight")?;
    let br = read_vec(bias, "bias")?;
    let xs = slice(&xr, "x")?;
    let (ws, bs) = (slice_opt(&wr, "weight")?, slice_opt(&br, "bias")?);
    let eps = options.eps as f32;
    let y = py
        .detach(|| match options.kind {
            NormKind::Layer => g::layer_norm(xs, rows, cols, ws, bs, eps),
            NormKind::Rms => g::rms_norm(xs, rows, cols, ws, eps),
            NormKind::Crms => Err(g::Error::Value("no wgpu kernel for crms_norm".into())),
        })
        .map_err(to_py)?;
    matrix(py, y, rows, cols)
}

type LossGrad<'py> = (Bound<'py, PyArray1<f32>>, Option<Bound<'py, PyArray2<f32>>>);

/// Cross-entropy of 2-d float32 logits against int64 class indices: (loss, gradient or None).
/// The loss has one value per row for reduction "none", else one value. With `grad_output` (a
/// number, or one per row for reduction "none"), also the gradient of grad_output * loss.
#[pyfunction]
#[pyo3(signature = (logits, target, weight, options, grad_output=None))]
fn wgpu_cross_entropy<'py>(
    logits: &Arr<'py>,
    target: &Arr<'py>,
    weight: Option<&Arr<'py>>,
    options: &CeOptions,
    grad_output: Option<GradOutput<'py>>,
) -> PyResult<LossGrad<'py>> {
    let py = logits.py();
    let xr = read::<f32>(logits, "logits", 2)?;
    let (rows, classes) = (xr.shape()[0], xr.shape()[1]);
    let tr = read::<i64>(target, "target", 1)?;
    let wr = read_vec(weight, "weight")?;
    let gr = match &grad_output {
        Some(GradOutput::Rows(g)) => read_vec(Some(g), "grad_output")?,
        _ => None,
    };
    let opts = options.with_weight(slice_opt(&wr, "weight")?);
    let grad = match &grad_output {
        None => None,
        Some(g) => Some(g.core(&gr)?),
    };
    let (xs, ts) = (slice(&xr, "logits")?, slice(&tr, "target")?);
    let (loss, grad) = py
        .detach(|| g::cross_entropy(xs, rows, classes, ts, &opts, grad))
        .map_err(to_py)?;
    let grad = grad.map(|d| matrix(py, d, rows, classes)).transpose()?;
    Ok((loss.into_pyarray(py), grad))
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(wgpu_adapter, m)?)?;
    m.add_function(wrap_pyfunction!(wgpu_softmax, m)?)?;
    m.add_function(wrap_pyfunction!(wgpu_log_softmax, m)?)?;
    m.add_function(wrap_pyfunction!(wgpu_logsumexp, m)?)?;
    m.add_function(wrap_pyfunction!(wgpu_norm, m)?)?;
    m.add_function(wrap_pyfunction!(wgpu_cross_entropy, m)?)?;
    Ok(())
}
