//! Rows, axes and threads: how every op family's row kernels are run over an array.
//!
//! - [`map`] and [`reduce`] (ops implementing [`RowMap`] / [`RowReduce`]) serve softmax,
//!   log_softmax, logsumexp, their backwards and stablemax, over any axis. An array is viewed as
//!   (outer, len, inner) with the reduced axis of length `len` in the middle. inner == 1 is the
//!   fast path (rows contiguous). Otherwise the ops' column kernels run on blocks of adjacent
//!   columns, one column per SIMD lane, so every load is a contiguous vector; a column the column
//!   kernel leaves to the exact path is gathered and run through the row kernel. Very long rows
//!   are split across threads in fixed chunks.
//! - [`for_each_fixed_row_block`] and [`sum_fixed_row_blocks`] serve the cross-entropy family
//!   (plain, linear, vocabulary-parallel); [`for_each_row_block`], [`column_sums`] and [`block_column_sums`] the norms.
//!
//! The cross-entropy and norm kernels are not [`RowMap`]s: a row needs its index (its target and
//! class weight, its loss; its saved mean and rstd) and adds to outputs shared by all rows (the
//! loss total, dweight and dbias), which a row-to-row map does not carry. Their Python doors move
//! the class or normalized axes last, so these ops take contiguous rows only: no column kernels,
//! and a long row is not split across threads.

use crate::float::Float;
use crate::isa::{dispatch, Kernel};
use crate::simd::Vector;
use crate::threads;
use crate::Error;

mod blocks;
pub(crate) use blocks::{
    block_column_sums, column_sums, for_each_fixed_row_block, for_each_row_block,
    sum_fixed_row_blocks, COLUMN_FOLD_ROWS,
};

/// Shape of the work: `outer` independent groups of `inner` rows of `len` elements, element (o, i, j)
/// at o * len * inner + i * inner + j.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub outer: usize,
    pub len: usize,
    pub inner: usize,
}

impl Layout {
    /// Contiguous rows of `len` elements.
    pub fn rows(rows: usize, len: usize) -> Layout {
        Layout {
            outer: rows,
            len,
            inner: 1,
        }
    }

    /// Elements in the array, or an error if the product overflows.
    pub fn size(&self) -> Result<usize, Error> {
        self.outer
            .checked_mul(self.len)
            .and_then(|n| n.checked_mul(self.inner))
            .ok_or_else(|| Error::Value("array too large".into()))
    }

    /// Number of rows (reduction results).
    pub fn rows_count(&self) -> usize {
        self.outer * self.inner
    }

    pub(crate) fn check(&self, name: &str, actual: usize, expected: usize) -> Result<(), Error> {
        if actual != expected {
            return Err(Error::Value(format!(
                "{name} has {actual} elements; the layout {self:?} needs {expected}"
            )));
        }
        Ok(())
    }
}

/// A raw pointer that may cross threads: the driver hands out disjoint ranges only.
#[derive(Clone, Copy)]
pub(crate) struct Ptr<T>(pub *mut T);
unsafe impl<T> Send for Ptr<T> {}
unsafe impl<T> Sync for Ptr<T> {}

impl<T> Ptr<T> {
    pub fn from_const(p: *const T) -> Self {
        Ptr(p as *mut T)
    }
    /// Offset by `i` elements; null stays null.
    pub fn at(self, i: usize) -> *mut T {
        if self.0.is_null() {
            self.0
        } else {
            self.0.wrapping_add(i)
        }
    }
}

/// A row-to-row op (softmax, log_softmax, their backwards): `a` and optional `b` in, `out` written.
/// `out` may be `a` itself: kernels read each element before writing the same index.
pub(crate) trait RowMap<T: Float>: Sync {
    type Stat: Copy + Send + Sync;
    /// Whether `b` is read.
    const TWO_INPUTS: bool;
    /// One whole row; free to pick whichever algorithm suits its length.
    unsafe fn row<V: Vector<Elem = T>>(&self, a: *const T, b: *const T, out: *mut T, len: usize);
    /// Statistics of one chunk of a long row, for splitting it across threads.
    unsafe fn chunk_stat<V: Vector<Elem = T>>(
        &self,
        a: *const T,
        b: *const T,
        len: usize,
    ) -> Self::Stat;
    fn combine(x: Self::Stat, y: Self::Stat) -> Self::Stat;
    /// False when the combined statistics say the row must be redone whole (the exact path).
    fn splittable(stat: &Self::Stat) -> bool;
    unsafe fn chunk_write<V: Vector<Elem = T>>(
        &self,
        a: *const T,
        b: *const T,
        out: *mut T,
        len: usize,
        stat: Self::Stat,
    );
    /// The column kernel, pass 1: the statistics of `cols` adjacent columns of `len` elements
    /// `stride` apart (element i of column c at `a + i * stride + c`, one column per SIMD lane),
    /// into `stats` (`cols` values): None for a column the row kernel must redo whole (a gathered
    /// copy of it). Reads only. The default leaves every column to the row kernel.
    #[inline(always)]
    unsafe fn column_stats<V: Vector<Elem = T>>(
        &self,
        _a: *const T,
        _b: *const T,
        _stride: usize,
        _len: usize,
        stats: &mut [Option<Self::Stat>],
    ) {
        stats.fill(None)
    }
    /// The column kernel, pass 2: writes the columns of `out` from their statistics (`stats`,
    /// one per column); what it writes in the columns whose statistics are None does not matter
    /// (the driver overwrites it).
    #[inline(always)]
    unsafe fn column_write<V: Vector<Elem = T>>(
        &self,
        _a: *const T,
        _b: *const T,
        _out: *mut T,
        _stride: usize,
        _len: usize,
        _stats: &[Option<Self::Stat>],
    ) {
    }
}

/// A row-to-value op (logsumexp): each row gives a value and a sign.
pub(crate) trait RowReduce<T: Float>: Sync {
    type Stat: Copy + Send + Sync;
    const TWO_INPUTS: bool;
    unsafe fn row<V: Vector<Elem = T>>(&self, a: *const T, b: *const T, len: usize) -> (T, T);
    unsafe fn chunk_stat<V: Vector<Elem = T>>(
        &self,
        a: *const T,
        b: *const T,
        len: usize,
    ) -> Self::Stat;
    fn combine(x: Self::Stat, y: Self::Stat) -> Self::Stat;
    /// The value and sign from a whole row's statistics, or None to redo the row whole.
    fn finish(stat: Self::Stat) -> Option<(T, T)>;
    /// The column kernel: the values and signs of `out.len()` adjacent columns laid out as in
    /// [`RowMap::column_stats`]; None for a column the row kernel must redo. The default leaves
    /// every column to the row kernel.
    #[inline(always)]
    unsafe fn column_values<V: Vector<Elem = T>>(
        &self,
        _a: *const T,
        _b: *const T,
        _stride: usize,
        _len: usize,
        out: &mut [Option<(T, T)>],
    ) {
        out.fill(None)
    }
}

/// Work per task: small arrays stay on the calling thread.
pub(crate) const GRAIN: usize = 1 << 15;
/// Rows at least this long are split across threads when there are too few rows to share.
const SPLIT_MIN_LEN: usize = 1 << 18;
/// Chunk of a split row; fixed, so results do not depend on the thread count.
const SPLIT_CHUNK: usize = 1 << 16;

fn chunks(len: usize) -> usize {
    len.div_ceil(SPLIT_CHUNK)
}

fn chunk_range(c: usize, len: usize) -> (usize, usize) {
    let start = c * SPLIT_CHUNK;
    (start, (start + SPLIT_CHUNK).min(len) - start)
}

/// Offset that keeps a null pointer null (the unused second input).
fn offset<T>(p: *const T, i: usize) -> *const T {
    if p.is_null() {
        p
    } else {
        p.wrapping_add(i)
    }
}

/// One row through a map op. Rows of SPLIT_MIN_LEN or more always use the chunked arithmetic of
/// the multi-threaded split, so results are the same for every thread count.
#[inline(always)]
unsafe fn map_row<T: Float, Op: RowMap<T>, V: Vector<Elem = T>>(
    op: &Op,
    a: *const T,
    b: *const T,
    out: *mut T,
    len: usize,
) {
    if len < SPLIT_MIN_LEN {
        return op.row::<V>(a, b, out, len);
    }
    // A plain loop: closures here would be compiled without the ISA's target features.
    let mut stat = op.chunk_stat::<V>(a, b, chunk_range(0, len).1);
    for c in 1..chunks(len) {
        let (s, n) = chunk_range(c, len);
        stat = Op::combine(stat, op.chunk_stat::<V>(offset(a, s), offset(b, s), n));
    }
    if !Op::splittable(&stat) {
        return op.row::<V>(a, b, out, len);
    }
    for c in 0..chunks(len) {
        let (s, n) = chunk_range(c, len);
        op.chunk_write::<V>(offset(a, s), offset(b, s), out.add(s), n, stat);
    }
}

/// One row through a reduce op, chunked like [`map_row`] when long.
#[inline(always)]
unsafe fn reduce_row<T: Float, Op: RowReduce<T>, V: Vector<Elem = T>>(
    op: &Op,
    a: *const T,
    b: *const T,
    len: usize,
) -> (T, T) {
    if len < SPLIT_MIN_LEN {
        return op.row::<V>(a, b, len);
    }
    // A plain loop: closures here would be compiled without the ISA's target features.
    let mut stat = op.chunk_stat::<V>(a, b, chunk_range(0, len).1);
    for c in 1..chunks(len) {
        let (s, n) = chunk_range(c, len);
        stat = Op::combine(stat, op.chunk_stat::<V>(offset(a, s), offset(b, s), n));
    }
    Op::finish(stat).unwrap_or_else(|| op.row::<V>(a, b, len))
}

fn should_split(layout: &Layout) -> bool {
    layout.inner == 1
        && layout.len >= SPLIT_MIN_LEN
        && layout.outer < 2 * threads::num_threads()
        && threads::num_threads() > 1
}

/// The column blocks of one group of rows (the tasks of the strided case): a thin first block
/// up to the first column whose address is a multiple of 64 bytes in every row (where the rows'
/// stride is), so that every vector of the other blocks is one cache line, not two.
#[derive(Clone, Copy)]
struct ColumnBlocks {
    head: usize,
    width: usize,
    count: usize,
}

impl ColumnBlocks {
    fn new<T>(layout: &Layout, a: *const T) -> Self {
        const LINE: usize = 64;
        let size = std::mem::size_of::<T>();
        let (addr, inner) = (a as usize, layout.inner);
        let head = if (inner * size) % LINE == 0 && addr % size == 0 {
            (((LINE - addr % LINE) % LINE) / size).min(inner)
        } else {
            0
        };
        let width = column_block(layout);
        ColumnBlocks {
            head,
            width,
            count: (head > 0) as usize + (inner - head).div_ceil(width),
        }
    }

    /// The first column and the number of columns of block `k`.
    fn block(&self, k: usize, inner: usize) -> (usize, usize) {
        if self.head > 0 && k == 0 {
            return (0, self.head);
        }
        let c0 = self.head + (k - (self.head > 0) as usize) * self.width;
        (c0, self.width.min(inner - c0))
    }
}

/// Columns per task in the strided case: enough that each task has real work, and at least 256
/// (1 KiB of float32 per row): the column kernels visit a block's rows in turn, and fewer bytes
/// per row visit cost a TLB entry and a DRAM page each (about 1.5x the time at 16 columns). Fewer
/// (down to 16) where that would leave threads idle: a column's rows are never split.
fn column_block(layout: &Layout) -> usize {
    let wide = (GRAIN / layout.len.max(1)).clamp(256, 1024);
    let tasks = 2 * threads::num_threads();
    let width = if layout.outer * layout.inner.div_ceil(wide) >= tasks {
        wide
    } else {
        (layout.inner * layout.outer)
            .div_ceil(tasks)
            .next_multiple_of(16)
            .clamp(16, wide)
    };
    width.min(layout.inner)
}

struct MapRows<'a, T, Op> {
    op: &'a Op,
    a: Ptr<T>,
    b: Ptr<T>,
    out: Ptr<T>,
    len: usize,
    rows: std::ops::Range<usize>,
}

impl<T: Float, Op: RowMap<T>> Kernel<T> for MapRows<'_, T, Op> {
    type Output = ();
    #[inline(always)]
    fn run<V: Vector<Elem = T>>(self) {
        for r in self.rows {
            let o = r * self.len;
            unsafe {
                map_row::<T, Op, V>(
                    self.op,
                    self.a.at(o),
                    self.b.at(o),
                    self.out.at(o),
                    self.len,
                )
            };
        }
    }
}

/// Copies the column of `len` elements `stride` apart at `src` into `dst`.
unsafe fn gather_column<T: Float>(src: *const T, stride: usize, len: usize, dst: &mut Vec<T>) {
    dst.clear();
    dst.extend((0..len).map(|i| *src.add(i * stride)));
}

/// The two inputs of column `l` gathered, for the row kernel (the second empty when unused).
unsafe fn gather_inputs<T: Float>(
    two: bool,
    a: *const T,
    b: *const T,
    stride: usize,
    len: usize,
    bufs: &mut [Vec<T>; 2],
) -> (*const T, *const T) {
    gather_column(a, stride, len, &mut bufs[0]);
    if !two {
        return (bufs[0].as_ptr(), std::ptr::null());
    }
    gather_column(b, stride, len, &mut bufs[1]);
    (bufs[0].as_ptr(), bufs[1].as_ptr())
}

/// Columns [c0, c0 + cols) of group `o` through a map op's column kernel, a vector of columns at
/// a time.
struct ColumnMap<'a, T, Op> {
    op: &'a Op,
    a: Ptr<T>,
    b: Ptr<T>,
    out: Ptr<T>,
    layout: Layout,
    o: usize,
    c0: usize,
    cols: usize,
}

impl<T: Float, Op: RowMap<T>> Kernel<T> for ColumnMap<'_, T, Op> {
    type Output = ();
    #[inline(always)]
    fn run<V: Vector<Elem = T>>(self) {
        let Layout { len, inner, .. } = self.layout;
        let at = self.o * len * inner + self.c0;
        let (a, b, out) = (
            self.a.at(at) as *const T,
            self.b.at(at) as *const T,
            self.out.at(at),
        );
        let mut stats = vec![None; self.cols];
        unsafe {
            self.op.column_stats::<V>(a, b, inner, len, &mut stats);
            // Rare (NaN, inf, extreme values): such columns from copies taken before the column
            // kernel writes `out`, which may be `a`.
            let mut bufs: [Vec<T>; 2] = Default::default();
            let mut redone = Vec::new();
            for (c, _) in stats.iter().enumerate().filter(|(_, s)| s.is_none()) {
                let (ga, gb) = gather_inputs(
                    Op::TWO_INPUTS,
                    a.add(c),
                    offset(b, c),
                    inner,
                    len,
                    &mut bufs,
                );
                let mut y = vec![T::ZERO; len];
                map_row::<T, Op, V>(self.op, ga, gb, y.as_mut_ptr(), len);
                redone.push((c, y));
            }
            self.op.column_write::<V>(a, b, out, inner, len, &stats);
            for (c, y) in redone {
                for (i, v) in y.into_iter().enumerate() {
                    *out.add(i * inner + c) = v;
                }
            }
        }
    }
}

struct ChunkStat<'a, T, Op> {
    op: &'a Op,
    a: *const T,
    b: *const T,
    len: usize,
}

impl<T: Float, Op: RowMap<T>> Kernel<T> for ChunkStat<'_, T, Op> {
    type Output = Op::Stat;
    #[inline(always)]
    fn run<V: Vector<Elem = T>>(self) -> Op::Stat {
        unsafe { self.op.chunk_stat::<V>(self.a, self.b, self.len) }
    }
}

struct ChunkWrite<'a, T: Float, Op: RowMap<T>> {
    op: &'a Op,
    a: *const T,
    b: *const T,
    out: *mut T,
    len: usize,
    stat: Op::Stat,
}

impl<T: Float, Op: RowMap<T>> Kernel<T> for ChunkWrite<'_, T, Op> {
    type Output = ();
    #[inline(always)]
    fn run<V: Vector<Elem = T>>(self) {
        unsafe {
            self.op
                .chunk_write::<V>(self.a, self.b, self.out, self.len, self.stat)
        }
    }
}

/// Runs a row-to-row op over the layout. `b` may be null when the op reads one input; `out` may be `a`.
///
/// # Safety
/// `a`, `b` (if used) readable and `out` writable for `layout.size()` elements.
pub(crate) unsafe fn map<T: Float, Op: RowMap<T>>(
    op: &Op,
    a: *const T,
    b: *const T,
    out: *mut T,
    layout: Layout,
) {
    let (a, b, out) = (Ptr::from_const(a), Ptr::from_const(b), Ptr(out));
    let Layout { outer, len, inner } = layout;
    if outer == 0 || len == 0 || inner == 0 {
        return;
    }
    if inner > 1 {
        let cb = ColumnBlocks::new(&layout, a.0);
        threads::for_each(outer * cb.count, |t| {
            let o = t / cb.count;
            let (c0, cols) = cb.block(t % cb.count, inner);
            dispatch(ColumnMap {
                op,
                a,
                b,
                out,
                layout,
                o,
                c0,
                cols,
            });
        });
    } else if should_split(&layout) {
        for r in 0..outer {
            let base = r * len;
            let stats = threads::map(chunks(len), |c| {
                let (s, n) = chunk_range(c, len);
                dispatch(ChunkStat {
                    op,
                    a: a.at(base + s),
                    b: b.at(base + s),
                    len: n,
                })
            });
            if threads::Stop::current().hit() {
                return; // interrupted: `stats` may be short
            }
            let stat = stats.into_iter().reduce(Op::combine).expect("len > 0");
            if !Op::splittable(&stat) {
                dispatch(MapRows {
                    op,
                    a,
                    b,
                    out,
                    len,
                    rows: r..r + 1,
                });
                continue;
            }
            threads::for_each(chunks(len), |c| {
                let (s, n) = chunk_range(c, len);
                let (a, b, out) = (a.at(base + s), b.at(base + s), out.at(base + s));
                dispatch(ChunkWrite {
                    op,
                    a,
                    b,
                    out,
                    len: n,
                    stat,
                });
            });
        }
    } else {
        let per_task = (GRAIN / len).max(1);
        threads::for_each(outer.div_ceil(per_task), |t| {
            let rows = t * per_task..((t + 1) * per_task).min(outer);
            dispatch(MapRows {
                op,
                a,
                b,
                out,
                len,
                rows,
            });
        });
    }
}

struct ReduceRows<'a, T, Op> {
    op: &'a Op,
    a: Ptr<T>,
    b: Ptr<T>,
    out: Ptr<T>,
    sign: Ptr<T>,
    layout: Layout,
    o: usize,
    c0: usize,
    cols: usize,
}

impl<T: Float, Op: RowReduce<T>> Kernel<T> for ReduceRows<'_, T, Op> {
    type Output = ();
    #[inline(always)]
    fn run<V: Vector<Elem = T>>(self) {
        let l = &self.layout;
        let put = |c: usize, (v, s): (T, T)| unsafe {
            let k = self.o * l.inner + self.c0 + c;
            *self.out.at(k) = v;
            if !self.sign.0.is_null() {
                *self.sign.at(k) = s;
            }
        };
        unsafe {
            if l.inner == 1 {
                for c in 0..self.cols {
                    let off = (self.o + c) * l.len;
                    put(
                        c,
                        reduce_row::<T, Op, V>(self.op, self.a.at(off), self.b.at(off), l.len),
                    );
                }
                return;
            }
            let at = self.o * l.len * l.inner + self.c0;
            let (a, b) = (self.a.at(at) as *const T, self.b.at(at) as *const T);
            let mut values = vec![None; self.cols];
            self.op
                .column_values::<V>(a, b, l.inner, l.len, &mut values);
            let mut bufs: [Vec<T>; 2] = Default::default();
            for (c, v) in values.into_iter().enumerate() {
                let v = match v {
                    Some(v) => v,
                    None => {
                        let (ga, gb) = gather_inputs(
                            Op::TWO_INPUTS,
                            a.add(c),
                            offset(b, c),
                            l.inner,
                            l.len,
                            &mut bufs,
                        );
                        reduce_row::<T, Op, V>(self.op, ga, gb, l.len)
                    }
                };
                put(c, v);
            }
        }
    }
}

struct ReduceChunk<'a, T, Op> {
    op: &'a Op,
    a: *const T,
    b: *const T,
    len: usize,
}

impl<T: Float, Op: RowReduce<T>> Kernel<T> for ReduceChunk<'_, T, Op> {
    type Output = Op::Stat;
    #[inline(always)]
    fn run<V: Vector<Elem = T>>(self) -> Op::Stat {
        unsafe { self.op.chunk_stat::<V>(self.a, self.b, self.len) }
    }
}

/// Runs a row-to-value op: `out` (and `sign`, unless null) get `layout.rows_count()` values.
///
/// # Safety
/// `a`, `b` (if used) readable for `layout.size()` elements; `out`, `sign` (unless null) writable
/// for `layout.rows_count()`.
pub(crate) unsafe fn reduce<T: Float, Op: RowReduce<T>>(
    op: &Op,
    a: *const T,
    b: *const T,
    out: *mut T,
    sign: *mut T,
    layout: Layout,
) {
    let (a, b, out, sign) = (Ptr::from_const(a), Ptr::from_const(b), Ptr(out), Ptr(sign));
    let Layout { outer, len, inner } = layout;
    if outer == 0 || inner == 0 {
        return;
    }
    if inner == 1 && should_split(&layout) {
        for r in 0..outer {
            let base = r * len;
            let stats = threads::map(chunks(len), |c| {
                let (s, n) = chunk_range(c, len);
                dispatch(ReduceChunk {
                    op,
                    a: a.at(base + s),
                    b: b.at(base + s),
                    len: n,
                })
            });
            if threads::Stop::current().hit() {
                return; // interrupted: `stats` may be short
            }
            let stat = stats.into_iter().reduce(Op::combine).expect("len > 0");
            let value = Op::finish(stat).unwrap_or_else(|| {
                dispatch(ReduceOne {
                    op,
                    a: a.at(base),
                    b: b.at(base),
                    len,
                })
            });
            *out.at(r) = value.0;
            if !sign.0.is_null() {
                *sign.at(r) = value.1;
            }
        }
        return;
    }
    // inner == 1: a "column block" is a block of consecutive rows.
    let (groups, cb) = if inner == 1 {
        let block = (GRAIN / len.max(1)).max(1).min(outer);
        let count = outer.div_ceil(block);
        (
            1,
            ColumnBlocks {
                head: 0,
                width: block,
                count,
            },
        )
    } else {
        (outer, ColumnBlocks::new(&layout, a.0))
    };
    let span = if inner == 1 { outer } else { inner };
    threads::for_each(groups * cb.count, |t| {
        let g = t / cb.count;
        let (c0, cols) = cb.block(t % cb.count, span);
        let (o, c0) = if inner == 1 { (c0, 0) } else { (g, c0) };
        dispatch(ReduceRows {
            op,
            a,
            b,
            out,
            sign,
            layout,
            o,
            c0,
            cols,
        });
    });
}

struct ReduceOne<'a, T, Op> {
    op: &'a Op,
    a: *const T,
    b: *const T,
    len: usize,
}

impl<T: Float, Op: RowReduce<T>> Kernel<T> for ReduceOne<'_, T, Op> {
    type Output = (T, T);
    #[inline(always)]
    fn run<V: Vector<Elem = T>>(self) -> (T, T) {
        unsafe { self.op.row::<V>(self.a, self.b, self.len) }
    }
}
