//! Bindings of the cross-entropy family: array conversion, the GIL released, errors mapped.
//!
//! python/normax/_cross_entropy.py validates the user's input and lays it out as contiguous rows
//! (classes last); the core re-checks sizes and every target index before any kernel reads.

use crate::arrays::{by_dtype, readonly, readonly_opt, readwrite, readwrite_opt, same_memory};
use crate::arrays::{slice, slice_mut, slice_mut_opt, slice_opt, Arr};
use crate::errors::to_py;
use crate::interrupt::detach;
use normax_core::cross_entropy::{self as k, LinearGrads};
use normax_core::spec::{CeOptions, GradOutput, Reduction, Target};
use normax_core::Float;
use numpy::{Element, PyArrayDyn, PyReadonlyArrayDyn};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

/// Hard targets arrive as int64, soft ones in the logits' dtype.
enum Targets<'py, T: Element> {
    Classes(PyReadonlyArrayDyn<'py, i64>),
    Probs(PyReadonlyArrayDyn<'py, T>),
}

impl<'py, T: Element + Float> Targets<'py, T> {
    fn new(a: &Arr<'py>) -> PyResult<Self> {
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

    fn get(&self) -> PyResult<Target<&[i64], &[T]>> {
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
    fn options<'w, T>(&self, weight: Option<&'w [T]>) -> PyResult<CeOptions<&'w [T]>> {
        Ok(CeOptions {
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
) -> PyResult<GradOutput<&'a [T]>> {
    Ok(match rows {
        Some(g) => GradOutput::Rows(slice(g, "grad_output")?),
        None => GradOutput::Scalar(scalar),
    })
}

#[allow(clippy::too_many_arguments)]
fn ce_typed<T: Float + Element>(
    py: Python<'_>,
    logits: &Arr<'_>,
    target: &Arr<'_>,
    weight: Option<&Arr<'_>>,
    loss: &Arr<'_>,
    grad: Option<&Arr<'_>>,
    grad_rows: Option<&Arr<'_>>,
    grad_scalar: f64,
    (rows, classes): (usize, usize),
    opts: Opts<'_>,
) -> PyResult<()> {
    let targets = Targets::<T>::new(target)?;
    let weight = readonly_opt::<T>(weight, "weight")?;
    let go = readonly_opt::<T>(grad_rows, "grad_output")?;
    let mut loss = readwrite::<T>(loss, "loss")?;
    let ws = slice_opt(&weight, "weight")?;
    let o = opts.options(ws)?;
    let t = targets.get()?;
    let go = grad_output(&go, grad_scalar)?;
    let ls = slice_mut(&mut loss, "loss")?;
    match grad {
        None => {
            let x = readonly::<T>(logits, "logits")?;
            let xs = slice(&x, "logits")?;
            detach(py, xs.len(), || {
                k::cross_entropy(xs, rows, classes, t, &o, ls)
            })
        }
        Some(g) if same_memory(g, logits) => {
            let mut x = readwrite::<T>(logits, "logits")?;
            let xs = slice_mut(&mut x, "logits")?;
            detach(py, xs.len(), || {
                k::cross_entropy_with_grad_inplace(xs, rows, classes, t, &o, go, ls)
            })
        }
        Some(g) => {
            let x = readonly::<T>(logits, "logits")?;
            let mut g = readwrite::<T>(g, "grad")?;
            let xs = slice(&x, "logits")?;
            let gs = slice_mut(&mut g, "grad")?;
            detach(py, xs.len(), || {
                k::cross_entropy_with_grad(xs, gs, rows, classes, t, &o, go, ls)
            })
        }
    }
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
    logits: &Arr<'_>,
    target: &Arr<'_>,
    weight: Option<Arr<'_>>,
    loss: &Arr<'_>,
    grad: Option<Arr<'_>>,
    grad_rows: Option<Arr<'_>>,
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
    let (w, g, go) = (weight.as_ref(), grad.as_ref(), grad_rows.as_ref());
    let shape = (rows, classes);
    by_dtype!(
        logits,
        ce_typed(py, logits, target, w, loss, g, go, grad_scalar, shape, opts)
    )
}

#[allow(clippy::too_many_arguments)]
fn linear_typed<T: Float + Element>(
    py: Python<'_>,
    hidden: &Arr<'_>,
    weight: &Arr<'_>,
    bias: Option<&Arr<'_>>,
    target: &Arr<'_>,
    loss: &Arr<'_>,
    grads: Option<(&Arr<'_>, &Arr<'_>)>,
    dbias: Option<&Arr<'_>>,
    grad_rows: Option<&Arr<'_>>,
    grad_scalar: f64,
    nhv: (usize, usize, usize),
    opts: Opts<'_>,
    chunk_size: Option<usize>,
) -> PyResult<()> {
    let hid = readonly::<T>(hidden, "hidden")?;
    let w = readonly::<T>(weight, "weight")?;
    let b = readonly_opt::<T>(bias, "bias")?;
    let t = readonly::<i64>(target, "target")?;
    let go = readonly_opt::<T>(grad_rows, "grad_output")?;
    let mut loss = readwrite::<T>(loss, "loss")?;
    let mut dh = grads.map(|g| readwrite::<T>(g.0, "dhidden")).transpose()?;
    let mut dw = grads.map(|g| readwrite::<T>(g.1, "dweight")).transpose()?;
    let mut db = readwrite_opt::<T>(dbias, "dbias")?;
    let (hs, ws, ts) = (
        slice(&hid, "hidden")?,
        slice(&w, "weight")?,
        slice(&t, "target")?,
    );
    let bs = slice_opt(&b, "bias")?;
    let o = opts.options::<T>(None)?;
    let go = grad_output(&go, grad_scalar)?;
    let ls = slice_mut(&mut loss, "loss")?;
    let grads = match (dh.as_mut(), dw.as_mut()) {
        (Some(dh), Some(dw)) => Some((
            go,
            LinearGrads {
                dhidden: slice_mut(dh, "dhidden")?,
                dweight: slice_mut(dw, "dweight")?,
                dbias: slice_mut_opt(&mut db, "dbias")?,
            },
        )),
        _ => None,
    };
    // The logits are never held, but each is computed: rows x vocabulary values of work.
    let work = nhv.0.saturating_mul(nhv.2);
    detach(py, work, || {
        k::linear_cross_entropy(hs, ws, bs, ts, nhv, &o, chunk_size, grads, ls)
    })
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
    hidden: &Arr<'_>,
    weight: &Arr<'_>,
    bias: Option<Arr<'_>>,
    target: &Arr<'_>,
    loss: &Arr<'_>,
    dhidden: Option<Arr<'_>>,
    dweight: Option<Arr<'_>>,
    dbias: Option<Arr<'_>>,
    grad_rows: Option<Arr<'_>>,
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
    by_dtype!(
        hidden,
        linear_typed(
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
    )
}

/// Adds this module's functions to `normax._core`.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(cross_entropy, m)?)?;
    m.add_function(wrap_pyfunction!(linear_cross_entropy, m)?)?;
    Ok(())
}
