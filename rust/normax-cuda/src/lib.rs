//! normax's CUDA backend: the kernels are CUDA C strings compiled at first use by NVRTC for the
//! device they run on (one module per op family, cached per device) and launched through the
//! driver API on the caller's stream. Both libraries are loaded at run time, so this crate builds
//! and its users run on machines with no CUDA at all; every entry point then returns
//! [`Error::Unavailable`].
//!
//! The caller owns all memory: inputs and outputs arrive as device addresses ([`Buf`]; the
//! Python bindings take them as raw `(ptr, dtype, len)` tuples). The only allocations here are
//! small stream-ordered scratch buffers for the partial results of rows split across blocks.
//!
//! The files mirror `kernels/`: `softmax.rs`, `cross_entropy.rs` (with the vocabulary-parallel
//! cross-entropy's statistics and gradient, `vocab_parallel_*`), `cross_entropy_classes.rs` (the
//! two kernels of class-index targets), `logprobs.rs` (log-probabilities and entropy), `norms.rs`,
//! `power_norm.rs`,
//! `stablemax.rs` host each family's checks and kernel sequence; `launch.rs` the launch shapes
//! they share; `table.rs` the kernel table (every kernel by op, dtype and variant); `device.rs`
//! the driver calls and the dry-run recorder ([`record`]).
//! Options, checks and errors are normax-core's [`spec`](normax_core::spec), as on every backend.

mod compile;
mod cross_entropy;
mod cross_entropy_classes;
mod device;
mod launch;
mod logprobs;
mod norms;
mod power_norm;
mod softmax;
mod stablemax;
mod table;

pub use compile::{compile_all, compile_cubin, nvrtc_probes, nvrtc_version, MODULES};
pub use cross_entropy::{
    cross_entropy, vocab_parallel_backward, vocab_parallel_fields, vocab_parallel_stats, CeExtras,
    CeStatsOut, CeTarget, ShardRows,
};
pub use cross_entropy_classes::{
    ce_workspace_len, cross_entropy_backward, cross_entropy_forward, widen_class_ids, CeGrad,
    CeRows, CeSaved,
};
pub use device::{device_name, fill_f32, record, Event};
pub use launch::{column_plan, plan, ColumnPlan, Plan};
pub use logprobs::{logprobs_backward, logprobs_forward, LpGrad, LpRows, LpSaved};
pub use norms::{norm_backward, norm_forward, norm_workspace, NormParamGrads};
pub use power_norm::{
    power_norm_backward, power_norm_forward, widen_pad_mask, PowerGradIn, PowerOut, PowerShape,
};
pub use softmax::{logsumexp, softmax, softmax_backward};
pub use stablemax::stablemax;

pub use normax_core::spec::{CeOptions, Error, NormKind, Target};

pub type Result<T> = std::result::Result<T, Error>;

/// The element types of the kernels; arithmetic is float32 for all of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// The name in kernel names: `softmax_<name>_v<V>`.
    pub fn kernel_name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        }
    }
}

/// A device buffer owned by the caller: its address, element type and element count.
#[derive(Clone, Copy, Debug)]
pub struct Buf {
    pub ptr: u64,
    pub dtype: DType,
    pub len: usize,
}

impl normax_core::spec::Elements for Buf {
    fn elements(&self) -> usize {
        self.len
    }
}

/// int64 class indices on the device: the address and element count.
#[derive(Clone, Copy, Debug)]
pub struct Indices {
    pub ptr: u64,
    pub len: usize,
}

/// Where the work runs: a device ordinal and a `CUstream` of that device (0: the legacy default).
#[derive(Clone, Copy, Debug)]
pub struct Stream {
    pub device: i32,
    pub handle: u64,
}
