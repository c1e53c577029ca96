//! Loops over one contiguous row, generic over [`Vector`]: vector-sized steps with a partial tail,
//! and sums of per-element terms kept short in `Elem` and folded into f64.
//!
//! These are the building blocks of every op family's row kernels (softmax, cross-entropy, norms):
//! element maps, dot products, sums, stores and a per-thread scratch row. They hold no op-specific
//! math.

use crate::float::Float;
use crate::simd::{load_partial, store_partial, Vector, MAX_LANES};
use crate::sum::{CompensatedSum, SHORT_FOLD};

/// Steps each of [`row_sums`]' four accumulators takes (one vector per step) before their sums are
/// folded into f64: longer than the accurate sums' [`SHORT_FOLD`].
const ROW_SUMS_FOLD: usize = 64;

/// Calls `f(i, n)` for consecutive pieces of `0..len`: full vectors (n == LANES), then one partial
/// tail (0 < n < LANES) if `len` is not a multiple of LANES.
#[inline(always)]
pub(crate) fn for_each_vector<V: Vector>(len: usize, f: impl FnMut(usize, usize)) {
    for_each_vector_from::<V>(0, len, f)
}

/// [`for_each_vector`] with a first piece of `head < LANES` elements (none if 0 or >= len), so
/// that the full vectors start `head` elements in: used to align them for streaming stores.
#[inline(always)]
pub(crate) fn for_each_vector_from<V: Vector>(
    head: usize,
    len: usize,
    mut f: impl FnMut(usize, usize),
) {
    let w = V::LANES;
    let mut i = 0;
    if head > 0 && head < len {
        f(0, head);
        i = head;
    }
    while i + w <= len {
        f(i, w);
        i += w;
    }
    if i < len {
        f(i, len - i);
    }
}

/// Bytes of a cache line: the unit of a prefetch.
const LINE: usize = 64;

/// Prefetches `p + i` if element `i` starts a vector in the first `LANES` elements of a 64-byte
/// stretch of offsets: called for every vector of a loop stepping by LANES, it prefetches each
/// line of the data at `p` once, whatever the vector width.
#[inline(always)]
pub(crate) fn prefetch_line<V: Vector>(p: *const V::Elem, i: usize) {
    let size = std::mem::size_of::<V::Elem>();
    if (i * size) % LINE < V::LANES * size {
        V::prefetch(p.wrapping_add(i))
    }
}

/// `n <= LANES` elements from `p`, the lanes past `n` zero.
///
/// # Safety
/// `p` must be valid for reading `n` elements.
#[inline(always)]
pub(crate) unsafe fn load_n<V: Vector>(p: *const V::Elem, n: usize) -> V {
    if n == V::LANES {
        V::load(p)
    } else {
        load_partial::<V>(p, n, V::Elem::ZERO)
    }
}

/// Stores the first `n <= LANES` lanes of `v` to `p`.
///
/// # Safety
/// `p` must be valid for writing `n` elements.
#[inline(always)]
pub(crate) unsafe fn store_n<V: Vector>(v: V, p: *mut V::Elem, n: usize) {
    if n == V::LANES {
        v.store(p)
    } else {
        store_partial(v, p, n)
    }
}

/// `p[..n] += v[..n]`.
///
/// # Safety
/// `p` must be valid for reading and writing `n` elements.
#[inline(always)]
pub(crate) unsafe fn add_n<V: Vector>(v: V, p: *mut V::Elem, n: usize) {
    store_n(load_n::<V>(p, n).add(v), p, n)
}

/// Output written with streaming stores, when large enough that it would not stay cached anyway.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Store {
    Plain,
    Stream,
}

/// Outputs at least this large (bytes) are written with streaming stores. A fixed size, not the
/// last-level cache the CPU reports: on a VM that is the host's (480 MiB on the issue 25 VM,
/// shared with other machines). One op in a loop there, one thread: streaming stores made
/// softmax-family outputs of 16-256 MiB 10-40% faster, plain stores a 2 MiB softmax 30% faster;
/// below 32 MiB an output can stay cached for the op that reads it next, which such a loop does
/// not show.
const STREAM_MIN_BYTES: usize = 32 << 20;

impl Store {
    pub(crate) fn for_output<T>(elements: usize) -> Store {
        if elements.saturating_mul(std::mem::size_of::<T>()) >= STREAM_MIN_BYTES {
            Store::Stream
        } else {
            Store::Plain
        }
    }

    /// For a row at `p`: the head length that aligns the full vectors after it, and how to store
    /// them (plain if `p` is not even element-aligned).
    #[inline(always)]
    pub(crate) fn row<V: Vector>(self, p: *const V::Elem) -> (usize, Store) {
        let size = std::mem::size_of::<V::Elem>();
        let bytes = V::LANES * size;
        let addr = p as usize;
        if self == Store::Plain || addr % size != 0 {
            return (0, Store::Plain);
        }
        (((bytes - addr % bytes) % bytes) / size, Store::Stream)
    }

    /// After a run of streaming stores.
    #[inline(always)]
    pub(crate) fn finish<V: Vector>(self) {
        if self == Store::Stream {
            V::stream_fence()
        }
    }
}

/// Stores the first `n <= LANES` lanes of `v` to `p`, a full vector with a streaming store if
/// STREAM (the caller aligned it, see [`Store::row`]).
///
/// # Safety
/// As [`store_n`]; with STREAM and `n == LANES`, `p` aligned to `LANES` elements.
#[inline(always)]
pub(crate) unsafe fn put<V: Vector, const STREAM: bool>(v: V, p: *mut V::Elem, n: usize) {
    if STREAM && n == V::LANES {
        v.store_stream(p)
    } else {
        store_n(v, p, n)
    }
}

/// `v` with the lanes from `n` on set to zero.
#[inline(always)]
pub(crate) fn keep_lanes<V: Vector>(v: V, n: usize) -> V {
    if n >= V::LANES {
        return v;
    }
    let mut buf = [V::Elem::ZERO; MAX_LANES];
    unsafe {
        v.store(buf.as_mut_ptr());
        buf[n..].fill(V::Elem::ZERO);
        V::load(buf.as_ptr())
    }
}

/// Adds the four accumulators of each term into `total` and clears them.
#[inline(always)]
fn fold<V: Vector, const K: usize>(total: &mut [f64; K], acc: &mut [[V; K]; 4]) {
    for k in 0..K {
        let s = acc[0][k].add(acc[1][k]).add(acc[2][k].add(acc[3][k]));
        total[k] += s.reduce_add().to_f64();
    }
    *acc = [[V::splat(V::Elem::ZERO); K]; 4];
}

/// The sums over `0..len` of `K` per-element terms: `term(i, n)` gives the terms of elements
/// `i..i + n` (n <= LANES; lanes past `n` are discarded, so the terms may be anything there).
///
/// Four accumulators per term hide the add latency; each adds at most `ROW_SUMS_FOLD` vectors in
/// `Elem` before its sum is folded into f64, so f32 partial sums stay short.
///
/// Mark `term` `#[inline(always)]` at the call (as every closure passed to these loops): a closure
/// that is not inlined is compiled without the ISA's target features, and each vector operation in
/// it becomes a function call.
#[inline(always)]
pub(crate) fn row_sums<V: Vector, const K: usize>(
    len: usize,
    term: impl Fn(usize, usize) -> [V; K],
) -> [f64; K] {
    let zero = V::splat(V::Elem::ZERO);
    let w = V::LANES;
    let mut acc = [[zero; K]; 4];
    let mut total = [0.0f64; K];
    let mut i = 0;
    let mut steps = 0;
    while i + 4 * w <= len {
        for (j, a) in acc.iter_mut().enumerate() {
            let t = term(i + j * w, w);
            for k in 0..K {
                a[k] = a[k].add(t[k]);
            }
        }
        i += 4 * w;
        steps += 1;
        if steps == ROW_SUMS_FOLD {
            fold(&mut total, &mut acc);
            steps = 0;
        }
    }
    while i < len {
        let n = (len - i).min(w);
        let t = term(i, n);
        for k in 0..K {
            acc[0][k] = acc[0][k].add(keep_lanes(t[k], n));
        }
        i += n;
    }
    fold(&mut total, &mut acc);
    total
}

/// Rows a column loop prefetches ahead: its rows are `stride` apart, too far for the hardware
/// prefetchers to follow when the stride is a page or more.
const COLUMN_PREFETCH: usize = 16;

/// The lane-wise max over `len` rows of `n <= LANES` adjacent columns `stride` apart (lanes past
/// `n` are anything). NaN may or may not survive `max`, as in `lse::max_pass`.
///
/// # Safety
/// `x` readable at `i * stride + l` for i < len, l < n.
#[inline(always)]
pub(crate) unsafe fn column_max<V: Vector>(
    x: *const V::Elem,
    stride: usize,
    len: usize,
    n: usize,
) -> V {
    let mut mx = [V::splat(V::Elem::NEG_INFINITY); 4];
    let mut i = 0;
    while i + 4 <= len {
        for (j, acc) in mx.iter_mut().enumerate() {
            V::prefetch(x.wrapping_add((i + j + COLUMN_PREFETCH) * stride));
            *acc = acc.max(load_n::<V>(x.add((i + j) * stride), n));
        }
        i += 4;
    }
    while i < len {
        mx[0] = mx[0].max(load_n::<V>(x.add(i * stride), n));
        i += 1;
    }
    mx[0].max(mx[1]).max(mx[2].max(mx[3]))
}

/// Lane-wise sums over `0..len` of `K` terms per row: `term(i)` gives row i's terms for every
/// lane (the column kernels: one column per lane). As [`row_sums`] by lanes: four accumulators
/// (rows i mod 4), each adding at most `SHORT_FOLD` vectors in `Elem` before the four are folded
/// into a compensated f64 sum per lane, so each term passes through as few `Elem` roundings as on
/// the row path.
#[inline(always)]
pub(crate) fn lane_sums<V: Vector, const K: usize>(
    len: usize,
    term: impl Fn(usize) -> [V; K],
) -> [[f64; MAX_LANES]; K] {
    #[inline(always)]
    fn fold<V: Vector, const K: usize>(
        total: &mut [[CompensatedSum; MAX_LANES]; K],
        acc: &mut [[V; K]; 4],
    ) {
        let mut lanes = [V::Elem::ZERO; MAX_LANES];
        for k in 0..K {
            let s = acc[0][k].add(acc[1][k]).add(acc[2][k].add(acc[3][k]));
            unsafe { s.store(lanes.as_mut_ptr()) };
            for l in 0..V::LANES {
                total[k][l].add(lanes[l].to_f64());
            }
        }
        *acc = [[V::splat(V::Elem::ZERO); K]; 4];
    }
    let zero = V::splat(V::Elem::ZERO);
    let mut acc = [[zero; K]; 4];
    let mut total = [[CompensatedSum::default(); MAX_LANES]; K];
    let mut i = 0;
    let mut steps = 0;
    while i + 4 <= len {
        for (j, a) in acc.iter_mut().enumerate() {
            let t = term(i + j);
            for k in 0..K {
                a[k] = a[k].add(t[k]);
            }
        }
        i += 4;
        steps += 1;
        if steps == SHORT_FOLD {
            fold::<V, K>(&mut total, &mut acc);
            steps = 0;
        }
    }
    while i < len {
        let t = term(i);
        for k in 0..K {
            acc[0][k] = acc[0][k].add(t[k]);
        }
        i += 1;
    }
    fold::<V, K>(&mut total, &mut acc);
    total.map(|t| t.map(|c| c.value()))
}

/// [`lane_sums`] of `cols` adjacent columns at once: `term(i, c, n)` gives row i's terms for
/// the `n <= LANES` columns from c (a group). Blocks of `4 * SHORT_FOLD` rows, each read for every
/// group in turn, so each row's lines of the columns are read together (64 bytes per row visit
/// cost a TLB entry and a DRAM page each). The sums of column c go to `out[c]`.
#[inline(always)]
pub(crate) fn columns_lane_sums<V: Vector, const K: usize>(
    len: usize,
    out: &mut [[f64; K]],
    term: impl Fn(usize, usize, usize) -> [V; K],
) {
    let cols = out.len();
    let zero = V::splat(V::Elem::ZERO);
    let mut totals = vec![[[CompensatedSum::default(); MAX_LANES]; K]; cols.div_ceil(V::LANES)];
    let mut i = 0;
    while i < len {
        let rows = (4 * SHORT_FOLD).min(len - i);
        for (g, total) in totals.iter_mut().enumerate() {
            let (c, mut acc) = (g * V::LANES, [[zero; K]; 4]);
            let n = V::LANES.min(cols - c);
            let mut r = 0;
            while r < rows {
                for (j, a) in acc.iter_mut().enumerate().take(rows - r) {
                    let t = term(i + r + j, c, n);
                    for k in 0..K {
                        a[k] = a[k].add(t[k]);
                    }
                }
                r += 4;
            }
            let mut lanes = [V::Elem::ZERO; MAX_LANES];
            for k in 0..K {
                let s = acc[0][k].add(acc[1][k]).add(acc[2][k].add(acc[3][k]));
                unsafe { s.store(lanes.as_mut_ptr()) };
                for l in 0..n {
                    total[k][l].add(lanes[l].to_f64());
                }
            }
        }
        i += rows;
    }
    for (c, o) in out.iter_mut().enumerate() {
        let (g, l) = (c / V::LANES, c % V::LANES);
        *o = std::array::from_fn(|k| totals[g][k][l].value());
    }
}

/// The vector of `f(l)` for the lanes l < n, zero past them (per-column constants).
#[inline(always)]
pub(crate) fn lanes<V: Vector>(n: usize, f: impl Fn(usize) -> V::Elem) -> V {
    let mut buf = [V::Elem::ZERO; MAX_LANES];
    for (l, b) in buf[..n.min(V::LANES)].iter_mut().enumerate() {
        *b = f(l);
    }
    unsafe { V::load(buf.as_ptr()) }
}

/// Rows [`map_columns`] writes of one group of columns before moving to the next group.
const COLUMN_CHUNK: usize = 4;

/// y = f(param(c), a, b) over `len` rows of `cols` adjacent columns `stride` apart, a group of up
/// to LANES columns at a time, `param(c)` the constants of the group whose lane l is column c + l
/// (`b` unread when null: `f` gets zeros). A chunk of rows at a time across the groups, so each
/// row's lines of the block are read and written together (64 bytes per row per pass is too
/// little per DRAM page and TLB entry). `y` may be `a` or `b`: each vector is read before it is
/// written.
///
/// Outputs too large to stay cached (`Store::for_output` of the rows written) get streaming
/// stores, which spare the read of each output line a plain store makes: the groups then start
/// where y's vectors are aligned (the columns before it are a group of their own, stored plainly),
/// so every full group writes whole lines. The values are the same either way.
///
/// # Safety
/// `a`, `b` (unless null) readable and `y` writable at `i * stride + c` for i < len, c < cols.
#[inline(always)]
pub(crate) unsafe fn map_columns<V: Vector, P: Copy>(
    a: *const V::Elem,
    b: *const V::Elem,
    y: *mut V::Elem,
    (stride, len, cols): (usize, usize, usize),
    param: impl Fn(usize) -> P,
    f: impl Fn(P, V, V) -> V,
) {
    let wanted = Store::for_output::<V::Elem>(len.saturating_mul(stride));
    // Every row's group starts equally aligned only if the stride is a whole number of vectors.
    let (head, store) = if stride % V::LANES == 0 {
        wanted.row::<V>(y)
    } else {
        (0, Store::Plain)
    };
    let head = head.min(cols);
    // (first column, columns, constants): the head group, then groups of LANES from `head` on.
    let groups: Vec<(usize, usize, P)> = (head > 0)
        .then_some((0, head))
        .into_iter()
        .chain(
            (head..cols)
                .step_by(V::LANES)
                .map(|c| (c, V::LANES.min(cols - c))),
        )
        .map(|(c, n)| (c, n, param(c)))
        .collect();
    let zero = V::splat(V::Elem::ZERO);
    let mut r0 = 0;
    while r0 < len {
        let r1 = (r0 + COLUMN_CHUNK).min(len);
        for &(c, n, p) in &groups {
            let stream = store == Store::Stream && c >= head && n == V::LANES;
            for i in r0..r1 {
                let at = i * stride + c;
                // The output too (unless streamed): a store that misses waits for its line, and
                // the rows are too far apart for the hardware to fetch ahead.
                V::prefetch(a.wrapping_add(at + COLUMN_PREFETCH * stride));
                if !stream {
                    V::prefetch(y.wrapping_add(at + COLUMN_PREFETCH * stride));
                }
                let vb = if b.is_null() {
                    zero
                } else {
                    load_n::<V>(b.add(at), n)
                };
                let v = f(p, load_n::<V>(a.add(at), n), vb);
                if stream {
                    v.store_stream(y.add(at));
                } else {
                    store_n(v, y.add(at), n);
                }
            }
        }
        r0 = r1;
    }
    store.finish::<V>();
}

/// Applies `f` to each full vector and the partial tail of x[..len], writing y.
#[inline(always)]
pub(crate) unsafe fn map_elements<V: Vector>(
    x: *const V::Elem,
    y: *mut V::Elem,
    len: usize,
    f: impl Fn(V) -> V,
) {
    map_elements_to(x, y, len, Store::Plain, f)
}

/// [`map_elements`] with the output written by `store` (streaming stores for large outputs).
#[inline(always)]
pub(crate) unsafe fn map_elements_to<V: Vector>(
    x: *const V::Elem,
    y: *mut V::Elem,
    len: usize,
    store: Store,
    f: impl Fn(V) -> V,
) {
    let (head, store) = store.row::<V>(y);
    if store == Store::Stream {
        for_each_vector_from::<V>(
            head,
            len,
            #[inline(always)]
            |i, n| put::<V, true>(f(load_n::<V>(x.add(i), n)), y.add(i), n),
        );
        store.finish::<V>();
    } else {
        for_each_vector::<V>(
            len,
            #[inline(always)]
            |i, n| store_n(f(load_n::<V>(x.add(i), n)), y.add(i), n),
        );
    }
}

/// a[i..i+n] * b[i..i+n] (or a alone when `b` is null), zero-padded past n.
#[inline(always)]
unsafe fn dot_term<V: Vector>(a: *const V::Elem, b: *const V::Elem, i: usize, n: usize) -> V {
    let va = load_n::<V>(a.add(i), n);
    if b.is_null() {
        va
    } else {
        va.mul(load_n::<V>(b.add(i), n))
    }
}

/// sum(a * b), or sum(a) when `b` is null; f32 partial sums folded into f64 every few vectors.
#[inline(always)]
pub(crate) unsafe fn dot<V: Vector>(a: *const V::Elem, b: *const V::Elem, len: usize) -> f64 {
    let zero = V::splat(V::Elem::ZERO);
    let w = V::LANES;
    let mut acc = [zero; 4];
    let mut total = CompensatedSum::default();
    let mut i = 0;
    let mut steps = 0;
    while i + 4 * w <= len {
        for (j, s) in acc.iter_mut().enumerate() {
            *s = s.add(dot_term::<V>(a, b, i + j * w, w));
        }
        i += 4 * w;
        steps += 1;
        if steps == SHORT_FOLD {
            total.add_lanes(&acc);
            acc = [zero; 4];
            steps = 0;
        }
    }
    while i < len {
        let n = (len - i).min(w);
        acc[0] = acc[0].add(dot_term::<V>(a, b, i, n));
        i += w;
    }
    total.add_lanes(&acc);
    total.value()
}

/// p[..len] = v.
pub(crate) unsafe fn fill<T: Float>(p: *mut T, len: usize, v: T) {
    std::slice::from_raw_parts_mut(p, len).fill(v);
}

thread_local! {
    /// Per-thread scratch row (f64 words, so aligned for any element type).
    static SCRATCH: std::cell::RefCell<Vec<f64>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// This thread's scratch row, at least `len` elements of T. Valid until the next call on this
/// thread (kernels do not nest). The kernel runs outside `LocalKey::with`, whose closure would be
/// compiled without the ISA's target features.
pub(crate) fn scratch_row<T: Float>(len: usize) -> *mut T {
    SCRATCH.with(|cell| {
        let mut buf = cell.borrow_mut();
        let words = (len * std::mem::size_of::<T>()).div_ceil(8);
        if buf.len() < words {
            buf.resize(words, 0.0);
        }
        buf.as_mut_ptr() as *mut T
    })
}

/// sum(x^2) over x[..len].
#[inline(always)]
pub(crate) unsafe fn sum_squares<V: Vector>(x: *const V::Elem, len: usize) -> f64 {
    let [ss] = row_sums::<V, 1>(
        len,
        #[inline(always)]
        |i, k| {
            let v = load_n::<V>(x.add(i), k);
            [v.mul(v)]
        },
    );
    ss
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simd::scalar::Scalar;

    #[test]
    fn row_sums_discards_the_tail_lanes() {
        #[cfg(target_arch = "x86_64")]
        if crate::isa::Isa::Avx2.is_supported() {
            // Any lanes past the row end must not count: the term adds 1 everywhere.
            #[target_feature(enable = "avx2,fma")]
            unsafe fn count(len: usize) -> f64 {
                let one = <f32 as Float>::Avx2::splat(1.0);
                row_sums::<<f32 as Float>::Avx2, 1>(len, |_, _| [one])[0]
            }
            for len in [0, 1, 7, 8, 9, 31, 32, 33, 1000] {
                assert_eq!(unsafe { count(len) }, len as f64);
            }
        }
        let x: Vec<f64> = (0..1001).map(|i| i as f64).collect();
        let [s, ss] = row_sums::<Scalar<f64>, 2>(x.len(), |i, _| {
            let v = Scalar(x[i]);
            [v, v.mul(v)]
        });
        assert_eq!(s, 1000.0 * 1001.0 / 2.0);
        assert_eq!(ss, 1000.0 * 1001.0 * 2001.0 / 6.0);
    }
}
