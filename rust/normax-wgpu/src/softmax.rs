//! softmax, log_softmax and logsumexp of rows (shaders/softmax.wgsl).

use crate::device::{f32_bytes, run, Input, Kernel, Uniform};
use crate::{dim, Error};
use normax_core::spec::{check_len, size};

/// The shader's `op` codes.
#[derive(Clone, Copy)]
enum RowOp {
    Softmax = 0,
    LogSoftmax = 1,
    LogSumExp = 2,
}

fn softmax_family(x: &[f32], rows: usize, cols: usize, op: RowOp) -> Result<Vec<f32>, Error> {
    check_len("x", x.len(), size(rows, cols)?)?;
    let per_row = if let RowOp::LogSumExp = op { 1 } else { cols };
    if rows == 0 || cols == 0 {
        // An empty reduction's log-sum-exp is -inf; empty rows have nothing to normalize.
        return Ok(vec![f32::NEG_INFINITY; rows * per_row]);
    }
    let c = dim("cols", cols)?;
    let mut out = run(
        Kernel::Softmax,
        rows,
        &[Input::Rows(f32_bytes(x), cols)],
        &[per_row],
        &|n, nx| {
            Uniform::default()
                .u32(n)
                .u32(c)
                .u32(nx)
                .u32(op as u32)
                .u32(0)
        },
    )?;
    Ok(out.swap_remove(0))
}

/// softmax of each row: exp(x - max) / sum(exp(x - max)). A row with NaN or +inf, or only -inf,
/// is NaN.
pub fn softmax(x: &[f32], rows: usize, cols: usize) -> Result<Vec<f32>, Error> {
    softmax_family(x, rows, cols, RowOp::Softmax)
}

/// log_softmax of each row: (x - max) - log(sum(exp(x - max))); NaN rows as [`softmax`].
pub fn log_softmax(x: &[f32], rows: usize, cols: usize) -> Result<Vec<f32>, Error> {
    softmax_family(x, rows, cols, RowOp::LogSoftmax)
}

/// log(sum(exp(x))) of each row: NaN with a NaN, +inf with +inf, -inf for a row of only -inf or
/// an empty row.
pub fn logsumexp(x: &[f32], rows: usize, cols: usize) -> Result<Vec<f32>, Error> {
    softmax_family(x, rows, cols, RowOp::LogSumExp)
}
