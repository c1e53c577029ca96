//! Cross-entropy of class-index targets in two kernels (kernels/cross_entropy_classes.cu): the
//! forward ([`cross_entropy_forward`]: one counter memset and one launch) writes the loss, reduced
//! on the device, and saves each row's lse and the mean's denominator; the backward
//! ([`cross_entropy_backward`]: one launch) streams the gradient from them.

use crate::cross_entropy::CeArgs;
use crate::device::{launch, memset_u32, params, with_device, Device, Kernel};
use crate::launch::{check, launch_flat, ptr, size, vector_width};
use crate::table::{KernelKey, Op, Variant};
use crate::{Buf, CeOptions, DType, Error, Indices, Result, Stream};
use normax_core::spec::Reduction;

/// Rows of class-index cross-entropy: the logits (`rows` x `cols`, contiguous) and one int64
/// class id per row.
#[derive(Clone, Copy, Debug)]
pub struct CeRows {
    pub logits: Buf,
    pub target: Indices,
    pub rows: usize,
    pub cols: usize,
}

/// What [`cross_entropy_forward`] saves for [`cross_entropy_backward`]: each row's float32
/// log-sum-exp, and for "mean" and "sum" the float32 workspace of [`ce_workspace_len`] elements
/// (the block partials, the mean's denominator at `2 * rows`, the last-block counter after it).
#[derive(Clone, Copy, Debug)]
pub struct CeSaved {
    pub lse: Buf,
    pub workspace: Option<Buf>,
}

/// The backward's output and incoming gradient: `dlogits` (the logits' dtype and length; may be
/// the logits themselves) and `grad_loss` (the logits' dtype) read at `row * stride`: stride 0
/// for one value, 1 for one per row ("none").
#[derive(Clone, Copy, Debug)]
pub struct CeGrad {
    pub dlogits: Buf,
    pub grad_loss: Buf,
    pub stride: usize,
}

/// float32 elements of the "mean"/"sum" workspace of `rows` rows: one loss and one weight
/// partial per block (at most one block per row), the denominator and the counter.
pub fn ce_workspace_len(rows: usize) -> usize {
    2 * rows + 2
}

/// Values per thread and tile (CE_VALUES in cross_entropy.cu): the threads of a row follow its
/// length, whatever the dtype.
const CE_VALUES: usize = 16;
/// Threads of a row at most: longer rows loop over tiles (`__launch_bounds__(1024)`).
const CE_MAX_THREADS: usize = 1024;
/// Threads per block at least, filled with several short rows.
const CE_MIN_BLOCK: usize = 256;
/// The backward blocks that sum the class weights first (label smoothing with weights) loop over
/// rows: at most this many per SM, so the sum is made once per block rather than once per row.
const CE_WEIGHT_SUM_BLOCKS_PER_SM: usize = 16;

/// (threads per row, rows per block) of the two kernels for rows of `cols`.
fn ce_block(cols: usize) -> (u32, u32) {
    let threads = cols
        .div_ceil(CE_VALUES)
        .next_power_of_two()
        .clamp(32, CE_MAX_THREADS);
    (threads as u32, (CE_MIN_BLOCK / threads).max(1) as u32)
}

impl CeRows {
    fn check(&self, opts: &CeOptions<Buf>) -> Result<()> {
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
        opts.check(self.cols)?;
        if let Some(w) = &opts.weight {
            check("weight", w, DType::F32, self.cols)?;
        }
        if self.rows > 0 && self.cols == 0 {
            return Err(Error::Value("logits: the class axis is empty".into()));
        }
        // Column indices are int in the kernels, up to one tile past the row's end.
        let most = i32::MAX as usize - CE_VALUES * CE_MAX_THREADS;
        if self.cols > most {
            return Err(Error::Value(format!(
                "logits: {} classes; the kernels take at most {most} (32-bit column indices)",
                self.cols
            )));
        }
        Ok(())
    }

    /// The workspace: `needed` for this reduction, else absent or of the same size.
    fn check_workspace(&self, ws: Option<Buf>, needed: bool) -> Result<()> {
        match ws {
            Some(w) => check("workspace", &w, DType::F32, ce_workspace_len(self.rows)),
            None if needed => Err(Error::Value(format!(
                "workspace: expected {} float32 elements for this reduction, got None",
                ce_workspace_len(self.rows)
            ))),
            None => Ok(()),
        }
    }

    fn args(&self, opts: &CeOptions<Buf>) -> CeArgs {
        CeArgs {
            target: self.target.ptr,
            probs: 0,
            weight: ptr(opts.weight),
            ignore_index: opts.ignore_index,
            eps: opts.label_smoothing as f32,
            z: opts.z_loss as f32,
            cap: opts.softcap.unwrap_or(0.0) as f32,
            inv_t: 1.0,
            token_weight: 0,
            stat_lse: 0,
            stat_entropy: 0,
            stat_correct: 0,
        }
    }

    /// The kernel `<op>[_smooth]_<dtype>_v<V>` (`plain`/`smooth` the two ops): the smoothing
    /// variant also sums w_c and w_c x_c per row (forward) and reads w_c per element (backward);
    /// V is 16 bytes' worth where `bufs` and the weights (read 16 bytes at a time there) are
    /// aligned.
    fn kernel(
        &self,
        d: &mut Device,
        (plain, smooth): (Op, Op),
        opts: &CeOptions<Buf>,
        bufs: &[u64],
    ) -> Result<Kernel> {
        let smoothing = opts.label_smoothing > 0.0;
        let mut aligned = bufs.to_vec();
        if smoothing {
            aligned.push(ptr(opts.weight));
        }
        let vec = vector_width(self.logits.dtype, self.cols, &aligned);
        let op = if smoothing { smooth } else { plain };
        d.kernel(KernelKey::new(op, self.logits.dtype, Variant::Vec(vec)))
    }

    /// Blocks of [`ce_block`] rows: the forward's grid (one block per row group).
    fn groups(&self) -> Result<u32> {
        let (_, rows_per_block) = ce_block(self.cols);
        u32::try_from(self.rows.div_ceil(rows_per_block as usize))
            .ok()
            .filter(|&g| g <= i32::MAX as u32)
            .ok_or_else(|| Error::Value(format!("too many rows for one launch: {}", self.rows)))
    }
}

/// The kernels' reduction codes (`CeReduction` in cross_entropy.cu).
fn reduction_code(r: Reduction) -> i32 {
    match r {
        Reduction::None => 0,
        Reduction::Mean => 1,
        Reduction::Sum => 2,
    }
}

/// The forward of class-index cross-entropy in one launch (after one cuMemsetD32Async of the
/// workspace's counter for "mean"/"sum"): `loss` (the logits' dtype) gets the per-row losses
/// ("none", `rows` elements; 0 for ignored rows) or the reduced loss (1 element), `saved.lse`
/// each row's float32 log-sum-exp and, for "mean"/"sum", `saved.workspace` the block partials
/// and the denominator (the count, or summed class weight, of the rows not ignored), added in a
/// fixed order: the same bits on every run. A class id outside `[0, cols)` that is not
/// `ignore_index` stops the kernel on the device (a message, then a trap), never read back here.
pub fn cross_entropy_forward(
    s: Stream,
    x: CeRows,
    opts: &CeOptions<Buf>,
    loss: Buf,
    saved: CeSaved,
) -> Result<()> {
    x.check(opts)?;
    let reduced = opts.reduction != Reduction::None;
    check(
        "loss",
        &loss,
        x.logits.dtype,
        if reduced { 1 } else { x.rows },
    )?;
    check("lse", &saved.lse, DType::F32, x.rows)?;
    x.check_workspace(saved.workspace, reduced)?;
    if x.rows == 0 && !reduced {
        return Ok(());
    }
    let args = x.args(opts);
    // No rows, reduced: one block writes the empty sum (and 0 / 0 for the mean).
    let grid = x.groups()?.max(1);
    let ws = ptr(saved.workspace);
    let (rows_i, cols_i, code) = (x.rows as i64, x.cols as i32, reduction_code(opts.reduction));
    with_device(s.device, |d| {
        let f = x.kernel(
            d,
            (Op::CeForward, Op::CeForwardSmooth),
            opts,
            &[x.logits.ptr],
        )?;
        // Safety: the workspace was checked to hold 2 * rows + 2 floats; the counter is the last.
        if reduced {
            unsafe { memset_u32(ws + 4 * (2 * x.rows as u64 + 1), 0, 1, s)? };
        }
        // Safety: every buffer checked above against the kernel's reads and writes.
        unsafe {
            launch(
                f,
                grid,
                ce_block(x.cols),
                s,
                &mut params![
                    x.logits.ptr,
                    rows_i,
                    cols_i,
                    args,
                    code,
                    loss.ptr,
                    saved.lse.ptr,
                    ws
                ],
            )
        }
    })
}

/// The gradient of [`cross_entropy_forward`]'s loss into `grad.dlogits` in one launch, from the
/// saved lse (and for "mean" the saved denominator, divided by on the device: 0 / 0 is NaN):
/// grad_loss times d(loss)/d(logits), 0 for ignored rows.
pub fn cross_entropy_backward(
    s: Stream,
    x: CeRows,
    opts: &CeOptions<Buf>,
    saved: CeSaved,
    grad: CeGrad,
) -> Result<()> {
    x.check(opts)?;
    let mean = opts.reduction == Reduction::Mean;
    check("lse", &saved.lse, DType::F32, x.rows)?;
    x.check_workspace(saved.workspace, mean)?;
    check("dlogits", &grad.dlogits, x.logits.dtype, x.logits.len)?;
    let per_row = match grad.stride {
        0 => 1,
        1 if opts.reduction == Reduction::None => x.rows,
        st => {
            return Err(Error::Value(format!(
                "grad_loss: stride {st} for reduction {:?}; expected 0 (one value) or 1 (one per \
                 row, reduction 'none')",
                opts.reduction
            )))
        }
    };
    check("grad_loss", &grad.grad_loss, x.logits.dtype, per_row)?;
    if x.rows == 0 {
        return Ok(());
    }
    let args = x.args(opts);
    let denom = match (mean, saved.workspace) {
        (true, Some(w)) => w.ptr + 4 * 2 * x.rows as u64,
        _ => 0,
    };
    let (rows_i, cols_i, stride_i) = (x.rows as i64, x.cols as i32, grad.stride as i64);
    with_device(s.device, |d| {
        let mut grid = x.groups()?;
        if opts.label_smoothing > 0.0 && opts.weight.is_some() {
            grid = grid.min(CE_WEIGHT_SUM_BLOCKS_PER_SM as u32 * d.sms);
        }
        let f = x.kernel(
            d,
            (Op::CeBackward, Op::CeBackwardSmooth),
            opts,
            &[x.logits.ptr, grad.dlogits.ptr],
        )?;
        // Safety: every buffer checked above against the kernel's reads and writes.
        unsafe {
            launch(
                f,
                grid,
                ce_block(x.cols),
                s,
                &mut params![
                    x.logits.ptr,
                    rows_i,
                    cols_i,
                    args,
                    saved.lse.ptr,
                    denom,
                    grad.grad_loss.ptr,
                    stride_i,
                    grad.dlogits.ptr
                ],
            )
        }
    })
}

/// int32 class ids at `ids` (`out.len` of them, device memory) widened into `out`, the int64 ids
/// the kernels read (JAX's integers are int32 without x64).
pub fn widen_class_ids(s: Stream, ids: u64, out: Indices) -> Result<()> {
    if out.len == 0 {
        return Ok(());
    }
    if ids == 0 || out.ptr == 0 {
        return Err(Error::Value("target: null device address".into()));
    }
    with_device(s.device, |d| {
        let f = d.kernel(KernelKey::untyped(Op::WidenIds))?;
        let n = out.len as i64;
        // Safety: `ids` holds n int32 values and `out` n int64 ones (the caller's buffers).
        unsafe { launch_flat(f, out.len, s, &mut params![ids, n, out.ptr]) }
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

    fn bufs(dtype: DType, ptr: u64, len: usize) -> Buf {
        Buf { ptr, dtype, len }
    }

    /// Every argument mistake of the two-kernel entries is a ValueError before any CUDA call
    /// (this machine may have no driver: reaching one would be Unavailable instead).
    #[test]
    fn bad_two_kernel_arguments_are_value_errors_before_any_cuda_call() {
        let s = Stream {
            device: 0,
            handle: 0,
        };
        let x = CeRows {
            logits: bufs(DType::BF16, 1 << 20, 6),
            target: Indices { ptr: 64, len: 2 },
            rows: 2,
            cols: 3,
        };
        let value = |r: Result<()>| matches!(r, Err(Error::Value(_)));
        let mean = CeOptions::<Buf>::default();
        let none = CeOptions {
            reduction: Reduction::None,
            ..mean
        };
        let lse = f32s(128, 2);
        let ws = Some(f32s(256, ce_workspace_len(2)));
        let loss1 = bufs(DType::BF16, 512, 1);
        let saved = CeSaved { lse, workspace: ws };
        // Forward: the loss's dtype and length per reduction, the lse, the workspace.
        assert!(value(cross_entropy_forward(
            s,
            x,
            &mean,
            f32s(512, 1),
            saved
        )));
        assert!(value(cross_entropy_forward(
            s,
            x,
            &none,
            loss1,
            CeSaved {
                workspace: None,
                ..saved
            }
        )));
        assert!(value(cross_entropy_forward(
            s,
            x,
            &mean,
            loss1,
            CeSaved {
                lse: f32s(128, 3),
                ..saved
            }
        )));
        assert!(value(cross_entropy_forward(
            s,
            x,
            &mean,
            loss1,
            CeSaved {
                workspace: None,
                ..saved
            }
        )));
        assert!(value(cross_entropy_forward(
            s,
            x,
            &mean,
            loss1,
            CeSaved {
                workspace: Some(f32s(256, 5)),
                ..saved
            }
        )));
        // The rows: targets, weights, an empty class axis, 2^31 classes.
        let short = CeRows {
            target: Indices { ptr: 64, len: 3 },
            ..x
        };
        assert!(value(cross_entropy_forward(s, short, &mean, loss1, saved)));
        let weights = CeOptions {
            weight: Some(f32s(1024, 4)),
            ..mean
        };
        assert!(value(cross_entropy_forward(s, x, &weights, loss1, saved)));
        let empty = CeRows {
            logits: bufs(DType::BF16, 1 << 20, 0),
            cols: 0,
            ..x
        };
        assert!(value(cross_entropy_forward(s, empty, &mean, loss1, saved)));
        let wide = CeRows {
            logits: bufs(DType::BF16, 1 << 20, 1 << 31),
            target: Indices { ptr: 64, len: 1 },
            rows: 1,
            cols: 1 << 31,
        };
        let one = CeSaved {
            lse: f32s(128, 1),
            workspace: Some(f32s(256, 4)),
        };
        assert!(value(cross_entropy_forward(s, wide, &mean, loss1, one)));
        // Backward: dlogits, grad_loss's dtype, length and stride, the mean's denominator.
        let grad = CeGrad {
            dlogits: bufs(DType::BF16, 1 << 21, 6),
            grad_loss: loss1,
            stride: 0,
        };
        let back =
            |o: &CeOptions<Buf>, sv: CeSaved, g: CeGrad| cross_entropy_backward(s, x, o, sv, g);
        assert!(value(back(
            &mean,
            saved,
            CeGrad {
                dlogits: bufs(DType::F32, 1 << 21, 6),
                ..grad
            }
        )));
        assert!(value(back(
            &mean,
            saved,
            CeGrad {
                grad_loss: f32s(512, 1),
                ..grad
            }
        )));
        assert!(value(back(&mean, saved, CeGrad { stride: 1, ..grad })));
        assert!(value(back(&none, saved, CeGrad { stride: 1, ..grad })));
        assert!(value(back(&none, saved, CeGrad { stride: 2, ..grad })));
        let no_ws = CeSaved {
            workspace: None,
            ..saved
        };
        assert!(value(back(&mean, no_ws, grad)));
    }

    #[test]
    fn two_kernel_blocks_give_rows_about_16_values_per_thread() {
        for cols in [1, 17, 50, 512, 513, 4096, 16384, 16385, 32000, 128256] {
            let (threads, rows_per_block) = ce_block(cols);
            assert!(threads.is_power_of_two() && (32..=1024).contains(&threads));
            // Enough threads for 16 values each, up to 1024; no more than twice that.
            assert!(
                threads as usize * CE_VALUES >= cols || threads == 1024,
                "{cols}"
            );
            assert!(
                threads == 32 || (threads as usize / 2) * CE_VALUES < cols,
                "{cols}"
            );
            // Short rows share blocks of 256 threads (the forward's partials: one per block).
            assert_eq!(threads * rows_per_block, threads.max(256), "{cols}");
            assert!(rows_per_block <= 8); // NX_MAX_ROWS_PER_BLOCK: the shared scratch's rows
        }
        // The shapes: 4096 classes at 256 threads (f32 and bf16 alike), 128256 at 1024.
        assert_eq!(ce_block(4096), (256, 1));
        assert_eq!(ce_block(128256), (1024, 1));
    }
}
