//! The Python extension `normax._core`: converts arrays, releases the GIL, maps errors. No math.
//!
//! The Python layer (python/normax) validates user input and reshapes every call into the
//! (outer, len, inner) layout of C-contiguous, native-endian float32/float64 arrays; this module
//! re-checks what memory safety depends on (dtype, contiguity, sizes, writeability).

use normax_core::{softmax as k, threads, Error, Float, Isa, Layout};
use numpy::{Element, PyArrayDyn, PyArrayMethods, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::exceptions::{PyIndexError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;

mod cross_entropy;
#[cfg(feature = "cuda")]
mod cuda;
mod norms;
#[cfg(feature = "wgpu")]
mod wgpu;

fn to_py(e: Error) -> PyErr {
    match e {
        Error::Value(m) => PyValueError::new_err(m),
        Error::Index(m) => PyIndexError::new_err(m),
        Error::NoDevice(m) | Error::Unavailable(m) | Error::Device(m) => PyRuntimeError::new_err(m),
    }
}

fn layout(outer: usize, len: usize, inner: usize) -> Layout {
    Layout { outer, len, inner }
}

/// The array as a typed one, contiguous, or a TypeError/ValueError naming it.
fn typed<'py, T: Element>(
    a: &Bound<'py, PyUntypedArray>,
    name: &str,
) -> PyResult<Bound<'py, PyArrayDyn<T>>> {
    let a = a
        .cast::<PyArrayDyn<T>>()
        .map_err(|_| {
            PyTypeError::new_err(format!(
                "{name}: expected a {} array",
                std::any::type_name::<T>()
            ))
        })?
        .clone();
    if !a.is_c_contiguous() {
        return Err(PyValueError::new_err(format!(
            "{name}: must be C-contiguous"
        )));
    }
    Ok(a)
}

fn is_f32(a: &Bound<'_, PyUntypedArray>) -> bool {
    a.cast::<PyArrayDyn<f32>>().is_ok()
}

fn same_memory(a: &Bound<'_, PyUntypedArray>, b: &Bound<'_, PyUntypedArray>) -> bool {
    unsafe { (*a.as_array_ptr()).fields.data == (*b.as_array_ptr()).fields.data }
}

/// Runs a kernel over `elements` values, releasing the GIL unless the work is too small to be
/// worth the release and re-acquire (tiny calls are dominated by call overhead).
fn run<R: Send>(py: Python<'_>, elements: usize, kernel: impl FnOnce() -> R + Send) -> R {
    if elements < 1 << 14 {
        kernel()
    } else {
        py.detach(kernel)
    }
}

type MapFn<T> = fn(&[T], &mut [T], Layout) -> Result<(), Error>;
type MapInplaceFn<T> = fn(&mut [T], Layout) -> Result<(), Error>;

fn map_typed<T: Float + Element>(
    py: Python<'_>,
    x: &Bound<'_, PyUntypedArray>,
    out: &Bound<'_, PyUntypedArray>,
    l: Layout,
    f: MapFn<T>,
    f_inplace: MapInplaceFn<T>,
) -> PyResult<()> {
    let xa = typed::<T>(x, "x")?;
    let oa = typed::<T>(out, "out")?;
    if same_memory(x, out) {
        let mut o = oa
            .try_readwrite()
            .map_err(|e| PyValueError::new_err(format!("out: {e}")))?;
        let os = o
            .as_slice_mut()
            .map_err(|e| PyValueError::new_err(format!("out: {e}")))?;
        return run(py, os.len(), || f_inplace(os, l)).map_err(to_py);
    }
    let xr = xa
        .try_readonly()
        .map_err(|e| PyValueError::new_err(format!("x: {e}")))?;
    let mut o = oa
        .try_readwrite()
        .map_err(|e| PyValueError::new_err(format!("out: {e}")))?;
    let xs = xr
        .as_slice()
        .map_err(|e| PyValueError::new_err(format!("x: {e}")))?;
    let os = o
        .as_slice_mut()
        .map_err(|e| PyValueError::new_err(format!("out: {e}")))?;
    run(py, xs.len(), || f(xs, os, l)).map_err(to_py)
}

/// The whole call for the common case, in one crossing of the boundary: a C-contiguous, native
/// float32/float64 array of at least one axis, reduced over its last axis into a new NumPy array
/// (NumPy's allocator). None for anything else; the Python layer then takes the general path.
fn last_axis_new<'py, T: Float + Element>(
    py: Python<'py>,
    x: &Bound<'py, PyArrayDyn<T>>,
    f: MapFn<T>,
) -> PyResult<Option<Bound<'py, PyUntypedArray>>> {
    if !x.is_c_contiguous() || x.ndim() == 0 {
        return Ok(None);
    }
    let len = x.shape()[x.ndim() - 1];
    let y = unsafe { PyArrayDyn::<T>::new(py, x.shape(), false) };
    if len > 0 {
        let xr = x
            .try_readonly()
            .map_err(|e| PyValueError::new_err(format!("x: {e}")))?;
        let xs = xr
            .as_slice()
            .map_err(|e| PyValueError::new_err(e.to_string()))?;
        // SAFETY: `y` was just created here; no other reference to its memory exists.
        let ys = unsafe { y.as_slice_mut() }.map_err(|e| PyValueError::new_err(e.to_string()))?;
        let l = layout(xs.len() / len, len, 1);
        run(py, xs.len(), || f(xs, ys, l)).map_err(to_py)?;
    }
    Ok(Some(y.into_any().cast_into::<PyUntypedArray>()?))
}

fn last_axis<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    f32_op: MapFn<f32>,
    f64_op: MapFn<f64>,
) -> PyResult<Option<Bound<'py, PyUntypedArray>>> {
    if let Ok(a) = x.cast::<PyArrayDyn<f32>>() {
        last_axis_new(py, a, f32_op)
    } else if let Ok(a) = x.cast::<PyArrayDyn<f64>>() {
        last_axis_new(py, a, f64_op)
    } else {
        Ok(None)
    }
}

/// softmax over the last axis into a new array, or None where the general path is needed.
#[pyfunction]
fn softmax_last<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
) -> PyResult<Option<Bound<'py, PyUntypedArray>>> {
    last_axis(py, x, k::softmax, k::softmax)
}

/// log_softmax over the last axis into a new array, or None where the general path is needed.
#[pyfunction]
fn log_softmax_last<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
) -> PyResult<Option<Bound<'py, PyUntypedArray>>> {
    last_axis(py, x, k::log_softmax, k::log_softmax)
}

/// softmax(x) into out (which may be x) over the middle axis of (outer, len, inner).
#[pyfunction]
fn softmax(
    py: Python<'_>,
    x: &Bound<'_, PyUntypedArray>,
    out: &Bound<'_, PyUntypedArray>,
    outer: usize,
    len: usize,
    inner: usize,
) -> PyResult<()> {
    let l = layout(outer, len, inner);
    if is_f32(x) {
        map_typed::<f32>(py, x, out, l, k::softmax, k::softmax_inplace)
    } else {
        map_typed::<f64>(py, x, out, l, k::softmax, k::softmax_inplace)
    }
}

/// log_softmax(x) into out (which may be x) over the middle axis of (outer, len, inner).
#[pyfunction]
fn log_softmax(
    py: Python<'_>,
    x: &Bound<'_, PyUntypedArray>,
    out: &Bound<'_, PyUntypedArray>,
    outer: usize,
    len: usize,
    inner: usize,
) -> PyResult<()> {
    let l = layout(outer, len, inner);
    if is_f32(x) {
        map_typed::<f32>(py, x, out, l, k::log_softmax, k::log_softmax_inplace)
    } else {
        map_typed::<f64>(py, x, out, l, k::log_softmax, k::log_softmax_inplace)
    }
}

fn lse_typed<T: Float + Element>(
    py: Python<'_>,
    x: &Bound<'_, PyUntypedArray>,
    b: Option<&Bound<'_, PyUntypedArray>>,
    out: &Bound<'_, PyUntypedArray>,
    sign: Option<&Bound<'_, PyUntypedArray>>,
    l: Layout,
) -> PyResult<()> {
    let xr = typed::<T>(x, "x")?
        .try_readonly()
        .map_err(|e| PyValueError::new_err(format!("x: {e}")))?;
    let br = match b {
        Some(b) => Some(
            typed::<T>(b, "b")?
                .try_readonly()
                .map_err(|e| PyValueError::new_err(format!("b: {e}")))?,
        ),
        None => None,
    };
    let mut o = typed::<T>(out, "out")?
        .try_readwrite()
        .map_err(|e| PyValueError::new_err(format!("out: {e}")))?;
    let mut s = match sign {
        Some(s) => Some(
            typed::<T>(s, "sign")?
                .try_readwrite()
                .map_err(|e| PyValueError::new_err(format!("sign: {e}")))?,
        ),
        None => None,
    };
    let xs = xr
        .as_slice()
        .map_err(|e| PyValueError::new_err(e.to_string()))?;
    let bs = match &br {
        Some(b) => Some(
            b.as_slice()
                .map_err(|e| PyValueError::new_err(e.to_string()))?,
        ),
        None => None,
    };
    let os = o
        .as_slice_mut()
        .map_err(|e| PyValueError::new_err(e.to_string()))?;
    let ss = match &mut s {
        Some(s) => Some(
            s.as_slice_mut()
                .map_err(|e| PyValueError::new_err(e.to_string()))?,
        ),
        None => None,
    };
    run(py, xs.len(), || k::logsumexp(xs, bs, os, ss, l)).map_err(to_py)
}

/// log|sum(b * exp(x))| over the middle axis into out (outer * inner values), sign optional.
#[pyfunction]
#[pyo3(signature = (x, b, out, sign, outer, len, inner))]
#[allow(clippy::too_many_arguments)]
fn logsumexp(
    py: Python<'_>,
    x: &Bound<'_, PyUntypedArray>,
    b: Option<Bound<'_, PyUntypedArray>>,
    out: &Bound<'_, PyUntypedArray>,
    sign: Option<Bound<'_, PyUntypedArray>>,
    outer: usize,
    len: usize,
    inner: usize,
) -> PyResult<()> {
    let l = layout(outer, len, inner);
    if is_f32(x) {
        lse_typed::<f32>(py, x, b.as_ref(), out, sign.as_ref(), l)
    } else {
        lse_typed::<f64>(py, x, b.as_ref(), out, sign.as_ref(), l)
    }
}

type BackwardFn<T> = fn(&[T], &[T], &mut [T], Layout) -> Result<(), Error>;

fn backward_typed<T: Float + Element>(
    py: Python<'_>,
    y: &Bound<'_, PyUntypedArray>,
    dy: &Bound<'_, PyUntypedArray>,
    dx: &Bound<'_, PyUntypedArray>,
    l: Layout,
    f: BackwardFn<T>,
) -> PyResult<()> {
    let yr = typed::<T>(y, "y")?
        .try_readonly()
        .map_err(|e| PyValueError::new_err(format!("y: {e}")))?;
    let dyr = typed::<T>(dy, "dy")?
        .try_readonly()
        .map_err(|e| PyValueError::new_err(format!("dy: {e}")))?;
    let mut dxw = typed::<T>(dx, "dx")?
        .try_readwrite()
        .map_err(|e| PyValueError::new_err(format!("dx: {e}")))?;
    let ys = yr
        .as_slice()
        .map_err(|e| PyValueError::new_err(e.to_string()))?;
    let dys = dyr
        .as_slice()
        .map_err(|e| PyValueError::new_err(e.to_string()))?;
    let dxs = dxw
        .as_slice_mut()
        .map_err(|e| PyValueError::new_err(e.to_string()))?;
    run(py, ys.len(), || f(ys, dys, dxs, l)).map_err(to_py)
}

/// dx = y * (dy - sum(dy * y)) over the middle axis; dx must be a fresh array.
#[pyfunction]
fn softmax_backward(
    py: Python<'_>,
    y: &Bound<'_, PyUntypedArray>,
    dy: &Bound<'_, PyUntypedArray>,
    dx: &Bound<'_, PyUntypedArray>,
    outer: usize,
    len: usize,
    inner: usize,
) -> PyResult<()> {
    let l = layout(outer, len, inner);
    if is_f32(y) {
        backward_typed::<f32>(py, y, dy, dx, l, k::softmax_backward)
    } else {
        backward_typed::<f64>(py, y, dy, dx, l, k::softmax_backward)
    }
}

/// dx = dy - exp(y) * sum(dy) over the middle axis; dx must be a fresh array.
#[pyfunction]
fn log_softmax_backward(
    py: Python<'_>,
    y: &Bound<'_, PyUntypedArray>,
    dy: &Bound<'_, PyUntypedArray>,
    dx: &Bound<'_, PyUntypedArray>,
    outer: usize,
    len: usize,
    inner: usize,
) -> PyResult<()> {
    let l = layout(outer, len, inner);
    if is_f32(y) {
        backward_typed::<f32>(py, y, dy, dx, l, k::log_softmax_backward)
    } else {
        backward_typed::<f64>(py, y, dy, dx, l, k::log_softmax_backward)
    }
}

/// exp(x) into out with the kernels' polynomial (for accuracy tests).
#[pyfunction]
fn exp(
    py: Python<'_>,
    x: &Bound<'_, PyUntypedArray>,
    out: &Bound<'_, PyUntypedArray>,
) -> PyResult<()> {
    let n = x.len();
    let l = layout(1, n, 1);
    fn exp_inplace<T: Float>(_: &mut [T], _: Layout) -> Result<(), Error> {
        Err(Error::Value("out must not be x".into()))
    }
    if is_f32(x) {
        map_typed::<f32>(py, x, out, l, |x, y, _| k::exp_slice(x, y), exp_inplace)
    } else {
        map_typed::<f64>(py, x, out, l, |x, y, _| k::exp_slice(x, y), exp_inplace)
    }
}

#[pyfunction]
fn get_num_threads() -> usize {
    threads::num_threads()
}

#[pyfunction]
fn set_num_threads(n: i64) -> PyResult<()> {
    if n < 1 {
        return Err(PyValueError::new_err(format!(
            "n must be at least 1, got {n}"
        )));
    }
    threads::set_num_threads(n as usize).map_err(to_py)
}

/// The SIMD implementation in use: "scalar", "avx2" or "avx512".
#[pyfunction]
fn get_isa() -> &'static str {
    normax_core::isa::active().name()
}

#[pyfunction]
fn set_isa(name: &str) -> PyResult<()> {
    normax_core::isa::set_active(Isa::parse(name).map_err(to_py)?).map_err(to_py)
}

/// The implementations this CPU supports, narrowest first.
#[pyfunction]
fn supported_isas() -> Vec<&'static str> {
    normax_core::isa::supported()
        .into_iter()
        .map(Isa::name)
        .collect()
}

#[pymodule(gil_used = false)]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // A bad NORMAX_ISA fails the import loudly rather than silently running another path.
    if let Some(isa) = normax_core::isa::from_env().map_err(to_py)? {
        normax_core::isa::set_active(isa).map_err(to_py)?;
    }
    m.add_function(wrap_pyfunction!(softmax, m)?)?;
    m.add_function(wrap_pyfunction!(softmax_last, m)?)?;
    m.add_function(wrap_pyfunction!(log_softmax_last, m)?)?;
    m.add_function(wrap_pyfunction!(log_softmax, m)?)?;
    m.add_function(wrap_pyfunction!(logsumexp, m)?)?;
    m.add_function(wrap_pyfunction!(softmax_backward, m)?)?;
    m.add_function(wrap_pyfunction!(log_softmax_backward, m)?)?;
    m.add_function(wrap_pyfunction!(exp, m)?)?;
    m.add_function(wrap_pyfunction!(get_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(set_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(get_isa, m)?)?;
    m.add_function(wrap_pyfunction!(set_isa, m)?)?;
    m.add_function(wrap_pyfunction!(supported_isas, m)?)?;
    norms::register(m)?;
    cross_entropy::register(m)?;
    #[cfg(feature = "cuda")]
    cuda::register(m)?;
    #[cfg(feature = "wgpu")]
    wgpu::register(m)?;
    Ok(())
}
