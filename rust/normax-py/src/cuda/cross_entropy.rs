//! cuda_cross_entropy: per-row losses and, optionally, the gradient scaled on the device (with
//! issue 24's temperature, token weights and per-row statistics).
//! cuda_ce_forward / cuda_ce_backward: class-index targets in two kernels (the loss reduced on
//! the device, the lse and the mean's denominator saved for the backward).
//! cuda_vocab_parallel_stats / cuda_vocab_parallel_backward: a vocabulary shard's row statistics
//! and gradient (the vocabulary-parallel cross-entropy; the combine between them is the CPU's
//! `vocab_parallel_combine`).

use super::{Call, Capsule, CudaStream};
use crate::options::{CeOptions, VocabParallelLayout};
use normax_cuda::{
    self as cu, CeExtras, CeGrad, CeRows, CeSaved, CeStatsOut, Indices, ShardRows, Target,
};
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;

/// The gradient's output and its scale: grad_output as float32 on the device, `stride` 0 for
/// one value, 1 for one per row.
type ScaledGrad<'py> = (Bound<'py, PyAny>, Bound<'py, PyAny>, usize);

/// The float32 per-row statistics outputs (lse, entropy, correct as 1.0 / 0.0).
type StatsOut<'py> = (Bound<'py, PyAny>, Bound<'py, PyAny>, Bound<'py, PyAny>);
/// (temperature, float32 token weights per row or None, the statistics outputs or None).
type Extras<'py> = (f64, Option<Bound<'py, PyAny>>, Option<StatsOut<'py>>);

/// Per-row losses of `inputs` = (logits, target, class weights or None) into `loss_rows`; the
/// reduction is the Python layer's. With `grad`, also the gradient scaled per row. `extras` =
/// (temperature: divides the logits, the gradient carries its 1 / T; token weights: float32 per
/// row multiplying each row's loss and gradient; the per-row statistics' outputs).
#[pyfunction]
#[pyo3(signature = (inputs, options, shape, loss_rows, grad, stream, extras = None))]
fn cuda_cross_entropy(
    inputs: (Bound<'_, PyAny>, Bound<'_, PyAny>, Option<Bound<'_, PyAny>>),
    options: &CeOptions,
    shape: (usize, usize),
    loss_rows: &Bound<'_, PyAny>,
    grad: Option<ScaledGrad<'_>>,
    stream: &CudaStream,
    extras: Option<Extras<'_>>,
) -> PyResult<()> {
    let (temperature, token_weight, stats) = extras.unwrap_or((1.0, None, None));
    let (c, (rows, cols)) = (Call::new(stream), shape);
    let (logits, target, weight) = &inputs;
    let x = c.buf(logits, "logits")?;
    let target = match c.capsule(target, "target")? {
        Capsule::Indices(t) => Target::Classes(t),
        Capsule::Floats(p) => Target::Probs(p),
    };
    let opts = options.with_weight(c.opt(weight.as_ref(), "weight")?);
    let stats = match &stats {
        Some((lse, entropy, correct)) => Some(CeStatsOut {
            lse: c.buf(lse, "lse")?,
            entropy: c.buf(entropy, "entropy")?,
            correct: c.buf(correct, "correct")?,
        }),
        None => None,
    };
    let extras = CeExtras {
        temperature,
        token_weight: c.opt(token_weight.as_ref(), "token_weight")?,
        stats,
    };
    let loss = c.buf(loss_rows, "loss")?;
    let grad = match &grad {
        Some((g, scale, stride)) => {
            Some((c.buf(g, "grad")?, c.buf(scale, "grad_output")?, *stride))
        }
        None => None,
    };
    c.run(loss_rows.py(), |s| {
        cu::cross_entropy(s, x, target, &opts, &extras, loss, grad, rows, cols)
    })
}

/// (logits, int64 class ids, float32 class weights or None).
type CeInputs<'py> = (
    Bound<'py, PyAny>,
    Bound<'py, PyAny>,
    Option<Bound<'py, PyAny>>,
);

impl Call {
    /// The rows of `inputs` and the options with their weight.
    fn ce_rows(
        &self,
        inputs: &CeInputs<'_>,
        options: &CeOptions,
        shape: (usize, usize),
    ) -> PyResult<(CeRows, cu::CeOptions<cu::Buf>)> {
        let (logits, target, weight) = inputs;
        let rows = CeRows {
            logits: self.buf(logits, "logits")?,
            target: self.indices(target, "target")?,
            rows: shape.0,
            cols: shape.1,
        };
        Ok((
            rows,
            options.with_weight(self.opt(weight.as_ref(), "weight")?),
        ))
    }

    fn ce_saved(
        &self,
        lse: &Bound<'_, PyAny>,
        workspace: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<CeSaved> {
        Ok(CeSaved {
            lse: self.buf(lse, "lse")?,
            workspace: self.opt(workspace, "workspace")?,
        })
    }
}

/// The forward of class-index targets: `outputs` = (loss: per row for "none", else the reduced
/// loss, in the logits' dtype; lse: float32 per row; workspace: float32 of 2 * rows + 2 for
/// "mean"/"sum", else None).
#[pyfunction]
fn cuda_ce_forward(
    py: Python<'_>,
    options: &CeOptions,
    inputs: CeInputs<'_>,
    shape: (usize, usize),
    outputs: (Bound<'_, PyAny>, Bound<'_, PyAny>, Option<Bound<'_, PyAny>>),
    stream: &CudaStream,
) -> PyResult<()> {
    let c = Call::new(stream);
    let (rows, opts) = c.ce_rows(&inputs, options, shape)?;
    let (loss, lse, workspace) = &outputs;
    let loss = c.buf(loss, "loss")?;
    let saved = c.ce_saved(lse, workspace.as_ref())?;
    c.run(py, |s| {
        cu::cross_entropy_forward(s, rows, &opts, loss, saved)
    })
}

/// The gradient of [`cuda_ce_forward`]'s loss: `saved` = (lse, workspace or None) as it left
/// them, `grad` = (dlogits, may be the logits; grad_loss in the logits' dtype; its stride, 0
/// for one value, 1 for one per row).
#[pyfunction]
fn cuda_ce_backward(
    py: Python<'_>,
    options: &CeOptions,
    inputs: CeInputs<'_>,
    shape: (usize, usize),
    saved: (Bound<'_, PyAny>, Option<Bound<'_, PyAny>>),
    grad: (Bound<'_, PyAny>, Bound<'_, PyAny>, usize),
    stream: &CudaStream,
) -> PyResult<()> {
    let c = Call::new(stream);
    let (rows, opts) = c.ce_rows(&inputs, options, shape)?;
    let saved = c.ce_saved(&saved.0, saved.1.as_ref())?;
    let grad = CeGrad {
        dlogits: c.buf(&grad.0, "dlogits")?,
        grad_loss: c.buf(&grad.1, "grad_loss")?,
        stride: grad.2,
    };
    c.run(py, |s| {
        cu::cross_entropy_backward(s, rows, &opts, saved, grad)
    })
}

impl Call {
    pub(super) fn indices(&self, obj: &Bound<'_, PyAny>, name: &str) -> PyResult<Indices> {
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
    m.add_function(wrap_pyfunction!(cuda_ce_forward, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_ce_backward, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_vocab_parallel_stats, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_vocab_parallel_backward, m)?)
}
