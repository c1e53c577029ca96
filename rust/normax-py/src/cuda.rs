//! The CUDA entry points: DLPack capsules in, kernels enqueued on the caller's stream, nothing
//! returned (outputs are caller-allocated capsules too). Every capsule is checked here (device,
//! dtype, element count, contiguity) before its address reaches a kernel, so a Python-side
//! mistake is a ValueError, never an out-of-bounds access on the device.

use normax_cuda::{self as cu, Buf, CeOptions, DType, Norm, Stream, Target};
use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;

fn to_py(e: cu::Error) -> PyErr {
    match e {
        cu::Error::Value(m) => PyValueError::new_err(m),
        cu::Error::Unavailable(m) | cu::Error::Cuda(m) => PyRuntimeError::new_err(m),
    }
}

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

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Elem {
    Float(DType),
    I64,
}

/// (address, element type, element count) of a contiguous DLPack tensor on CUDA device `device`.
fn dlpack(obj: &Bound<'_, PyAny>, name: &str, device: i32) -> PyResult<(u64, Elem, usize)> {
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
    let elem = match (t.dtype.code, t.dtype.bits, t.dtype.lanes) {
        (2, 32, 1) => Elem::Float(DType::F32),
        (2, 16, 1) => Elem::Float(DType::F16),
        (4, 16, 1) => Elem::Float(DType::BF16),
        (0, 64, 1) => Elem::I64,
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
    if let Some(strides) = strides {
        // C-contiguous: each stride is the product of the later extents (size-1 axes are free).
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
    Ok((ptr, elem, len))
}

fn float_buf(obj: &Bound<'_, PyAny>, name: &str, device: i32) -> PyResult<Buf> {
    match dlpack(obj, name, device)? {
        (ptr, Elem::Float(dtype), len) => Ok(Buf { ptr, dtype, len }),
        _ => Err(PyTypeError::new_err(format!(
            "{name}: expected a floating-point array"
        ))),
    }
}

fn opt_buf(obj: Option<&Bound<'_, PyAny>>, name: &str, device: i32) -> PyResult<Option<Buf>> {
    obj.map(|o| float_buf(o, name, device)).transpose()
}

fn stream(device: i32, handle: u64) -> Stream {
    Stream { device, handle }
}

/// Enqueues without the GIL (the first call on a device compiles kernels: about a second).
fn run(py: Python<'_>, f: impl FnOnce() -> cu::Result<()> + Send) -> PyResult<()> {
    py.detach(f).map_err(to_py)
}

#[pyfunction]
fn cuda_compile_all(py: Python<'_>, arch: &str) -> PyResult<Vec<(String, usize)>> {
    let arch = arch.to_string();
    py.detach(move || cu::compile_all(&arch))
        .map(|v| v.into_iter().map(|(m, n)| (m.to_string(), n)).collect())
        .map_err(to_py)
}

#[pyfunction]
fn cuda_nvrtc_version() -> PyResult<(i32, i32)> {
    cu::nvrtc_version().map_err(to_py)
}

#[pyfunction]
fn cuda_device_name(py: Python<'_>, device: i32) -> PyResult<String> {
    py.detach(move || cu::device_name(device)).map_err(to_py)
}

#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn cuda_softmax(
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    rows: usize,
    cols: usize,
    log: bool,
    device: i32,
    stream_handle: u64,
) -> PyResult<()> {
    let (x, y) = (float_buf(x, "x", device)?, float_buf(out, "out", device)?);
    run(py, || {
        cu::softmax(stream(device, stream_handle), x, y, rows, cols, log)
    })
}

#[pyfunction]
fn cuda_logsumexp(
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    rows: usize,
    cols: usize,
    device: i32,
    stream_handle: u64,
) -> PyResult<()> {
    let (x, o) = (float_buf(x, "x", device)?, float_buf(out, "out", device)?);
    run(py, || {
        cu::logsumexp(stream(device, stream_handle), x, o, rows, cols)
    })
}

#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn cuda_softmax_backward(
    py: Python<'_>,
    y: &Bound<'_, PyAny>,
    dy: &Bound<'_, PyAny>,
    dx: &Bound<'_, PyAny>,
    rows: usize,
    cols: usize,
    log: bool,
    device: i32,
    stream_handle: u64,
) -> PyResult<()> {
    let y = float_buf(y, "y", device)?;
    let dy = float_buf(dy, "dy", device)?;
    let dx = float_buf(dx, "dx", device)?;
    run(py, || {
        cu::softmax_backward(stream(device, stream_handle), y, dy, dx, rows, cols, log)
    })
}

#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (logits, target, weight, loss_rows, grad, scale, scale_stride, rows, cols, ignore_index, label_smoothing, z_loss, softcap, device, stream_handle))]
fn cuda_cross_entropy(
    py: Python<'_>,
    logits: &Bound<'_, PyAny>,
    target: &Bound<'_, PyAny>,
    weight: Option<&Bound<'_, PyAny>>,
    loss_rows: &Bound<'_, PyAny>,
    grad: Option<&Bound<'_, PyAny>>,
    scale: Option<&Bound<'_, PyAny>>,
    scale_stride: usize,
    rows: usize,
    cols: usize,
    ignore_index: i64,
    label_smoothing: f32,
    z_loss: f32,
    softcap: f32,
    device: i32,
    stream_handle: u64,
) -> PyResult<()> {
    let x = float_buf(logits, "logits", device)?;
    let target = match dlpack(target, "target", device)? {
        (ptr, Elem::I64, len) => Target::Classes { ptr, len },
        (ptr, Elem::Float(dtype), len) => Target::Probs(Buf { ptr, dtype, len }),
    };
    let weight = opt_buf(weight, "weight", device)?;
    let loss = float_buf(loss_rows, "loss", device)?;
    let grad = match (
        opt_buf(grad, "grad", device)?,
        opt_buf(scale, "grad_output", device)?,
    ) {
        (Some(g), Some(s)) => Some((g, s, scale_stride)),
        (None, _) => None,
        (Some(_), None) => return Err(PyValueError::new_err("grad_output: needed with grad")),
    };
    let opts = CeOptions {
        ignore_index,
        label_smoothing,
        z_loss,
        softcap,
    };
    run(py, || {
        cu::cross_entropy(
            stream(device, stream_handle),
            x,
            target,
            weight,
            opts,
            loss,
            grad,
            rows,
            cols,
        )
    })
}

fn norm_kind(kind: &str) -> PyResult<Norm> {
    match kind {
        "rms" => Ok(Norm::Rms),
        "crms" => Ok(Norm::Crms),
        "layer" => Ok(Norm::Layer),
        _ => Err(PyValueError::new_err(format!(
            "kind: unknown norm {kind:?}"
        ))),
    }
}

#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (kind, x, weight, bias, out, mean, rstd, rows, cols, eps, device, stream_handle))]
fn cuda_norm_forward(
    py: Python<'_>,
    kind: &str,
    x: &Bound<'_, PyAny>,
    weight: Option<&Bound<'_, PyAny>>,
    bias: Option<&Bound<'_, PyAny>>,
    out: Option<&Bound<'_, PyAny>>,
    mean: Option<&Bound<'_, PyAny>>,
    rstd: Option<&Bound<'_, PyAny>>,
    rows: usize,
    cols: usize,
    eps: f32,
    device: i32,
    stream_handle: u64,
) -> PyResult<()> {
    let kind = norm_kind(kind)?;
    let x = float_buf(x, "x", device)?;
    let weight = opt_buf(weight, "weight", device)?;
    let bias = opt_buf(bias, "bias", device)?;
    let out = opt_buf(out, "out", device)?;
    let mean = opt_buf(mean, "mean", device)?;
    let rstd = opt_buf(rstd, "rstd", device)?;
    run(py, || {
        cu::norm_forward(
            stream(device, stream_handle),
            kind,
            x,
            weight,
            bias,
            out,
            mean,
            rstd,
            rows,
            cols,
            eps,
        )
    })
}

#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (kind, dy, x, weight, mean, rstd, dx, dweight, dbias, rows, cols, device, stream_handle))]
fn cuda_norm_backward(
    py: Python<'_>,
    kind: &str,
    dy: &Bound<'_, PyAny>,
    x: &Bound<'_, PyAny>,
    weight: Option<&Bound<'_, PyAny>>,
    mean: Option<&Bound<'_, PyAny>>,
    rstd: &Bound<'_, PyAny>,
    dx: &Bound<'_, PyAny>,
    dweight: Option<&Bound<'_, PyAny>>,
    dbias: Option<&Bound<'_, PyAny>>,
    rows: usize,
    cols: usize,
    device: i32,
    stream_handle: u64,
) -> PyResult<()> {
    let kind = norm_kind(kind)?;
    let dy = float_buf(dy, "dy", device)?;
    let x = float_buf(x, "x", device)?;
    let weight = opt_buf(weight, "weight", device)?;
    let mean = opt_buf(mean, "mean", device)?;
    let rstd = float_buf(rstd, "rstd", device)?;
    let dx = float_buf(dx, "dx", device)?;
    let dweight = opt_buf(dweight, "dweight", device)?;
    let dbias = opt_buf(dbias, "dbias", device)?;
    run(py, || {
        cu::norm_backward(
            stream(device, stream_handle),
            kind,
            dy,
            x,
            weight,
            mean,
            rstd,
            dx,
            dweight,
            dbias,
            rows,
            cols,
        )
    })
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(cuda_compile_all, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_nvrtc_version, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_device_name, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_softmax, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_logsumexp, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_softmax_backward, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_cross_entropy, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_norm_forward, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_norm_backward, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_power_norm_forward, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_power_norm_backward, m)?)?;
    Ok(())
}

// PowerNorm: x is (tokens, channels); the per-channel factors and sums are float32 device arrays.

fn power_shape(tokens: usize, channels: usize, groups: usize) -> cu::PowerShape {
    cu::PowerShape {
        tokens,
        channels,
        groups,
    }
}

#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (x, tokens, channels, groups, eps, pad, sumsq, scale, shift, y, device, stream_handle))]
fn cuda_power_norm_forward(
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    tokens: usize,
    channels: usize,
    groups: usize,
    eps: f32,
    pad: Option<&Bound<'_, PyAny>>,
    sumsq: Option<&Bound<'_, PyAny>>,
    scale: Option<&Bound<'_, PyAny>>,
    shift: Option<&Bound<'_, PyAny>>,
    y: Option<&Bound<'_, PyAny>>,
    device: i32,
    stream_handle: u64,
) -> PyResult<()> {
    let x = float_buf(x, "x", device)?;
    let pad = opt_buf(pad, "pad_mask", device)?;
    let sumsq = opt_buf(sumsq, "sumsq", device)?;
    let out = match (
        opt_buf(scale, "scale", device)?,
        opt_buf(shift, "shift", device)?,
        opt_buf(y, "y", device)?,
    ) {
        (Some(scale), Some(shift), Some(y)) => Some(cu::PowerOut { scale, shift, y }),
        (None, None, None) => None,
        _ => {
            return Err(PyValueError::new_err(
                "y: scale, shift and y are given together or not at all",
            ))
        }
    };
    let shape = power_shape(tokens, channels, groups);
    run(py, || {
        cu::power_norm_forward(
            stream(device, stream_handle),
            x,
            shape,
            eps,
            pad,
            sumsq,
            out,
        )
    })
}

#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (dy, x, tokens, channels, groups, eps, weight, zscale, ema, dscale, dx, sums, device, stream_handle))]
fn cuda_power_norm_backward(
    py: Python<'_>,
    dy: &Bound<'_, PyAny>,
    x: &Bound<'_, PyAny>,
    tokens: usize,
    channels: usize,
    groups: usize,
    eps: f32,
    weight: Option<&Bound<'_, PyAny>>,
    zscale: &Bound<'_, PyAny>,
    ema: &Bound<'_, PyAny>,
    dscale: &Bound<'_, PyAny>,
    dx: &Bound<'_, PyAny>,
    sums: &Bound<'_, PyAny>,
    device: i32,
    stream_handle: u64,
) -> PyResult<()> {
    let dy = float_buf(dy, "dy", device)?;
    let x = float_buf(x, "x", device)?;
    let grad = cu::PowerGradIn {
        weight: opt_buf(weight, "weight", device)?,
        zscale: float_buf(zscale, "zscale", device)?,
        ema: float_buf(ema, "ema", device)?,
        dscale: float_buf(dscale, "dscale", device)?,
    };
    let dx = float_buf(dx, "dx", device)?;
    let sums = float_buf(sums, "sums", device)?;
    let shape = power_shape(tokens, channels, groups);
    run(py, || {
        cu::power_norm_backward(
            stream(device, stream_handle),
            dy,
            x,
            shape,
            eps,
            grad,
            dx,
            sums,
        )
    })
}
