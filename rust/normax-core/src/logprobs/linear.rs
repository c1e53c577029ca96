//! The linear form: logits = (hidden @ weight^T + bias) / T, one block of rows x vocabulary at a
//! time (the linear cross-entropy's blocks, [`linear_block`]), never all held at once.
//!
//! Forward: each block's rows fold into their statistics ([`Part`]: an lse and entropy that
//! combine across vocabulary blocks). Backward: with whole rows in a block (the common case), one
//! GEMM recomputes the block, the row kernel finds each row's statistics and overwrites the block
//! with its gradient, and two GEMMs feed dhidden and dweight: three GEMMs per block. With
//! vocabulary blocks, a first sweep of GEMMs gathers the rows' statistics and a second one turns
//! each recomputed block into its gradient.

use super::rows::{Fold, Grad, Part};
use super::{check_rows, finish, LogprobGrads, LogprobOptions};
use crate::cross_entropy::{linear_block, Linear, LinearGrads};
use crate::driver::{self, Ptr};
use crate::float::Float;
use crate::gemm::release_free_memory;
use crate::isa::dispatch;
use crate::spec::{check_len, size};
use crate::Error;

/// Checks the shapes and options of the linear form; returns its inputs.
#[allow(clippy::too_many_arguments)]
fn checked<T: Float>(
    hidden: &[T],
    weight: &[T],
    bias: Option<&[T]>,
    target: &[i64],
    (n, h, v): (usize, usize, usize),
    opts: &LogprobOptions,
    chunk_size: Option<usize>,
    grads: Option<&LogprobGrads<'_, T>>,
) -> Result<Linear<T>, Error> {
    if chunk_size == Some(0) {
        return Err(Error::Value("chunk_size must be at least 1".into()));
    }
    check_len("hidden", hidden.len(), size(n, h)?)?;
    check_len("weight", weight.len(), size(v, h)?)?;
    if let Some(b) = bias {
        check_len("bias", b.len(), v)?;
    }
    check_rows(n, v, target, opts, grads)?;
    Ok(Linear {
        hidden: Ptr::from_const(hidden.as_ptr()),
        weight: Ptr::from_const(weight.as_ptr()),
        bias: Ptr::from_const(bias.map_or(std::ptr::null(), |b| b.as_ptr())),
        h,
        scale: T::ONE,
    })
}

/// Folds every block of classes of rows [r0, r0 + rn) into `parts` (one per row of the block).
#[allow(clippy::too_many_arguments)]
fn fold_rows<T: Float>(
    lin: &Linear<T>,
    block: Ptr<T>,
    (r0, rn): (usize, usize),
    (v, bv): (usize, usize),
    target: &[i64],
    opts: &LogprobOptions,
    entropy: bool,
    parts: &mut [Part],
) {
    let state = Ptr(parts.as_mut_ptr());
    for v0 in (0..v).step_by(bv) {
        let vn = bv.min(v - v0);
        unsafe { lin.logits(block.at(0), r0, rn, v0, vn) };
        driver::for_each_fixed_row_block(rn, vn, |rows| {
            dispatch(Fold {
                x: block,
                len: vn,
                v0,
                temperature: opts.temperature,
                targets: target,
                ignore: opts.ignore_index,
                row0: r0,
                state,
                entropy,
                rows,
            })
        });
    }
}

/// logprob (and, given, entropy) of each row of logits = hidden @ weight^T + bias (hidden n x h,
/// weight v x h, target n) divided by the temperature, without holding the n x v logits: at most
/// `chunk_size` of them at once (see [`linear_block`]).
#[allow(clippy::too_many_arguments)]
pub fn linear_logprobs<T: Float>(
    hidden: &[T],
    weight: &[T],
    bias: Option<&[T]>,
    target: &[i64],
    (n, h, v): (usize, usize, usize),
    opts: &LogprobOptions,
    chunk_size: Option<usize>,
    logprob: &mut [T],
    entropy: Option<&mut [T]>,
) -> Result<(), Error> {
    let lin = checked(
        hidden,
        weight,
        bias,
        target,
        (n, h, v),
        opts,
        chunk_size,
        None,
    )?;
    check_len("logprob", logprob.len(), n)?;
    if let Some(e) = &entropy {
        check_len("entropy", e.len(), n)?;
    }
    let (bn, bv) = linear_block(n, v, chunk_size);
    let mut block = vec![T::ZERO; if n > 0 { bn * bv } else { 0 }];
    let blk = Ptr(block.as_mut_ptr());
    let mut parts = vec![Part::EMPTY; n];
    for r0 in (0..n).step_by(bn) {
        let rn = bn.min(n - r0);
        let rows = &mut parts[r0..r0 + rn];
        fold_rows(
            &lin,
            blk,
            (r0, rn),
            (v, bv),
            target,
            opts,
            entropy.is_some(),
            rows,
        );
    }
    release_free_memory();
    finish(&parts, target, opts.ignore_index, logprob, entropy);
    Ok(())
}

/// The gradients of sum_r (g_logp[r] logprob[r] + g_H[r] entropy[r]) of [`linear_logprobs`] with
/// respect to hidden, weight and bias into `out` (`out.dbias` present exactly when `bias` is).
#[allow(clippy::too_many_arguments)]
pub fn linear_logprobs_backward<T: Float>(
    hidden: &[T],
    weight: &[T],
    bias: Option<&[T]>,
    target: &[i64],
    (n, h, v): (usize, usize, usize),
    opts: &LogprobOptions,
    chunk_size: Option<usize>,
    grads: LogprobGrads<'_, T>,
    out: LinearGrads<'_, T>,
) -> Result<(), Error> {
    let lin = checked(
        hidden,
        weight,
        bias,
        target,
        (n, h, v),
        opts,
        chunk_size,
        Some(&grads),
    )?;
    check_len("dhidden", out.dhidden.len(), hidden.len())?;
    check_len("dweight", out.dweight.len(), weight.len())?;
    match (&out.dbias, bias) {
        (Some(db), Some(_)) => check_len("dbias", db.len(), v)?,
        (None, None) => {}
        _ => {
            return Err(Error::Value(
                "dbias must be given exactly when bias is".into(),
            ))
        }
    }
    let (bn, bv) = linear_block(n, v, chunk_size);
    let mut block = vec![T::ZERO; if n > 0 { bn * bv } else { 0 }];
    let blk = Ptr(block.as_mut_ptr());
    let mut bias_sums = vec![0.0f64; if bias.is_some() { v } else { 0 }];
    let mut parts = Vec::new();
    for r0 in (0..n).step_by(bn) {
        let rn = bn.min(n - r0);
        if bv < v {
            parts = vec![Part::EMPTY; rn];
            let entropy = grads.entropy.is_some();
            fold_rows(
                &lin,
                blk,
                (r0, rn),
                (v, bv),
                target,
                opts,
                entropy,
                &mut parts,
            );
        }
        for v0 in (0..v).step_by(bv) {
            let vn = bv.min(v - v0);
            unsafe { lin.logits(blk.at(0), r0, rn, v0, vn) };
            let folded = (bv < v).then_some(&parts[..]);
            driver::for_each_fixed_row_block(rn, vn, |rows| {
                dispatch(Grad {
                    x: blk,
                    len: vn,
                    v0,
                    temperature: opts.temperature,
                    targets: target,
                    ignore: opts.ignore_index,
                    row0: r0,
                    folded,
                    grads,
                    grad: blk,
                    rows,
                })
            });
            let sums = bias.is_some().then_some(&mut bias_sums[..]);
            let (dh, dw) = (out.dhidden.as_mut_ptr(), out.dweight.as_mut_ptr());
            unsafe { lin.backward(blk.at(0), (r0, rn), (v0, vn), dh, dw, sums) };
        }
        release_free_memory();
    }
    if n == 0 {
        out.dweight.fill(T::ZERO);
    }
    if let Some(db) = out.dbias {
        for (d, s) in db.iter_mut().zip(&bias_sums) {
            *d = T::from_f64(*s);
        }
    }
    Ok(())
}
