//! Bindings of the normalization kernels (`normax_core::norms`): array conversion only.
//!
//! python/normax/_norms.py validates the user's arguments and lays every array out C-contiguous,
//! native-endian, in the kernel dtype (statistics always float64); here only what memory safety
//! depends on is re-checked (dtypes, contiguity, writeability, sizes in the core).

use crate::arrays::{by_dtype, readonly, readonly_opt, readwrite, readwrite_opt, same_memory};
use crate::arrays::{slice, slice_mut, slice_mut_opt, slice_opt, Arr};
use crate::interrupt::detach;
use crate::options::{NormOptions, PowerNormOptions};
use normax_core::norms::{self as k, Params, PowerGrad, PowerLayout, PowerOutput};
use normax_core::Float;
use numpy::{Element, PyUntypedArrayMethods};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

/// Rows of x (its last axis) in the core's terms, with the parameters `w` and `b`.
fn params<'a, T>(
    options: &NormOptions,
    x: &Arr<'_>,
    w: Option<&'a [T]>,
    b: Option<&'a [T]>,
) -> Params<'a, T> {
    Params {
        norm: options.kind,
        len: x.shape().last().copied().unwrap_or(1),
        eps: options.eps,
        weight: w,
        bias: b,
    }
}

type Stats<'py> = (Option<Arr<'py>>, Option<Arr<'py>>);

fn forward_typed<T: Float + Element>(
    options: &NormOptions,
    x: &Arr<'_>,
    (weight, bias): (Option<&Arr<'_>>, Option<&Arr<'_>>),
    y: &Arr<'_>,
    (mean, rstd): (Option<&Arr<'_>>, Option<&Arr<'_>>),
) -> PyResult<()> {
    let (w, b) = (
        readonly_opt::<T>(weight, "weight")?,
        readonly_opt::<T>(bias, "bias")?,
    );
    let (mut m, mut r) = (
        readwrite_opt::<f64>(mean, "mean")?,
        readwrite_opt::<f64>(rstd, "rstd")?,
    );
    let p = params(options, x, slice_opt(&w, "weight")?, slice_opt(&b, "bias")?);
    let (ms, rs) = (
        slice_mut_opt(&mut m, "mean")?,
        slice_mut_opt(&mut r, "rstd")?,
    );
    let py = x.py();
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

/// Normalizes the rows (last axis) of x into y (which may be x); the statistics mean/rstd
/// (float64, one per row) are written where given.
#[pyfunction]
#[pyo3(signature = (options, x, weight, bias, y, mean=None, rstd=None))]
fn norm_forward(
    options: &NormOptions,
    x: &Arr<'_>,
    weight: Option<Arr<'_>>,
    bias: Option<Arr<'_>>,
    y: &Arr<'_>,
    mean: Option<Arr<'_>>,
    rstd: Option<Arr<'_>>,
) -> PyResult<()> {
    let wb = (weight.as_ref(), bias.as_ref());
    let stats = (mean.as_ref(), rstd.as_ref());
    by_dtype!(x, forward_typed(options, x, wb, y, stats))
}

fn backward_typed<T: Float + Element>(
    options: &NormOptions,
    (dy, x, weight): (&Arr<'_>, &Arr<'_>, Option<&Arr<'_>>),
    (mean, rstd): (Option<&Arr<'_>>, Option<&Arr<'_>>),
    dx: &Arr<'_>,
    (dweight, dbias): (Option<&Arr<'_>>, Option<&Arr<'_>>),
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
    let p = params(options, x, slice_opt(&w, "weight")?, None);
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
    detach(x.py(), xs.len(), || {
        k::backward(&p, dys, xs, ms, rs, dxs, dws, dbs)
    })
}

/// dx (and dweight, dbias where given) of the rows (last axis) of x; `saved`: the forward's
/// (mean, rstd) statistics, each optional.
#[pyfunction]
#[pyo3(signature = (options, dy, x, weight, saved, dx, dparams))]
fn norm_backward(
    options: &NormOptions,
    dy: &Arr<'_>,
    x: &Arr<'_>,
    weight: Option<Arr<'_>>,
    saved: Stats<'_>,
    dx: &Arr<'_>,
    dparams: Stats<'_>,
) -> PyResult<()> {
    let ins = (dy, x, weight.as_ref());
    let stats = (saved.0.as_ref(), saved.1.as_ref());
    let grads = (dparams.0.as_ref(), dparams.1.as_ref());
    by_dtype!(x, backward_typed(options, ins, stats, dx, grads))
}

/// The token layout of x: as many tokens as whole rows of `channels` (the core checks the rest).
fn power_layout(x: &Arr<'_>, options: &PowerNormOptions) -> PowerLayout {
    PowerLayout {
        tokens: x.len() / options.channels.max(1),
        channels: options.channels,
        groups: options.groups,
    }
}

/// PowerNorm's forward outputs: scale, shift (per channel) and y.
type PowerOut<'py> = (Arr<'py>, Arr<'py>, Arr<'py>);

fn power_forward_typed<T: Float + Element>(
    options: &PowerNormOptions,
    x: &Arr<'_>,
    pad: Option<&Arr<'_>>,
    sumsq: Option<&Arr<'_>>,
    out: Option<&PowerOut<'_>>,
) -> PyResult<()> {
    let xr = readonly::<T>(x, "x")?;
    let padr = readonly_opt::<bool>(pad, "pad_mask")?;
    let mut ss = readwrite_opt::<f64>(sumsq, "sumsq")?;
    let sc = out.map(|o| readonly::<T>(&o.0, "scale")).transpose()?;
    let sh = out.map(|o| readonly::<T>(&o.1, "shift")).transpose()?;
    let mut yw = out.map(|o| readwrite::<T>(&o.2, "y")).transpose()?;
    let (xs, pads, sss) = (
        slice(&xr, "x")?,
        slice_opt(&padr, "pad_mask")?,
        slice_mut_opt(&mut ss, "sumsq")?,
    );
    let out = match (sc.as_ref(), sh.as_ref(), yw.as_mut()) {
        (Some(sc), Some(sh), Some(y)) => Some(PowerOutput {
            scale: slice(sc, "scale")?,
            shift: slice(sh, "shift")?,
            y: slice_mut(y, "y")?,
        }),
        _ => None,
    };
    let (l, eps) = (power_layout(x, options), options.eps);
    detach(x.py(), xs.len(), || {
        k::power_norm_forward(xs, l, eps, pads, sss, out)
    })
}

/// PowerNorm's forward pass over (tokens, channels): sums of u^2 into `sumsq` and/or, with
/// `out` = (scale, shift, y), y = u * scale + shift.
#[pyfunction]
#[pyo3(signature = (options, x, pad, sumsq, out))]
fn power_norm_forward(
    options: &PowerNormOptions,
    x: &Arr<'_>,
    pad: Option<Arr<'_>>,
    sumsq: Option<Arr<'_>>,
    out: Option<PowerOut<'_>>,
) -> PyResult<()> {
    let (p, s) = (pad.as_ref(), sumsq.as_ref());
    by_dtype!(x, power_forward_typed(options, x, p, s, out.as_ref()))
}

/// PowerNorm's backward inputs from the forward: zscale, ema, dscale (per channel).
type PowerSaved<'py> = (Arr<'py>, Arr<'py>, Arr<'py>);

fn power_backward_typed<T: Float + Element>(
    options: &PowerNormOptions,
    (dy, x, weight): (&Arr<'_>, &Arr<'_>, Option<&Arr<'_>>),
    (zscale, ema, dscale): &PowerSaved<'_>,
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
    let (l, eps) = (power_layout(x, options), options.eps);
    if ss.len() != 3 * l.channels {
        return Err(PyValueError::new_err("sums: expected 3 * channels values"));
    }
    detach(x.py(), xs.len(), || {
        let s = k::power_norm_backward(dys, xs, l, eps, &c, dxs)?;
        ss.copy_from_slice(&s);
        Ok(())
    })
}

/// PowerNorm's backward pass: dx, and per channel the sums of g_hat * z, dy * z, dy into `sums`.
#[pyfunction]
#[pyo3(signature = (options, dy, x, weight, saved, dx, sums))]
fn power_norm_backward(
    options: &PowerNormOptions,
    dy: &Arr<'_>,
    x: &Arr<'_>,
    weight: Option<Arr<'_>>,
    saved: PowerSaved<'_>,
    dx: &Arr<'_>,
    sums: &Arr<'_>,
) -> PyResult<()> {
    let ins = (dy, x, weight.as_ref());
    by_dtype!(x, power_backward_typed(options, ins, &saved, dx, sums))
}

/// Adds the normalization functions to the extension module.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(norm_forward, m)?)?;
    m.add_function(wrap_pyfunction!(norm_backward, m)?)?;
    m.add_function(wrap_pyfunction!(power_norm_forward, m)?)?;
    m.add_function(wrap_pyfunction!(power_norm_backward, m)?)?;
    Ok(())
}
