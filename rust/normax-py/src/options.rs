//! The checked options of every op as Python objects: the one form in which they cross pyo3.
//!
//! python/normax/_options.py checks the user's arguments (TypeErrors and ValueErrors naming
//! them) and builds these once per call; every binding, CPU, CUDA and wgpu alike, takes them as
//! one argument. The constructors repeat only the core's cheap invariant checks (`spec`), so a
//! direct `_core` caller cannot hand a kernel an option out of range.

use crate::arrays::{slice, Arr, Read};
use crate::errors::to_py;
use normax_core::spec::{self, GradOutput as CoreGradOutput, NormKind, Reduction};
use numpy::Element;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};
use std::hash::{Hash, Hasher};

fn reduction_name(r: Reduction) -> &'static str {
    match r {
        Reduction::None => "none",
        Reduction::Sum => "sum",
        Reduction::Mean => "mean",
    }
}

fn norm_name(k: NormKind) -> &'static str {
    match k {
        NormKind::Rms => "rms",
        NormKind::Crms => "crms",
        NormKind::Layer => "layer",
    }
}

fn hash_of(parts: impl Hash) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    parts.hash(&mut h);
    h.finish()
}

/// The cross-entropy options of torch.nn.functional.cross_entropy (class weights travel as an
/// array beside them). Immutable, hashable and picklable; `replace(**changes)` makes a variant.
#[pyclass(frozen, eq, module = "normax._core", name = "CeOptions")]
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct CeOptions {
    #[pyo3(get)]
    pub ignore_index: i64,
    pub reduction: Reduction,
    #[pyo3(get)]
    pub label_smoothing: f64,
    #[pyo3(get)]
    pub z_loss: f64,
    #[pyo3(get)]
    pub softcap: Option<f64>,
    #[pyo3(get)]
    pub temperature: f64,
    /// StableMax's loss instead of softmax's (the core's `CeOptions::stablemax`: the CPU row
    /// kernels only).
    #[pyo3(get)]
    pub stablemax: bool,
}

impl CeOptions {
    /// The core's options with the class weights `weight` (as the backend holds them) and no
    /// token weights.
    pub(crate) fn with_weight<W>(&self, weight: Option<W>) -> spec::CeOptions<W> {
        self.with_weights(weight, None)
    }

    /// The core's options with class and token weights.
    pub(crate) fn with_weights<W>(
        &self,
        weight: Option<W>,
        token_weight: Option<W>,
    ) -> spec::CeOptions<W> {
        spec::CeOptions {
            weight,
            ignore_index: self.ignore_index,
            reduction: self.reduction,
            label_smoothing: self.label_smoothing,
            z_loss: self.z_loss,
            softcap: self.softcap,
            temperature: self.temperature,
            token_weight,
            stablemax: self.stablemax,
        }
    }

    fn checked(self) -> PyResult<Self> {
        self.with_weight::<&[f64]>(None).check(0).map_err(to_py)?;
        Ok(self)
    }
}

#[pymethods]
impl CeOptions {
    #[new]
    #[pyo3(signature = (ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0, softcap=None, temperature=1.0, stablemax=false))]
    fn new(
        ignore_index: i64,
        reduction: &str,
        label_smoothing: f64,
        z_loss: f64,
        softcap: Option<f64>,
        temperature: f64,
        stablemax: bool,
    ) -> PyResult<Self> {
        CeOptions {
            ignore_index,
            reduction: Reduction::parse(reduction).map_err(to_py)?,
            label_smoothing,
            z_loss,
            softcap,
            temperature,
            stablemax,
        }
        .checked()
    }

    #[getter]
    fn reduction(&self) -> &'static str {
        reduction_name(self.reduction)
    }

    /// A copy with the named fields changed (as NamedTuple's `_replace`).
    #[pyo3(signature = (**changes))]
    fn replace(&self, changes: Option<&Bound<'_, PyDict>>) -> PyResult<Self> {
        let mut o = *self;
        for (key, value) in changes.into_iter().flatten() {
            match key.extract::<String>()?.as_str() {
                "ignore_index" => o.ignore_index = value.extract()?,
                "reduction" => {
                    o.reduction = Reduction::parse(&value.extract::<String>()?).map_err(to_py)?
                }
                "label_smoothing" => o.label_smoothing = value.extract()?,
                "z_loss" => o.z_loss = value.extract()?,
                "softcap" => o.softcap = value.extract()?,
                "temperature" => o.temperature = value.extract()?,
                "stablemax" => o.stablemax = value.extract()?,
                other => {
                    return Err(PyTypeError::new_err(format!(
                        "CeOptions has no field {other:?}"
                    )))
                }
            }
        }
        o.checked()
    }

    fn __hash__(&self) -> u64 {
        hash_of((
            self.ignore_index,
            self.reduction as u8,
            self.label_smoothing.to_bits(),
            self.z_loss.to_bits(),
            self.softcap.map(f64::to_bits),
            self.temperature.to_bits(),
            self.stablemax,
        ))
    }

    fn __reduce__<'py>(
        slf: &Bound<'py, Self>,
    ) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyTuple>)> {
        let o = slf.get();
        let args = (
            o.ignore_index,
            reduction_name(o.reduction),
            o.label_smoothing,
            o.z_loss,
            o.softcap,
            o.temperature,
            o.stablemax,
        );
        Ok((slf.get_type().into_any(), args.into_pyobject(slf.py())?))
    }

    fn __repr__(&self) -> String {
        let cap = self
            .softcap
            .map_or("None".to_string(), |c| format!("{c:?}"));
        format!(
            "CeOptions(ignore_index={}, reduction='{}', label_smoothing={:?}, z_loss={:?}, softcap={cap}, temperature={:?}, stablemax={})",
            self.ignore_index,
            reduction_name(self.reduction),
            self.label_smoothing,
            self.z_loss,
            self.temperature,
            if self.stablemax { "True" } else { "False" },
        )
    }
}

/// Which normalization of a row and its eps (RMSNorm, LayerNorm, CRMSNorm).
#[pyclass(frozen, eq, module = "normax._core", name = "NormOptions")]
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct NormOptions {
    pub kind: NormKind,
    #[pyo3(get)]
    pub eps: f64,
}

#[pymethods]
impl NormOptions {
    #[new]
    fn new(kind: &str, eps: f64) -> PyResult<Self> {
        spec::check_eps(eps).map_err(to_py)?;
        Ok(NormOptions {
            kind: NormKind::parse(kind).map_err(to_py)?,
            eps,
        })
    }

    #[getter]
    fn kind(&self) -> &'static str {
        norm_name(self.kind)
    }

    fn __hash__(&self) -> u64 {
        hash_of((self.kind as u8, self.eps.to_bits()))
    }

    fn __reduce__<'py>(
        slf: &Bound<'py, Self>,
    ) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyTuple>)> {
        let o = slf.get();
        let args = (norm_name(o.kind), o.eps).into_pyobject(slf.py())?;
        Ok((slf.get_type().into_any(), args))
    }

    fn __repr__(&self) -> String {
        format!(
            "NormOptions(kind='{}', eps={:?})",
            norm_name(self.kind),
            self.eps
        )
    }
}

/// PowerNorm's channel layout and eps: x is (tokens, channels), the statistics are per channel,
/// averaged over `groups` consecutive channels.
#[pyclass(frozen, eq, module = "normax._core", name = "PowerNormOptions")]
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct PowerNormOptions {
    #[pyo3(get)]
    pub channels: usize,
    #[pyo3(get)]
    pub groups: usize,
    #[pyo3(get)]
    pub eps: f64,
}

#[pymethods]
impl PowerNormOptions {
    #[new]
    fn new(channels: usize, groups: usize, eps: f64) -> PyResult<Self> {
        spec::check_eps(eps).map_err(to_py)?;
        if groups == 0 || channels % groups != 0 {
            return Err(PyValueError::new_err(format!(
                "group_num {groups} does not divide the {channels} channels"
            )));
        }
        Ok(PowerNormOptions {
            channels,
            groups,
            eps,
        })
    }

    fn __hash__(&self) -> u64 {
        hash_of((self.channels, self.groups, self.eps.to_bits()))
    }

    fn __reduce__<'py>(
        slf: &Bound<'py, Self>,
    ) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyTuple>)> {
        let o = slf.get();
        let args = (o.channels, o.groups, o.eps).into_pyobject(slf.py())?;
        Ok((slf.get_type().into_any(), args))
    }

    fn __repr__(&self) -> String {
        format!(
            "PowerNormOptions(channels={}, groups={}, eps={:?})",
            self.channels, self.groups, self.eps
        )
    }
}

/// One rank's share of a vocabulary-parallel cross-entropy: `rows` rows of the classes
/// [start, start + length) out of `classes`.
#[pyclass(
    frozen,
    eq,
    from_py_object,
    module = "normax._core",
    name = "VocabParallelLayout"
)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct VocabParallelLayout {
    #[pyo3(get)]
    pub rows: usize,
    #[pyo3(get)]
    pub start: usize,
    #[pyo3(get)]
    pub length: usize,
    #[pyo3(get)]
    pub classes: usize,
}

#[pymethods]
impl VocabParallelLayout {
    #[new]
    fn new(rows: usize, start: usize, length: usize, classes: usize) -> PyResult<Self> {
        if start.checked_add(length).is_none_or(|end| end > classes) {
            return Err(PyValueError::new_err(format!(
                "the shard [{start}, {start} + {length}) is not within the {classes} classes"
            )));
        }
        Ok(VocabParallelLayout {
            rows,
            start,
            length,
            classes,
        })
    }

    fn __hash__(&self) -> u64 {
        hash_of((self.rows, self.start, self.length, self.classes))
    }

    fn __reduce__<'py>(
        slf: &Bound<'py, Self>,
    ) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyTuple>)> {
        let o = slf.get();
        let args = (o.rows, o.start, o.length, o.classes).into_pyobject(slf.py())?;
        Ok((slf.get_type().into_any(), args))
    }

    fn __repr__(&self) -> String {
        format!(
            "VocabParallelLayout(rows={}, start={}, length={}, classes={})",
            self.rows, self.start, self.length, self.classes
        )
    }
}

impl VocabParallelLayout {
    pub(crate) fn core(&self) -> normax_core::cross_entropy::Shard {
        normax_core::cross_entropy::Shard {
            start: self.start,
            len: self.length,
        }
    }
}

/// d(loss)/d(output) of a backward: one number, or an array of one per row (reduction "none").
#[derive(FromPyObject)]
pub(crate) enum GradOutput<'py> {
    Scalar(f64),
    Rows(Arr<'py>),
}

impl<'py> GradOutput<'py> {
    /// The per-row array, borrowed for reading in dtype T (None for a number).
    pub(crate) fn read<T: Element>(&self) -> PyResult<Option<Read<'py, T>>> {
        match self {
            GradOutput::Scalar(_) => Ok(None),
            GradOutput::Rows(a) => crate::arrays::readonly::<T>(a, "grad_output").map(Some),
        }
    }

    /// The core's form: the number, or the rows that [`read`](Self::read) borrowed.
    pub(crate) fn core<'a, T: Element>(
        &self,
        rows: &'a Option<Read<'_, T>>,
    ) -> PyResult<CoreGradOutput<&'a [T]>> {
        match (self, rows) {
            (GradOutput::Scalar(s), _) => Ok(CoreGradOutput::Scalar(*s)),
            (GradOutput::Rows(_), Some(r)) => Ok(CoreGradOutput::Rows(slice(r, "grad_output")?)),
            (GradOutput::Rows(_), None) => Err(PyValueError::new_err(
                "grad_output: the per-row array was not read",
            )),
        }
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<CeOptions>()?;
    m.add_class::<NormOptions>()?;
    m.add_class::<PowerNormOptions>()?;
    m.add_class::<VocabParallelLayout>()?;
    Ok(())
}
