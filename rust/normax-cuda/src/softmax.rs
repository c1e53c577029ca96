//! softmax, log_softmax, logsumexp and their backward (kernels/softmax.cu).

use crate::device::{params, with_device};
use crate::launch::{check, check_opt, launch_flat, ptr, size, RowLaunch};
use crate::table::{KernelKey, Op, Variant};
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
        let mut r = RowLaunch::new(d, s, x.dtype, rows, cols, &[x.ptr, y.ptr], true)?;
        let (rows_i, cols_i, chunk_i, chunks_i) = r.dims();
        let mode = log as i32;
        if let Some(packs) = r.cached_packs() {
            // Safety: x and y have rows*cols elements (checked), 16-byte aligned rows (vec > 1).
            return unsafe {
                r.run(
                    Op::SoftmaxCached,
                    Variant::Packs(packs),
                    &mut params![x.ptr, y.ptr, rows_i, cols_i, mode],
                )
            };
        }
        // Safety: x has rows*cols elements (checked), the scratch rows*chunks (max, sum) pairs.
        let part = unsafe {
            r.split_stats(
                Op::MaxSumPart,
                MAX_SUM_BYTES,
                &params![x.ptr, rows_i, cols_i, chunk_i, chunks_i],
            )?
        };
        let part_ptr = part.as_ref().map_or(0u64, |sc| sc.ptr);
        // Safety: x and y have rows*cols elements; part is null or the partials written above.
        unsafe {
            r.run_vec(
                Op::Softmax,
                &mut params![x.ptr, y.ptr, rows_i, cols_i, chunk_i, chunks_i, part_ptr, mode],
            )
        }
    })
}

/// log-sum-exp of each row into `out` (`rows` elements of x's dtype) and, where given, the sign of
/// each row's sum of exponentials into `sign` (like `out`): 1, 0 for an all -inf row, NaN for NaN.
pub fn logsumexp(
    s: Stream,
    x: Buf,
    out: Buf,
    sign: Option<Buf>,
    rows: usize,
    cols: usize,
) -> Result<()> {
    let n = size(rows, cols)?;
    check("x", &x, x.dtype, n)?;
    check("out", &out, x.dtype, rows)?;
    check_opt("sign", sign, x.dtype, rows)?;
    if rows == 0 {
        return Ok(());
    }
    if cols == 0 {
        return Err(Error::Value("x: logsumexp of an empty row".into()));
    }
    with_device(s.device, |d| {
        let mut r = RowLaunch::new(d, s, x.dtype, rows, cols, &[x.ptr], true)?;
        let (rows_i, cols_i, chunk_i, chunks_i) = r.dims();
        // Safety: as in softmax.
        let part = unsafe {
            r.stats(
                Op::MaxSumPart,
                MAX_SUM_BYTES,
                &params![x.ptr, rows_i, cols_i, chunk_i, chunks_i],
            )?
        };
        let f = r
            .device()
            .kernel(KernelKey::new(Op::Logsumexp, x.dtype, Variant::Plain))?;
        let sign_ptr = ptr(sign);
        // Safety: the partials written above, `out` and `sign` (or null) of `rows` elements.
        unsafe {
            launch_flat(
                f,
                rows,
                s,
                &mut params![part.ptr, chunks_i, rows_i, out.ptr, sign_ptr],
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
        let mut r = RowLaunch::new(d, s, y.dtype, rows, cols, &bufs, true)?;
        let (rows_i, cols_i, chunk_i, chunks_i) = r.dims();
        let mode = log as i32;
        if let Some(packs) = r.cached_packs_of(2) {
            // Safety: y, dy, dx have rows*cols elements (checked), 16-byte aligned rows.
            return unsafe {
                r.run(
                    Op::SoftmaxBackwardCached,
                    Variant::Packs(packs),
                    &mut params![y.ptr, dy.ptr, dx.ptr, rows_i, cols_i, mode],
                )
            };
        }
        // Safety: y, dy of rows*cols elements; rows*chunks floats of scratch.
        let part = unsafe {
            r.split_stats(
                Op::DotPart,
                4,
                &params![y.ptr, dy.ptr, rows_i, cols_i, chunk_i, chunks_i, mode],
            )?
        };
        let part_ptr = part.as_ref().map_or(0u64, |sc| sc.ptr);
        // Safety: as above; dx of rows*cols elements.
        unsafe {
            r.run_vec(
                Op::SoftmaxBackward,
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
    use crate::device::{memset_u32, record, Event};
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

    fn f32s(ptr: u64, len: usize) -> Buf {
        let dtype = DType::F32;
        Buf { ptr, dtype, len }
    }

    const STREAM: u64 = 0x5eed;

    /// A recorded launch on `STREAM` with the kernel arguments `args` (all 4 or 8 bytes here).
    fn launch(name: &str, grid: u64, threads: u32, args: &[u64]) -> Event {
        let (event, name) = ("launch", name.to_string());
        let (grid, block) = ((grid, 1, 1), (threads, 1, 1));
        let args = args.iter().copied().map(Some).collect();
        Event {
            event,
            name,
            grid,
            block,
            stream: STREAM,
            args,
        }
    }

    fn sized(event: &'static str, name: &str, size: u64, stream: u64) -> Event {
        let (name, grid, block) = (name.to_string(), (size, 1, 1), (1, 1, 1));
        let args = Vec::new();
        Event {
            event,
            name,
            grid,
            block,
            stream,
            args,
        }
    }

    /// The dry-run recorder runs the real host sequence with no driver (none on this machine):
    /// whole rows held in registers are one launch; rows split across blocks are two, around
    /// their statistics' scratch.
    #[test]
    fn the_recorder_lists_the_launch_sequence() {
        let s = Stream {
            device: 3,
            handle: STREAM,
        };
        assert_eq!(record(true), None);
        let (rows, cols) = (4096, 4096);
        let x = f32s(1 << 20, rows * cols);
        let y = f32s(1 << 30, rows * cols);
        softmax(s, x, y, rows, cols, false).unwrap();
        // 1024 vectors of 4 per row: 256 threads hold 4 packs each. The arguments: x, y, rows,
        // cols, log = 0.
        let args = [1 << 20, 1 << 30, 4096, 4096, 0];
        let cached = vec![launch("softmax_cached_f32_p4", 4096, 256, &args)];
        assert_eq!(record(true), Some(cached));

        let (rows, cols) = (4, 65536);
        let x = f32s(1 << 20, rows * cols);
        let y = f32s(1 << 30, rows * cols);
        softmax(s, x, y, rows, cols, true).unwrap();
        // 4 rows on 132 SMs: each cut in 16 pieces of 4096, one (max, sum) pair per piece, in
        // scratch (address 0 in the recorder).
        let (dims, part) = ([4, 65536, 4096, 16], 0);
        let stats = [&[1 << 20][..], &dims, &[part]].concat();
        let rows = [&[1 << 20, 1 << 30][..], &dims, &[part, 1]].concat();
        let split = vec![
            sized("alloc", "cuMemAllocAsync", 4 * 16 * 8, STREAM),
            launch("max_sum_part_f32_v4", 64, 512, &stats),
            launch("softmax_f32_v4", 64, 512, &rows),
            sized("free", "cuMemFreeAsync", 4 * 16 * 8, STREAM),
        ];
        assert_eq!(record(false), Some(split));
        assert_eq!(record(false), None);
    }

    #[test]
    fn the_recorder_lists_memsets() {
        record(true);
        let s = Stream {
            device: 0,
            handle: 0,
        };
        // Safety: recorded, never run.
        with_device(0, |_| unsafe { memset_u32(1 << 20, 0, 3, s) }).unwrap();
        let memset = Event {
            args: vec![Some(1 << 20)],
            ..sized("memset", "cuMemsetD32Async", 3, 0)
        };
        assert_eq!(record(false), Some(vec![memset]));
    }
}
