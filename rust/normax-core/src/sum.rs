//! Sums of per-element terms kept short in `Elem` and folded into f64: the fold interval of the
//! accurate sums and Neumaier's compensated f64 sum they fold into. Shared by `lse` (sums of
//! exponentials) and `rows` (dot products, column sums).

use crate::float::Float;
use crate::simd::Vector;

/// Steps an accumulator in `Elem` takes (one vector per step; the loops unroll four) before it is
/// folded into f64, where a sum must stay within a few ULP: each element passes through at most
/// this many `Elem` roundings, without summing in f64 per element.
pub(crate) const SHORT_FOLD: usize = 16;

/// A sum with Neumaier's compensation: the folded partial sums of a long row add up without the
/// error growing with their count (it matters for f64 rows, whose partials are already f64).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct CompensatedSum {
    sum: f64,
    compensation: f64,
}

impl CompensatedSum {
    #[inline(always)]
    pub(crate) fn add(&mut self, v: f64) {
        let t = self.sum + v;
        self.compensation += if self.sum.abs() >= v.abs() {
            (self.sum - t) + v
        } else {
            (v - t) + self.sum
        };
        self.sum = t;
    }

    /// Adds every lane of the four unrolled accumulators.
    #[inline(always)]
    pub(crate) fn add_lanes<V: Vector>(&mut self, acc: &[V; 4]) {
        self.add(
            acc[0]
                .add(acc[1])
                .add(acc[2].add(acc[3]))
                .reduce_add()
                .to_f64(),
        );
    }

    #[inline(always)]
    pub(crate) fn value(self) -> f64 {
        self.sum + self.compensation
    }

    /// Times `k`, a power of two (exact unless it underflows).
    #[inline(always)]
    pub(crate) fn scale(&mut self, k: f64) {
        self.sum *= k;
        self.compensation *= k;
    }
}
