//! Bindings of the cross-entropy family: array conversion, the GIL released, errors mapped.
//!
//! python/normax/_cross_entropy.py validates the user's input and lays it out as contiguous rows
//! (classes last); the core re-checks sizes and every target index before any kernel reads.

use crate::arrays::{by_dtype, matrix_shape, readonly, readonly_opt, readwrite, readwrite_opt};
use crate::arrays::{same_memory, slice, slice_mut, slice_mut_opt, slice_opt, Arr, Read, Write};
use crate::interrupt::detach;
use crate::options::{CeOptions, GradOutput};
use normax_core::cross_entropy::{self as k, CeLogits, CeStats, LinearGrads};
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

/// Class weights alone, or (class weights, token weights): either may be None.
#[derive(FromPyObject)]
enum Weights<'py> {
    Both((Option<Arr<'py>>, Option<Arr<'py>>)),
    Class(Arr<'py>),
}

impl<'py> Weights<'py> {
    fn split(w: Option<&Self>) -> (Option<&Arr<'py>>, Option<&Arr<'py>>) {
        match w {
            None => (None, None),
            Some(Weights::Class(c)) => (Some(c), None),
            Some(Weights::Both((c, t))) => (c.as_ref(), t.as_ref()),
        }
    }
}

/// Where the loss goes: the loss array, or (loss, lse, entropy, correct) for the statistics too
/// (lse and entropy in the loss's dtype, correct bool, one per row each).
#[derive(FromPyObject)]
enum Outputs<'py> {
    WithStats((Arr<'py>, Arr<'py>, Arr<'py>, Arr<'py>)),
    Loss(Arr<'py>),
}

/// The writable views of [`Outputs`].
struct OutputViews<'py, T: Element> {
    loss: Write<'py, T>,
    stats: Option<(Write<'py, T>, Write<'py, T>, Write<'py, bool>)>,
}

impl<'py> Outputs<'py> {
    fn views<T: Element>(&self) -> PyResult<OutputViews<'py, T>> {
        Ok(match self {
            Outputs::Loss(l) => OutputViews {
                loss: readwrite::<T>(l, "loss")?,
                stats: None,
            },
            Outputs::WithStats((l, lse, ent, c)) => OutputViews {
                loss: readwrite::<T>(l, "loss")?,
                stats: Some((
                    readwrite::<T>(lse, "lse")?,
                    readwrite::<T>(ent, "entropy")?,
                    readwrite::<bool>(c, "correct")?,
                )),
            },
        })
    }
}

impl<T: Element> OutputViews<'_, T> {
    fn slices(&mut self) -> PyResult<(&mut [T], Option<CeStats<'_, T>>)> {
        let stats = match &mut self.stats {
            None => None,
            Some((lse, ent, c)) => Some(CeStats {
                lse: slice_mut(lse, "lse")?,
                entropy: slice_mut(ent, "entropy")?,
                correct: slice_mut(c, "correct")?,
            }),
        };
        Ok((slice_mut(&mut self.loss, "loss")?, stats))
    }
}

fn ce_typed<T: Float + Element>(
    logits: &Arr<'_>,
    (target, weights): (&Arr<'_>, Option<&Weights<'_>>),
    options: &CeOptions,
    out: &Outputs<'_>,
    grad: Option<(&Arr<'_>, &GradOutput<'_>)>,
) -> PyResult<()> {
    let (rows, classes) = matrix_shape(logits, "logits")?;
    let targets = Targets::<T>::new(target)?;
    let (weight, token_weight) = Weights::split(weights);
    let weight = readonly_opt::<T>(weight, "weight")?;
    let token_weight = readonly_opt::<T>(token_weight, "token_weight")?;
    let go = grad.map(|(_, g)| g.read::<T>()).transpose()?.flatten();
    let mut views = out.views::<T>()?;
    let o = options.with_weights(
        slice_opt(&weight, "weight")?,
        slice_opt(&token_weight, "token_weight")?,
    );
    let t = targets.get()?;
    let (ls, stats) = views.slices()?;
    let py = logits.py();
    let shape = (rows, classes);
    match grad {
        None => {
            let x = readonly::<T>(logits, "logits")?;
            let xs = slice(&x, "logits")?;
            let go = normax_core::spec::GradOutput::Scalar(0.0);
            detach(py, xs.len(), || {
                k::cross_entropy_into(CeLogits::Loss(xs), shape, t, &o, go, ls, stats)
            })
        }
        Some((g, grad_output)) => {
            let go = grad_output.core(&go)?;
            if same_memory(g, logits) {
                let mut x = readwrite::<T>(logits, "logits")?;
                let xs = slice_mut(&mut x, "logits")?;
                let n = xs.len();
                return detach(py, n, || {
                    let x = CeLogits::GradInPlace(xs);
                    k::cross_entropy_into(x, shape, t, &o, go, ls, stats)
                });
            }
            let x = readonly::<T>(logits, "logits")?;
            let mut g = readwrite::<T>(g, "grad")?;
            let xs = slice(&x, "logits")?;
            let gs = slice_mut(&mut g, "grad")?;
            detach(py, xs.len(), || {
                k::cross_entropy_into(CeLogits::Grad(xs, gs), shape, t, &o, go, ls, stats)
            })
        }
    }
}

/// Cross-entropy of contiguous (rows, classes) logits into `loss` (rows values for reduction
/// "none", else one). With `grad` (a fresh array, or `logits` itself for in place) also the
/// gradient of grad_output * loss: `grad_output` a number, or one per row for "none".
/// `weight` is the class weights or (class weights, token weights); `loss` the loss array or
/// (loss, lse, entropy, correct) for the per-row statistics too.
#[pyfunction]
#[pyo3(signature = (logits, target, weight, options, loss, grad=None, grad_output=GradOutput::Scalar(1.0)))]
fn cross_entropy(
    logits: &Arr<'_>,
    target: &Arr<'_>,
    weight: Option<Weights<'_>>,
    options: &CeOptions,
    loss: Outputs<'_>,
    grad: Option<Arr<'_>>,
    grad_output: GradOutput<'_>,
) -> PyResult<()> {
    let ins = (target, weight.as_ref());
    let g = grad.as_ref().map(|g| (g, &grad_output));
    by_dtype!(logits, ce_typed(logits, ins, options, &loss, g))
}

/// The linear cross-entropy's inputs: hidden (N, H), linear weight (V, H), bias (V,) or None.
type LinearInputs<'py> = (Arr<'py>, Arr<'py>, Option<Arr<'py>>);
/// Its gradients' outputs: dhidden, dlinear_weight, dlinear_bias (with a bias).
type LinearOutputs<'py> = (Arr<'py>, Arr<'py>, Option<Arr<'py>>);

/// Class indices alone, or (class indices, token weights or None).
#[derive(FromPyObject)]
enum Labels<'py> {
    Weighted((Arr<'py>, Option<Arr<'py>>)),
    Plain(Arr<'py>),
}

fn linear_typed<T: Float + Element>(
    (hidden, weight, bias): &LinearInputs<'_>,
    labels: &Labels<'_>,
    (options, chunk_size): (&CeOptions, Option<usize>),
    out: &Outputs<'_>,
    grads: Option<(&LinearOutputs<'_>, &GradOutput<'_>)>,
) -> PyResult<()> {
    let (target, token_weight) = match labels {
        Labels::Plain(t) => (t, None),
        Labels::Weighted((t, w)) => (t, w.as_ref()),
    };
    let (n, h) = matrix_shape(hidden, "hidden")?;
    let (v, _) = matrix_shape(weight, "linear_weight")?;
    let hid = readonly::<T>(hidden, "hidden")?;
    let w = readonly::<T>(weight, "linear_weight")?;
    let b = readonly_opt::<T>(bias.as_ref(), "linear_bias")?;
    let t = readonly::<i64>(target, "target")?;
    let tw = readonly_opt::<T>(token_weight, "token_weight")?;
    let go = grads.map(|(_, g)| g.read::<T>()).transpose()?.flatten();
    let mut views = out.views::<T>()?;
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
    let o = options.with_weights::<&[T]>(None, slice_opt(&tw, "token_weight")?);
    let (ls, stats) = views.slices()?;
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
        k::linear_cross_entropy(hs, ws, bs, ts, (n, h, v), &o, chunk_size, grads, ls, stats)
    })
}

/// Linear cross-entropy: logits = hidden @ linear_weight.T + linear_bias, never all held at
/// once. With `grads` (fresh dhidden, dlinear_weight and, with a bias, dlinear_bias) also the
/// gradients of grad_output * loss. `target` is the class indices or (class indices, token
/// weights); `loss` as for `cross_entropy`.
#[pyfunction]
#[pyo3(signature = (inputs, target, options, chunk_size, loss, grads=None, grad_output=GradOutput::Scalar(1.0)))]
fn linear_cross_entropy(
    inputs: LinearInputs<'_>,
    target: Labels<'_>,
    options: &CeOptions,
    chunk_size: Option<usize>,
    loss: Outputs<'_>,
    grads: Option<LinearOutputs<'_>>,
    grad_output: GradOutput<'_>,
) -> PyResult<()> {
    let g = grads.as_ref().map(|g| (g, &grad_output));
    let opts = (options, chunk_size);
    by_dtype!(&inputs.0, linear_typed(&inputs, &target, opts, &loss, g))
}

/// Adds this module's functions to `normax._core`.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(cross_entropy, m)?)?;
    m.add_function(wrap_pyfunction!(linear_cross_entropy, m)?)?;
    Ok(())
}
