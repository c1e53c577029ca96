//! Extra leading batch dims (`jax.vmap` with `vmap_method="broadcast_all"` or "expand_dims"):
//! a row operand just has more rows; a parameter operand (class or norm weight) with the batch's
//! leading dims is applied per batch element, one with none (or all ones) is shared.

use super::frame::{Buffer, Element};
use normax_core::Error;

/// The batch of a call: the leading dims of its main operand beyond that operand's base rank.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Batch<'a> {
    pub dims: &'a [i64],
    /// The number of batch elements (the product of `dims`).
    pub count: usize,
}

impl<'a> Batch<'a> {
    /// The batch of `main`, whose unbatched rank is `base_rank`.
    pub(crate) fn of(main: &Buffer<'a>, base_rank: usize) -> Result<Batch<'a>, Error> {
        let dims = main.leading(base_rank)?;
        Ok(Batch {
            dims,
            count: dims.iter().map(|&d| d as usize).product(),
        })
    }

    /// Whether `leading` (an operand's dims before its base) is this batch (true), or no batch
    /// at all / all ones (false: shared by every batch element); an error otherwise.
    pub(crate) fn is_batched(&self, name: &str, leading: &[i64]) -> Result<bool, Error> {
        if leading.iter().all(|&d| d == 1) && (leading.len() != self.dims.len() || self.count != 1)
        {
            return Ok(false);
        }
        if leading == self.dims {
            return Ok(!leading.is_empty());
        }
        Err(Error::Value(format!(
            "{name}: batch dims {leading:?} do not match {:?}",
            self.dims
        )))
    }
}

/// `s` cut into `parts` equal slices (each empty when `s` is).
pub(crate) fn parts_mut<'s, T>(
    name: &str,
    s: &'s mut [T],
    parts: usize,
) -> Result<Vec<&'s mut [T]>, Error> {
    let step = per_element(name, s.len(), parts)?;
    if step == 0 {
        return Ok((0..parts).map(|_| <&mut [T]>::default()).collect());
    }
    Ok(s.chunks_exact_mut(step).collect())
}

/// As [`parts_mut`] for an optional output: `parts` Nones without one.
pub(crate) fn opt_parts_mut<'s, T>(
    name: &str,
    s: Option<&'s mut [T]>,
    parts: usize,
) -> Result<Vec<Option<&'s mut [T]>>, Error> {
    match s {
        Some(s) => Ok(parts_mut(name, s, parts)?.into_iter().map(Some).collect()),
        None => Ok((0..parts).map(|_| None).collect()),
    }
}

fn per_element(name: &str, len: usize, count: usize) -> Result<usize, Error> {
    if count == 0 {
        return Ok(0);
    }
    if len % count != 0 {
        return Err(Error::Value(format!(
            "{name}: {len} values do not split into {count} batch elements"
        )));
    }
    Ok(len / count)
}

/// An operand viewed per batch element: the same slice for each (shared) or the b-th of
/// `count` equal parts.
pub(crate) struct PerBatch<'a, T> {
    data: &'a [T],
    step: usize,
}

// Copy for any T: only a slice reference is copied (derive would ask T: Copy).
impl<T> Clone for PerBatch<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for PerBatch<'_, T> {}

impl<'a, T> PerBatch<'a, T> {
    /// Whether every batch element sees the same slice.
    pub(crate) fn is_shared(&self) -> bool {
        self.step == 0
    }

    /// The slice of batch element `b`.
    pub(crate) fn at(&self, b: usize) -> &'a [T] {
        if self.step == 0 {
            self.data
        } else {
            &self.data[b * self.step..(b + 1) * self.step]
        }
    }
}

impl<'a> Buffer<'a> {
    /// This operand of base rank `base_rank` per element of `batch` (shared where it has no
    /// batch dims).
    pub(crate) fn per_batch<T: Element>(
        &self,
        batch: &Batch<'_>,
        base_rank: usize,
    ) -> Result<PerBatch<'a, T>, Error> {
        let data = self.slice::<T>()?;
        let batched = batch.is_batched(self.name(), self.leading(base_rank)?)?;
        let step = if batched {
            per_element(self.name(), data.len(), batch.count)?
        } else {
            0
        };
        Ok(PerBatch { data, step })
    }

    /// As [`per_batch`](Self::per_batch), None for an absent (empty) optional operand.
    pub(crate) fn per_batch_opt<T: Element>(
        &self,
        batch: &Batch<'_>,
        base_rank: usize,
    ) -> Result<Option<PerBatch<'a, T>>, Error> {
        if self.len() == 0 {
            return Ok(None);
        }
        self.per_batch(batch, base_rank).map(Some)
    }
}

impl<'a, T> PerBatch<'a, T> {
    /// `data` for every batch element.
    pub(crate) fn shared(data: &'a [T]) -> Self {
        PerBatch { data, step: 0 }
    }

    /// `data` cut into `parts` equal slices (one part: the whole slice).
    pub(crate) fn parts(name: &str, data: &'a [T], parts: usize) -> Result<Self, Error> {
        let step = per_element(name, data.len(), parts)?;
        Ok(PerBatch { data, step })
    }
}
