//! The CUDA entry points: raw device arrays in, kernels enqueued on the caller's stream, nothing
//! returned (outputs are caller-allocated raw arrays too). A raw array is the tuple
//! `(ptr, dtype, len)`: the device address of element 0 of a C-contiguous array, its dtype code
//! (0 float32, 1 float16, 2 bfloat16, 3 int64) and its element count. The Python side
//! (`normax._backends.cuda.device.run`) guarantees contiguity and the device; here each tuple's
//! form, dtype code and alignment are checked, and normax-cuda checks each length against the
//! shape, so a Python-side mistake is a TypeError or ValueError, never an out-of-bounds access on
//! the device.
//!
//! One file per op family, as in normax-cuda; this one holds what they share: the raw-array
//! checks, the call's device and stream ([`Call`]), the dry-run recorder and the module-wide
//! functions.

mod cross_entropy;
mod logprobs;
mod norms;
mod power_norm;
mod softmax;
mod stablemax;

use crate::errors::to_py;
use normax_cuda::{self as cu, Buf, DType, Indices, Stream};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyInt};

/// What a raw array holds: floats for the kernels, or int64 class indices.
enum Capsule {
    Floats(Buf),
    Indices(Indices),
}

/// The raw array `obj` = (ptr, dtype code, len).
fn raw(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<Capsule> {
    let Ok((ptr, code, len)) = obj.extract::<(u64, i64, usize)>() else {
        type Ints<'py> = (Bound<'py, PyInt>, Bound<'py, PyInt>, Bound<'py, PyInt>);
        return Err(if obj.extract::<Ints<'_>>().is_ok() {
            PyValueError::new_err(format!(
                "{name}: a raw array's address and length are non-negative and its dtype \
                 code 0 to 3, got {obj}"
            ))
        } else {
            PyTypeError::new_err(format!(
                "{name}: expected a raw device array (ptr, dtype, len) of ints, got {}",
                obj.get_type().name()?
            ))
        });
    };
    let dtype = match code {
        0 => Some(DType::F32),
        1 => Some(DType::F16),
        2 => Some(DType::BF16),
        3 => None,
        c => {
            return Err(PyTypeError::new_err(format!(
                "{name}: unknown dtype code {c}; the CUDA kernels take 0 (float32), 1 (float16), \
                 2 (bfloat16) and 3 (int64 class indices)"
            )))
        }
    };
    let size = dtype.map_or(8, DType::size) as u64;
    if ptr % size != 0 {
        return Err(PyValueError::new_err(format!(
            "{name}: address {ptr:#x} is not aligned to its {size}-byte elements"
        )));
    }
    Ok(match dtype {
        Some(dtype) => Capsule::Floats(Buf { ptr, dtype, len }),
        None => Capsule::Indices(Indices { ptr, len }),
    })
}

/// The caller's device and current stream (a raw CUstream handle): where every array of a call
/// lives and where its kernels are enqueued.
#[pyclass(frozen, eq, module = "normax._core", name = "CudaStream")]
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct CudaStream {
    #[pyo3(get)]
    device: i32,
    #[pyo3(get)]
    handle: u64,
}

#[pymethods]
impl CudaStream {
    #[new]
    fn new(device: i32, handle: u64) -> Self {
        CudaStream { device, handle }
    }

    fn __repr__(&self) -> String {
        format!(
            "CudaStream(device={}, handle={:#x})",
            self.device, self.handle
        )
    }
}

/// One binding call: the stream (and its device) the kernels go to.
#[derive(Clone, Copy)]
struct Call {
    stream: Stream,
}

impl Call {
    fn new(on: &CudaStream) -> Call {
        Call {
            stream: Stream {
                device: on.device,
                handle: on.handle,
            },
        }
    }

    /// The raw array `obj` (argument `name`), floats or class indices.
    fn capsule(&self, obj: &Bound<'_, PyAny>, name: &str) -> PyResult<Capsule> {
        raw(obj, name)
    }

    /// A floating-point raw array's buffer.
    fn buf(&self, obj: &Bound<'_, PyAny>, name: &str) -> PyResult<Buf> {
        match self.capsule(obj, name)? {
            Capsule::Floats(b) => Ok(b),
            Capsule::Indices(_) => Err(PyTypeError::new_err(format!(
                "{name}: expected a floating-point array"
            ))),
        }
    }

    fn opt(&self, obj: Option<&Bound<'_, PyAny>>, name: &str) -> PyResult<Option<Buf>> {
        obj.map(|o| self.buf(o, name)).transpose()
    }

    /// Enqueues `f` without the GIL (the first call on a device compiles kernels: about a
    /// second).
    fn run(self, py: Python<'_>, f: impl FnOnce(Stream) -> cu::Result<()> + Send) -> PyResult<()> {
        py.detach(|| f(self.stream)).map_err(to_py)
    }
}

#[pyfunction]
fn cuda_compile_all(py: Python<'_>, arch: &str) -> PyResult<Vec<(String, usize)>> {
    let arch = arch.to_string();
    py.detach(move || cu::compile_all(&arch))
        .map(|v| v.into_iter().map(|(m, n)| (m.to_string(), n)).collect())
        .map_err(to_py)
}

/// The cubin of one CUDA module (`"softmax"`, `"norms"`, ...) compiled by NVRTC for `arch`.
#[pyfunction]
fn cuda_compile_cubin<'py>(
    py: Python<'py>,
    module: &str,
    arch: &str,
) -> PyResult<Bound<'py, PyBytes>> {
    let (module, arch) = (module.to_string(), arch.to_string());
    let image = py
        .detach(move || cu::compile_cubin(&module, &arch))
        .map_err(to_py)?;
    Ok(PyBytes::new(py, &image))
}

#[pyfunction]
fn cuda_nvrtc_version() -> PyResult<(i32, i32)> {
    cu::nvrtc_version().map_err(to_py)
}

/// How many times this process has looked for the NVRTC library (it stops once found).
#[pyfunction]
fn cuda_nvrtc_probes() -> usize {
    cu::nvrtc_probes()
}

/// One recorded driver call: (event, kernel or driver call, grid, block).
type Recorded = (&'static str, String, (u64, u64, u64), (u32, u32, u32));
/// A recorded driver call with its stream and arguments: [`Recorded`], the CUstream, the kernel
/// arguments (None for argument blocks; a memset's address).
type RecordedCall = (
    &'static str,
    String,
    (u64, u64, u64),
    (u32, u32, u32),
    u64,
    Vec<Option<u64>>,
);

/// Turns this thread's dry-run recorder on or off; what it recorded since the previous call
/// (None where it was off), as [`Recorded`] tuples or, with `arguments`, [`RecordedCall`]s. See
/// normax-cuda's `record`.
#[pyfunction]
#[pyo3(signature = (on, arguments = false))]
fn cuda_record(py: Python<'_>, on: bool, arguments: bool) -> PyResult<Option<Py<PyAny>>> {
    let Some(events) = cu::record(on) else {
        return Ok(None);
    };
    let list = if arguments {
        let calls: Vec<RecordedCall> = events
            .into_iter()
            .map(|e| (e.event, e.name, e.grid, e.block, e.stream, e.args))
            .collect();
        calls.into_pyobject(py)?.into_any().unbind()
    } else {
        let calls: Vec<Recorded> = events
            .into_iter()
            .map(|e| (e.event, e.name, e.grid, e.block))
            .collect();
        calls.into_pyobject(py)?.into_any().unbind()
    };
    Ok(Some(list))
}

#[pyfunction]
fn cuda_device_name(py: Python<'_>, device: i32) -> PyResult<String> {
    py.detach(move || cu::device_name(device)).map_err(to_py)
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<CudaStream>()?;
    m.add_function(wrap_pyfunction!(cuda_compile_all, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_compile_cubin, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_nvrtc_version, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_nvrtc_probes, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_record, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_device_name, m)?)?;
    softmax::register(m)?;
    stablemax::register(m)?;
    cross_entropy::register(m)?;
    logprobs::register(m)?;
    norms::register(m)?;
    power_norm::register(m)
}
