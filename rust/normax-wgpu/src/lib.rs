//! normax's forward ops on a GPU through wgpu (Vulkan, Metal, DX12), in float32.
//!
//! Every op takes `rows` contiguous rows of `cols` values (`x.len() == rows * cols`) and works on
//! each row alone, one workgroup per row (WGSL kernels in `src/shaders`). The device is created on
//! first use: the first adapter wgpu offers (a GPU before a software one such as Mesa's lavapipe).
//! Nothing here panics: a missing adapter, an input too large for the device, or a lost device
//! are [`Error`]s. Inputs larger than the device's buffer or dispatch limits run in chunks of rows.
//!
//! Semantics are normax-core's (`softmax`, `log_softmax`, `logsumexp`, `rms_norm`, `layer_norm`,
//! `cross_entropy`), including NaN, infinities and ignored rows; the arithmetic is float32 with
//! max-subtracted exponentials, so results agree with the CPU kernels to float32 rounding (a few
//! ULP, more where the GPU's `exp` and `log` are less accurate), not bit for bit. Options, checks
//! and errors are normax-core's [`spec`](normax_core::spec), as on every backend; no adapter is
//! [`Error::NoDevice`].
//!
//! One file per op family, mirroring `src/shaders`: `softmax.rs`, `norms.rs`, `cross_entropy.rs`;
//! `device.rs` holds the device and the one routine that runs a kernel over rows.

mod cross_entropy;
mod device;
mod norms;
mod softmax;

pub use cross_entropy::{cross_entropy, LossAndGrad};
pub use norms::{layer_norm, rms_norm};
pub use softmax::{log_softmax, logsumexp, softmax};

pub use normax_core::spec::{CeOptions, Error, GradOutput, Reduction};

use device::gpu;

/// The adapter in use ("name (backend, device type)"), creating the device on first call; an
/// [`Error::NoDevice`] when there is none.
pub fn adapter_info() -> Result<String, Error> {
    guarded(|| gpu().map(|g| g.describe()))
}

/// Test hook: at most `rows` rows per chunk (0 restores the device's limits), so that small
/// inputs exercise the chunked path.
#[doc(hidden)]
pub fn set_chunk_rows_limit(rows: usize) {
    device::set_chunk_rows_limit(rows);
}

/// Runs `f`, turning a panic inside wgpu (a driver bug, say) into an error.
fn guarded<R>(f: impl FnOnce() -> Result<R, Error>) -> Result<R, Error> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|p| {
        Err(Error::Device(format!(
            "wgpu panicked: {}",
            device::panic_text(&p)
        )))
    })
}

/// A size as the kernels' u32.
fn dim(name: &str, v: usize) -> Result<u32, Error> {
    u32::try_from(v).map_err(|_| Error::Value(format!("{name}: {v} is too large for the GPU")))
}
