//! Blocks of contiguous rows for the ops whose kernels are not [`RowMap`](super::RowMap)s: the
//! norms' row blocks and deterministic column sums, the cross-entropy family's fixed blocks.

use super::GRAIN;
use crate::float::Float;
use crate::threads;

/// Runs `f` over blocks of consecutive contiguous rows of `len` elements in parallel: at least
/// `GRAIN` elements a block (small arrays stay on the calling thread), and no more than
/// `ROW_TASKS_PER_THREAD` blocks per thread (large arrays are not cut into needless tasks) unless
/// blocks would pass `TASK_MAX` elements (an interrupt waits for the running blocks).
pub(crate) fn for_each_row_block(
    rows: usize,
    len: usize,
    f: impl Fn(std::ops::Range<usize>) + Sync + Send,
) {
    const ROW_TASKS_PER_THREAD: usize = 8;
    const TASK_MAX: usize = 1 << 22;
    let most_tasks = ROW_TASKS_PER_THREAD * threads::num_threads();
    let per_task = (GRAIN / len.max(1))
        .max(rows.div_ceil(most_tasks))
        .min(TASK_MAX / len.max(1))
        .max(1);
    threads::for_each(rows.div_ceil(per_task), |t| {
        f(t * per_task..((t + 1) * per_task).min(rows))
    });
}

/// Rows per block of [`for_each_fixed_row_block`] and [`sum_fixed_row_blocks`]: about `GRAIN`
/// elements, one row if longer.
fn fixed_block_rows(len: usize) -> usize {
    (GRAIN / len.max(1)).max(1)
}

/// Runs `f` over blocks of consecutive contiguous rows of `len` elements in parallel, the blocks
/// cut by size alone (about `GRAIN` elements, whatever the thread count): the cross-entropy
/// family's passes over rows of logits.
pub(crate) fn for_each_fixed_row_block(
    rows: usize,
    len: usize,
    f: impl Fn(std::ops::Range<usize>) + Sync + Send,
) {
    let per_task = fixed_block_rows(len);
    threads::for_each(rows.div_ceil(per_task), |t| {
        f(t * per_task..((t + 1) * per_task).min(rows))
    });
}

/// The sum of `f` over the blocks of [`for_each_fixed_row_block`], added in block order: the same
/// bits for any thread count (the cross-entropy loss totals).
pub(crate) fn sum_fixed_row_blocks(
    rows: usize,
    len: usize,
    f: impl Fn(std::ops::Range<usize>) -> f64 + Sync + Send,
) -> f64 {
    let per_task = fixed_block_rows(len);
    let sums = threads::map(rows.div_ceil(per_task), |t| {
        f(t * per_task..((t + 1) * per_task).min(rows))
    });
    sums.into_iter().sum()
}

/// Rows summed in `Elem` before the partial sums are folded into f64.
pub(crate) const COLUMN_FOLD_ROWS: usize = 16;
/// At most this many blocks of rows keep partial column sums (enough to share among threads).
const COLUMN_MAX_BLOCKS: usize = 128;
/// Bound on the f64 partial sums all blocks hold together.
const COLUMN_MAX_PARTIAL: usize = 1 << 22;

/// Column sums over `rows` rows: `width` sums (for example `k` quantities of `cols` columns each).
///
/// `add_rows(range, acc)` adds the terms of the rows in `range` (at most `COLUMN_FOLD_ROWS` of
/// them) into `acc` (`width` zeroed values in `T`); each block folds those short `T` sums into its
/// f64 sums every `COLUMN_FOLD_ROWS` rows (see [`block_column_sums`]).
pub(crate) fn column_sums<T: Float>(
    rows: usize,
    width: usize,
    add_rows: impl Fn(std::ops::Range<usize>, &mut [T]) + Sync + Send,
) -> Vec<f64> {
    block_column_sums(rows, width, |block, acc| {
        let mut part = vec![T::ZERO; width];
        let mut r = block.start;
        while r < block.end {
            let next = (r + COLUMN_FOLD_ROWS).min(block.end);
            add_rows(r..next, &mut part);
            for (a, p) in acc.iter_mut().zip(part.iter_mut()) {
                *a += p.to_f64();
                *p = T::ZERO;
            }
            r = next;
        }
    })
}

/// Column sums over `rows` rows, each block of rows summing into its own `width` f64 sums
/// (`add_block(range, acc)`, `acc` zeroed). The blocks depend only on `rows` and `width`, never
/// on the thread count, and their sums are added in block order: the same bits whatever the
/// number of threads. (The norms' backward folds its own short `Elem` sums inside its kernel,
/// where the fold is vectorised.)
pub(crate) fn block_column_sums(
    rows: usize,
    width: usize,
    add_block: impl Fn(std::ops::Range<usize>, &mut [f64]) + Sync + Send,
) -> Vec<f64> {
    let mut total = vec![0.0f64; width];
    if rows == 0 || width == 0 {
        return total;
    }
    let min_rows = (GRAIN / width).max(1);
    let max_blocks = (COLUMN_MAX_PARTIAL / width).clamp(1, COLUMN_MAX_BLOCKS);
    let per_block = rows.div_ceil(rows.div_ceil(min_rows).min(max_blocks));
    let partials = threads::map(rows.div_ceil(per_block), |b| {
        let mut acc = vec![0.0f64; width];
        add_block(b * per_block..((b + 1) * per_block).min(rows), &mut acc);
        acc
    });
    for p in partials {
        for (t, v) in total.iter_mut().zip(p) {
            *t += v;
        }
    }
    total
}
