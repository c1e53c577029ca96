//! The CUDA entry points: DLPack capsules in, kernels enqueued on the caller's stream, nothing
//! returned (outputs are caller-allocated capsules too). Every capsule is checked here (device,
//! dtype, element count, contiguity) before its address reaches a kernel, so a Python-side
//! mistake is a ValueError, never an out-of-bounds access on the device.
//!
//! One file per op family, as in normax-cuda; this one holds what they share: the capsule
//! checks, the call's device and stream ([`Call`]), and the module-wide functions.

mod cross_entropy;
mod norms;
mod power_norm;
mod softmax;
mod stablemax;

use crate::errors::to_py;
use normax_cuda::{self as cu, Buf, DType, Indices, Stream};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

// DLPack's C structs (dlpack.h, the unversioned `dltensor` capsule).
#[repr(C)]
struct DlDevice {
    device_type: i32,
    device_id: i32,
}
#[repr(C)]
struct DlDataType {
    code: u8,
    bits: u8,
    lanes: u16,
}
#[repr(C)]
struct DlTensor {
    data: *mut std::ffi::c_void,
    device: DlDevice,
    ndim: i32,
    dtype: DlDataType,
    shape: *const i64,
    strides: *const i64,
    byte_offset: u64,
}

const DL_CUDA: i32 = 2;
const DL_CUDA_MANAGED: i32 = 13;

/// What a capsule holds: floats for the kernels, or int64 class indices.
enum Capsule {
    Floats(Buf),
    Indices(Indices),
}

/// The contiguous DLPack tensor `obj` on CUDA device `device`.
fn dlpack(obj: &Bound<'_, PyAny>, name: &str, device: i32) -> PyResult<Capsule> {
    let capsule_name = c"dltensor";
    // Safety: PyCapsule_IsValid/GetPointer only inspect the object; the tensor it points at is
    // owned by the capsule, which `obj` keeps alive for this call.
    let t = unsafe {
        if ffi::PyCapsule_IsValid(obj.as_ptr(), capsule_name.as_ptr()) != 1 {
            return Err(PyTypeError::new_err(format!(
                "{name}: expected a DLPack capsule (from __dlpack__())"
            )));
        }
        let managed = ffi::PyCapsule_GetPointer(obj.as_ptr(), capsule_name.as_ptr());
        if managed.is_null() {
            return Err(PyErr::fetch(obj.py()));
        }
        // DLManagedTensor starts with its DLTensor.
        &*(managed as *const DlTensor)
    };
    if t.device.device_type != DL_CUDA && t.device.device_type != DL_CUDA_MANAGED {
        return Err(PyValueError::new_err(format!(
            "{name}: not a CUDA array (DLPack device type {})",
            t.device.device_type
        )));
    }
    if t.device.device_id != device {
        return Err(PyValueError::new_err(format!(
            "{name}: is on cuda:{}, the other arrays on cuda:{device}",
            t.device.device_id
        )));
    }
    let dtype = match (t.dtype.code, t.dtype.bits, t.dtype.lanes) {
        (2, 32, 1) => Some(DType::F32),
        (2, 16, 1) => Some(DType::F16),
        (4, 16, 1) => Some(DType::BF16),
        (0, 64, 1) => None,
        (c, b, l) => {
            return Err(PyTypeError::new_err(format!(
                "{name}: unsupported element type (DLPack code {c}, {b} bits, {l} lanes); the CUDA \
                 kernels take float32, float16 and bfloat16 (and int64 class indices)"
            )))
        }
    };
    let ndim =
        usize::try_from(t.ndim).map_err(|_| PyValueError::new_err(format!("{name}: bad ndim")))?;
    let (shape, strides) = if ndim == 0 {
        (&[][..], None)
    } else {
        // Safety: DLPack guarantees `shape` (and `strides` when not null) hold ndim entries.
        unsafe {
            (
                std::slice::from_raw_parts(t.shape, ndim),
                (!t.strides.is_null()).then(|| std::slice::from_raw_parts(t.strides, ndim)),
            )
        }
    };
    let mut len = 1usize;
    for &d in shape {
        let d = usize::try_from(d)
            .map_err(|_| PyValueError::new_err(format!("{name}: negative shape")))?;
        len = len
            .checked_mul(d)
            .ok_or_else(|| PyValueError::new_err(format!("{name}: too many elements")))?;
    }
    if let (Some(strides), true) = (strides, len > 0) {
        // C-contiguous: each stride is the product of the later extents (size-1 axes are free,
        // and so is every stride of an empty array, as torch and NumPy treat them).
        let mut expect = 1i64;
        for (&d, &s) in shape.iter().zip(strides).rev() {
            if d != 1 && s != expect {
                return Err(PyValueError::new_err(format!(
                    "{name}: must be C-contiguous (strides {strides:?} for shape {shape:?})"
                )));
            }
            expect = expect.saturating_mul(d);
        }
    }
    let ptr = (t.data as u64).wrapping_add(t.byte_offset);
    Ok(match dtype {
        Some(dtype) => Capsule::Floats(Buf { ptr, dtype, len }),
        None => Capsule::Indices(Indices { ptr, len }),
    })
}

/// The caller's device and current stream (a raw CUstream handle): where every capsule of a
/// call must live and where its kernels are enqueued.
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

/// One binding call: the device every capsule must be on and the stream the kernels go to.
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

    fn capsule(&self, obj: &Bound<'_, PyAny>, name: &str) -> PyResult<Capsule> {
        dlpack(obj, name, self.stream.device)
    }

    /// A floating-point capsule's buffer.
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

#[pyfunction]
fn cuda_device_name(py: Python<'_>, device: i32) -> PyResult<String> {
    py.detach(move || cu::device_name(device)).map_err(to_py)
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<CudaStream>()?;
    m.add_function(wrap_pyfunction!(cuda_compile_all, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_compile_cubin, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_nvrtc_version, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_device_name, m)?)?;
    softmax::register(m)?;
    stablemax::register(m)?;
    cross_entropy::register(m)?;
    norms::register(m)?;
    power_norm::register(m)
}
