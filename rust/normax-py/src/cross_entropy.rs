//! Bindings of the cross-entropy family: array conversion, the GIL released, errors mapped.
//!
//! python/normax/_cross_entropy.py validates the user's input and lays it out as contiguous rows
//! (classes last); the core re-checks sizes and every target index before any kernel reads.

use crate::arrays::{by_dtype, matrix_shape, readonly, readonly_opt, readwrite, readwrite_opt};
use crate::arrays::{same_memory, slice, slice_mut, slice_mut_opt, slice_opt, Arr, Read};
use crate::interrupt::detach;
use crate::options::{CeOptions, GradOutput};
use normax_core::cross_entropy::{self as k, LinearGrads};
use normax_core::spec::Target;
use normax_core::Float;
use numpy::{Element, PyArrayDyn};
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;

/// Hard targets arrive as int64, soft ones in the logits' dtype.
enum Targets<'py, T: Element> {
    Classes(Read<'py, i64>),
    Probs(Read<'py, T>),
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

fn ce_typed<T: Float + Element>(
    logits: &Arr<'_>,
    (target, weight): (&Arr<'_>, Option<&Arr<'_>>),
    options: &CeOptions,
    loss: &Arr<'_>,
    grad: Option<(&Arr<'_>, &GradOutput<'_>)>,
) -> PyResult<()> {
    let (rows, classes) = matrix_shape(logits, "logits")?;
    let targets = Targets::<T>::new(target)?;
    let weight = readonly_opt::<T>(weight, "weight")?;
    let go = grad.map(|(_, g)| g.read::<T>()).transpose()?.flatten();
    let mut loss = readwrite::<T>(loss, "loss")?;
    let o = options.with_weight(slice_opt(&weight, "weight")?);
    let t = targets.get()?;
    let ls = slice_mut(&mut loss, "loss")?;
    let py = logits.py();
    match grad {
        None => {
            let x = readonly::<T>(logits, "logits")?;
            let xs = slice(&x, "logits")?;
            detach(py, xs.len(), || {
                k::cross_entropy(xs, rows, classes, t, &o, ls)
            })
        }
        Some((g, grad_output)) => {
            let go = grad_output.core(&go)?;
            if same_memory(g, logits) {
                let mut x = readwrite::<T>(logits, "logits")?;
                let xs = slice_mut(&mut x, "logits")?;
                return detach(py, xs.len(), || {
                    k::cross_entropy_with_grad_inplace(xs, rows, classes, t, &o, go, ls)
                });
            }
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
/// gradient of grad_output * loss: `grad_output` a number, or one per row for "none".
#[pyfunction]
#[pyo3(signature = (logits, target, weight, options, loss, grad=None, grad_output=GradOutput::Scalar(1.0)))]
fn cross_entropy(
    logits: &Arr<'_>,
    target: &Arr<'_>,
    weight: Option<Arr<'_>>,
    options: &CeOptions,
    loss: &Arr<'_>,
    grad: Option<Arr<'_>>,
    grad_output: GradOutput<'_>,
) -> PyResult<()> {
    let ins = (target, weight.as_ref());
    let g = grad.as_ref().map(|g| (g, &grad_output));
    by_dtype!(logits, ce_typed(logits, ins, options, loss, g))
}

/// The linear cross-entropy's inputs: hidden (N, H), linear weight (V, H), bias (V,) or None.
type LinearInputs<'py> = (Arr<'py>, Arr<'py>, Option<Arr<'py>>);
/// Its gradients' outputs: dhidden, dlinear_weight, dlinear_bias (with a bias).
type LinearOutputs<'py> = (Arr<'py>, Arr<'py>, Option<Arr<'py>>);

fn linear_typed<T: Float + Element>(
    (hidden, weight, bias): &LinearInputs<'_>,
    target: &Arr<'_>,
    (options, chunk_size): (&CeOptions, Option<usize>),
    loss: &Arr<'_>,
    grads: Option<(&LinearOutputs<'_>, &GradOutput<'_>)>,
) -> PyResult<()> {
    let (n, h) = matrix_shape(hidden, "hidden")?;
    let (v, _) = matrix_shape(weight, "linear_weight")?;
    let hid = readonly::<T>(hidden, "hidden")?;
    let w = readonly::<T>(weight, "linear_weight")?;
    let b = readonly_opt::<T>(bias.as_ref(), "linear_bias")?;
    let t = readonly::<i64>(target, "target")?;
    let go = grads.map(|(_, g)| g.read::<T>()).transpose()?.flatten();
    let mut loss = readwrite::<T>(loss, "loss")?;
    let mut dh = grads
        .map(|g| readwrite::<T>(&g.0 .0, "dhidden"))
        .transpose()?;
    let mut dw = grads
        .map(|g| readwrite::<T>(&g.0 .1, "dlinear_weight"))
        .transpose()?;
    let mut db = readwrite_opt::<T>(grads.and_then(|g| g.0 .2.as_ref()), "dlinear_bias")?;
    let (hs, ws, ts) = (
        slice(&hid, "hidden")?,
        slice(&w, "linear_weight")?,
        slice(&t, "target")?,
    );
    let bs = slice_opt(&b, "linear_bias")?;
    let o = options.with_weight::<&[T]>(None);
    let ls = slice_mut(&mut loss, "loss")?;
    let grads = match (grads, dh.as_mut(), dw.as_mut()) {
        (Some((_, grad_output)), Some(dh), Some(dw)) => Some((
            grad_output.core(&go)?,
            LinearGrads {
                dhidden: slice_mut(dh, "dhidden")?,
                dweight: slice_mut(dw, "dlinear_weight")?,
                dbias: slice_mut_opt(&mut db, "dlinear_bias")?,
            },
        )),
        _ => None,
    };
    // The logits are never held, but each is computed: rows x vocabulary values of work.
    let work = n.saturating_mul(v);
    detach(hidden.py(), work, || {
        k::linear_cross_entropy(hs, ws, bs, ts, (n, h, v), &o, chunk_size, grads, ls)
    })
}

/// Linear cross-entropy: logits = hidden @ linear_weight.T + linear_bias, never all held at
/// once. With `grads` (fresh dhidden, dlinear_weight and, with a bias, dlinear_bias) also the
/// gradients of grad_output * loss.
#[pyfunction]
#[pyo3(signature = (inputs, target, options, chunk_size, loss, grads=None, grad_output=GradOutput::Scalar(1.0)))]
fn linear_cross_entropy(
    inputs: LinearInputs<'_>,
    target: &Arr<'_>,
    options: &CeOptions,
    chunk_size: Option<usize>,
    loss: &Arr<'_>,
    grads: Option<LinearOutputs<'_>>,
    grad_output: GradOutput<'_>,
) -> PyResult<()> {
    let g = grads.as_ref().map(|g| (g, &grad_output));
    let opts = (options, chunk_size);
    by_dtype!(&inputs.0, linear_typed(&inputs, target, opts, loss, g))
}

/// Adds this module's functions to `normax._core`.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(cross_entropy, m)?)?;
    m.add_function(wrap_pyfunction!(linear_cross_entropy, m)?)?;
    Ok(())
}
