//! normax's CUDA backend: the kernels are CUDA C strings compiled at first use by NVRTC for the
//! device they run on (one module per op family, cached per device) and launched through the
//! driver API on the caller's stream. Both libraries are loaded at run time, so this crate builds
//! and its users run on machines with no CUDA at all; every entry point then returns
//! [`Error::Unavailable`].
//!
//! The caller owns all memory: inputs and outputs arrive as device addresses ([`Buf`], from
//! DLPack in the Python bindings). The only allocations here are small stream-ordered scratch
//! buffers for the partial results of rows split across blocks.

mod compile;
mod device;
mod ops;
mod power_norm;

pub use compile::{compile_all, nvrtc_version, MODULES};
pub use device::device_name;
pub use ops::*;
pub use power_norm::*;

use std::fmt;

#[derive(Debug, Clone, PartialEq)]
pub enum Error {
    /// No CUDA driver or NVRTC library could be loaded (or no device): the backend is unusable.
    Unavailable(String),
    /// Bad arguments (sizes, dtypes): the caller's bug, reported before anything runs.
    Value(String),
    /// A CUDA or NVRTC call failed.
    Cuda(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Unavailable(m) | Error::Value(m) | Error::Cuda(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for Error {}

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

/// Where the work runs: a device ordinal and a `CUstream` of that device (0: the legacy default).
#[derive(Clone, Copy, Debug)]
pub struct Stream {
    pub device: i32,
    pub handle: u64,
}
