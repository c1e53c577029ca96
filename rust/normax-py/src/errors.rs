//! The one conversion of a core error into a Python exception, for every backend.

use normax_core::Error;
use pyo3::exceptions::{PyIndexError, PyRuntimeError, PyValueError};
use pyo3::PyErr;

pub(crate) fn to_py(e: Error) -> PyErr {
    match e {
        Error::Value(m) => PyValueError::new_err(m),
        Error::Index(m) => PyIndexError::new_err(m),
        Error::NoDevice(m) | Error::Unavailable(m) | Error::Device(m) => PyRuntimeError::new_err(m),
    }
}
