"""A stand-in for XLA calling an FFI handler, in ctypes (no GPU, no jaxlib internals): the call frame,
its buffers and attributes laid out as xla/ffi/api/c_api.h (API 0.3) says, and an XLA_FFI_Api whose
functions are Python callbacks: Stream_Get gives `STREAM`, DeviceOrdinal_Get `DEVICE`,
DeviceMemory_Allocate hands out fake device addresses (and Free takes them back, both recorded),
Error_Create keeps the code and message of each error the handler returns.

With the dry-run recorder on (`_core.cuda_record`) the CUDA handlers run their real host code and
list the launches they would enqueue; the fake device addresses are never dereferenced.
"""

from __future__ import annotations

import ctypes
from ctypes import POINTER, c_char_p, c_int, c_int32, c_int64, c_size_t, c_uint32, c_void_p
from dataclasses import dataclass, field

import numpy as np

STREAM = 0x5EED0  # XLA's CUstream for the call
DEVICE = 0  # XLA's device ordinal (the recorder's stand-in device answers for any)

# XLA_FFI_DataType codes
DTYPES = {
    np.dtype(np.bool_): 1,
    np.dtype(np.int32): 4,
    np.dtype(np.int64): 5,
    np.dtype(np.float16): 10,
    np.dtype(np.float32): 11,
    np.dtype(np.float64): 12,
    "bfloat16": 16,
}
INVALID_ARGUMENT, INTERNAL = 3, 13
ATTR_SCALAR, ATTR_STRING = 3, 4
STAGE_EXECUTE = 3


class ExtensionBase(ctypes.Structure):
    pass


ExtensionBase._fields_ = [("struct_size", c_size_t), ("type", c_int), ("next", POINTER(ExtensionBase))]


class ApiVersion(ctypes.Structure):
    _fields_ = [("struct_size", c_size_t), ("extension_start", c_void_p), ("major", c_int), ("minor", c_int)]


class ErrorCreateArgs(ctypes.Structure):
    _fields_ = [
        ("struct_size", c_size_t),
        ("extension_start", c_void_p),
        ("message", c_char_p),
        ("errc", c_int),
    ]


class StreamGetArgs(ctypes.Structure):
    _fields_ = [
        ("struct_size", c_size_t),
        ("extension_start", c_void_p),
        ("ctx", c_void_p),
        ("stream", c_void_p),
    ]


class AllocateArgs(ctypes.Structure):
    _fields_ = [
        ("struct_size", c_size_t), ("extension_start", c_void_p), ("ctx", c_void_p),
        ("size", c_size_t), ("alignment", c_size_t), ("data", c_void_p),
    ]  # fmt: skip


class FreeArgs(ctypes.Structure):
    _fields_ = [
        ("struct_size", c_size_t), ("extension_start", c_void_p), ("ctx", c_void_p),
        ("size", c_size_t), ("data", c_void_p),
    ]  # fmt: skip


class DeviceOrdinalArgs(ctypes.Structure):
    _fields_ = [
        ("struct_size", c_size_t), ("extension_start", c_void_p), ("ctx", c_void_p), ("device_ordinal", c_int32),
    ]  # fmt: skip


def _fn(args_type):
    """An XLA_FFI_Api function: XLA_FFI_Error* f(Args*)."""
    return ctypes.CFUNCTYPE(c_void_p, POINTER(args_type))


# The 18 function slots of XLA_FFI_Api in order; the ones the handlers may call are typed.
_SLOTS = [
    ("error_create", _fn(ErrorCreateArgs)), ("error_get_message", c_void_p), ("error_destroy", c_void_p),
    ("handler_register", c_void_p), ("stream_get", _fn(StreamGetArgs)), ("type_register", c_void_p),
    ("execution_context_get", c_void_p), ("state_set", c_void_p), ("state_get", c_void_p),
    ("device_memory_allocate", _fn(AllocateArgs)), ("device_memory_free", _fn(FreeArgs)),
    ("thread_pool_schedule", c_void_p), ("thread_pool_num_threads", c_void_p), ("future_create", c_void_p),
    ("future_set_available", c_void_p), ("future_set_error", c_void_p), ("run_id_get", c_void_p),
    ("device_ordinal_get", _fn(DeviceOrdinalArgs)),
]  # fmt: skip


class Api(ctypes.Structure):
    _fields_ = [
        ("struct_size", c_size_t), ("extension_start", c_void_p), ("api_version", ApiVersion),
        ("internal_api", c_void_p), *_SLOTS,
    ]  # fmt: skip


class Buffer(ctypes.Structure):
    _fields_ = [
        ("struct_size", c_size_t), ("extension_start", c_void_p), ("dtype", c_int), ("data", c_void_p),
        ("rank", c_int64), ("dims", POINTER(c_int64)),
    ]  # fmt: skip


class ByteSpan(ctypes.Structure):
    _fields_ = [("ptr", c_char_p), ("len", c_size_t)]


class Scalar(ctypes.Structure):
    _fields_ = [("dtype", c_int), ("value", c_void_p)]


class Args(ctypes.Structure):
    _fields_ = [
        ("struct_size", c_size_t), ("extension_start", c_void_p), ("size", c_int64),
        ("types", POINTER(c_int)), ("args", POINTER(c_void_p)),
    ]  # fmt: skip


class Attrs(ctypes.Structure):
    _fields_ = [
        ("struct_size", c_size_t), ("extension_start", c_void_p), ("size", c_int64), ("types", POINTER(c_int)),
        ("names", POINTER(POINTER(ByteSpan))), ("attrs", POINTER(c_void_p)),
    ]  # fmt: skip


class CallFrame(ctypes.Structure):
    _fields_ = [
        ("struct_size", c_size_t), ("extension_start", POINTER(ExtensionBase)), ("api", POINTER(Api)),
        ("ctx", c_void_p), ("stage", c_int), ("args", Args), ("rets", Args), ("attrs", Attrs), ("future", c_void_p),
    ]  # fmt: skip


class Metadata(ctypes.Structure):
    _fields_ = [
        ("struct_size", c_size_t),
        ("api_version", ApiVersion),
        ("traits", c_uint32),
        ("state_type_id", c_int64),
    ]


class MetadataExtension(ctypes.Structure):
    _fields_ = [("extension_base", ExtensionBase), ("metadata", POINTER(Metadata))]


assert ctypes.sizeof(Api) == 48 + 18 * 8 and ctypes.sizeof(Buffer) == 48
assert CallFrame.attrs.offset + ctypes.sizeof(Attrs) == 168  # XLA_FFI_CallFrame_STRUCT_SIZE


@dataclass
class Array:
    """A device array as XLA hands it over: a fake address, a dtype and dims."""

    ptr: int
    dtype: object
    shape: tuple

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


@dataclass
class FakeXla:
    """One fake XLA runtime: device addresses, allocations and the errors handlers made."""

    stream_fails: bool = False
    next_ptr: int = 0x7F00_0000_0000
    allocations: list = field(default_factory=list)  # (ptr, size, alignment)
    frees: list = field(default_factory=list)  # (ptr, size)
    errors: dict = field(default_factory=dict)  # error address -> (code, message)

    def __post_init__(self):
        self._keep = []
        self.api = Api(struct_size=ctypes.sizeof(Api))
        self.api.api_version = ApiVersion(ctypes.sizeof(ApiVersion), None, 0, 3)
        self.api.error_create = self._keep_fn(_SLOTS[0][1](self._error_create))
        self.api.stream_get = self._keep_fn(_SLOTS[4][1](self._stream_get))
        self.api.device_memory_allocate = self._keep_fn(_SLOTS[9][1](self._allocate))
        self.api.device_memory_free = self._keep_fn(_SLOTS[10][1](self._free))
        self.api.device_ordinal_get = self._keep_fn(_SLOTS[17][1](self._device_ordinal))

    def _keep_fn(self, f):
        self._keep.append(f)
        return f

    def _error(self, code: int, message: str) -> int:
        # A distinct address per error: the handler only passes it back.
        address = 0xE000 + 16 * len(self.errors)
        self.errors[address] = (code, message)
        return address

    def _error_create(self, args):
        return self._error(args.contents.errc, args.contents.message.decode())

    def _stream_get(self, args):
        if self.stream_fails:
            return self._error(INTERNAL, "no stream")
        args.contents.stream = STREAM

    def _device_ordinal(self, args):
        args.contents.device_ordinal = DEVICE

    def _allocate(self, args):
        a = args.contents
        ptr = self.malloc(a.size)
        self.allocations.append((ptr, a.size, a.alignment))
        a.data = ptr

    def _free(self, args):
        self.frees.append((args.contents.data, args.contents.size))

    def malloc(self, nbytes: int) -> int:
        """A fresh, 256-byte aligned fake device address with room for `nbytes`."""
        ptr = self.next_ptr
        self.next_ptr += (max(nbytes, 1) + 0xFFFF) // 0x10000 * 0x10000
        return ptr

    def array(self, shape, dtype=np.float32) -> Array:
        """A device array of XLA's (no memory behind it)."""
        itemsize = 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize
        shape = tuple(shape)
        return Array(self.malloc(int(np.prod(shape, dtype=np.int64)) * itemsize), dtype, shape)

    # -- the call

    def _buffers(self, arrays):
        n = len(arrays)
        types = (c_int * max(n, 1))(*([1] * n))
        pointers = (c_void_p * max(n, 1))()
        for i, a in enumerate(arrays):
            dims = (c_int64 * max(len(a.shape), 1))(*a.shape)
            dtype = DTYPES["bfloat16"] if a.dtype == "bfloat16" else DTYPES[np.dtype(a.dtype)]
            b = Buffer(ctypes.sizeof(Buffer), None, dtype, a.ptr, len(a.shape), dims)
            self._keep += [dims, b]
            pointers[i] = ctypes.addressof(b)
        self._keep += [types, pointers]
        return Args(ctypes.sizeof(Args), None, n, types, pointers)

    def _attrs(self, attrs):
        n = len(attrs)
        types = (c_int * max(n, 1))()
        names = (POINTER(ByteSpan) * max(n, 1))()
        values = (c_void_p * max(n, 1))()
        for i, (name, value) in enumerate(sorted(attrs.items())):
            raw = name.encode()
            span = ByteSpan(raw, len(raw))
            names[i] = ctypes.pointer(span)
            if isinstance(value, str):
                text = value.encode()
                payload = ByteSpan(text, len(text))
                types[i] = ATTR_STRING
                self._keep += [text]
            else:
                if isinstance(value, (bool, np.bool_)):
                    cell, code = ctypes.c_uint8(bool(value)), 1
                elif isinstance(value, (int, np.integer)):
                    cell, code = c_int64(int(value)), 5
                else:
                    cell, code = ctypes.c_double(float(value)), 12
                payload = Scalar(code, ctypes.addressof(cell))
                types[i] = ATTR_SCALAR
                self._keep += [cell]
            values[i] = ctypes.addressof(payload)
            self._keep += [raw, span, payload]
        self._keep += [types, names, values]
        return Attrs(ctypes.sizeof(Attrs), None, n, types, names, values)

    def frame(self, operands, results, attrs, stage=STAGE_EXECUTE, extension=None):
        f = CallFrame(
            struct_size=ctypes.sizeof(CallFrame),
            extension_start=extension,
            api=ctypes.pointer(self.api),
            ctx=0xC0DE,
            stage=stage,
            args=self._buffers(operands),
            rets=self._buffers(results),
            attrs=self._attrs(attrs),
        )
        self._keep.append(f)
        return f

    def call(self, handler, operands, results, **attrs):
        """Calls `handler` as XLA would; (error code, message) of its error, or None."""
        error = handler(ctypes.addressof(self.frame(operands, results, attrs)))
        return None if error is None else self.errors[error]


def handler(capsule):
    """The FFI handler a capsule of `_core.ffi_targets` holds (its pointer is the function)."""
    get = ctypes.pythonapi.PyCapsule_GetPointer
    get.restype, get.argtypes = c_void_p, [ctypes.py_object, c_char_p]
    return ctypes.CFUNCTYPE(c_void_p, c_void_p)(get(capsule, None))
