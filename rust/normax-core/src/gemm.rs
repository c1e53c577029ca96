//! The matrix products of the linear cross-entropy (the `gemm` crate on this crate's thread pool)
//! and the allocator trim their packing buffers need.

use crate::driver::Ptr;
use crate::float::Float;
use crate::rows::fill;
use crate::threads;

/// dst (m x n, row stride `dst_rs`) = [dst +] lhs (m x k) @ rhs (k x n), operands given by
/// (row, column) strides; on this crate's thread pool.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn matmul<T: Float>(
    dims: (usize, usize, usize),
    dst: *mut T,
    dst_rs: usize,
    accumulate: bool,
    lhs: *const T,
    lhs_strides: (usize, usize),
    rhs: *const T,
    rhs_strides: (usize, usize),
) {
    let (l, r) = ((lhs, lhs_strides), (rhs, rhs_strides));
    matmul_scaled(dims, (dst, dst_rs), accumulate, l, r, T::ONE);
}

/// dst = scale * ([dst +] lhs @ rhs): [`matmul`] with the result scaled in the GEMM's own
/// output step (the linear cross-entropy's temperature, at no extra pass).
pub(crate) unsafe fn matmul_scaled<T: Float>(
    (m, n, k): (usize, usize, usize),
    (dst, dst_rs): (*mut T, usize),
    accumulate: bool,
    (lhs, (lhs_rs, lhs_cs)): (*const T, (usize, usize)),
    (rhs, (rhs_rs, rhs_cs)): (*const T, (usize, usize)),
    scale: T,
) {
    // An interrupted call skips its remaining products (its results are discarded).
    if m == 0 || n == 0 || threads::Stop::current().hit() {
        return;
    }
    if k == 0 {
        for i in 0..m {
            let row = std::slice::from_raw_parts_mut(dst.add(i * dst_rs), n);
            if accumulate {
                row.iter_mut()
                    .for_each(|v| *v = T::from_f64(v.to_f64() * scale.to_f64()));
            } else {
                fill(row.as_mut_ptr(), n, T::ZERO);
            }
        }
        return;
    }
    let par = match threads::num_threads() {
        1 => gemm::Parallelism::None,
        t => gemm::Parallelism::Rayon(t),
    };
    let (dst, lhs, rhs) = (Ptr(dst), Ptr::from_const(lhs), Ptr::from_const(rhs));
    threads::install(move || {
        gemm::gemm(
            m,
            n,
            k,
            dst.at(0),
            1,
            dst_rs as isize,
            accumulate,
            lhs.at(0),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.at(0),
            rhs_cs as isize,
            rhs_rs as isize,
            // dst = alpha * dst + beta * lhs @ rhs
            scale,
            scale,
            false,
            false,
            false,
            par,
        )
    });
}

/// Hands the allocator's free memory back to the OS (glibc; elsewhere nothing).
///
/// The gemm crate allocates its packing buffers on every call (about 21 MiB for the dweight
/// product at H = 1024, V = 32768). Under glibc's dynamic mmap threshold those come from the heap
/// and, measured with glibc 2.36, the freed ones were not reused: the resident set grew by one
/// buffer per call (+300 MiB over the 16 row blocks of N = 8192) while the live heap stayed at
/// one block of logits plus one buffer. Trimming once per row block keeps resident = live.
pub(crate) fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn malloc_trim(pad: usize) -> std::os::raw::c_int;
        }
        // SAFETY: malloc_trim only returns free pages to the OS; it takes no pointers.
        unsafe {
            malloc_trim(0);
        }
    }
}
