//! Log-probabilities of the targets and entropies of softmax(x / T), and their gradient: what a
//! reinforcement-learning trainer asks of a policy's logits (PPO's probability ratio and its
//! entropy bonus), fused over rows of logits, or over blocks of hidden @ weight^T + bias that are
//! never all held at once.
//!
//! Per row with logits x, temperature T, z = x / T, lse = log-sum-exp(z), p = softmax(z) and
//! target y:
//!
//! ```text
//! logprob = z_y - lse                     entropy H = sum_c p_c (lse - z_c)
//! dx_c    = (1/T) [g_logp (onehot_c - p_c) - g_H p_c (z_c - lse + H)]
//! ```
//!
//! Every entropy term p_c (lse - z_c) is >= 0, so the sum never cancels; a p_c = 0 term adds 0
//! (also for z_c = -inf). lse comes from the sum-of-exponentials machinery of [`crate::lse`],
//! refined where one element dominates, and is kept as hi + lo, so the target's logprob and its
//! gradient g_logp (1 - p_y) = -g_logp expm1(logprob) stay relatively accurate past any margin
//! (no "Softmax Collapse" to 0). Rows with NaN, +inf or huge values take an exact f64 path; a row
//! that is NaN, holds +inf or is all -inf gives NaN (torch's log_softmax does too). Ignored rows
//! give 0 and a zero gradient.
//!
//! The backward recomputes each row's statistics from the logits instead of taking saved ones:
//! no float64 residual to carry, the same accuracy, and the entropy pass only where g_H is given.
//!
//! Here: the options, the checks and the public functions of the rows form; `rows`: the row
//! kernels; `linear`: the linear form.

mod linear;
mod rows;

use crate::driver::{self, Ptr};
use crate::float::Float;
use crate::isa::dispatch;
use crate::spec::{check_class, check_len, size};
use crate::Error;
use rows::{Fold, Grad, Part};

pub use linear::{linear_logprobs, linear_logprobs_backward};

/// The options of the log-probabilities: the target that marks a row as ignored, and the
/// temperature T the logits are divided by.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LogprobOptions {
    pub ignore_index: i64,
    pub temperature: f64,
}

impl Default for LogprobOptions {
    fn default() -> Self {
        LogprobOptions {
            ignore_index: -100,
            temperature: 1.0,
        }
    }
}

impl LogprobOptions {
    /// The temperature must be finite and > 0.
    pub fn check(&self) -> Result<(), Error> {
        let t = self.temperature;
        if !(t.is_finite() && t > 0.0) {
            return Err(Error::Value(format!(
                "temperature: must be a finite number > 0, got {t}"
            )));
        }
        Ok(())
    }
}

/// The incoming gradients of the backward, one per row: of the logprobs and of the entropies.
/// None stands for zeros, and its terms are skipped (an absent g_H skips the entropy pass).
#[derive(Clone, Copy)]
pub struct LogprobGrads<'a, T> {
    pub logprob: Option<&'a [T]>,
    pub entropy: Option<&'a [T]>,
}

impl<T: Float> LogprobGrads<'_, T> {
    /// Row `r`'s (g_logp, g_H), 0 for an absent one.
    fn at(&self, r: usize) -> (f64, f64) {
        let get = |g: Option<&[T]>| g.map_or(0.0, |g| g[r].to_f64());
        (get(self.logprob), get(self.entropy))
    }
}

/// Checks the options, the targets (every class index in range or ignore_index) and the
/// per-row lengths.
fn check_rows<T>(
    rows: usize,
    classes: usize,
    target: &[i64],
    opts: &LogprobOptions,
    grads: Option<&LogprobGrads<'_, T>>,
) -> Result<(), Error> {
    opts.check()?;
    if classes == 0 {
        return Err(Error::Value("logits: the class axis is empty".into()));
    }
    check_len("target", target.len(), rows)?;
    for (i, &y) in target.iter().enumerate() {
        check_class(i, y, classes, opts.ignore_index)?;
    }
    if let Some(g) = grads {
        if let Some(gl) = g.logprob {
            check_len("grad_logprob", gl.len(), rows)?;
        }
        if let Some(gh) = g.entropy {
            check_len("grad_entropy", gh.len(), rows)?;
        }
    }
    Ok(())
}

/// Writes each row's logprob (and entropy) from its folded statistics.
fn finish<T: Float>(
    parts: &[Part],
    target: &[i64],
    ignore: i64,
    logprob: &mut [T],
    entropy: Option<&mut [T]>,
) {
    for (i, (p, l)) in parts.iter().zip(logprob.iter_mut()).enumerate() {
        *l = T::from_f64(if target[i] == ignore {
            0.0
        } else {
            p.logprob()
        });
    }
    if let Some(h) = entropy {
        for (i, (p, e)) in parts.iter().zip(h.iter_mut()).enumerate() {
            *e = T::from_f64(if target[i] == ignore {
                0.0
            } else {
                p.entropy()
            });
        }
    }
}

/// logprob (and, given, entropy) of each row of `logits` (rows x classes, contiguous) at its
/// class index in `target`.
pub fn logprobs<T: Float>(
    logits: &[T],
    rows: usize,
    classes: usize,
    target: &[i64],
    opts: &LogprobOptions,
    logprob: &mut [T],
    entropy: Option<&mut [T]>,
) -> Result<(), Error> {
    check_len("logits", logits.len(), size(rows, classes)?)?;
    check_rows::<T>(rows, classes, target, opts, None)?;
    check_len("logprob", logprob.len(), rows)?;
    if let Some(h) = &entropy {
        check_len("entropy", h.len(), rows)?;
    }
    let mut parts = vec![Part::EMPTY; rows];
    let state = Ptr(parts.as_mut_ptr());
    let x = Ptr::from_const(logits.as_ptr());
    let with_entropy = entropy.is_some();
    driver::for_each_fixed_row_block(rows, classes, |range| {
        dispatch(Fold {
            x,
            len: classes,
            v0: 0,
            temperature: opts.temperature,
            targets: target,
            ignore: opts.ignore_index,
            row0: 0,
            state,
            entropy: with_entropy,
            rows: range,
        })
    });
    finish(&parts, target, opts.ignore_index, logprob, entropy);
    Ok(())
}

/// The gradient of sum_r (g_logp[r] logprob[r] + g_H[r] entropy[r]) with respect to `logits`
/// into `grad` (rows x classes); ignored rows get zeros.
pub fn logprobs_backward<T: Float>(
    logits: &[T],
    rows: usize,
    classes: usize,
    target: &[i64],
    opts: &LogprobOptions,
    grads: LogprobGrads<'_, T>,
    grad: &mut [T],
) -> Result<(), Error> {
    check_len("logits", logits.len(), size(rows, classes)?)?;
    check_rows(rows, classes, target, opts, Some(&grads))?;
    check_len("grad", grad.len(), logits.len())?;
    let x = Ptr::from_const(logits.as_ptr());
    let out = Ptr(grad.as_mut_ptr());
    driver::for_each_fixed_row_block(rows, classes, |range| {
        dispatch(Grad {
            x,
            len: classes,
            v0: 0,
            temperature: opts.temperature,
            targets: target,
            ignore: opts.ignore_index,
            row0: 0,
            folded: None,
            grads,
            grad: out,
            rows: range,
        })
    });
    Ok(())
}
