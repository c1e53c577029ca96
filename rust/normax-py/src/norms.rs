//! Bindings of the normalization kernels (`normax_core::norms`): array conversion only.
//!
//! python/normax/_norms.py validates the user's arguments and lays every array out C-contiguous,
//! native-endian, in the kernel dtype (statistics always float64); here only what memory safety
//! depends on is re-checked (dtypes, contiguity, writeability, sizes in the core).

use crate::{is_f32, same_memory, to_py, typed};
use normax_core::norms::{self as k, Norm, Params, PowerGrad, PowerLayout, PowerOutput};
use normax_core::Float;
use numpy::{
    Element, PyArrayMethods, PyReadonlyArrayDyn, PyReadwriteArrayDyn, PyUntypedArray,
    PyUntypedArrayMethods,
};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

type Arr<'py> = Bound<'py, PyUntypedArray>;

fn read<'py, T: Element>(a: &Arr<'py>, name: &str) -> PyResult<PyReadonlyArrayDyn<'py, T>> {
    typed::<T>(a, name)?
        .try_readonly()
        .map_err(|e| PyValueError::new_err(format!("{name}: {e}")))
}

fn write<'py, T: Element>(a: &Arr<'py>, name: &str) -> PyResult<PyReadwriteArrayDyn<'py, T>> {
    typed::<T>(a, name)?
        .try_readwrite()
        .map_err(|e| PyValueError::new_err(format!("{name}: {e}")))
}

fn read_opt<'py, T: Element>(
    a: Option<&Arr<'py>>,
    name: &str,
) -> PyResult<Option<PyReadonlyArrayDyn<'py, T>>> {
    a.map(|a| read::<T>(a, name)).transpose()
}

fn write_opt<'py, T: Element>(
    a: Option<&Arr<'py>>,
    name: &str,
) -> PyResult<Option<PyReadwriteArrayDyn<'py, T>>> {
    a.map(|a| write::<T>(a, name)).transpose()
}

fn slice<'a, T: Element>(a: &'a PyReadonlyArrayDyn<'_, T>) -> PyResult<&'a [T]> {
    a.as_slice()
        .map_err(|e| PyValueError::new_err(e.to_string()))
}

fn slice_mut<'a, T: Element>(a: &'a mut PyReadwriteArrayDyn<'_, T>) -> PyResult<&'a mut [T]> {
    a.as_slice_mut()
        .map_err(|e| PyValueError::new_err(e.to_string()))
}

fn slice_opt<'a, T: Element>(
    a: &'a Option<PyReadonlyArrayDyn<'_, T>>,
) -> PyResult<Option<&'a [T]>> {
    a.as_ref().map(slice).transpose()
}

fn slice_mut_opt<'a, T: Element>(
    a: &'a mut Option<PyReadwriteArrayDyn<'_, T>>,
) -> PyResult<Option<&'a mut [T]>> {
    a.as_mut().map(slice_mut).transpose()
}

#[allow(clippy::too_many_arguments)]
fn forward_typed<T: Float + Element>(
    py: Python<'_>,
    norm: Norm,
    x: &Arr<'_>,
    weight: Option<&Arr<'_>>,
    bias: Option<&Arr<'_>>,
    y: &Arr<'_>,
    mean: Option<&Arr<'_>>,
    rstd: Option<&Arr<'_>>,
    len: usize,
    eps: f64,
) -> PyResult<()> {
    let (w, b) = (
        read_opt::<T>(weight, "weight")?,
        read_opt::<T>(bias, "bias")?,
    );
    let (mut m, mut r) = (
        write_opt::<f64>(mean, "mean")?,
        write_opt::<f64>(rstd, "rstd")?,
    );
    let p = Params {
        norm,
        len,
        eps,
        weight: slice_opt(&w)?,
        bias: slice_opt(&b)?,
    };
    let (ms, rs) = (slice_mut_opt(&mut m)?, slice_mut_opt(&mut r)?);
    if same_memory(x, y) {
        let mut yw = write::<T>(y, "out")?;
        let ys = slice_mut(&mut yw)?;
        return py
            .detach(|| k::forward_inplace(&p, ys, ms, rs))
            .map_err(to_py);
    }
    let xr = read::<T>(x, "x")?;
    let mut yw = write::<T>(y, "out")?;
    let (xs, ys) = (slice(&xr)?, slice_mut(&mut yw)?);
    py.detach(|| k::forward(&p, xs, ys, ms, rs)).map_err(to_py)
}

/// Normalizes rows of `len` elements of x into y (which may be x); mean/rstd (float64) optional.
#[pyfunction]
#[pyo3(signature = (norm, x, weight, bias, y, mean, rstd, len, eps))]
#[allow(clippy::too_many_arguments)]
fn norm_forward(
    py: Python<'_>,
    norm: &str,
    x: &Arr<'_>,
    weight: Option<Arr<'_>>,
    bias: Option<Arr<'_>>,
    y: &Arr<'_>,
    mean: Option<Arr<'_>>,
    rstd: Option<Arr<'_>>,
    len: usize,
    eps: f64,
) -> PyResult<()> {
    let norm = Norm::parse(norm).map_err(to_py)?;
    let (w, b, m, r) = (weight.as_ref(), bias.as_ref(), mean.as_ref(), rstd.as_ref());
    if is_f32(x) {
        forward_typed::<f32>(py, norm, x, w, b, y, m, r, len, eps)
    } else {
        forward_typed::<f64>(py, norm, x, w, b, y, m, r, len, eps)
    }
}

#[allow(clippy::too_many_arguments)]
fn backward_typed<T: Float + Element>(
    py: Python<'_>,
    norm: Norm,
    dy: &Arr<'_>,
    x: &Arr<'_>,
    weight: Option<&Arr<'_>>,
    mean: Option<&Arr<'_>>,
    rstd: Option<&Arr<'_>>,
    dx: &Arr<'_>,
    dweight: Option<&Arr<'_>>,
    dbias: Option<&Arr<'_>>,
    len: usize,
    eps: f64,
) -> PyResult<()> {
    let (dyr, xr, w) = (
        read::<T>(dy, "dy")?,
        read::<T>(x, "x")?,
        read_opt::<T>(weight, "weight")?,
    );
    let (m, r) = (
        read_opt::<f64>(mean, "mean")?,
        read_opt::<f64>(rstd, "rstd")?,
    );
    let mut dxw = write::<T>(dx, "dx")?;
    let (mut dw, mut db) = (
        write_opt::<T>(dweight, "dweight")?,
        write_opt::<T>(dbias, "dbias")?,
    );
    let p = Params {
        norm,
        len,
        eps,
        weight: slice_opt(&w)?,
        bias: None,
    };
    let (dys, xs, ms, rs) = (slice(&dyr)?, slice(&xr)?, slice_opt(&m)?, slice_opt(&r)?);
    let (dxs, dws, dbs) = (
        slice_mut(&mut dxw)?,
        slice_mut_opt(&mut dw)?,
        slice_mut_opt(&mut db)?,
    );
    py.detach(|| k::backward(&p, dys, xs, ms, rs, dxs, dws, dbs))
        .map_err(to_py)
}

/// dx (and dweight, dbias where given) of rows of `len` elements; mean/rstd: saved statistics.
#[pyfunction]
#[pyo3(signature = (norm, dy, x, weight, mean, rstd, dx, dweight, dbias, len, eps))]
#[allow(clippy::too_many_arguments)]
fn norm_backward(
    py: Python<'_>,
    norm: &str,
    dy: &Arr<'_>,
    x: &Arr<'_>,
    weight: Option<Arr<'_>>,
    mean: Option<Arr<'_>>,
    rstd: Option<Arr<'_>>,
    dx: &Arr<'_>,
    dweight: Option<Arr<'_>>,
    dbias: Option<Arr<'_>>,
    len: usize,
    eps: f64,
) -> PyResult<()> {
    let norm = Norm::parse(norm).map_err(to_py)?;
    let (w, m, r) = (weight.as_ref(), mean.as_ref(), rstd.as_ref());
    let (dw, db) = (dweight.as_ref(), dbias.as_ref());
    if is_f32(x) {
        backward_typed::<f32>(py, norm, dy, x, w, m, r, dx, dw, db, len, eps)
    } else {
        backward_typed::<f64>(py, norm, dy, x, w, m, r, dx, dw, db, len, eps)
    }
}

#[allow(clippy::too_many_arguments)]
fn power_forward_typed<T: Float + Element>(
    py: Python<'_>,
    x: &Arr<'_>,
    l: PowerLayout,
    eps: f64,
    pad: Option<&Arr<'_>>,
    sumsq: Option<&Arr<'_>>,
    scale: Option<&Arr<'_>>,
    shift: Option<&Arr<'_>>,
    y: Option<&Arr<'_>>,
) -> PyResult<()> {
    let xr = read::<T>(x, "x")?;
    let padr = read_opt::<bool>(pad, "pad_mask")?;
    let mut ss = write_opt::<f64>(sumsq, "sumsq")?;
    let (sc, sh) = (
        read_opt::<T>(scale, "scale")?,
        read_opt::<T>(shift, "shift")?,
    );
    let mut yw = write_opt::<T>(y, "y")?;
    let (xs, pads, sss) = (slice(&xr)?, slice_opt(&padr)?, slice_mut_opt(&mut ss)?);
    let out = match (slice_opt(&sc)?, slice_opt(&sh)?, slice_mut_opt(&mut yw)?) {
        (Some(scale), Some(shift), Some(y)) => Some(PowerOutput { scale, shift, y }),
        (None, None, None) => None,
        _ => return Err(PyValueError::new_err("scale, shift and y go together")),
    };
    py.detach(|| k::power_norm_forward(xs, l, eps, pads, sss, out))
        .map_err(to_py)
}

/// PowerNorm's forward pass over (tokens, channels): sums of u^2 and/or y = u * scale + shift.
#[pyfunction]
#[pyo3(signature = (x, channels, groups, eps, pad, sumsq, scale, shift, y))]
#[allow(clippy::too_many_arguments)]
fn power_norm_forward(
    py: Python<'_>,
    x: &Arr<'_>,
    channels: usize,
    groups: usize,
    eps: f64,
    pad: Option<Arr<'_>>,
    sumsq: Option<Arr<'_>>,
    scale: Option<Arr<'_>>,
    shift: Option<Arr<'_>>,
    y: Option<Arr<'_>>,
) -> PyResult<()> {
    let l = PowerLayout {
        tokens: x.len() / channels.max(1),
        channels,
        groups,
    };
    let (p, s, sc, sh, yy) = (
        pad.as_ref(),
        sumsq.as_ref(),
        scale.as_ref(),
        shift.as_ref(),
        y.as_ref(),
    );
    if is_f32(x) {
        power_forward_typed::<f32>(py, x, l, eps, p, s, sc, sh, yy)
    } else {
        power_forward_typed::<f64>(py, x, l, eps, p, s, sc, sh, yy)
    }
}

#[allow(clippy::too_many_arguments)]
fn power_backward_typed<T: Float + Element>(
    py: Python<'_>,
    dy: &Arr<'_>,
    x: &Arr<'_>,
    l: PowerLayout,
    eps: f64,
    weight: Option<&Arr<'_>>,
    zscale: &Arr<'_>,
    ema: &Arr<'_>,
    dscale: &Arr<'_>,
    dx: &Arr<'_>,
    sums: &Arr<'_>,
) -> PyResult<()> {
    let (dyr, xr, w) = (
        read::<T>(dy, "dy")?,
        read::<T>(x, "x")?,
        read_opt::<T>(weight, "weight")?,
    );
    let (zr, er, dr) = (
        read::<T>(zscale, "zscale")?,
        read::<T>(ema, "ema")?,
        read::<T>(dscale, "dscale")?,
    );
    let mut dxw = write::<T>(dx, "dx")?;
    let mut sw = write::<f64>(sums, "sums")?;
    let c = PowerGrad {
        weight: slice_opt(&w)?,
        zscale: slice(&zr)?,
        ema: slice(&er)?,
        dscale: slice(&dr)?,
    };
    let (dys, xs, dxs, ss) = (
        slice(&dyr)?,
        slice(&xr)?,
        slice_mut(&mut dxw)?,
        slice_mut(&mut sw)?,
    );
    if ss.len() != 3 * l.channels {
        return Err(PyValueError::new_err("sums: expected 3 * channels values"));
    }
    py.detach(|| {
        let s = k::power_norm_backward(dys, xs, l, eps, &c, dxs)?;
        ss.copy_from_slice(&s);
        Ok(())
    })
    .map_err(to_py)
}

/// PowerNorm's backward pass: dx, and per channel the sums of g_hat * z, dy * z, dy into `sums`.
#[pyfunction]
#[pyo3(signature = (dy, x, channels, groups, eps, weight, zscale, ema, dscale, dx, sums))]
#[allow(clippy::too_many_arguments)]
fn power_norm_backward(
    py: Python<'_>,
    dy: &Arr<'_>,
    x: &Arr<'_>,
    channels: usize,
    groups: usize,
    eps: f64,
    weight: Option<Arr<'_>>,
    zscale: &Arr<'_>,
    ema: &Arr<'_>,
    dscale: &Arr<'_>,
    dx: &Arr<'_>,
    sums: &Arr<'_>,
) -> PyResult<()> {
    let l = PowerLayout {
        tokens: x.len() / channels.max(1),
        channels,
        groups,
    };
    let w = weight.as_ref();
    if is_f32(x) {
        power_backward_typed::<f32>(py, dy, x, l, eps, w, zscale, ema, dscale, dx, sums)
    } else {
        power_backward_typed::<f64>(py, dy, x, l, eps, w, zscale, ema, dscale, dx, sums)
    }
}

/// Adds the normalization functions to the extension module.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(norm_forward, m)?)?;
    m.add_function(wrap_pyfunction!(norm_backward, m)?)?;
    m.add_function(wrap_pyfunction!(power_norm_forward, m)?)?;
    m.add_function(wrap_pyfunction!(power_norm_backward, m)?)?;
    Ok(())
}
