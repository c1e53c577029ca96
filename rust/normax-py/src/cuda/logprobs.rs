//! cuda_logprobs_forward / cuda_logprobs_backward: log p(target) and the entropy of
//! softmax(logits / T) per row, and their gradient (normax-cuda's logprobs.rs).

use super::{Call, CudaStream};
use normax_cuda::{self as cu, LpGrad, LpRows, LpSaved};
use pyo3::prelude::*;

/// (logits, int64 class ids).
type LpInputs<'py> = (Bound<'py, PyAny>, Bound<'py, PyAny>);
/// The float32 per-row (logprob, entropy, lse).
type LpOut<'py> = (Bound<'py, PyAny>, Bound<'py, PyAny>, Bound<'py, PyAny>);

impl Call {
    fn lp_rows(
        &self,
        inputs: &LpInputs<'_>,
        options: (i64, f64),
        shape: (usize, usize),
    ) -> PyResult<LpRows> {
        Ok(LpRows {
            logits: self.buf(&inputs.0, "logits")?,
            target: self.indices(&inputs.1, "target")?,
            rows: shape.0,
            cols: shape.1,
            ignore_index: options.0,
            temperature: options.1,
        })
    }

    fn lp_saved(&self, out: &LpOut<'_>) -> PyResult<LpSaved> {
        Ok(LpSaved {
            logprob: self.buf(&out.0, "logprob")?,
            entropy: self.buf(&out.1, "entropy")?,
            lse: self.buf(&out.2, "lse")?,
        })
    }
}

/// The forward: `options` = (ignore_index, temperature), `outputs` = float32 (logprob, entropy,
/// lse) per row, one launch.
#[pyfunction]
fn cuda_logprobs_forward(
    py: Python<'_>,
    inputs: LpInputs<'_>,
    options: (i64, f64),
    shape: (usize, usize),
    outputs: LpOut<'_>,
    stream: &CudaStream,
) -> PyResult<()> {
    let c = Call::new(stream);
    let rows = c.lp_rows(&inputs, options, shape)?;
    let saved = c.lp_saved(&outputs)?;
    c.run(py, |s| cu::logprobs_forward(s, rows, saved))
}

/// The gradient: `saved` as the forward left it, `grad` = (grad of logprob or None, grad of
/// entropy or None, both per row in the logits' dtype; dlogits, may be the logits), one launch.
#[pyfunction]
fn cuda_logprobs_backward(
    py: Python<'_>,
    inputs: LpInputs<'_>,
    options: (i64, f64),
    shape: (usize, usize),
    saved: LpOut<'_>,
    grad: (
        Option<Bound<'_, PyAny>>,
        Option<Bound<'_, PyAny>>,
        Bound<'_, PyAny>,
    ),
    stream: &CudaStream,
) -> PyResult<()> {
    let c = Call::new(stream);
    let rows = c.lp_rows(&inputs, options, shape)?;
    let saved = c.lp_saved(&saved)?;
    let grad = LpGrad {
        g_logprob: c.opt(grad.0.as_ref(), "grad_logprob")?,
        g_entropy: c.opt(grad.1.as_ref(), "grad_entropy")?,
        dlogits: c.buf(&grad.2, "dlogits")?,
    };
    c.run(py, |s| cu::logprobs_backward(s, rows, saved, grad))
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(cuda_logprobs_forward, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_logprobs_backward, m)?)
}
