//! Bindings of the log-probabilities (rows and linear forms, forward and backward): their options
//! as one frozen object, array conversion, the GIL released, errors mapped.
//!
//! python/normax/_logprobs.py validates the user's input and lays it out as contiguous rows
//! (classes last) with int64 targets; the core re-checks sizes and every target index before any
//! kernel reads.

use crate::arrays::{by_dtype, matrix_shape, readonly, readonly_opt, readwrite, readwrite_opt};
use crate::arrays::{slice, slice_mut, slice_mut_opt, slice_opt, Arr};
use crate::errors::to_py;
use crate::interrupt::detach;
use normax_core::cross_entropy::LinearGrads;
use normax_core::logprobs::{self as k, LogprobGrads};
use normax_core::Float;
use numpy::Element;
use pyo3::prelude::*;
use pyo3::types::PyTuple;

/// The options of normax.logprobs: the ignored target and the temperature (finite, > 0).
/// Immutable, hashable and picklable.
#[pyclass(frozen, eq, module = "normax._core", name = "LogprobOptions")]
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct LogprobOptions {
    #[pyo3(get)]
    pub ignore_index: i64,
    #[pyo3(get)]
    pub temperature: f64,
}

impl LogprobOptions {
    fn core(&self) -> k::LogprobOptions {
        k::LogprobOptions {
            ignore_index: self.ignore_index,
            temperature: self.temperature,
        }
    }
}

#[pymethods]
impl LogprobOptions {
    #[new]
    #[pyo3(signature = (ignore_index=-100, temperature=1.0))]
    fn new(ignore_index: i64, temperature: f64) -> PyResult<Self> {
        let o = LogprobOptions {
            ignore_index,
            temperature,
        };
        o.core().check().map_err(to_py)?;
        Ok(o)
    }

    fn __hash__(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (self.ignore_index, self.temperature.to_bits()).hash(&mut h);
        h.finish()
    }

    fn __reduce__<'py>(
        slf: &Bound<'py, Self>,
    ) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyTuple>)> {
        let o = slf.get();
        let args = (o.ignore_index, o.temperature).into_pyobject(slf.py())?;
        Ok((slf.get_type().into_any(), args))
    }

    fn __repr__(&self) -> String {
        format!(
            "LogprobOptions(ignore_index={}, temperature={:?})",
            self.ignore_index, self.temperature
        )
    }
}

/// The incoming gradients of a backward: of the logprobs and of the entropies, either None.
type IncomingGrads<'py> = (Option<Arr<'py>>, Option<Arr<'py>>);

fn forward_typed<T: Float + Element>(
    logits: &Arr<'_>,
    target: &Arr<'_>,
    options: &LogprobOptions,
    (logprob, entropy): (&Arr<'_>, Option<&Arr<'_>>),
) -> PyResult<()> {
    let (rows, classes) = matrix_shape(logits, "logits")?;
    let x = readonly::<T>(logits, "logits")?;
    let t = readonly::<i64>(target, "target")?;
    let mut lp = readwrite::<T>(logprob, "logprob")?;
    let mut ent = readwrite_opt::<T>(entropy, "entropy")?;
    let (xs, ts) = (slice(&x, "logits")?, slice(&t, "target")?);
    let lps = slice_mut(&mut lp, "logprob")?;
    let es = slice_mut_opt(&mut ent, "entropy")?;
    let o = options.core();
    detach(logits.py(), xs.len(), || {
        k::logprobs(xs, rows, classes, ts, &o, lps, es)
    })
}

/// log softmax(logits / T) at each row's class index in `target` into `logprob` (rows,), and
/// the rows' entropies into `entropy` where given; ignored rows 0.
#[pyfunction]
#[pyo3(signature = (logits, target, options, logprob, entropy=None))]
fn logprobs(
    logits: &Arr<'_>,
    target: &Arr<'_>,
    options: &LogprobOptions,
    logprob: &Arr<'_>,
    entropy: Option<Arr<'_>>,
) -> PyResult<()> {
    let outs = (logprob, entropy.as_ref());
    by_dtype!(logits, forward_typed(logits, target, options, outs))
}

fn backward_typed<T: Float + Element>(
    logits: &Arr<'_>,
    target: &Arr<'_>,
    options: &LogprobOptions,
    (g_logprob, g_entropy): &IncomingGrads<'_>,
    grad: &Arr<'_>,
) -> PyResult<()> {
    let (rows, classes) = matrix_shape(logits, "logits")?;
    let x = readonly::<T>(logits, "logits")?;
    let t = readonly::<i64>(target, "target")?;
    let gl = readonly_opt::<T>(g_logprob.as_ref(), "grad_logprob")?;
    let gh = readonly_opt::<T>(g_entropy.as_ref(), "grad_entropy")?;
    let mut g = readwrite::<T>(grad, "grad")?;
    let (xs, ts) = (slice(&x, "logits")?, slice(&t, "target")?);
    let grads = LogprobGrads {
        logprob: slice_opt(&gl, "grad_logprob")?,
        entropy: slice_opt(&gh, "grad_entropy")?,
    };
    let gs = slice_mut(&mut g, "grad")?;
    let o = options.core();
    detach(logits.py(), xs.len(), || {
        k::logprobs_backward(xs, rows, classes, ts, &o, grads, gs)
    })
}

/// The gradient of sum(grad_logprob * logprob + grad_entropy * entropy) with respect to the
/// logits into `grad` (a fresh array shaped like them); either incoming gradient may be None
/// (zero; its terms are skipped).
#[pyfunction]
#[pyo3(signature = (logits, target, options, grads, grad))]
fn logprobs_backward(
    logits: &Arr<'_>,
    target: &Arr<'_>,
    options: &LogprobOptions,
    grads: IncomingGrads<'_>,
    grad: &Arr<'_>,
) -> PyResult<()> {
    by_dtype!(
        logits,
        backward_typed(logits, target, options, &grads, grad)
    )
}

/// The linear form's inputs: hidden (N, H), linear weight (V, H), bias (V,) or None.
type LinearInputs<'py> = (Arr<'py>, Arr<'py>, Option<Arr<'py>>);
/// Its gradients' outputs: dhidden, dlinear_weight, dlinear_bias (with a bias).
type LinearOutputs<'py> = (Arr<'py>, Arr<'py>, Option<Arr<'py>>);

/// (n, h, v) of the linear form's inputs, checked 2-d.
fn linear_shape(hidden: &Arr<'_>, weight: &Arr<'_>) -> PyResult<(usize, usize, usize)> {
    let (n, h) = matrix_shape(hidden, "hidden")?;
    let (v, _) = matrix_shape(weight, "linear_weight")?;
    Ok((n, h, v))
}

fn linear_forward_typed<T: Float + Element>(
    (hidden, weight, bias): &LinearInputs<'_>,
    target: &Arr<'_>,
    (options, chunk_size): (&LogprobOptions, Option<usize>),
    (logprob, entropy): (&Arr<'_>, Option<&Arr<'_>>),
) -> PyResult<()> {
    let shape = linear_shape(hidden, weight)?;
    let hid = readonly::<T>(hidden, "hidden")?;
    let w = readonly::<T>(weight, "linear_weight")?;
    let b = readonly_opt::<T>(bias.as_ref(), "linear_bias")?;
    let t = readonly::<i64>(target, "target")?;
    let mut lp = readwrite::<T>(logprob, "logprob")?;
    let mut ent = readwrite_opt::<T>(entropy, "entropy")?;
    let (hs, ws, ts) = (
        slice(&hid, "hidden")?,
        slice(&w, "linear_weight")?,
        slice(&t, "target")?,
    );
    let bs = slice_opt(&b, "linear_bias")?;
    let lps = slice_mut(&mut lp, "logprob")?;
    let es = slice_mut_opt(&mut ent, "entropy")?;
    let o = options.core();
    // The logits are never held, but each is computed: rows x vocabulary values of work.
    let work = shape.0.saturating_mul(shape.2);
    detach(hidden.py(), work, || {
        k::linear_logprobs(hs, ws, bs, ts, shape, &o, chunk_size, lps, es)
    })
}

/// logprob (and entropy, where given) of logits = (hidden @ linear_weight.T + linear_bias) / T,
/// never all held at once (at most `chunk_size` of them, as the linear cross-entropy).
#[pyfunction]
#[pyo3(signature = (inputs, target, options, chunk_size, logprob, entropy=None))]
fn linear_logprobs(
    inputs: LinearInputs<'_>,
    target: &Arr<'_>,
    options: &LogprobOptions,
    chunk_size: Option<usize>,
    logprob: &Arr<'_>,
    entropy: Option<Arr<'_>>,
) -> PyResult<()> {
    let outs = (logprob, entropy.as_ref());
    let opts = (options, chunk_size);
    by_dtype!(&inputs.0, linear_forward_typed(&inputs, target, opts, outs))
}

fn linear_backward_typed<T: Float + Element>(
    (hidden, weight, bias): &LinearInputs<'_>,
    target: &Arr<'_>,
    (options, chunk_size): (&LogprobOptions, Option<usize>),
    (g_logprob, g_entropy): &IncomingGrads<'_>,
    (dh, dw, db): &LinearOutputs<'_>,
) -> PyResult<()> {
    let shape = linear_shape(hidden, weight)?;
    let hid = readonly::<T>(hidden, "hidden")?;
    let w = readonly::<T>(weight, "linear_weight")?;
    let b = readonly_opt::<T>(bias.as_ref(), "linear_bias")?;
    let t = readonly::<i64>(target, "target")?;
    let gl = readonly_opt::<T>(g_logprob.as_ref(), "grad_logprob")?;
    let gh = readonly_opt::<T>(g_entropy.as_ref(), "grad_entropy")?;
    let mut dh = readwrite::<T>(dh, "dhidden")?;
    let mut dw = readwrite::<T>(dw, "dlinear_weight")?;
    let mut db = readwrite_opt::<T>(db.as_ref(), "dlinear_bias")?;
    let (hs, ws, ts) = (
        slice(&hid, "hidden")?,
        slice(&w, "linear_weight")?,
        slice(&t, "target")?,
    );
    let bs = slice_opt(&b, "linear_bias")?;
    let grads = LogprobGrads {
        logprob: slice_opt(&gl, "grad_logprob")?,
        entropy: slice_opt(&gh, "grad_entropy")?,
    };
    let out = LinearGrads {
        dhidden: slice_mut(&mut dh, "dhidden")?,
        dweight: slice_mut(&mut dw, "dlinear_weight")?,
        dbias: slice_mut_opt(&mut db, "dlinear_bias")?,
    };
    let o = options.core();
    let work = shape.0.saturating_mul(shape.2);
    detach(hidden.py(), work, || {
        k::linear_logprobs_backward(hs, ws, bs, ts, shape, &o, chunk_size, grads, out)
    })
}

/// The gradients of sum(grad_logprob * logprob + grad_entropy * entropy) of
/// [`linear_logprobs`] into fresh dhidden, dlinear_weight and (with a bias) dlinear_bias.
#[pyfunction]
#[pyo3(signature = (inputs, target, options, chunk_size, grads, outputs))]
fn linear_logprobs_backward(
    inputs: LinearInputs<'_>,
    target: &Arr<'_>,
    options: &LogprobOptions,
    chunk_size: Option<usize>,
    grads: IncomingGrads<'_>,
    outputs: LinearOutputs<'_>,
) -> PyResult<()> {
    let opts = (options, chunk_size);
    by_dtype!(
        &inputs.0,
        linear_backward_typed(&inputs, target, opts, &grads, &outputs)
    )
}

/// Adds this module's class and functions to `normax._core`.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<LogprobOptions>()?;
    m.add_function(wrap_pyfunction!(logprobs, m)?)?;
    m.add_function(wrap_pyfunction!(logprobs_backward, m)?)?;
    m.add_function(wrap_pyfunction!(linear_logprobs, m)?)?;
    m.add_function(wrap_pyfunction!(linear_logprobs_backward, m)?)?;
    Ok(())
}
