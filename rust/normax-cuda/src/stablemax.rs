//! stablemax and log_stablemax (kernels/stablemax.cu); their backwards are softmax's backward
//! scaled by 1 / (1 + |x|), composed by the caller.

use crate::device::{params, with_device};
use crate::launch::{check, size, RowLaunch};
use crate::table::Op;
use crate::{Buf, Result, Stream};

/// stablemax (`log = false`) or log_stablemax of `rows` contiguous rows of `cols` elements.
pub fn stablemax(s: Stream, x: Buf, y: Buf, rows: usize, cols: usize, log: bool) -> Result<()> {
    let n = size(rows, cols)?;
    check("x", &x, x.dtype, n)?;
    check("out", &y, x.dtype, n)?;
    if n == 0 {
        return Ok(());
    }
    with_device(s.device, |d| {
        // Whole rows per block: the kernel reads each row from its start.
        let mut r = RowLaunch::new(d, s, x.dtype, rows, cols, &[x.ptr, y.ptr], false)?;
        let (rows_i, cols_i, _, _) = r.dims();
        let mode = log as i32;
        // Safety: x and y have rows*cols elements (checked), aligned for the plan's vector width.
        unsafe {
            r.run_vec(
                Op::Stablemax,
                &mut params![x.ptr, y.ptr, rows_i, cols_i, mode],
            )
        }
    })
}
