//! Bindings of the wgpu kernels (`normax_wgpu`, Cargo feature `wgpu`): array conversion only.
//!
//! python/normax/_wgpu.py validates the user's arguments and hands over C-contiguous float32
//! arrays of rows (2-d, the reduced axis last); here the dtype, contiguity and rank are re-checked,
//! the GIL is released while the device works, and errors become Python exceptions: no adapter or
//! a device failure RuntimeError, a bad argument ValueError, a class index IndexError.

use crate::typed;
use normax_wgpu::{self as g, GradOutput, Options, Reduction};
use numpy::{
    IntoPyArray, PyArray1, PyArray2, PyArrayMethods, PyReadonlyArrayDyn, PyUntypedArray,
    PyUntypedArrayMethods,
};
use pyo3::exceptions::{PyIndexError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;

type Arr<'py> = Bound<'py, PyUntypedArray>;

fn to_py(e: g::Error) -> PyErr {
    match e {
        g::Error::NoAdapter(m) | g::Error::Unavailable(m) | g::Error::Device(m) => {
            PyRuntimeError::new_err(m)
        }
        g::Error::Value(m) => PyValueError::new_err(m),
        g::Error::Index(m) => PyIndexError::new_err(m),
    }
}

fn read<'py, T: numpy::Element>(
    a: &Arr<'py>,
    name: &str,
    ndim: usize,
) -> PyResult<PyReadonlyArrayDyn<'py, T>> {
    if a.ndim() != ndim {
        return Err(PyValueError::new_err(format!(
            "{name}: expected a {ndim}-d array, got {} dimensions",
            a.ndim()
        )));
    }
    typed::<T>(a, name)?
        .try_readonly()
        .map_err(|e| PyValueError::new_err(format!("{name}: {e}")))
}

fn slice<'a, T: numpy::Element>(a: &'a PyReadonlyArrayDyn<'_, T>) -> PyResult<&'a [T]> {
    a.as_slice()
        .map_err(|e| PyValueError::new_err(e.to_string()))
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

fn map_rows<'py>(py: Python<'py>, x: &Arr<'py>, f: RowsFn) -> PyResult<Bound<'py, PyArray2<f32>>> {
    let xr = read::<f32>(x, "x", 2)?;
    let (rows, cols) = (xr.shape()[0], xr.shape()[1]);
    let xs = slice(&xr)?;
    let y = py.detach(|| f(xs, rows, cols)).map_err(to_py)?;
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
    let xr = read::<f32>(x, "x", 2)?;
    let (rows, cols) = (xr.shape()[0], xr.shape()[1]);
    let xs = slice(&xr)?;
    let y = py.detach(|| g::logsumexp(xs, rows, cols)).map_err(to_py)?;
    Ok(y.into_pyarray(py))
}

fn read_vec<'py>(
    a: Option<&Arr<'py>>,
    name: &str,
) -> PyResult<Option<PyReadonlyArrayDyn<'py, f32>>> {
    a.map(|a| read::<f32>(a, name, 1)).transpose()
}

fn slice_opt<'a>(a: &'a Option<PyReadonlyArrayDyn<'_, f32>>) -> PyResult<Option<&'a [f32]>> {
    a.as_ref().map(slice).transpose()
}

/// rms_norm of each row (weight None: ones).
#[pyfunction]
#[pyo3(signature = (x, weight, eps))]
fn wgpu_rms_norm<'py>(
    py: Python<'py>,
    x: &Arr<'py>,
    weight: Option<&Arr<'py>>,
    eps: f32,
) -> PyResult<Bound<'py, PyArray2<f32>>> {
    let xr = read::<f32>(x, "x", 2)?;
    let (rows, cols) = (xr.shape()[0], xr.shape()[1]);
    let wr = read_vec(weight, "weight")?;
    let (xs, ws) = (slice(&xr)?, slice_opt(&wr)?);
    let y = py
        .detach(|| g::rms_norm(xs, rows, cols, ws, eps))
        .map_err(to_py)?;
    matrix(py, y, rows, cols)
}

/// layer_norm of each row (weight None: ones, bias None: zeros).
#[pyfunction]
#[pyo3(signature = (x, weight, bias, eps))]
fn wgpu_layer_norm<'py>(
    py: Python<'py>,
    x: &Arr<'py>,
    weight: Option<&Arr<'py>>,
    bias: Option<&Arr<'py>>,
    eps: f32,
) -> PyResult<Bound<'py, PyArray2<f32>>> {
    let xr = read::<f32>(x, "x", 2)?;
    let (rows, cols) = (xr.shape()[0], xr.shape()[1]);
    let wr = read_vec(weight, "weight")?;
    let br = read_vec(bias, "bias")?;
    let (xs, ws, bs) = (slice(&xr)?, slice_opt(&wr)?, slice_opt(&br)?);
    let y = py
        .detach(|| g::layer_norm(xs, rows, cols, ws, bs, eps))
        .map_err(to_py)?;
    matrix(py, y, rows, cols)
}

type LossGrad<'py> = (Bound<'py, PyArray1<f32>>, Option<Bound<'py, PyArray2<f32>>>);

/// Cross-entropy of 2-d float32 logits against int64 class indices: (loss, gradient or None).
/// The loss has one value per row for reduction "none", else one value. With `with_grad`, the
/// gradient is that of grad_output * loss, grad_output being `grad_rows` (one per row, reduction
/// "none" only) or `grad_scalar`.
#[pyfunction]
#[pyo3(signature = (
    logits, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap, with_grad,
    grad_rows, grad_scalar
))]
#[allow(clippy::too_many_arguments)]
fn wgpu_cross_entropy<'py>(
    py: Python<'py>,
    logits: &Arr<'py>,
    target: &Arr<'py>,
    weight: Option<&Arr<'py>>,
    ignore_index: i64,
    reduction: &str,
    label_smoothing: f32,
    z_loss: f32,
    softcap: Option<f32>,
    with_grad: bool,
    grad_rows: Option<&Arr<'py>>,
    grad_scalar: f64,
) -> PyResult<LossGrad<'py>> {
    let xr = read::<f32>(logits, "logits", 2)?;
    let (rows, classes) = (xr.shape()[0], xr.shape()[1]);
    let tr = read::<i64>(target, "target", 1)?;
    let wr = read_vec(weight, "weight")?;
    let gr = read_vec(grad_rows, "grad_output")?;
    let reduction = match reduction {
        "none" => Reduction::None,
        "sum" => Reduction::Sum,
        "mean" => Reduction::Mean,
        other => {
            return Err(PyValueError::new_err(format!(
                "reduction: expected 'mean', 'sum' or 'none', got {other:?}"
            )))
        }
    };
    let opts = Options {
        weight: slice_opt(&wr)?,
        ignore_index,
        reduction,
        label_smoothing,
        z_loss,
        softcap,
    };
    let grad = match (with_grad, slice_opt(&gr)?) {
        (false, _) => None,
        (true, Some(g)) => Some(GradOutput::Rows(g)),
        (true, None) => Some(GradOutput::Scalar(grad_scalar)),
    };
    let (xs, ts) = (slice(&xr)?, slice(&tr)?);
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
    m.add_function(wrap_pyfunction!(wgpu_rms_norm, m)?)?;
    m.add_function(wrap_pyfunction!(wgpu_layer_norm, m)?)?;
    m.add_function(wrap_pyfunction!(wgpu_cross_entropy, m)?)?;
    Ok(())
}
