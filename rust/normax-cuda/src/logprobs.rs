//! Log-probabilities and entropy of class-index targets (kernels/logprobs.cu): a forward that
//! reads each row once and saves its float32 lse, logprob and entropy, and a backward that
//! streams the gradient from them (no reduction, so long rows may split across blocks).

use crate::device::{params, with_device};
use crate::launch::{check, check_opt, size, RowLaunch};
use crate::table::Op;
use crate::{Buf, DType, Error, Indices, Result, Stream};

/// The kernels' argument block (`LpArgs` in logprobs.cu: same fields, same order).
#[repr(C)]
#[derive(Clone, Copy)]
struct LpArgs {
    target: u64,
    ignore_index: i64,
    inv_t: f32,
}

/// `rows` rows of `cols` logits (contiguous, any kernel dtype) and one int64 class id per row.
#[derive(Clone, Copy, Debug)]
pub struct LpRows {
    pub logits: Buf,
    pub target: Indices,
    pub rows: usize,
    pub cols: usize,
    pub ignore_index: i64,
    /// The logits are divided by it; finite and > 0.
    pub temperature: f64,
}

/// The forward's float32 per-row results: log p(target), the entropy and the log-sum-exp of
/// softmax(logits / T) (0 for `ignore_index` rows; NaN for a class id out of range, which the
/// caller refuses first).
#[derive(Clone, Copy, Debug)]
pub struct LpSaved {
    pub logprob: Buf,
    pub entropy: Buf,
    pub lse: Buf,
}

impl LpRows {
    fn check(&self) -> Result<()> {
        check(
            "logits",
            &self.logits,
            self.logits.dtype,
            size(self.rows, self.cols)?,
        )?;
        if self.target.len != self.rows {
            return Err(Error::Value(format!(
                "target: expected {} class indices, got {}",
                self.rows, self.target.len
            )));
        }
        if self.rows > 0 && self.target.ptr == 0 {
            return Err(Error::Value("target: null device address".into()));
        }
        let t = self.temperature;
        if !(t.is_finite() && t > 0.0) {
            return Err(Error::Value(format!(
                "temperature: must be a finite number > 0, got {t}"
            )));
        }
        if self.rows > 0 && self.cols == 0 {
            return Err(Error::Value("logits: the class axis is empty".into()));
        }
        Ok(())
    }

    fn args(&self) -> LpArgs {
        LpArgs {
            target: self.target.ptr,
            ignore_index: self.ignore_index,
            inv_t: (1.0 / self.temperature) as f32,
        }
    }
}

impl LpSaved {
    fn check(&self, rows: usize) -> Result<()> {
        check("logprob", &self.logprob, DType::F32, rows)?;
        check("entropy", &self.entropy, DType::F32, rows)?;
        check("lse", &self.lse, DType::F32, rows)
    }
}

/// The forward in one launch: whole rows per block (one reduction per row).
pub fn logprobs_forward(s: Stream, x: LpRows, out: LpSaved) -> Result<()> {
    x.check()?;
    out.check(x.rows)?;
    if x.rows == 0 {
        return Ok(());
    }
    let args = x.args();
    with_device(s.device, |d| {
        let mut r = RowLaunch::new(d, s, x.logits.dtype, x.rows, x.cols, &[x.logits.ptr], false)?;
        let (rows_i, cols_i, _, _) = r.dims();
        // Safety: every buffer checked above against the kernel's reads and writes.
        unsafe {
            r.run_vec(
                Op::LogprobsForward,
                &mut params![
                    x.logits.ptr,
                    rows_i,
                    cols_i,
                    args,
                    out.logprob.ptr,
                    out.entropy.ptr,
                    out.lse.ptr
                ],
            )
        }
    })
}

/// The incoming gradients of (logprob, entropy), each absent (zero) or one value per row in the
/// logits' dtype, and where the logits' gradient goes (the logits' dtype; may be the logits).
#[derive(Clone, Copy, Debug)]
pub struct LpGrad {
    pub g_logprob: Option<Buf>,
    pub g_entropy: Option<Buf>,
    pub dlogits: Buf,
}

/// The gradient of [`logprobs_forward`]'s outputs in one launch, from what it saved.
pub fn logprobs_backward(s: Stream, x: LpRows, saved: LpSaved, grad: LpGrad) -> Result<()> {
    x.check()?;
    saved.check(x.rows)?;
    let dtype = x.logits.dtype;
    check_opt("grad_logprob", grad.g_logprob, dtype, x.rows)?;
    check_opt("grad_entropy", grad.g_entropy, dtype, x.rows)?;
    check("dlogits", &grad.dlogits, dtype, x.logits.len)?;
    if x.rows == 0 {
        return Ok(());
    }
    let args = x.args();
    let gl = grad.g_logprob.map_or(0, |b| b.ptr);
    let gh = grad.g_entropy.map_or(0, |b| b.ptr);
    with_device(s.device, |d| {
        let bufs = [x.logits.ptr, grad.dlogits.ptr];
        let mut r = RowLaunch::new(d, s, dtype, x.rows, x.cols, &bufs, true)?;
        let (rows_i, cols_i, chunk_i, chunks_i) = r.dims();
        // Safety: every buffer checked above against the kernel's reads and writes.
        unsafe {
            r.run_vec(
                Op::LogprobsBackward,
                &mut params![
                    x.logits.ptr,
                    rows_i,
                    cols_i,
                    chunk_i,
                    chunks_i,
                    args,
                    saved.lse.ptr,
                    saved.logprob.ptr,
                    saved.entropy.ptr,
                    gl,
                    gh,
                    grad.dlogits.ptr
                ],
            )
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f32s(ptr: u64, len: usize) -> Buf {
        Buf {
            ptr,
            dtype: DType::F32,
            len,
        }
    }

    /// Every argument mistake is a ValueError before any CUDA call (this machine may have no
    /// driver: reaching one would be Unavailable instead).
    #[test]
    fn bad_arguments_are_value_errors_before_any_cuda_call() {
        let s = Stream {
            device: 0,
            handle: 0,
        };
        let x = LpRows {
            logits: f32s(1 << 20, 6),
            target: Indices { ptr: 64, len: 2 },
            rows: 2,
            cols: 3,
            ignore_index: -100,
            temperature: 1.0,
        };
        let saved = LpSaved {
            logprob: f32s(128, 2),
            entropy: f32s(256, 2),
            lse: f32s(384, 2),
        };
        let value = |r: Result<()>| matches!(r, Err(Error::Value(_)));
        for t in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let hot = LpRows {
                temperature: t,
                ..x
            };
            assert!(value(logprobs_forward(s, hot, saved)));
        }
        let short = LpRows {
            target: Indices { ptr: 64, len: 3 },
            ..x
        };
        assert!(value(logprobs_forward(s, short, saved)));
        let empty = LpRows {
            logits: f32s(1 << 20, 0),
            cols: 0,
            ..x
        };
        assert!(value(logprobs_forward(s, empty, saved)));
        let few = LpSaved {
            lse: f32s(384, 1),
            ..saved
        };
        assert!(value(logprobs_forward(s, x, few)));
        let grad = LpGrad {
            g_logprob: Some(f32s(512, 2)),
            g_entropy: None,
            dlogits: f32s(1 << 21, 6),
        };
        let bad_g = LpGrad {
            g_entropy: Some(Buf {
                ptr: 640,
                dtype: DType::BF16,
                len: 2,
            }),
            ..grad
        };
        assert!(value(logprobs_backward(s, x, saved, bad_g)));
        let bad_dx = LpGrad {
            dlogits: f32s(1 << 21, 5),
            ..grad
        };
        assert!(value(logprobs_backward(s, x, saved, bad_dx)));
    }
}
