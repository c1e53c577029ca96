//! normax-core: SIMD softmax / log-sum-exp kernels with rayon parallelism. No Python here.
//!
//! Layout: `float` (element types), `simd` (one vector trait, one file per ISA), `isa` (run-time
//! dispatch), `lse` (the sum-of-exponentials machinery), `driver` (rows, axes, threads) and one
//! module per op family.

pub mod cross_entropy;
pub mod driver;
pub mod float;
pub mod isa;
pub mod lse;
pub mod norms;
mod rows;
pub mod simd;
pub mod softmax;
pub mod threads;

pub use driver::Layout;
pub use float::Float;
pub use isa::Isa;

/// Errors the kernels report; the bindings map each to a Python exception.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// A bad value or shape (Python ValueError).
    Value(String),
    /// An index out of range (Python IndexError).
    Index(String),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Value(m) | Error::Index(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for Error {}
