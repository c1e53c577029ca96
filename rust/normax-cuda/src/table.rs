//! The kernel table: every kernel the host launches, named once. A launch looks its kernel up by
//! [`KernelKey`] (op, dtype, variant) in the device's table, an array indexed by op and dtype;
//! no kernel name is formatted or hashed on the launch path (only at the first lookup, which
//! loads the function from its module).
//!
//! Adding a kernel: one line in [`kernels!`] below (the op's Rust name, its module, the name
//! before `_<dtype>_<variant>` in the .cu file, and its instantiations, which the cubin test of
//! launch.rs checks), then `RowLaunch::run(Op::Name, ..)` or `d.kernel(KernelKey::new(..))`.

use crate::DType;

/// Which instantiation of a kernel template: `<op>_<dtype>`, `<op>_<dtype>_v<V>` (V elements
/// per load) or `<op>_<dtype>_p<P>` (a cached kernel holding P packs per thread).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Variant {
    Plain,
    Vec(usize),
    Packs(usize),
}

/// The instantiations an op's kernel template has in its module (checked against the cubins by
/// launch.rs's tests).
#[cfg(test)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Forms {
    /// `<op>` alone: no dtype (e.g. the float32 `sum_parts`).
    Untyped,
    /// `<op>_<dtype>`.
    Plain,
    /// `<op>_<dtype>_v1` and `<op>_<dtype>_v<16 bytes>`.
    Vec,
    /// `<op>_<dtype>_p<P>` for every power of two P the cached plans can ask for.
    Packs,
    /// Those listed by the cubin test of launch.rs (the norms' `norms::kernel_names`, which pick
    /// `_p<P>` or `_v<V>` from the row length; the softmax backward's and the cross-entropy's
    /// cached kernels, half as many packs).
    Listed,
}

macro_rules! kernels {
    ($($op:ident: $module:literal $name:literal $forms:ident,)*) => {
        /// A kernel of the table (see the module docs to add one).
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub(crate) enum Op {
            $($op,)*
        }

        impl Op {
            #[cfg(test)]
            pub(crate) const ALL: &[Op] = &[$(Op::$op,)*];
            const COUNT: usize = [$(Op::$op,)*].len();

            /// The module (kernels/<module>.cu) that defines it.
            pub(crate) fn module(self) -> &'static str {
                match self {
                    $(Op::$op => $module,)*
                }
            }

            /// Its name in the module, before the `_<dtype>_<variant>` suffix.
            pub(crate) fn name(self) -> &'static str {
                match self {
                    $(Op::$op => $name,)*
                }
            }

            #[cfg(test)]
            pub(crate) fn forms(self) -> Forms {
                match self {
                    $(Op::$op => Forms::$forms,)*
                }
            }
        }
    };
}

kernels! {
    MaxSumPart: "softmax" "max_sum_part" Vec,
    Softmax: "softmax" "softmax" Vec,
    SoftmaxCached: "softmax" "softmax_cached" Packs,
    DotPart: "softmax" "dot_part" Vec,
    SoftmaxBackward: "softmax" "softmax_backward" Vec,
    SoftmaxBackwardCached: "softmax" "softmax_backward_cached" Listed,
    Logsumexp: "softmax" "logsumexp" Plain,
    Stablemax: "stablemax" "stablemax" Vec,
    CePart: "cross_entropy" "ce_part" Vec,
    CrossEntropy: "cross_entropy" "cross_entropy" Vec,
    CeCached: "cross_entropy" "ce_cached" Listed,
    CrossEntropyStats: "cross_entropy" "cross_entropy_stats" Vec,
    CeCachedStats: "cross_entropy" "ce_cached_stats" Listed,
    CeVocabParallelStats: "cross_entropy" "ce_vocab_parallel_stats" Vec,
    CeVocabParallelBackward: "cross_entropy" "ce_vocab_parallel_backward" Vec,
    CeForward: "cross_entropy" "ce_forward" Vec,
    CeForwardSmooth: "cross_entropy" "ce_forward_smooth" Vec,
    CeBackward: "cross_entropy" "ce_backward" Vec,
    CeBackwardSmooth: "cross_entropy" "ce_backward_smooth" Vec,
    WidenIds: "cross_entropy" "widen_ids" Untyped,
    LogprobsForward: "logprobs" "logprobs_forward" Vec,
    LogprobsBackward: "logprobs" "logprobs_backward" Vec,
    NormForward: "norms" "norm_forward" Listed,
    NormForwardWx: "norms" "norm_forward_wx" Listed,
    NormBackward: "norms" "norm_backward" Listed,
    NormBackwardWx: "norms" "norm_backward_wx" Listed,
    NormParamReduce: "norms" "norm_param_reduce" Listed,
    PowerScale: "power_norm" "power_scale" Vec,
    PowerForward: "power_norm" "power_forward" Plain,
    PowerBackward: "power_norm" "power_backward" Vec,
    PowerParamPart: "power_norm" "power_param_part" Plain,
    PowerSumParts: "power_norm" "power_sum_parts" Untyped,
    PowerWidenMask: "power_norm" "power_widen_mask" Untyped,
}

/// One kernel instantiation: the op, its element type (None for the untyped kernels) and the
/// variant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct KernelKey {
    pub(crate) op: Op,
    pub(crate) dtype: Option<DType>,
    pub(crate) variant: Variant,
}

impl KernelKey {
    pub(crate) fn new(op: Op, dtype: DType, variant: Variant) -> KernelKey {
        KernelKey {
            op,
            dtype: Some(dtype),
            variant,
        }
    }

    /// A kernel with no dtype in its name (`power_sum_parts`).
    pub(crate) fn untyped(op: Op) -> KernelKey {
        KernelKey {
            op,
            dtype: None,
            variant: Variant::Plain,
        }
    }

    /// The kernel's name in its module, e.g. `softmax_bf16_v8`.
    pub(crate) fn name(&self) -> String {
        let op = self.op.name();
        let Some(dtype) = self.dtype else {
            return op.to_string();
        };
        let t = dtype.kernel_name();
        match self.variant {
            Variant::Plain => format!("{op}_{t}"),
            Variant::Vec(v) => format!("{op}_{t}_v{v}"),
            Variant::Packs(p) => format!("{op}_{t}_p{p}"),
        }
    }

    /// The key's row of the table: one per (op, dtype), the variants found in it by a scan.
    fn slot(&self) -> usize {
        let dtype = match self.dtype {
            Some(DType::F32) => 0,
            Some(DType::F16) => 1,
            Some(DType::BF16) => 2,
            None => 3,
        };
        self.op as usize * 4 + dtype
    }
}

/// Functions (of type `F`: a device's loaded handles) by [`KernelKey`].
pub(crate) struct Table<F> {
    rows: Vec<Vec<(Variant, F)>>,
}

impl<F: Copy> Table<F> {
    pub(crate) fn new() -> Self {
        Table {
            rows: (0..Op::COUNT * 4).map(|_| Vec::new()).collect(),
        }
    }

    pub(crate) fn get(&self, key: KernelKey) -> Option<F> {
        let row = &self.rows[key.slot()];
        row.iter().find(|(v, _)| *v == key.variant).map(|&(_, f)| f)
    }

    pub(crate) fn insert(&mut self, key: KernelKey, f: F) {
        self.rows[key.slot()].push((key.variant, f));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_kernels_convention() {
        let key = KernelKey::new(Op::Softmax, DType::BF16, Variant::Vec(8));
        assert_eq!(key.name(), "softmax_bf16_v8");
        let key = KernelKey::new(Op::CeCached, DType::F32, Variant::Packs(4));
        assert_eq!(key.name(), "ce_cached_f32_p4");
        let key = KernelKey::new(Op::Logsumexp, DType::F16, Variant::Plain);
        assert_eq!(key.name(), "logsumexp_f16");
        assert_eq!(
            KernelKey::untyped(Op::PowerSumParts).name(),
            "power_sum_parts"
        );
    }

    #[test]
    fn every_key_has_its_own_entry() {
        let mut table = Table::new();
        let mut keys = vec![];
        for (i, &op) in Op::ALL.iter().enumerate() {
            keys.push(KernelKey::untyped(op));
            for dtype in [DType::F32, DType::F16, DType::BF16] {
                for variant in [
                    Variant::Plain,
                    Variant::Vec(1),
                    Variant::Vec(8),
                    Variant::Packs(2),
                ] {
                    keys.push(KernelKey::new(op, dtype, variant));
                }
            }
            assert_eq!(op as usize, i);
        }
        for (i, &key) in keys.iter().enumerate() {
            assert_eq!(table.get(key), None);
            table.insert(key, i);
        }
        for (i, &key) in keys.iter().enumerate() {
            assert_eq!(table.get(key), Some(i), "{key:?}");
        }
    }
}
