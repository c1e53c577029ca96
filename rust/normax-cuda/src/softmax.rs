//! softmax, log_softmax, logsumexp and their backward (kernels/softmax.cu).

use crate::device::{params, with_device};
use crate::launch::{check, kernel, launch_flat, size, RowLaunch, Variant};
use crate::{Buf, Error, Result, Stream};

/// Bytes of one piece of a split row's statistics: the (max, sum) float pair.
const MAX_SUM_BYTES: usize = 8;

/// softmax (`log = false`) or log_softmax of `rows` contiguous rows of `cols` elements.
pub fn softmax(s: Stream, x: Buf, y: Buf, rows: usize, cols: usize, log: bool) -> Result<()> {
    let n = size(rows, cols)?;
    check("x", &x, x.dtype, n)?;
    check("out", &y, x.dtype, n)?;
    if n == 0 {
        return Ok(());
    }
    with_device(s.device, |d| {
        let mut r = RowLaunch::new(d, s, "softmax", x.dtype, rows, cols, &[x.ptr, y.ptr], true)?;
        let (rows_i, cols_i, chunk_i, chunks_i) = r.dims();
        let mode = log as i32;
        if let Some(packs) = r.cached_packs() {
            // Safety: x and y have rows*cols elements (checked), 16-byte aligned rows (vec > 1).
            return unsafe {
                r.run(
                    "softmax_cached",
                    Variant::Packs(packs),
                    &mut params![x.ptr, y.ptr, rows_i, cols_i, mode],
                )
            };
        }
        // Safety: x has rows*cols elements (checked), the scratch rows*chunks (max, sum) pairs.
        let part = unsafe {
            r.split_stats(
                "max_sum_part",
                MAX_SUM_BYTES,
                &params![x.ptr, rows_i, cols_i, chunk_i, chunks_i],
            )?
        };
        let part_ptr = part.as_ref().map_or(0u64, |sc| sc.ptr);
        // Safety: x and y have rows*cols elements; part is null or the partials written above.
        unsafe {
            r.run_vec(
                "softmax",
                &mut params![x.ptr, y.ptr, rows_i, cols_i, chunk_i, chunks_i, part_ptr, mode],
            )
        }
    })
}

/// log-sum-exp of each row into `out` (`rows` elements of x's dtype).
pub fn logsumexp(s: Stream, x: Buf, out: Buf, rows: usize, cols: usize) -> Result<()> {
    let n = size(rows, cols)?;
    check("x", &x, x.dtype, n)?;
    check("out", &out, x.dtype, rows)?;
    if rows == 0 {
        return Ok(());
    }
    if cols == 0 {
        return Err(Error::Value("x: logsumexp of an empty row".into()));
    }
    with_device(s.device, |d| {
        let mut r = RowLaunch::new(d, s, "softmax", x.dtype, rows, cols, &[x.ptr], true)?;
        let (rows_i, cols_i, chunk_i, chunks_i) = r.dims();
        // Safety: as in softmax.
        let part = unsafe {
            r.stats(
                "max_sum_part",
                MAX_SUM_BYTES,
                &params![x.ptr, rows_i, cols_i, chunk_i, chunks_i],
            )?
        };
        let f = kernel(r.device(), "softmax", "logsumexp", x.dtype, Variant::Plain)?;
        // Safety: the partials written above and `out` of `rows` elements.
        unsafe {
            launch_flat(
                f,
                rows,
                s,
                &mut params![part.ptr, chunks_i, rows_i, out.ptr],
            )
        }
    })
}

/// The backward of softmax (`log = false`: dx = y (dy - sum(dy y))) or of log_softmax
/// (dx = dy - exp(y) sum(dy)), from the forward's output `y`.
pub fn softmax_backward(
    s: Stream,
    y: Buf,
    dy: Buf,
    dx: Buf,
    rows: usize,
    cols: usize,
    log: bool,
) -> Result<()> {
    let n = size(rows, cols)?;
    check("y", &y, y.dtype, n)?;
    check("dy", &dy, y.dtype, n)?;
    check("dx", &dx, y.dtype, n)?;
    if n == 0 {
        return Ok(());
    }
    with_device(s.device, |d| {
        let bufs = [y.ptr, dy.ptr, dx.ptr];
        let mut r = RowLaunch::new(d, s, "softmax", y.dtype, rows, cols, &bufs, true)?;
        let (rows_i, cols_i, chunk_i, chunks_i) = r.dims();
        let mode = log as i32;
        if let Some(packs) = r.cached_packs_of(2) {
            // Safety: y, dy, dx have rows*cols elements (checked), 16-byte aligned rows.
            return unsafe {
                r.run(
                    "softmax_backward_cached",
                    Variant::Packs(packs),
                    &mut params![y.ptr, dy.ptr, dx.ptr, rows_i, cols_i, mode],
                )
            };
        }
        // Safety: y, dy of rows*cols elements; rows*chunks floats of scratch.
        let part = unsafe {
            r.split_stats(
                "dot_part",
                4,
                &params![y.ptr, dy.ptr, rows_i, cols_i, chunk_i, chunks_i, mode],
            )?
        };
        let part_ptr = part.as_ref().map_or(0u64, |sc| sc.ptr);
        // Safety: as above; dx of rows*cols elements.
        unsafe {
            r.run_vec(
                "softmax_backward",
                &mut params![
                    y.ptr, dy.ptr, dx.ptr, rows_i, cols_i, chunk_i, chunks_i, part_ptr, mode
                ],
            )
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DType;

    #[test]
    fn bad_sizes_are_errors_before_any_cuda_call() {
        let s = Stream {
            device: 0,
            handle: 0,
        };
        let x = Buf {
            ptr: 16,
            dtype: DType::F32,
            len: 6,
        };
        let y = Buf {
            ptr: 32,
            dtype: DType::F32,
            len: 5,
        };
        assert!(matches!(
            softmax(s, x, y, 2, 3, false),
            Err(Error::Value(_))
        ));
        let y16 = Buf {
            ptr: 32,
            dtype: DType::F16,
            len: 6,
        };
        assert!(matches!(
            softmax(s, x, y16, 2, 3, false),
            Err(Error::Value(_))
        ));
    }
}
