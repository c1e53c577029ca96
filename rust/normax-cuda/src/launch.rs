//! The launch shapes every op family shares: how rows map to blocks ([`Plan`]) and token columns
//! to 2-D grids ([`ColumnPlan`]), which kernel instantiation runs, the buffer checks, and the one
//! sequence for rows split across blocks (partial statistics into scratch, then the row pass).

use crate::device::{launch, launch_2d, params, Arg, Device, Kernel, Scratch};
use crate::table::{KernelKey, Op, Variant};
use crate::{Buf, DType, Error, Result, Stream};

/// How rows map to blocks: `block.0` threads per row, `block.1` rows per block, and each row
/// cut in `chunks` pieces of `chunk` elements (one block each).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Plan {
    pub block: (u32, u32),
    pub chunks: u32,
    pub chunk: usize,
    pub grid: u32,
    /// Elements per load/store: 16 bytes' worth when every row is 16-byte aligned, else 1.
    pub vec: usize,
}

/// Rows at most this many per block (the kernels' shared scratch is sized for it).
const MAX_ROWS_PER_BLOCK: u32 = 8;
/// Threads per block at most: the kernels' `__launch_bounds__(512)` (more registers per thread).
const MAX_THREADS: u32 = 512;
/// A row is split across blocks only when there are too few rows to fill the device and each
/// piece keeps at least this many elements.
const MIN_CHUNK: usize = 4096;

/// Elements of a row per thread the plan aims at (the least where rows are long): few enough
/// to hold in registers, enough to keep several 16-byte loads in flight per thread.
const VALUES_PER_THREAD: usize = 16;

/// The launch shape for `rows` rows of `cols` elements; `split` allows cutting rows in chunks.
/// Threads per row follow the element count, not the vector count, so 16-bit rows get as many
/// threads as float32 rows of the same length (and each thread half the bytes).
pub fn plan(rows: usize, cols: usize, vec: usize, sms: u32, split: bool) -> Result<Plan> {
    let threads = cols
        .div_ceil(VALUES_PER_THREAD)
        .next_power_of_two()
        .clamp(32, MAX_THREADS as usize) as u32;
    let rows_per_block = (256 / threads).clamp(1, MAX_ROWS_PER_BLOCK);
    let groups = rows.div_ceil(rows_per_block as usize);
    let mut chunks = 1usize;
    let mut chunk = cols;
    let wanted = 4 * sms as usize; // blocks that keep every SM busy with a few resident
    if split && rows_per_block == 1 && groups < wanted && cols >= 2 * MIN_CHUNK {
        chunks = wanted.div_ceil(groups).min(cols / MIN_CHUNK).max(1);
        chunk = cols.div_ceil(chunks).next_multiple_of(vec);
        chunks = cols.div_ceil(chunk);
    }
    let grid = groups
        .checked_mul(chunks)
        .filter(|&g| g <= i32::MAX as usize)
        .ok_or_else(|| Error::Value(format!("too many rows for one launch: {rows} x {cols}")))?;
    Ok(Plan {
        block: (threads, rows_per_block),
        chunks: chunks as u32,
        chunk,
        grid: grid as u32,
        vec,
    })
}

/// Floats of row per thread the cached kernels may hold (their `P * V`): with the rest of the
/// kernel they fit the 64 registers that keep two 512-thread blocks per SM resident. Rows up to
/// 16384 elements (32 per thread of 512) are read once.
const MAX_CACHED_FLOATS: usize = 32;

/// The packs per thread of a cached kernel (`<op>_cached_<dtype>_p<P>`: the row held in
/// registers, one read of memory) holding at most `floats` per thread, or None where the row
/// does not fit or is not vectorized.
fn cached_packs(p: &Plan, cols: usize, floats: usize) -> Option<usize> {
    if p.chunks != 1 || p.vec == 1 {
        return None;
    }
    let packs = cols
        .div_ceil(p.vec)
        .div_ceil(p.block.0 as usize)
        .next_power_of_two();
    (packs * p.vec <= floats).then_some(packs)
}

/// 16 bytes' worth of elements when the rows and every buffer are 16-byte aligned, else 1.
pub(crate) fn vector_width(dtype: DType, cols: usize, bufs: &[u64]) -> usize {
    let v = 16 / dtype.size();
    if cols % v == 0 && bufs.iter().all(|&p| p % 16 == 0) {
        v
    } else {
        1
    }
}

/// `b` holds `len` elements of `dtype` at a non-null address (when not empty).
pub(crate) fn check(name: &str, b: &Buf, dtype: DType, len: usize) -> Result<()> {
    if b.dtype != dtype {
        return Err(Error::Value(format!(
            "{name}: expected {dtype:?} elements, got {:?}",
            b.dtype
        )));
    }
    // "{name}: expected N elements" (not spec's check_len wording): the messages the Python
    // tests and users see for an array of the wrong size.
    if b.len != len {
        return Err(Error::Value(format!(
            "{name}: expected {len} elements, got {}",
            b.len
        )));
    }
    if len > 0 && b.ptr == 0 {
        return Err(Error::Value(format!("{name}: null device address")));
    }
    Ok(())
}

/// [`check`] of a buffer that may be absent.
pub(crate) fn check_opt(name: &str, b: Option<Buf>, dtype: DType, len: usize) -> Result<()> {
    b.map_or(Ok(()), |b| check(name, &b, dtype, len))
}

/// rows * cols, within the kernels' int64 indexing.
pub(crate) fn size(rows: usize, cols: usize) -> Result<usize> {
    let n = normax_core::spec::size(rows, cols)?;
    if n > i64::MAX as usize {
        return Err(Error::Value(format!("{rows} x {cols} elements overflow")));
    }
    Ok(n)
}

/// The address of a buffer that may be absent (null: the kernels' "not given").
pub(crate) fn ptr(b: Option<Buf>) -> u64 {
    b.map_or(0, |b| b.ptr)
}

/// Threads per block of the one-thread-per-element kernels (`logsumexp`, `sum_parts`).
const FLAT_BLOCK: u32 = 256;

/// Launches `f` with one thread per element of `n`. Safety: as [`launch`].
pub(crate) unsafe fn launch_flat(f: Kernel, n: usize, s: Stream, args: &mut [Arg]) -> Result<()> {
    let grid = u32::try_from(n.div_ceil(FLAT_BLOCK as usize))
        .map_err(|_| Error::Value(format!("too many elements for one launch: {n}")))?;
    launch(f, grid, (FLAT_BLOCK, 1), s, args)
}

/// One op's launches over `rows` rows of `cols` elements: the plan, and the kernels of one
/// dtype.
pub(crate) struct RowLaunch<'d> {
    d: &'d mut Device,
    s: Stream,
    dtype: DType,
    rows: usize,
    cols: usize,
    pub(crate) p: Plan,
}

impl<'d> RowLaunch<'d> {
    /// `bufs`: the addresses of the row buffers, which must all be aligned for vector loads.
    pub(crate) fn new(
        d: &'d mut Device,
        s: Stream,
        dtype: DType,
        rows: usize,
        cols: usize,
        bufs: &[u64],
        split: bool,
    ) -> Result<Self> {
        let vec = vector_width(dtype, cols, bufs);
        let p = plan(rows, cols, vec, d.sms, split)?;
        Ok(RowLaunch {
            d,
            s,
            dtype,
            rows,
            cols,
            p,
        })
    }

    /// (rows, cols, chunk, chunks) as the kernels take them.
    pub(crate) fn dims(&self) -> (i64, i64, i64, i32) {
        (
            self.rows as i64,
            self.cols as i64,
            self.p.chunk as i64,
            self.p.chunks as i32,
        )
    }

    /// The packs per thread of the op's cached kernel, where the whole row fits in registers.
    pub(crate) fn cached_packs(&self) -> Option<usize> {
        self.cached_packs_of(1)
    }

    /// [`cached_packs`](Self::cached_packs) of a kernel that holds `arrays` rows (the softmax
    /// backward holds y and dy) in the same registers.
    pub(crate) fn cached_packs_of(&self, arrays: usize) -> Option<usize> {
        cached_packs(&self.p, self.cols, MAX_CACHED_FLOATS / arrays)
    }

    pub(crate) fn device(&mut self) -> &mut Device {
        self.d
    }

    /// Launches `op` (of the variant) on the plan's grid. Safety: as [`launch`].
    pub(crate) unsafe fn run(&mut self, op: Op, variant: Variant, args: &mut [Arg]) -> Result<()> {
        let f = self.d.kernel(KernelKey::new(op, self.dtype, variant))?;
        launch(f, self.p.grid, self.p.block, self.s, args)
    }

    /// [`run`](Self::run) of the vectorized variant the plan picked.
    pub(crate) unsafe fn run_vec(&mut self, op: Op, args: &mut [Arg]) -> Result<()> {
        self.run(op, Variant::Vec(self.p.vec), args)
    }

    /// The partial row statistics of `<op>` (vectorized): `bytes` per piece of row in
    /// stream-ordered scratch, whose address the kernel takes after `args`, its last parameter.
    /// Safety: as [`launch`].
    pub(crate) unsafe fn stats(&mut self, op: Op, bytes: usize, args: &[Arg]) -> Result<Scratch> {
        let sc = Scratch::new(self.rows * self.p.chunks as usize * bytes, self.s)?;
        let mut all = args.to_vec();
        all.push(Arg::of(&sc.ptr));
        self.run_vec(op, &mut all)?;
        Ok(sc)
    }

    /// [`stats`](Self::stats) where rows are split across blocks (the row pass then adds the
    /// pieces up); None where each block holds whole rows. Safety: as [`launch`].
    pub(crate) unsafe fn split_stats(
        &mut self,
        op: Op,
        bytes: usize,
        args: &[Arg],
    ) -> Result<Option<Scratch>> {
        if self.p.chunks == 1 {
            return Ok(None);
        }
        self.stats(op, bytes, args).map(Some)
    }
}

/// The grid of a column pass: `tiles` blocks of 32 columns times `parts` blocks of `per_part`
/// rows (tokens); each part writes its own partial column sums, added later in part order (so
/// the sums are deterministic).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ColumnPlan {
    pub tiles: u32,
    pub parts: u32,
    pub per_part: usize,
}

/// Threads of a column-pass block: 32 columns by 8 rows.
pub(crate) const COLUMN_BLOCK: (u32, u32) = (32, 8);

/// Enough parts to give every SM a few blocks, but no more than one per 32 rows.
pub fn column_plan(rows: usize, cols: usize, sms: u32) -> Result<ColumnPlan> {
    let tiles = cols.div_ceil(32).max(1);
    let parts = (8 * sms.max(1) as usize)
        .div_ceil(tiles)
        .clamp(1, rows.div_ceil(32).max(1));
    let per_part = rows.div_ceil(parts).max(1);
    let parts = rows.div_ceil(per_part).max(1);
    if tiles > i32::MAX as usize || parts > 65535 {
        return Err(Error::Value(format!(
            "too many columns or rows for one launch: {rows} x {cols}"
        )));
    }
    Ok(ColumnPlan {
        tiles: tiles as u32,
        parts: parts as u32,
        per_part,
    })
}

impl ColumnPlan {
    /// Launches the column pass `f` on this grid. Safety: as [`launch`].
    pub(crate) unsafe fn run(&self, f: Kernel, s: Stream, args: &mut [Arg]) -> Result<()> {
        launch_2d(f, (self.tiles, self.parts), COLUMN_BLOCK, s, args)
    }
}

/// out[c] = sum of the `parts` partial rows of `cols` floats at `part`, in part order, by the
/// `sum` kernel ([`Op::PowerSumParts`] of power_norm.cu).
pub(crate) fn sum_parts(
    d: &mut Device,
    s: Stream,
    sum: Op,
    part: u64,
    parts: u32,
    cols: usize,
    out: u64,
) -> Result<()> {
    let f = d.kernel(KernelKey::untyped(sum))?;
    let (parts_i, cols_i) = (parts as i32, cols as i64);
    // Safety: parts*cols partials in, cols floats out.
    unsafe { launch_flat(f, cols, s, &mut params![part, parts_i, cols_i, out]) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::Forms;

    #[test]
    fn plans_cover_every_element_once() {
        for &(rows, cols) in &[
            (1, 1),
            (7, 3),
            (16384, 4096),
            (4096, 32768),
            (32, 128256),
            (3, 1 << 20),
            (100000, 17),
        ] {
            for vec in [1, 4, 8] {
                if cols % vec != 0 {
                    continue;
                }
                let p = plan(rows, cols, vec, 132, true).unwrap();
                assert!(p.chunk % vec == 0 || p.chunks == 1, "{rows}x{cols}: {p:?}");
                assert!(p.chunk * p.chunks as usize >= cols, "{rows}x{cols}: {p:?}");
                assert!(
                    (p.chunks as usize - 1) * p.chunk < cols,
                    "{rows}x{cols}: {p:?}"
                );
                let rows_covered = (p.grid / p.chunks) as usize * p.block.1 as usize;
                assert!(rows_covered >= rows && rows_covered < rows + p.block.1 as usize);
                assert!(p.block.0 * p.block.1 <= MAX_THREADS && p.block.1 <= MAX_ROWS_PER_BLOCK);
                assert!(p.block.0 % 32 == 0);
                if p.chunks > 1 {
                    assert_eq!(p.block.1, 1);
                }
            }
        }
    }

    /// Every kernel name the table can ask for, by module.
    fn names_asked_for() -> Vec<(&'static str, String)> {
        let mut names = vec![];
        for &op in Op::ALL {
            let mut keys = vec![];
            for dtype in [DType::F32, DType::F16, DType::BF16] {
                let wide = 16 / dtype.size();
                let packs = (0..)
                    .map(|k| 1usize << k)
                    .take_while(|p| p * wide <= MAX_CACHED_FLOATS);
                let variants: Vec<_> = match op.forms() {
                    Forms::Untyped => vec![],
                    Forms::Plain => vec![Variant::Plain],
                    Forms::Vec => vec![Variant::Vec(1), Variant::Vec(wide)],
                    Forms::Packs => packs.map(Variant::Packs).collect(),
                    Forms::Listed => vec![],
                };
                keys.extend(variants.into_iter().map(|v| KernelKey::new(op, dtype, v)));
            }
            if op.forms() == Forms::Untyped {
                keys.push(KernelKey::untyped(op));
            }
            names.extend(keys.iter().map(|k| (op.module(), k.name())));
        }
        names.extend(
            crate::norms::kernel_names()
                .into_iter()
                .map(|n| ("norms", n)),
        );
        // The softmax backward holds y and dy, the cross-entropy its statistics and weights
        // beside the logits: half the packs of the softmax forward.
        // The cross-entropy's stats variant holds its extra statistics too: a quarter.
        for (op, share) in [
            (Op::SoftmaxBackwardCached, 2),
            (Op::CeCached, 2),
            (Op::CeCachedStats, 4),
        ] {
            for dtype in [DType::F32, DType::F16, DType::BF16] {
                let wide = 16 / dtype.size();
                for p in (0..)
                    .map(|k| 1usize << k)
                    .take_while(|p| share * p * wide <= MAX_CACHED_FLOATS)
                {
                    let key = KernelKey::new(op, dtype, Variant::Packs(p));
                    names.push((op.module(), key.name()));
                }
            }
        }
        names
    }

    #[test]
    fn every_kernel_asked_for_is_in_its_module() {
        let Ok(_) = crate::nvrtc_version() else {
            eprintln!("NVRTC not found: skipped (CI runs tests/compile.rs with NVRTC required)");
            return;
        };
        for (module, _) in crate::MODULES {
            let image = crate::compile::compile(module, "sm_80").unwrap();
            for (_, name) in names_asked_for().iter().filter(|(m, _)| *m == module) {
                // A cubin is an ELF file: its symbol names are NUL-terminated strings in it.
                let needle = [name.as_bytes(), b"\0"].concat();
                assert!(
                    image.windows(needle.len()).any(|w| w == needle),
                    "{module} has no {name}"
                );
            }
            // And the search can fail: a name that is never instantiated is not found.
            let absent = KernelKey::new(Op::Softmax, DType::BF16, Variant::Packs(64)).name();
            let absent = [absent.as_bytes(), b"\0"].concat();
            assert!(!image.windows(absent.len()).any(|w| w == absent));
        }
    }

    #[test]
    fn cached_plans_hold_whole_rows() {
        for cols in (1..40_000).step_by(97).chain([4096, 32768, 16384, 8192]) {
            for vec in [4, 8] {
                if cols % vec != 0 {
                    continue;
                }
                let p = plan(1000, cols, vec, 132, true).unwrap();
                if let Some(packs) = cached_packs(&p, cols, MAX_CACHED_FLOATS) {
                    assert!(packs.is_power_of_two() && packs * vec <= MAX_CACHED_FLOATS);
                    assert!(
                        packs * vec * p.block.0 as usize >= cols,
                        "{cols}: {p:?} {packs}"
                    );
                }
            }
        }
        let fits = |rows, cols, vec, floats| {
            cached_packs(&plan(rows, cols, vec, 132, true).unwrap(), cols, floats).is_some()
        };
        // Rows of 4096 and 16384 are read once; 32768 (64 floats per thread) would spill.
        assert!(fits(16384, 4096, 4, MAX_CACHED_FLOATS));
        assert!(fits(4096, 16384, 4, MAX_CACHED_FLOATS));
        assert!(fits(4096, 16384, 8, MAX_CACHED_FLOATS));
        assert!(!fits(4096, 32768, 8, MAX_CACHED_FLOATS));
        assert!(!fits(32, 128256, 4, MAX_CACHED_FLOATS));
        // The softmax backward holds y and dy: rows of 4096 fit twice, rows of 16384 do not.
        assert!(fits(16384, 4096, 8, MAX_CACHED_FLOATS / 2));
        assert!(!fits(4096, 16384, 8, MAX_CACHED_FLOATS / 2));
    }

    #[test]
    fn threads_follow_elements_not_vectors() {
        for cols in [64, 1000, 4096, 8192, 32768] {
            let f32_plan = plan(4096, cols, 4, 132, true).unwrap();
            let bf16_plan = plan(4096, cols, 8, 132, true).unwrap();
            assert_eq!(f32_plan.block, bf16_plan.block, "{cols}");
            let per_thread = cols.div_ceil(f32_plan.block.0 as usize);
            assert!(per_thread <= VALUES_PER_THREAD || f32_plan.block.0 == MAX_THREADS);
            assert!(per_thread > VALUES_PER_THREAD / 2 || f32_plan.block.0 == 32);
        }
        assert_eq!(plan(16384, 4096, 8, 132, true).unwrap().block, (256, 1));
    }

    #[test]
    fn long_rows_are_split_only_when_few() {
        assert!(plan(32, 128256, 4, 132, true).unwrap().chunks > 1);
        assert_eq!(plan(16384, 4096, 4, 132, true).unwrap().chunks, 1);
        assert_eq!(plan(32, 128256, 4, 132, false).unwrap().chunks, 1);
    }

    #[test]
    fn column_plans_cover_every_row_once() {
        for &(rows, cols) in &[
            (0, 1),
            (1, 1),
            (31, 7),
            (33, 64),
            (4096, 1024),
            (16384, 4096),
            (100_000, 17),
            (5, 1 << 20),
        ] {
            for sms in [1, 8, 132] {
                let p = column_plan(rows, cols, sms).unwrap();
                let parts = p.parts as usize;
                assert!(p.per_part >= 1 && parts >= 1, "{rows}x{cols}: {p:?}");
                assert!(parts * p.per_part >= rows, "{rows}x{cols}: {p:?}");
                // No empty part: the last one starts before the end (or there is only one).
                assert!(parts == 1 || (parts - 1) * p.per_part < rows, "{p:?}");
                assert!(p.tiles as usize * 32 >= cols && (p.tiles as usize - 1) * 32 < cols.max(1));
                assert!(parts <= 8 * sms as usize && parts <= 65535);
                assert!(parts <= rows.div_ceil(32).max(1), "{rows}x{cols}: {p:?}");
            }
        }
    }
}
