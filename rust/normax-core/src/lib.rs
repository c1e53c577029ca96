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
pub mod spec;
pub mod threads;

pub use driver::Layout;
pub use float::Float;
pub use isa::Isa;

pub use spec::Error;
