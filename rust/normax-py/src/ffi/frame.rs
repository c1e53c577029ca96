//! Safe decoding of an XLA FFI call frame: operands and results by index with dtype and size
//! checks, attributes by name, the metadata query, errors, and no panic across the C boundary.
//!
//! All of the FFI's unsafe code is here and in `api`: a handler body receives a [`Frame`] and
//! works with slices. Every size is checked before memory is touched, so a call with the wrong
//! operands is an FFI error (raised by jax), never undefined behaviour.

use super::api::*;
use normax_core::Error;
use std::cell::Cell;
use std::ffi::{c_void, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// An element type a buffer can be viewed as, with its XLA dtype.
pub(crate) trait Element: Copy + 'static {
    const DTYPE: XLA_FFI_DataType;
    const NAME: &'static str;
}

macro_rules! element {
    ($t:ty, $dtype:expr, $name:literal) => {
        impl Element for $t {
            const DTYPE: XLA_FFI_DataType = $dtype;
            const NAME: &'static str = $name;
        }
    };
}
element!(f32, XLA_FFI_DATA_TYPE_F32, "float32");
element!(f64, XLA_FFI_DATA_TYPE_F64, "float64");
element!(i32, XLA_FFI_DATA_TYPE_S32, "int32");
element!(i64, XLA_FFI_DATA_TYPE_S64, "int64");

/// The dtype of a buffer, as the handlers dispatch on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DType {
    F32,
    F64,
    S32,
    S64,
    Pred,
    Other(i32),
}

impl DType {
    fn of(code: XLA_FFI_DataType) -> DType {
        match code {
            XLA_FFI_DATA_TYPE_F32 => DType::F32,
            XLA_FFI_DATA_TYPE_F64 => DType::F64,
            XLA_FFI_DATA_TYPE_S32 => DType::S32,
            XLA_FFI_DATA_TYPE_S64 => DType::S64,
            XLA_FFI_DATA_TYPE_PRED => DType::Pred,
            other => DType::Other(other),
        }
    }
}

fn value_error(message: String) -> Error {
    Error::Value(message)
}

/// One buffer of the call, operand or result: its dims checked non-negative and its element
/// count computed without overflow.
pub(crate) struct Raw<'a> {
    name: &'static str,
    dtype: XLA_FFI_DataType,
    dims: &'a [i64],
    len: usize,
    data: *mut c_void,
}

impl<'a> Raw<'a> {
    /// # Safety
    /// `buffer` is XLA's buffer of a call that lives for 'a.
    unsafe fn new(buffer: *const XLA_FFI_Buffer, name: &'static str) -> Result<Self, Error> {
        if buffer.is_null() {
            return Err(value_error(format!("{name}: no buffer")));
        }
        let b = &*buffer;
        let rank = usize::try_from(b.rank)
            .map_err(|_| value_error(format!("{name}: negative rank {}", b.rank)))?;
        let dims: &[i64] = if rank == 0 {
            &[]
        } else if b.dims.is_null() {
            return Err(value_error(format!("{name}: no dims")));
        } else {
            std::slice::from_raw_parts(b.dims, rank)
        };
        let mut len = 1usize;
        for &d in dims {
            let d = usize::try_from(d)
                .map_err(|_| value_error(format!("{name}: negative dimension in {dims:?}")))?;
            len = len
                .checked_mul(d)
                .ok_or_else(|| value_error(format!("{name}: shape {dims:?} overflows")))?;
        }
        Ok(Raw {
            name,
            dtype: b.dtype,
            dims,
            len,
            data: b.data,
        })
    }

    fn check<T: Element>(&self) -> Result<(), Error> {
        if self.dtype != T::DTYPE {
            return Err(value_error(format!(
                "{}: expected {}, got {:?}",
                self.name,
                T::NAME,
                DType::of(self.dtype)
            )));
        }
        if self.len > 0 && (self.data.is_null() || self.data as usize % align_of::<T>() != 0) {
            return Err(value_error(format!(
                "{}: null or misaligned data",
                self.name
            )));
        }
        if self
            .len
            .checked_mul(size_of::<T>())
            .is_none_or(|b| b > isize::MAX as usize)
        {
            return Err(value_error(format!("{}: too large", self.name)));
        }
        Ok(())
    }

    /// The memory [start, end) in bytes.
    fn span(&self) -> (usize, usize) {
        let size = match DType::of(self.dtype) {
            DType::F64 | DType::S64 => 8,
            DType::F32 | DType::S32 => 4,
            DType::Pred => 1,
            // The CUDA handlers' 16-bit floats: their true size, or adjacent buffers would seem
            // to overlap.
            DType::Other(XLA_FFI_DATA_TYPE_F16 | XLA_FFI_DATA_TYPE_BF16) => 2,
            // Unknown dtypes are never viewed; up to 16 bytes an element covers every XLA type.
            DType::Other(_) => 16,
        };
        let start = self.data as usize;
        (start, start.saturating_add(self.len.saturating_mul(size)))
    }
}

/// The error for a dtype a handler does not take.
pub(crate) fn unsupported_dtype(name: &str, dtype: DType) -> Error {
    value_error(format!(
        "{name}: expected float32 or float64, got {dtype:?}"
    ))
}

/// Calls `$f::<T>(args)` with T the float type of buffer `$buf` (f32 or f64), or returns the
/// dtype error.
macro_rules! by_float {
    ($buf:expr, $f:ident ( $($arg:expr),* $(,)? )) => {
        match $buf.dtype() {
            $crate::ffi::frame::DType::F32 => $f::<f32>($($arg),*),
            $crate::ffi::frame::DType::F64 => $f::<f64>($($arg),*),
            d => Err($crate::ffi::frame::unsupported_dtype($buf.name(), d)),
        }
    };
}
pub(crate) use by_float;

/// An operand: read-only.
pub(crate) struct Buffer<'a>(Raw<'a>);

/// A result: written once, by the one handler that took it.
pub(crate) struct BufferMut<'a>(Raw<'a>);

/// The shape of a buffer, operand or result (both dereference to it).
impl<'a> Raw<'a> {
    /// The argument's name, for error messages.
    pub(crate) fn name(&self) -> &'static str {
        self.name
    }

    pub(crate) fn dtype(&self) -> DType {
        DType::of(self.dtype)
    }

    pub(crate) fn dims(&self) -> &'a [i64] {
        self.dims
    }

    pub(crate) fn rank(&self) -> usize {
        self.dims.len()
    }

    /// The number of elements.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The data's address, never dereferenced here: on CUDA it is device memory, which the
    /// kernels read and write.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn address(&self) -> u64 {
        self.data as u64
    }

    /// Dimension `i` counted from the end (0: the last), or an error naming the buffer.
    pub(crate) fn dim_from_end(&self, i: usize) -> Result<usize, Error> {
        let r = self.rank();
        if i >= r {
            return Err(value_error(format!(
                "{}: expected at least {} dims, got shape {:?}",
                self.name,
                i + 1,
                self.dims
            )));
        }
        Ok(self.dims[r - 1 - i] as usize)
    }

    /// The dims before the last `base_rank` (the batch dims), or an error when there are
    /// fewer than `base_rank`.
    pub(crate) fn leading(&self, base_rank: usize) -> Result<&'a [i64], Error> {
        let r = self.rank();
        if r < base_rank {
            return Err(value_error(format!(
                "{}: expected at least {base_rank} dims, got shape {:?}",
                self.name, self.dims
            )));
        }
        Ok(&self.dims[..r - base_rank])
    }

    /// An error unless the buffer has the dims `dims` (another buffer's).
    pub(crate) fn expect_same(&self, dims: &[i64]) -> Result<(), Error> {
        if self.dims == dims {
            return Ok(());
        }
        Err(value_error(format!(
            "{}: expected shape {dims:?}, got {:?}",
            self.name, self.dims
        )))
    }

    /// An error unless the buffer has exactly `dims`.
    pub(crate) fn expect_dims(&self, dims: &[usize]) -> Result<(), Error> {
        let same = self.dims.len() == dims.len()
            && self.dims.iter().zip(dims).all(|(&a, &b)| a as usize == b);
        if same {
            Ok(())
        } else {
            Err(value_error(format!(
                "{}: expected shape {dims:?}, got {:?}",
                self.name, self.dims
            )))
        }
    }
}

impl<'a> std::ops::Deref for Buffer<'a> {
    type Target = Raw<'a>;

    fn deref(&self) -> &Raw<'a> {
        &self.0
    }
}

impl<'a> std::ops::Deref for BufferMut<'a> {
    type Target = Raw<'a>;

    fn deref(&self) -> &Raw<'a> {
        &self.0
    }
}

impl<'a> Buffer<'a> {
    /// The elements as a slice of T, or an error when the dtype is not T.
    pub(crate) fn slice<T: Element>(&self) -> Result<&'a [T], Error> {
        self.0.check::<T>()?;
        if self.0.len == 0 {
            return Ok(&[]);
        }
        // SAFETY: XLA's operand buffer holds `len` elements of its dtype (checked to be T, the
        // pointer non-null and aligned) for the whole call; no result overlaps it (checked when
        // results are taken).
        Ok(unsafe { std::slice::from_raw_parts(self.0.data as *const T, self.0.len) })
    }

    /// The elements as a slice of T, or None when the buffer is empty (an absent optional
    /// operand is passed as a 0-length array).
    pub(crate) fn slice_opt<T: Element>(&self) -> Result<Option<&'a [T]>, Error> {
        if self.0.len == 0 {
            return Ok(None);
        }
        self.slice::<T>().map(Some)
    }

    /// Class indices widened to int64 (int32 is copied; int64 is borrowed).
    pub(crate) fn indices(&self) -> Result<std::borrow::Cow<'a, [i64]>, Error> {
        match self.dtype() {
            DType::S32 => Ok(self.slice::<i32>()?.iter().map(|&v| v as i64).collect()),
            _ => self.slice::<i64>().map(std::borrow::Cow::Borrowed),
        }
    }

    /// A boolean mask (XLA's PRED: one byte per element), copied.
    pub(crate) fn bools(&self) -> Result<Vec<bool>, Error> {
        if self.0.dtype != XLA_FFI_DATA_TYPE_PRED {
            return Err(value_error(format!(
                "{}: expected bool, got {:?}",
                self.0.name,
                self.dtype()
            )));
        }
        if self.0.len == 0 {
            return Ok(Vec::new());
        }
        if self.0.data.is_null() {
            return Err(value_error(format!("{}: null data", self.0.name)));
        }
        // SAFETY: a PRED buffer holds `len` bytes; they are read as bytes, not as bool.
        let bytes = unsafe { std::slice::from_raw_parts(self.0.data as *const u8, self.0.len) };
        Ok(bytes.iter().map(|&b| b != 0).collect())
    }
}

impl<'a> BufferMut<'a> {
    /// The elements as a mutable slice of T, or an error when the dtype is not T.
    pub(crate) fn slice_mut<T: Element>(self) -> Result<&'a mut [T], Error> {
        self.0.check::<T>()?;
        if self.0.len == 0 {
            return Ok(&mut []);
        }
        // SAFETY: as `Buffer::slice`; `Frame::result` hands each result out once and refuses one
        // that overlaps an operand, so this is the only reference to this memory.
        Ok(unsafe { std::slice::from_raw_parts_mut(self.0.data as *mut T, self.0.len) })
    }

    /// A boolean result (XLA's PRED: one byte per element) as `bool`s, all set to false first.
    pub(crate) fn bools_mut(self) -> Result<&'a mut [bool], Error> {
        if self.0.dtype != XLA_FFI_DATA_TYPE_PRED {
            return Err(value_error(format!(
                "{}: expected bool, got {:?}",
                self.0.name,
                DType::of(self.0.dtype)
            )));
        }
        if self.0.len == 0 {
            return Ok(&mut []);
        }
        if self.0.data.is_null() {
            return Err(value_error(format!("{}: null data", self.0.name)));
        }
        let data = self.0.data as *mut u8;
        // SAFETY: a PRED buffer holds `len` bytes, handed out once (as `slice_mut`). They are
        // zeroed as bytes before being viewed as bool, so every element is a valid `false`.
        unsafe {
            std::ptr::write_bytes(data, 0, self.0.len);
            Ok(std::slice::from_raw_parts_mut(
                data as *mut bool,
                self.0.len,
            ))
        }
    }
}

/// The call as a handler body sees it.
pub(crate) struct Frame<'a> {
    call: &'a XLA_FFI_CallFrame,
    /// Bit i set: result i has been handed out.
    taken: Cell<u64>,
}

impl<'a> Frame<'a> {
    pub(crate) fn operand_count(&self) -> usize {
        self.call.args.size.max(0) as usize
    }

    pub(crate) fn result_count(&self) -> usize {
        self.call.rets.size.max(0) as usize
    }

    /// An error unless the call has exactly `operands` operands and `results` results.
    pub(crate) fn expect_arity(&self, operands: usize, results: usize) -> Result<(), Error> {
        let (o, r) = (self.operand_count(), self.result_count());
        if (o, r) != (operands, results) {
            return Err(value_error(format!(
                "expected {operands} operands and {results} results, got {o} and {r}"
            )));
        }
        Ok(())
    }

    /// Operand `i`, called `name` in error messages.
    pub(crate) fn operand(&self, i: usize, name: &'static str) -> Result<Buffer<'a>, Error> {
        let a = &self.call.args;
        if i >= self.operand_count() || a.types.is_null() || a.args.is_null() {
            return Err(value_error(format!("{name}: operand {i} is missing")));
        }
        // SAFETY: `types` and `args` hold `size` entries (XLA's call frame).
        let (ty, ptr) = unsafe { (*a.types.add(i), *a.args.add(i)) };
        if ty != XLA_FFI_ARG_TYPE_BUFFER {
            return Err(value_error(format!("{name}: operand {i} is not a buffer")));
        }
        // SAFETY: an argument of type BUFFER points at an XLA_FFI_Buffer living for the call.
        unsafe { Raw::new(ptr as *const XLA_FFI_Buffer, name) }.map(Buffer)
    }

    /// Result `i`, called `name` in error messages; each result can be taken once.
    pub(crate) fn result(&self, i: usize, name: &'static str) -> Result<BufferMut<'a>, Error> {
        let r = &self.call.rets;
        if i >= self.result_count() || i >= 64 || r.types.is_null() || r.rets.is_null() {
            return Err(value_error(format!("{name}: result {i} is missing")));
        }
        if self.taken.get() & (1 << i) != 0 {
            return Err(value_error(format!("{name}: result {i} taken twice")));
        }
        // SAFETY: `types` and `rets` hold `size` entries (XLA's call frame).
        let (ty, ptr) = unsafe { (*r.types.add(i), *r.rets.add(i)) };
        if ty != XLA_FFI_RET_TYPE_BUFFER {
            return Err(value_error(format!("{name}: result {i} is not a buffer")));
        }
        // SAFETY: a result of type BUFFER points at an XLA_FFI_Buffer living for the call.
        let raw = unsafe { Raw::new(ptr as *const XLA_FFI_Buffer, name) }?;
        let (start, end) = raw.span();
        for j in 0..self.operand_count() {
            let op = self.operand(j, "operand")?;
            let (s, e) = op.0.span();
            if raw.len > 0 && op.0.len > 0 && start < e && s < end {
                return Err(value_error(format!(
                    "{name}: result {i} overlaps operand {j} (aliased outputs are not supported)"
                )));
            }
        }
        self.taken.set(self.taken.get() | (1 << i));
        Ok(BufferMut(raw))
    }

    /// The attribute `name`: its type and value pointer.
    fn attr(&self, name: &str) -> Result<(i32, *mut c_void), Error> {
        let a = &self.call.attrs;
        let n = a.size.max(0) as usize;
        if n > 0 && (a.types.is_null() || a.names.is_null() || a.attrs.is_null()) {
            return Err(value_error("malformed attributes".into()));
        }
        for i in 0..n {
            // SAFETY: `types`, `names` and `attrs` hold `size` entries; each name is a byte span.
            let (ty, span, value) = unsafe { (*a.types.add(i), *a.names.add(i), *a.attrs.add(i)) };
            if span.is_null() {
                continue;
            }
            // SAFETY: a byte span of `len` bytes at `ptr` (XLA's attribute name).
            let bytes = unsafe {
                let s = &*span;
                if s.ptr.is_null() {
                    continue;
                }
                std::slice::from_raw_parts(s.ptr as *const u8, s.len)
            };
            if bytes == name.as_bytes() {
                return Ok((ty, value));
            }
        }
        Err(value_error(format!("missing attribute {name:?}")))
    }

    /// The scalar attribute `name`: its dtype and value pointer.
    fn scalar(&self, name: &str) -> Result<(DType, *const c_void), Error> {
        let (ty, value) = self.attr(name)?;
        if ty != XLA_FFI_ATTR_TYPE_SCALAR || value.is_null() {
            return Err(value_error(format!("attribute {name}: expected a scalar")));
        }
        // SAFETY: a SCALAR attribute points at an XLA_FFI_Scalar.
        let s = unsafe { &*(value as *const XLA_FFI_Scalar) };
        if s.value.is_null() {
            return Err(value_error(format!("attribute {name}: no value")));
        }
        Ok((DType::of(s.dtype), s.value))
    }

    /// An integer attribute (int64, or int32 widened).
    pub(crate) fn attr_i64(&self, name: &str) -> Result<i64, Error> {
        // SAFETY: a scalar's value points at one element of its dtype.
        match self.scalar(name)? {
            (DType::S64, p) => Ok(unsafe { *(p as *const i64) }),
            (DType::S32, p) => Ok(unsafe { *(p as *const i32) } as i64),
            (d, _) => Err(value_error(format!(
                "attribute {name}: expected an integer, got {d:?}"
            ))),
        }
    }

    /// A non-negative integer attribute as a size.
    pub(crate) fn attr_usize(&self, name: &str) -> Result<usize, Error> {
        let v = self.attr_i64(name)?;
        usize::try_from(v)
            .map_err(|_| value_error(format!("attribute {name}: must be >= 0, got {v}")))
    }

    /// A floating-point attribute (float64, or float32 widened).
    pub(crate) fn attr_f64(&self, name: &str) -> Result<f64, Error> {
        // SAFETY: a scalar's value points at one element of its dtype.
        match self.scalar(name)? {
            (DType::F64, p) => Ok(unsafe { *(p as *const f64) }),
            (DType::F32, p) => Ok(unsafe { *(p as *const f32) } as f64),
            (d, _) => Err(value_error(format!(
                "attribute {name}: expected a float, got {d:?}"
            ))),
        }
    }

    /// A boolean attribute.
    pub(crate) fn attr_bool(&self, name: &str) -> Result<bool, Error> {
        match self.scalar(name)? {
            // SAFETY: a PRED scalar is one byte, read as a byte.
            (DType::Pred, p) => Ok(unsafe { *(p as *const u8) } != 0),
            (d, _) => Err(value_error(format!(
                "attribute {name}: expected a bool, got {d:?}"
            ))),
        }
    }

    /// A string attribute.
    pub(crate) fn attr_str(&self, name: &str) -> Result<&'a str, Error> {
        let (ty, value) = self.attr(name)?;
        if ty != XLA_FFI_ATTR_TYPE_STRING || value.is_null() {
            return Err(value_error(format!("attribute {name}: expected a string")));
        }
        // SAFETY: a STRING attribute points at a byte span living for the call.
        let bytes = unsafe {
            let s = &*(value as *const XLA_FFI_ByteSpan);
            if s.ptr.is_null() {
                &[]
            } else {
                std::slice::from_raw_parts(s.ptr as *const u8, s.len)
            }
        };
        std::str::from_utf8(bytes).map_err(|_| value_error(format!("attribute {name}: not UTF-8")))
    }

    /// The platform stream of the call (a `CUstream` on CUDA).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn stream(&self) -> Result<*mut c_void, Error> {
        // SAFETY: `api` is XLA's API table for this call (checked non-null in `handle`).
        let api = unsafe { &*self.call.api };
        let get = api
            .stream_get
            .ok_or_else(|| Error::Device("the FFI API has no stream".into()))?;
        let mut args = XLA_FFI_Stream_Get_Args {
            struct_size: size_of::<XLA_FFI_Stream_Get_Args>(),
            extension_start: std::ptr::null_mut(),
            ctx: self.call.ctx,
            stream: std::ptr::null_mut(),
        };
        // SAFETY: XLA's function with its argument struct, filled as c_api.h says.
        let err = unsafe { get(&mut args) };
        if !err.is_null() {
            // The error object is XLA's; this subset cannot read its message, so it is leaked
            // rather than destroyed through a slot this subset does not type.
            return Err(Error::Device("XLA could not give the call's stream".into()));
        }
        Ok(args.stream)
    }

    /// The call's device ordinal (XLA's, the CUDA ordinal on CUDA).
    #[cfg(feature = "cuda")]
    pub(crate) fn device_ordinal(&self) -> Result<i32, Error> {
        // SAFETY: as in `stream`.
        let api = unsafe { &*self.call.api };
        let get = api
            .device_ordinal_get
            .ok_or_else(|| Error::Device("the FFI API has no device ordinal".into()))?;
        let mut args = XLA_FFI_DeviceOrdinal_Get_Args {
            struct_size: size_of::<XLA_FFI_DeviceOrdinal_Get_Args>(),
            extension_start: std::ptr::null_mut(),
            ctx: self.call.ctx,
            device_ordinal: 0,
        };
        // SAFETY: as in `stream`.
        if !unsafe { get(&mut args) }.is_null() {
            return Err(Error::Device("XLA could not give the call's device".into()));
        }
        Ok(args.device_ordinal)
    }

    /// `size` bytes of device memory from XLA's allocator (null for 0 bytes), given back when
    /// the result is dropped: before the handler returns, as XLA's own scratch allocator does
    /// (XLA reuses it in its stream's order, after the work enqueued on that stream).
    #[cfg(feature = "cuda")]
    pub(crate) fn allocate(
        &self,
        size: usize,
        alignment: usize,
    ) -> Result<DeviceMemory<'_>, Error> {
        // SAFETY: as in `stream`.
        let api = unsafe { &*self.call.api };
        let mut memory = DeviceMemory {
            api,
            ctx: self.call.ctx,
            ptr: 0,
            size,
        };
        if size == 0 {
            return Ok(memory);
        }
        let allocate = api
            .device_memory_allocate
            .ok_or_else(|| Error::Device("the FFI API has no allocator".into()))?;
        let mut args = XLA_FFI_DeviceMemory_Allocate_Args {
            struct_size: size_of::<XLA_FFI_DeviceMemory_Allocate_Args>(),
            extension_start: std::ptr::null_mut(),
            ctx: self.call.ctx,
            size,
            alignment,
            data: std::ptr::null_mut(),
        };
        // SAFETY: as in `stream`.
        if !unsafe { allocate(&mut args) }.is_null() || args.data.is_null() {
            return Err(Error::Device(format!(
                "XLA could not allocate {size} bytes of scratch"
            )));
        }
        memory.ptr = args.data as u64;
        Ok(memory)
    }
}

/// Device memory of one call from XLA's allocator ([`Frame::allocate`]).
#[cfg(feature = "cuda")]
pub(crate) struct DeviceMemory<'a> {
    api: &'a XLA_FFI_Api,
    ctx: *mut XLA_FFI_ExecutionContext,
    pub(crate) ptr: u64,
    size: usize,
}

#[cfg(feature = "cuda")]
impl Drop for DeviceMemory<'_> {
    fn drop(&mut self) {
        let Some(free) = self.api.device_memory_free.filter(|_| self.ptr != 0) else {
            return;
        };
        let mut args = XLA_FFI_DeviceMemory_Free_Args {
            struct_size: size_of::<XLA_FFI_DeviceMemory_Free_Args>(),
            extension_start: std::ptr::null_mut(),
            ctx: self.ctx,
            size: self.size,
            data: self.ptr as *mut c_void,
        };
        // SAFETY: memory this call's allocator gave, returned once; a failed free leaves it to
        // XLA (the error object is leaked, as in `Frame::stream`).
        unsafe { free(&mut args) };
    }
}

/// An XLA error with `message` (copied by XLA), or null where the API cannot make one.
///
/// # Safety
/// `api` is XLA's API table.
unsafe fn make_error(
    api: *const XLA_FFI_Api,
    code: XLA_FFI_Error_Code,
    message: &str,
) -> *mut XLA_FFI_Error {
    let Some(create) = (&*api).error_create else {
        return std::ptr::null_mut();
    };
    let text = CString::new(message.replace('\0', " ")).unwrap_or_default();
    let mut args = XLA_FFI_Error_Create_Args {
        struct_size: size_of::<XLA_FFI_Error_Create_Args>(),
        extension_start: std::ptr::null_mut(),
        message: text.as_ptr(),
        errc: code,
    };
    create(&mut args)
}

/// The FFI code of a normax error: INVALID_ARGUMENT for bad values and indices, INTERNAL else.
fn error_code(e: &Error) -> (XLA_FFI_Error_Code, &str) {
    match e {
        Error::Value(m) | Error::Index(m) => (XLA_FFI_ERROR_CODE_INVALID_ARGUMENT, m),
        Error::NoDevice(m) | Error::Unavailable(m) | Error::Device(m) => {
            (XLA_FFI_ERROR_CODE_INTERNAL, m)
        }
    }
}

/// Answers XLA's metadata query: the API version this subset was written against, and `traits`.
///
/// # Safety
/// `ext` is the call frame's metadata extension.
unsafe fn populate_metadata(
    api: *const XLA_FFI_Api,
    ext: *mut XLA_FFI_Extension_Base,
    traits: u32,
) -> *mut XLA_FFI_Error {
    let ext = &mut *(ext as *mut XLA_FFI_Metadata_Extension);
    if ext.extension_base.struct_size < XLA_FFI_METADATA_EXTENSION_STRUCT_SIZE
        || ext.metadata.is_null()
        || (*ext.metadata).struct_size < XLA_FFI_METADATA_STRUCT_SIZE
    {
        let code = XLA_FFI_ERROR_CODE_INVALID_ARGUMENT;
        return make_error(api, code, "normax: metadata struct too small");
    }
    let m = &mut *ext.metadata;
    m.api_version = XLA_FFI_Api_Version {
        struct_size: size_of::<XLA_FFI_Api_Version>(),
        extension_start: std::ptr::null_mut(),
        major_version: XLA_FFI_API_MAJOR,
        minor_version: XLA_FFI_API_MINOR,
    };
    m.traits = traits;
    // No state (XLA_FFI_UNKNOWN_TYPE_ID), where the caller's struct has the field.
    if m.struct_size >= size_of::<XLA_FFI_Metadata>() {
        m.state_type_id = XLA_FFI_TypeId { type_id: 0 };
    }
    std::ptr::null_mut()
}

/// Runs a handler body on XLA's call frame: answers the metadata query, checks the frame and the
/// stage, and turns the body's error, or its panic, into an XLA error.
///
/// # Safety
/// `call_frame` is the call frame XLA passed to the handler.
pub(crate) unsafe fn handle(
    call_frame: *mut XLA_FFI_CallFrame,
    traits: u32,
    body: fn(&Frame) -> Result<(), Error>,
) -> *mut XLA_FFI_Error {
    // Without a frame and its API no error can be made; XLA always passes both.
    if call_frame.is_null() || (*call_frame).api.is_null() {
        return std::ptr::null_mut();
    }
    let call = &*call_frame;
    let api = call.api;
    if call.struct_size < XLA_FFI_CALL_FRAME_STRUCT_SIZE {
        let code = XLA_FFI_ERROR_CODE_INVALID_ARGUMENT;
        return make_error(api, code, "normax: XLA's call frame is older than API 0.3");
    }
    let ext = call.extension_start;
    if !ext.is_null() && (*ext).type_ == XLA_FFI_EXTENSION_METADATA {
        return populate_metadata(api, ext, traits);
    }
    if call.stage != XLA_FFI_EXECUTION_STAGE_EXECUTE {
        let code = XLA_FFI_ERROR_CODE_INVALID_ARGUMENT;
        let message = format!("normax: called at stage {}, not execute", call.stage);
        return make_error(api, code, &message);
    }
    let frame = Frame {
        call,
        taken: Cell::new(0),
    };
    match catch_unwind(AssertUnwindSafe(|| body(&frame))) {
        Ok(Ok(())) => std::ptr::null_mut(),
        Ok(Err(e)) => {
            let (code, message) = error_code(&e);
            make_error(api, code, message)
        }
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            let message = format!("normax: internal error in an FFI handler: {what}");
            make_error(api, XLA_FFI_ERROR_CODE_INTERNAL, &message)
        }
    }
}

/// Defines `extern "C" fn $name(*mut XLA_FFI_CallFrame) -> *mut XLA_FFI_Error` running the safe
/// body `$body: fn(&Frame) -> Result<(), Error>` through [`handle`], with handler traits
/// `$traits` (0 on the CPU).
macro_rules! ffi_handler {
    ($name:ident, $body:path) => {
        $crate::ffi::frame::ffi_handler!($name, $body, 0);
    };
    ($name:ident, $body:path, $traits:expr) => {
        unsafe extern "C" fn $name(
            call_frame: *mut $crate::ffi::api::XLA_FFI_CallFrame,
        ) -> *mut $crate::ffi::api::XLA_FFI_Error {
            // SAFETY: XLA calls a registered handler with its call frame.
            unsafe { $crate::ffi::frame::handle(call_frame, $traits, $body) }
        }
    };
}
pub(crate) use ffi_handler;
