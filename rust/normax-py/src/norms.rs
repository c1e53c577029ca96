//! Bindings of the normalization kernels (`normax_core::norms`): array conversion only.
//!
//! python/normax/_norms.py validates the user's arguments and lays every array out C-contiguous,
//! native-endian, in the kernel dtype (statistics always float64); here only what memory safety
//! depends on is re-checked (dtypes, contiguity, writeability, sizes in the core).

use crate::arrays::{by_dtype, readonly, readonly_opt, readwrite, readwrite_opt, same_memory};
use crate::arrays::{slice, slice_mut, slice_mut_opt, slice_opt, Arr};
use crate::errors::to_py;
use crate::interrupt::detach;
use normax_core::norms::{self as k, Params, PowerGrad, PowerLayout, PowerOutput};
use normax_core::spec::NormKind;
use normax_core::Float;
use numpy::{Element, PyUntypedArrayMethods};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

#[allow(clippy::too_many_arguments)]
fn forward_typed<T: Float + Element>(
    py: Python<'_>,
    norm: NormKind,
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
        readonly_opt::<T>(weight, "weight")?,
        readonly_opt::<T>(bias, "bias")?,
    );
    let (mut m, mut r) = (
        readwrite_opt::<f64>(mean, "mean")?,
        readwrite_opt::<f64>(rstd, "rstd")?,
    );
    let p = Params {
        norm,
        len,
        eps,
        weight: slice_opt(&w, "weight")?,
        bias: slice_opt(&b, "bias")?,
    };
    let (ms, rs) = (
        slice_mut_opt(&mut m, "mean")?,
        slice_mut_opt(&mut r, "rstd")?,
    );
    if same_memory(x, y) {
        let mut yw = readwrite::<T>(y, "out")?;
        let ys = slice_mut(&mut yw, "out")?;
        return detach(py, ys.len(), || k::forward_inplace(&p, ys, ms, rs));
    }
    let xr = readonly::<T>(x, "x")?;
    let mut yw = readwrite::<T>(y, "out")?;
    let (xs, ys) = (slice(&xr, "x")?, slice_mut(&mut yw, "out")?);
    detach(py, xs.len(), || k::forward(&p, xs, ys, ms, rs))
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
    let norm = NormKind::parse(norm).map_err(to_py)?;
    let (w, b, m, r) = (weight.as_ref(), bias.as_ref(), mean.as_ref(), rstd.as_ref());
    by_dtype!(x, forward_typed(py, norm, x, w, b, y, m, r, len, eps))
}

#[allow(clippy::too_many_arguments)]
fn backward_typed<T: Float + Element>(
    py: Python<'_>,
    norm: NormKind,
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
        readonly::<T>(dy, "dy")?,
        readonly::<T>(x, "x")?,
        readonly_opt::<T>(weight, "weight")?,
    );
    let (m, r) = (
        readonly_opt::<f64>(mean, "mean")?,
        readonly_opt::<f64>(rstd, "rstd")?,
    );
    let mut dxw = readwrite::<T>(dx, "dx")?;
    let (mut dw, mut db) = (
        readwrite_opt::<T>(dweight, "dweight")?,
        readwrite_opt::<T>(dbias, "dbias")?,
    );
    let p = Params {
        norm,
        len,
        eps,
        weight: slice_opt(&w, "weight")?,
        bias: None,
    };
    let (dys, xs, ms, rs) = (
        slice(&dyr, "dy")?,
        slice(&xr, "x")?,
        slice_opt(&m, "mean")?,
        slice_opt(&r, "rstd")?,
    );
    let (dxs, dws, dbs) = (
        slice_mut(&mut dxw, "dx")?,
        slice_mut_opt(&mut dw, "dweight")?,
        slice_mut_opt(&mut db, "dbias")?,
    );
    detach(py, xs.len(), || {
        k::backward(&p, dys, xs, ms, rs, dxs, dws, dbs)
    })
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
    let norm = NormKind::parse(norm).map_err(to_py)?;
    let (w, m, r) = (weight.as_ref(), mean.as_ref(), rstd.as_ref());
    let (dw, db) = (dweight.as_ref(), dbias.as_ref());
    by_dtype!(
        x,
        backward_typed(py, norm, dy, x, w, m, r, dx, dw, db, len, eps)
    )
}

/// The token layout of x: as many tokens as whole rows of `channels` (the core checks the rest).
fn power_layout(x: &Arr<'_>, channels: usize, groups: usize) -> PowerLayout {
    PowerLayout {
        tokens: x.len() / channels.max(1),
        channels,
        groups,
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
    let xr = readonly::<T>(x, "x")?;
    let padr = readonly_opt::<bool>(pad, "pad_mask")?;
    let mut ss = readwrite_opt::<f64>(sumsq, "sumsq")?;
    let (sc, sh) = (
        readonly_opt::<T>(scale, "scale")?,
        readonly_opt::<T>(shift, "shift")?,
    );
    let mut yw = readwrite_opt::<T>(y, "y")?;
    let (xs, pads, sss) = (
        slice(&xr, "x")?,
        slice_opt(&padr, "pad_mask")?,
        slice_mut_opt(&mut ss, "sumsq")?,
    );
    let out = match (
        slice_opt(&sc, "scale")?,
        slice_opt(&sh, "shift")?,
        slice_mut_opt(&mut yw, "y")?,
    ) {
        (Some(scale), Some(shift), Some(y)) => Some(PowerOutput { scale, shift, y }),
        (None, None, None) => None,
        _ => return Err(PyValueError::new_err("scale, shift and y go together")),
    };
    detach(py, xs.len(), || {
        k::power_norm_forward(xs, l, eps, pads, sss, out)
    })
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
    let l = power_layout(x, channels, groups);
    let (p, s, sc, sh, yy) = (
        pad.as_ref(),
        sumsq.as_ref(),
        scale.as_ref(),
        shift.as_ref(),
        y.as_ref(),
    );
    by_dtype!(x, power_forward_typed(py, x, l, eps, p, s, sc, sh, yy))
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
        readonly::<T>(dy, "dy")?,
        readonly::<T>(x, "x")?,
        readonly_opt::<T>(weight, "weight")?,
    );
    let (zr, er, dr) = (
        readonly::<T>(zscale, "zscale")?,
        readonly::<T>(ema, "ema")?,
        readonly::<T>(dscale, "dscale")?,
    );
    let mut dxw = readwrite::<T>(dx, "dx")?;
    let mut sw = readwrite::<f64>(sums, "sums")?;
    let c = PowerGrad {
        weight: slice_opt(&w, "weight")?,
        zscale: slice(&zr, "zscale")?,
        ema: slice(&er, "ema")?,
        dscale: slice(&dr, "dscale")?,
    };
    let (dys, xs, dxs, ss) = (
        slice(&dyr, "dy")?,
        slice(&xr, "x")?,
        slice_mut(&mut dxw, "dx")?,
        slice_mut(&mut sw, "sums")?,
    );
    if ss.len() != 3 * l.channels {
        return Err(PyValueError::new_err("sums: expected 3 * channels values"));
    }
    detach(py, xs.len(), || {
        let s = k::power_norm_backward(dys, xs, l, eps, &c, dxs)?;
        ss.copy_from_slice(&s);
        Ok(())
    })
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
    let l = power_layout(x, channels, groups);
    let w = weight.as_ref();
    by_dtype!(
        x,
        power_backward_typed(py, dy, x, l, eps, w, zscale, ema, dscale, dx, sums)
    )
}

/// Adds the normalization functions to the extension module.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(norm_forward, m)?)?;
    m.add_function(wrap_pyfunction!(norm_backward, m)?)?;
    m.add_function(wrap_pyfunction!(power_norm_forward, m)?)?;
    m.add_function(wrap_pyfunction!(power_norm_backward, m)?)?;
    Ok(())
}
