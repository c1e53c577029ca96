//! Bindings of the cross-entropy family: array conversion, the GIL released, errors mapped.
//!
//! python/normax/_cross_entropy.py validates the user's input and lays it out as contiguous rows
//! (classes last); the core re-checks sizes and every target index before any kernel reads.

use super::{is_f32, same_memory, to_py, typed};
use normax_core::cross_entropy::{self as k, GradOutput, LinearGrads, Options, Reduction, Target};
use normax_core::Float;
use numpy::{
    Element, PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn, PyReadwriteArrayDyn, PyUntypedArray,
};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

fn readonly<'py, T: Element>(
    a: &Bound<'py, PyUntypedArray>,
    name: &str,
) -> PyResult<PyReadonlyArrayDyn<'py, T>> {
    typed::<T>(a, name)?
        .try_readonly()
        .map_err(|e| PyValueError::new_err(format!("{name}: {e}")))
}

fn readwrite<'py, T: Element>(
    a: &Bound<'py, PyUntypedArray>,
    name: &str,
) -> PyResult<PyReadwriteArrayDyn<'py, T>> {
    typed::<T>(a, name)?
        .try_readwrite()
        .map_err(|e| PyValueError::new_err(format!("{name}: {e}")))
}

fn slice<'a, T: Element>(a: &'a PyReadonlyArrayDyn<'_, T>, name: &str) -> PyResult<&'a [T]> {
    a.as_slice()
        .map_err(|e| PyValueError::new_err(format!("{name}: {e}")))
}

fn slice_mut<'a, T: Element>(
    a: &'a mut PyReadwriteArrayDyn<'_, T>,
    name: &str,
) -> PyResult<&'a mut [T]> {
    a.as_slice_mut()
        .map_err(|e| PyValueError::new_err(format!("{name}: {e}")))
}

/// Hard targets arrive as int64, soft ones in the logits' dtype.
enum Targets<'py, T: Element> {
    Classes(PyReadonlyArrayDyn<'py, i64>),
    Probs(PyReadonlyArrayDyn<'py, T>),
}

impl<'py, T: Element + Float> Targets<'py, T> {
    fn new(a: &Bound<'py, PyUntypedArray>) -> PyResult<Self> {
        if a.cast::<PyArrayDyn<i64>>().is_ok() {
            Ok(Targets::Classes(readonly::<i64>(a, "target")?))
        } else if a.cast::<PyArrayDyn<T>>().is_ok() {
            Ok(Targets::Probs(readonly::<T>(a, "target")?))
        } else {
            Err(PyTypeError::new_err(
                "target: expected int64 class indices or probabilities in the logits' dtype",
            ))
        }
    }

    fn get(&self) -> PyResult<Target<'_, T>> {
        Ok(match self {
            Targets::Classes(t) => Target::Classes(slice(t, "target")?),
            Targets::Probs(t) => Target::Probs(slice(t, "target")?),
        })
    }
}

/// The loss options shared by both ops (class weights added by the caller).
#[derive(Clone, Copy)]
struct Opts<'a> {
    ignore_index: i64,
    reduction: &'a str,
    label_smoothing: f64,
    z_loss: f64,
    softcap: Option<f64>,
}

impl Opts<'_> {
    fn options<'w, T>(&self, weight: Option<&'w [T]>) -> PyResult<Options<'w, T>> {
        Ok(Options {
            weight,
            ignore_index: self.ignore_index,
            reduction: Reduction::parse(self.reduction).map_err(to_py)?,
            label_smoothing: self.label_smoothing,
            z_loss: self.z_loss,
            softcap: self.softcap,
        })
    }
}

fn grad_output<'a, T: Element>(
    rows: &'a Option<PyReadonlyArrayDyn<'_, T>>,
    scalar: f64,
) -> PyResult<GradOutput<'a, T>> {
    Ok(match rows {
        Some(g) => GradOutput::Rows(slice(g, "grad_output")?),
        None => GradOutput::Scalar(scalar),
    })
}

#[allow(clippy::too_many_arguments)]
fn ce_typed<T: Float + Element>(
    py: Python<'_>,
    logits: &Bound<'_, PyUntypedArray>,
    target: &Bound<'_, PyUntypedArray>,
    weight: Option<&Bound<'_, PyUntypedArray>>,
    loss: &Bound<'_, PyUntypedArray>,
    grad: Option<&Bound<'_, PyUntypedArray>>,
    grad_rows: Option<&Bound<'_, PyUntypedArray>>,
    grad_scalar: f64,
    (rows, classes): (usize, usize),
    opts: Opts<'_>,
) -> PyResult<()> {
    let targets = Targets::<T>::new(target)?;
    let weight = weight.map(|w| readonly::<T>(w, "weight")).transpose()?;
    let go = grad_rows
        .map(|g| readonly::<T>(g, "grad_output"))
        .transpose()?;
    let mut loss = readwrite::<T>(loss, "loss")?;
    let ws = weight.as_ref().map(|w| slice(w, "weight")).transpose()?;
    let o = opts.options(ws)?;
    let t = targets.get()?;
    let go = grad_output(&go, grad_scalar)?;
    let ls = slice_mut(&mut loss, "loss")?;
    match grad {
        None => {
            let x = readonly::<T>(logits, "logits")?;
            let xs = slice(&x, "logits")?;
            py.detach(|| k::cross_entropy(xs, rows, classes, t, &o, ls))
        }
        Some(g) if same_memory(g, logits) => {
            let mut x = readwrite::<T>(logits, "logits")?;
            let xs = slice_mut(&mut x, "logits")?;
            py.detach(|| k::cross_entropy_with_grad_inplace(xs, rows, classes, t, &o, go, ls))
        }
        Some(g) => {
            let x = readonly::<T>(logits, "logits")?;
            let mut g = readwrite::<T>(g, "grad")?;
            let xs = slice(&x, "logits")?;
            let gs = slice_mut(&mut g, "grad")?;
            py.detach(|| k::cross_entropy_with_grad(xs, gs, rows, classes, t, &o, go, ls))
        }
    }
    .map_err(to_py)
}

/// Cross-entropy of contiguous (rows, classes) logits into `loss` (rows values for reduction
/// "none", else one). With `grad` (a fresh array, or `logits` itself for in place) also the
/// gradient of grad_output * loss: `grad_rows` per row for "none", else `grad_scalar`.
#[pyfunction]
#[pyo3(signature = (logits, target, weight, loss, grad, grad_rows, grad_scalar, rows, classes,
                    ignore_index, reduction, label_smoothing, z_loss, softcap))]
#[allow(clippy::too_many_arguments)]
fn cross_entropy(
    py: Python<'_>,
    logits: &Bound<'_, PyUntypedArray>,
    target: &Bound<'_, PyUntypedArray>,
    weight: Option<Bound<'_, PyUntypedArray>>,
    loss: &Bound<'_, PyUntypedArray>,
    grad: Option<Bound<'_, PyUntypedArray>>,
    grad_rows: Option<Bound<'_, PyUntypedArray>>,
    grad_scalar: f64,
    rows: usize,
    classes: usize,
    ignore_index: i64,
    reduction: &str,
    label_smoothing: f64,
    z_loss: f64,
    softcap: Option<f64>,
) -> PyResult<()> {
    let opts = Opts {
        ignore_index,
        reduction,
        label_smoothing,
        z_loss,
        softcap,
    };
    let args = (
        weight.as_ref(),
        loss,
        grad.as_ref(),
        grad_rows.as_ref(),
        grad_scalar,
    );
    if is_f32(logits) {
        ce_typed::<f32>(
            py,
            logits,
            target,
            args.0,
            args.1,
            args.2,
            args.3,
            args.4,
            (rows, classes),
            opts,
        )
    } else {
        ce_typed::<f64>(
            py,
            logits,
            target,
            args.0,
            args.1,
            args.2,
            args.3,
            args.4,
            (rows, classes),
            opts,
        )
    }
}

#[allow(clippy::too_many_arguments)]
fn linear_typed<T: Float + Element>(
    py: Python<'_>,
    hidden: &Bound<'_, PyUntypedArray>,
    weight: &Bound<'_, PyUntypedArray>,
    bias: Option<&Bound<'_, PyUntypedArray>>,
    target: &Bound<'_, PyUntypedArray>,
    loss: &Bound<'_, PyUntypedArray>,
    grads: Option<(&Bound<'_, PyUntypedArray>, &Bound<'_, PyUntypedArray>)>,
    dbias: Option<&Bound<'_, PyUntypedArray>>,
    grad_rows: Option<&Bound<'_, PyUntypedArray>>,
    grad_scalar: f64,
    nhv: (usize, usize, usize),
    opts: Opts<'_>,
    chunk_size: Option<usize>,
) -> PyResult<()> {
    let hid = readonly::<T>(hidden, "hidden")?;
    let w = readonly::<T>(weight, "weight")?;
    let b = bias.map(|b| readonly::<T>(b, "bias")).transpose()?;
    let t = readonly::<i64>(target, "target")?;
    let go = grad_rows
        .map(|g| readonly::<T>(g, "grad_output"))
        .transpose()?;
    let mut loss = readwrite::<T>(loss, "loss")?;
    let mut dh = grads.map(|g| readwrite::<T>(g.0, "dhidden")).transpose()?;
    let mut dw = grads.map(|g| readwrite::<T>(g.1, "dweight")).transpose()?;
    let mut db = dbias.map(|d| readwrite::<T>(d, "dbias")).transpose()?;
    let (hs, ws, ts) = (
        slice(&hid, "hidden")?,
        slice(&w, "weight")?,
        slice(&t, "target")?,
    );
    let bs = b.as_ref().map(|b| slice(b, "bias")).transpose()?;
    let o = opts.options::<T>(None)?;
    let go = grad_output(&go, grad_scalar)?;
    let ls = slice_mut(&mut loss, "loss")?;
    let grads = match (dh.as_mut(), dw.as_mut()) {
        (Some(dh), Some(dw)) => Some((
            go,
            LinearGrads {
                dhidden: slice_mut(dh, "dhidden")?,
                dweight: slice_mut(dw, "dweight")?,
                dbias: db.as_mut().map(|d| slice_mut(d, "dbias")).transpose()?,
            },
        )),
        _ => None,
    };
    py.detach(|| k::linear_cross_entropy(hs, ws, bs, ts, nhv, &o, chunk_size, grads, ls))
        .map_err(to_py)
}

/// Linear cross-entropy: logits = hidden @ weight.T + bias, never all held at once. With
/// `dhidden`/`dweight` (fresh arrays; `dbias` too when there is a bias) also the gradients.
#[pyfunction]
#[pyo3(signature = (hidden, weight, bias, target, loss, dhidden, dweight, dbias, grad_rows,
                    grad_scalar, n, h, v, ignore_index, reduction, label_smoothing, z_loss,
                    softcap, chunk_size))]
#[allow(clippy::too_many_arguments)]
fn linear_cross_entropy(
    py: Python<'_>,
    hidden: &Bound<'_, PyUntypedArray>,
    weight: &Bound<'_, PyUntypedArray>,
    bias: Option<Bound<'_, PyUntypedArray>>,
    target: &Bound<'_, PyUntypedArray>,
    loss: &Bound<'_, PyUntypedArray>,
    dhidden: Option<Bound<'_, PyUntypedArray>>,
    dweight: Option<Bound<'_, PyUntypedArray>>,
    dbias: Option<Bound<'_, PyUntypedArray>>,
    grad_rows: Option<Bound<'_, PyUntypedArray>>,
    grad_scalar: f64,
    n: usize,
    h: usize,
    v: usize,
    ignore_index: i64,
    reduction: &str,
    label_smoothing: f64,
    z_loss: f64,
    softcap: Option<f64>,
    chunk_size: Option<usize>,
) -> PyResult<()> {
    let opts = Opts {
        ignore_index,
        reduction,
        label_smoothing,
        z_loss,
        softcap,
    };
    let grads = match (&dhidden, &dweight) {
        (Some(a), Some(b)) => Some((a, b)),
        (None, None) => None,
        _ => return Err(PyValueError::new_err("dhidden and dweight come together")),
    };
    let (b, db, go) = (bias.as_ref(), dbias.as_ref(), grad_rows.as_ref());
    let nhv = (n, h, v);
    if is_f32(hidden) {
        linear_typed::<f32>(
            py,
            hidden,
            weight,
            b,
            target,
            loss,
            grads,
            db,
            go,
            grad_scalar,
            nhv,
            opts,
            chunk_size,
        )
    } else {
        linear_typed::<f64>(
            py,
            hidden,
            weight,
            b,
            target,
            loss,
            grads,
            db,
            go,
            grad_scalar,
            nhv,
            opts,
            chunk_size,
        )
    }
}

/// Adds this module's functions to `normax._core`.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(cross_entropy, m)?)?;
    m.add_function(wrap_pyfunction!(linear_cross_entropy, m)?)?;
    Ok(())
}
