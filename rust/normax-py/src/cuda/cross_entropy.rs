//! cuda_cross_entropy: per-row losses and, optionally, the gradient scaled on the device.
//! cuda_vocab_parallel_stats / cuda_vocab_parallel_backward: a vocabulary shard's row statistics
//! and gradient (the vocabulary-parallel cross-entropy; the combine between them is the CPU's
//! `vocab_parallel_combine`).

use super::{Call, Capsule, CudaStream};
use crate::options::{CeOptions, VocabParallelLayout};
use normax_cuda::{self as cu, Indices, ShardRows, Target};
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;

/// The gradient's output and its scale: grad_output as float32 on the device, `stride` 0 for
/// one value, 1 for one per row.
type ScaledGrad<'py> = (Bound<'py, PyAny>, Bound<'py, PyAny>, usize);

/// Per-row losses of `inputs` = (logits, target, class weights or None) into `loss_rows`; the
/// reduction is the Python layer's. With `grad`, also the gradient scaled per row.
#[pyfunction]
#[pyo3(signature = (inputs, options, shape, loss_rows, grad, stream))]
fn cuda_cross_entropy(
    py: Python<'_>,
    inputs: (Bound<'_, PyAny>, Bound<'_, PyAny>, Option<Bound<'_, PyAny>>),
    options: &CeOptions,
    shape: (usize, usize),
    loss_rows: &Bound<'_, PyAny>,
    grad: Option<ScaledGrad<'_>>,
    stream: &CudaStream,
) -> PyResult<()> {
    let (c, (rows, cols)) = (Call::new(stream), shape);
    let (logits, target, weight) = &inputs;
    let x = c.buf(logits, "logits")?;
    let target = match c.capsule(target, "target")? {
        Capsule::Indices(t) => Target::Classes(t),
        Capsule::Floats(p) => Target::Probs(p),
    };
    let opts = options.with_weight(c.opt(weight.as_ref(), "weight")?);
    let loss = c.buf(loss_rows, "loss")?;
    let grad = match &grad {
        Some((g, scale, stride)) => {
            Some((c.buf(g, "grad")?, c.buf(scale, "grad_output")?, *stride))
        }
        None => None,
    };
    c.run(py, |s| {
        cu::cross_entropy(s, x, target, &opts, loss, grad, rows, cols)
    })
}

impl Call {
    fn indices(&self, obj: &Bound<'_, PyAny>, name: &str) -> PyResult<Indices> {
        match self.capsule(obj, name)? {
            Capsule::Indices(t) => Ok(t),
            Capsule::Floats(_) => Err(PyTypeError::new_err(format!(
                "{name}: expected int64 class indices"
            ))),
        }
    }

    fn shard(
        &self,
        logits: &Bound<'_, PyAny>,
        target: &Bound<'_, PyAny>,
        shard: &VocabParallelLayout,
    ) -> PyResult<ShardRows> {
        Ok(ShardRows {
            x: self.buf(logits, "logits")?,
            target: self.indices(target, "target")?,
            rows: shard.rows,
            start: shard.start,
            len: shard.length,
        })
    }
}

/// (target class indices, the whole vocabulary's float32 class weights or None).
type Labels<'py> = (Bound<'py, PyAny>, Option<Bound<'py, PyAny>>);

/// The shard's statistics (float32, rows x fields) into `packed`.
#[pyfunction]
fn cuda_vocab_parallel_stats(
    logits: &Bound<'_, PyAny>,
    labels: Labels<'_>,
    shard: &VocabParallelLayout,
    options: &CeOptions,
    packed: &Bound<'_, PyAny>,
    stream: &CudaStream,
) -> PyResult<()> {
    let c = Call::new(stream);
    let sh = c.shard(logits, &labels.0, shard)?;
    // z-loss applies once the shards are combined.
    let opts = CeOptions {
        z_loss: 0.0,
        ..*options
    }
    .with_weight(c.opt(labels.1.as_ref(), "weight")?);
    let packed = c.buf(packed, "packed")?;
    c.run(logits.py(), |s| {
        cu::vocab_parallel_stats(s, sh, &opts, packed)
    })
}

/// The shard's gradient into `grad` = (grad, scale, stride) from `saved` = (each row's global
/// log-sum-exp as float32 hi, lo; the sum of the whole vocabulary's weights, `classes` without
/// weights).
#[pyfunction]
fn cuda_vocab_parallel_backward(
    logits: &Bound<'_, PyAny>,
    labels: Labels<'_>,
    shard: &VocabParallelLayout,
    options: &CeOptions,
    saved: (Bound<'_, PyAny>, f64),
    grad: ScaledGrad<'_>,
    stream: &CudaStream,
) -> PyResult<()> {
    let c = Call::new(stream);
    let sh = c.shard(logits, &labels.0, shard)?;
    let opts = options.with_weight(c.opt(labels.1.as_ref(), "weight")?);
    let (lse, w_sum) = (c.buf(&saved.0, "lse")?, saved.1);
    let (g, scale) = (c.buf(&grad.0, "grad")?, c.buf(&grad.1, "grad_output")?);
    let (classes, stride) = (shard.classes, grad.2);
    c.run(logits.py(), |s| {
        cu::vocab_parallel_backward(s, sh, classes, w_sum, &opts, lse, g, scale, stride)
    })
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(cuda_cross_entropy, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_vocab_parallel_stats, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_vocab_parallel_backward, m)?)
}
