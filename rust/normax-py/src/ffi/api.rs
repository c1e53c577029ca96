//! The part of XLA's FFI C API (`xla/ffi/api/c_api.h`, API version 0.3, shipped with jaxlib:
//! `jax.ffi.include_dir()`) that the handlers use, written out by hand as `#[repr(C)]` structs.
//!
//! Field order and types follow the header exactly; C enums are `i32`/`u32` here rather than Rust
//! enums, so that a value this subset does not know is a number to reject, not undefined
//! behaviour. Only the functions the handlers call are typed; the other slots of `XLA_FFI_Api`
//! are opaque pointers that keep the layout.

#![allow(non_camel_case_types)]

use std::ffi::{c_char, c_void};

pub(crate) const XLA_FFI_API_MAJOR: i32 = 0;
pub(crate) const XLA_FFI_API_MINOR: i32 = 3;

/// `XLA_FFI_Extension_Type`: the metadata query XLA sends before the first real call.
pub(crate) const XLA_FFI_EXTENSION_METADATA: i32 = 1;

/// `XLA_FFI_Error_Code` values the handlers return.
pub(crate) type XLA_FFI_Error_Code = i32;
pub(crate) const XLA_FFI_ERROR_CODE_INVALID_ARGUMENT: XLA_FFI_Error_Code = 3;
pub(crate) const XLA_FFI_ERROR_CODE_INTERNAL: XLA_FFI_Error_Code = 13;

/// `XLA_FFI_DataType` values the handlers accept.
pub(crate) type XLA_FFI_DataType = i32;
pub(crate) const XLA_FFI_DATA_TYPE_PRED: XLA_FFI_DataType = 1;
pub(crate) const XLA_FFI_DATA_TYPE_S32: XLA_FFI_DataType = 4;
pub(crate) const XLA_FFI_DATA_TYPE_S64: XLA_FFI_DataType = 5;
pub(crate) const XLA_FFI_DATA_TYPE_F32: XLA_FFI_DataType = 11;
pub(crate) const XLA_FFI_DATA_TYPE_F64: XLA_FFI_DataType = 12;
pub(crate) const XLA_FFI_DATA_TYPE_F16: XLA_FFI_DataType = 10;
pub(crate) const XLA_FFI_DATA_TYPE_BF16: XLA_FFI_DataType = 16;

/// `XLA_FFI_ArgType` / `XLA_FFI_RetType`: buffers are the only kind.
pub(crate) const XLA_FFI_ARG_TYPE_BUFFER: i32 = 1;
pub(crate) const XLA_FFI_RET_TYPE_BUFFER: i32 = 1;

/// `XLA_FFI_AttrType` values the handlers decode.
pub(crate) const XLA_FFI_ATTR_TYPE_SCALAR: i32 = 3;
pub(crate) const XLA_FFI_ATTR_TYPE_STRING: i32 = 4;

/// `XLA_FFI_ExecutionStage_EXECUTE`: the only stage a plain capsule handler is registered for.
pub(crate) const XLA_FFI_EXECUTION_STAGE_EXECUTE: i32 = 3;

/// Opaque types only XLA looks inside.
#[repr(C)]
pub(crate) struct XLA_FFI_Error {
    _private: [u8; 0],
}
#[repr(C)]
pub(crate) struct XLA_FFI_ExecutionContext {
    _private: [u8; 0],
}

#[repr(C)]
pub(crate) struct XLA_FFI_Extension_Base {
    pub struct_size: usize,
    pub type_: i32,
    pub next: *mut XLA_FFI_Extension_Base,
}

#[repr(C)]
pub(crate) struct XLA_FFI_Api_Version {
    pub struct_size: usize,
    pub extension_start: *mut XLA_FFI_Extension_Base,
    pub major_version: i32,
    pub minor_version: i32,
}

#[repr(C)]
pub(crate) struct XLA_FFI_Error_Create_Args {
    pub struct_size: usize,
    pub extension_start: *mut XLA_FFI_Extension_Base,
    pub message: *const c_char,
    pub errc: XLA_FFI_Error_Code,
}

#[repr(C)]
pub(crate) struct XLA_FFI_Buffer {
    pub struct_size: usize,
    pub extension_start: *mut XLA_FFI_Extension_Base,
    pub dtype: XLA_FFI_DataType,
    pub data: *mut c_void,
    pub rank: i64,
    pub dims: *mut i64,
}

#[repr(C)]
pub(crate) struct XLA_FFI_ByteSpan {
    pub ptr: *const c_char,
    pub len: usize,
}

#[repr(C)]
pub(crate) struct XLA_FFI_Scalar {
    pub dtype: XLA_FFI_DataType,
    pub value: *mut c_void,
}

#[repr(C)]
pub(crate) struct XLA_FFI_Args {
    pub struct_size: usize,
    pub extension_start: *mut XLA_FFI_Extension_Base,
    pub size: i64,
    pub types: *mut i32,
    pub args: *mut *mut c_void,
}

#[repr(C)]
pub(crate) struct XLA_FFI_Rets {
    pub struct_size: usize,
    pub extension_start: *mut XLA_FFI_Extension_Base,
    pub size: i64,
    pub types: *mut i32,
    pub rets: *mut *mut c_void,
}

#[repr(C)]
pub(crate) struct XLA_FFI_Attrs {
    pub struct_size: usize,
    pub extension_start: *mut XLA_FFI_Extension_Base,
    pub size: i64,
    pub types: *mut i32,
    pub names: *mut *mut XLA_FFI_ByteSpan,
    pub attrs: *mut *mut c_void,
}

#[repr(C)]
pub(crate) struct XLA_FFI_CallFrame {
    pub struct_size: usize,
    pub extension_start: *mut XLA_FFI_Extension_Base,
    pub api: *const XLA_FFI_Api,
    pub ctx: *mut XLA_FFI_ExecutionContext,
    pub stage: i32,
    pub args: XLA_FFI_Args,
    pub rets: XLA_FFI_Rets,
    pub attrs: XLA_FFI_Attrs,
    pub future: *mut c_void,
}

/// `XLA_FFI_CallFrame_STRUCT_SIZE`: the frame up to and including `attrs`.
pub(crate) const XLA_FFI_CALL_FRAME_STRUCT_SIZE: usize =
    std::mem::offset_of!(XLA_FFI_CallFrame, attrs) + std::mem::size_of::<XLA_FFI_Attrs>();

#[repr(C)]
pub(crate) struct XLA_FFI_Stream_Get_Args {
    pub struct_size: usize,
    pub extension_start: *mut XLA_FFI_Extension_Base,
    pub ctx: *mut XLA_FFI_ExecutionContext,
    pub stream: *mut c_void,
}

#[repr(C)]
pub(crate) struct XLA_FFI_DeviceMemory_Allocate_Args {
    pub struct_size: usize,
    pub extension_start: *mut XLA_FFI_Extension_Base,
    pub ctx: *mut XLA_FFI_ExecutionContext,
    pub size: usize,
    pub alignment: usize,
    pub data: *mut c_void,
}

#[repr(C)]
pub(crate) struct XLA_FFI_DeviceMemory_Free_Args {
    pub struct_size: usize,
    pub extension_start: *mut XLA_FFI_Extension_Base,
    pub ctx: *mut XLA_FFI_ExecutionContext,
    pub size: usize,
    pub data: *mut c_void,
}

#[repr(C)]
pub(crate) struct XLA_FFI_DeviceOrdinal_Get_Args {
    pub struct_size: usize,
    pub extension_start: *mut XLA_FFI_Extension_Base,
    pub ctx: *mut XLA_FFI_ExecutionContext,
    pub device_ordinal: i32,
}

#[repr(C)]
pub(crate) struct XLA_FFI_TypeId {
    pub type_id: i64,
}

#[repr(C)]
pub(crate) struct XLA_FFI_Metadata {
    pub struct_size: usize,
    pub api_version: XLA_FFI_Api_Version,
    pub traits: u32,
    pub state_type_id: XLA_FFI_TypeId,
}

/// `XLA_FFI_Metadata_STRUCT_SIZE`: up to and including `traits`.
pub(crate) const XLA_FFI_METADATA_STRUCT_SIZE: usize =
    std::mem::offset_of!(XLA_FFI_Metadata, traits) + std::mem::size_of::<u32>();

#[repr(C)]
pub(crate) struct XLA_FFI_Metadata_Extension {
    pub extension_base: XLA_FFI_Extension_Base,
    pub metadata: *mut XLA_FFI_Metadata,
}

pub(crate) const XLA_FFI_METADATA_EXTENSION_STRUCT_SIZE: usize =
    std::mem::size_of::<XLA_FFI_Metadata_Extension>();

pub(crate) type XLA_FFI_Error_Create =
    unsafe extern "C" fn(args: *mut XLA_FFI_Error_Create_Args) -> *mut XLA_FFI_Error;
pub(crate) type XLA_FFI_Stream_Get =
    unsafe extern "C" fn(args: *mut XLA_FFI_Stream_Get_Args) -> *mut XLA_FFI_Error;
pub(crate) type XLA_FFI_DeviceMemory_Allocate =
    unsafe extern "C" fn(args: *mut XLA_FFI_DeviceMemory_Allocate_Args) -> *mut XLA_FFI_Error;
pub(crate) type XLA_FFI_DeviceMemory_Free =
    unsafe extern "C" fn(args: *mut XLA_FFI_DeviceMemory_Free_Args) -> *mut XLA_FFI_Error;
pub(crate) type XLA_FFI_DeviceOrdinal_Get =
    unsafe extern "C" fn(args: *mut XLA_FFI_DeviceOrdinal_Get_Args) -> *mut XLA_FFI_Error;

/// A function slot of `XLA_FFI_Api` this subset does not call.
type Unused = Option<unsafe extern "C" fn()>;

#[repr(C)]
pub(crate) struct XLA_FFI_Api {
    pub struct_size: usize,
    pub extension_start: *mut XLA_FFI_Extension_Base,
    pub api_version: XLA_FFI_Api_Version,
    pub internal_api: *const c_void,
    pub error_create: Option<XLA_FFI_Error_Create>,
    error_get_message: Unused,
    error_destroy: Unused,
    handler_register: Unused,
    pub stream_get: Option<XLA_FFI_Stream_Get>,
    type_register: Unused,
    execution_context_get: Unused,
    state_set: Unused,
    state_get: Unused,
    pub device_memory_allocate: Option<XLA_FFI_DeviceMemory_Allocate>,
    pub device_memory_free: Option<XLA_FFI_DeviceMemory_Free>,
    thread_pool_schedule: Unused,
    thread_pool_num_threads: Unused,
    future_create: Unused,
    future_set_available: Unused,
    future_set_error: Unused,
    run_id_get: Unused,
    pub device_ordinal_get: Option<XLA_FFI_DeviceOrdinal_Get>,
}

/// A handler as XLA calls it: `XLA_FFI_Handler`.
pub(crate) type XLA_FFI_Handler =
    unsafe extern "C" fn(call_frame: *mut XLA_FFI_CallFrame) -> *mut XLA_FFI_Error;

// The offsets a C compiler gives these structs on a 64-bit target (from c_api.h), checked at
// compile time: a wrong field here would read XLA's memory at the wrong place.
#[cfg(target_pointer_width = "64")]
const _: () = {
    use std::mem::{offset_of, size_of};
    assert!(size_of::<XLA_FFI_Buffer>() == 48);
    assert!(offset_of!(XLA_FFI_Buffer, data) == 24);
    assert!(offset_of!(XLA_FFI_CallFrame, stage) == 32);
    assert!(offset_of!(XLA_FFI_CallFrame, args) == 40);
    assert!(offset_of!(XLA_FFI_CallFrame, rets) == 80);
    assert!(offset_of!(XLA_FFI_CallFrame, attrs) == 120);
    assert!(XLA_FFI_CALL_FRAME_STRUCT_SIZE == 168);
    assert!(offset_of!(XLA_FFI_Api, error_create) == 48);
    assert!(offset_of!(XLA_FFI_Api, stream_get) == 80);
    assert!(offset_of!(XLA_FFI_Api, device_memory_allocate) == 120);
    assert!(offset_of!(XLA_FFI_Api, device_ordinal_get) == 184);
    assert!(size_of::<XLA_FFI_DeviceMemory_Allocate_Args>() == 48);
    assert!(offset_of!(XLA_FFI_DeviceOrdinal_Get_Args, device_ordinal) == 24);
    assert!(size_of::<XLA_FFI_Api>() == 48 + 18 * 8);
    assert!(offset_of!(XLA_FFI_Metadata, traits) == 32);
    assert!(XLA_FFI_METADATA_EXTENSION_STRUCT_SIZE == 32);
};
