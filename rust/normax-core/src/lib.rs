//! normax-core: SIMD softmax, cross-entropy and normalization kernels with rayon parallelism. No
//! Python here.
//!
//! Layout: `spec` (the option types, checks and error every backend shares), `float` (element
//! types), `simd` (one vector trait, one file per ISA), `isa` (run-time dispatch), `rows` (loops
//! over one row), `sum` (short sums folded into f64), `lse` (the sum-of-exponentials machinery),
//! `driver` (rows, axes, threads), `gemm` (matrix products) and one module per op family:
//! `softmax`, `cross_entropy`, `logprobs`, `norms`, `stablemax`.

pub mod cross_entropy;
pub mod driver;
pub mod float;
mod gemm;
pub mod isa;
pub mod logprobs;
pub mod lse;
pub mod norms;
mod rows;
pub mod simd;
pub mod softmax;
pub mod spec;
pub mod stablemax;
mod sum;
pub mod threads;

pub use driver::Layout;
pub use float::Float;
pub use isa::Isa;

pub use spec::Error;
