//! Devices, their compiled modules, kernel launches and stream-ordered scratch memory, and the
//! dry-run recorder.
//!
//! The primary context of each device is retained once (the one PyTorch and CuPy use too) and
//! made current around each call unless it already is, restoring whatever the calling thread
//! had current before.
//!
//! The recorder ([`record`]) is a per-thread mode in which the entry points run their host code
//! with a stand-in device and, instead of calling the driver, list the launches, memsets and
//! scratch allocations and frees they would enqueue: no driver and no NVRTC needed. The host
//! code enqueues only (it never synchronizes with the device), so the list has no "sync" event.

use crate::compile::{compile, ensure_nvrtc};
use crate::table::{KernelKey, Table};
use crate::{Buf, DType, Error, Result, Stream};
use cudarc::driver::sys::{self, CUdevice_attribute as Attr, CUresult};
use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::sync::{Mutex, OnceLock};

pub(crate) struct Device {
    ctx: sys::CUcontext,
    arch: String,
    pub(crate) sms: u32,
    modules: HashMap<&'static str, sys::CUmodule>,
    functions: Table<sys::CUfunction>,
    /// The recorder's stand-in: no context, no modules, kernels resolve to their names.
    dry_run: bool,
}

/// A kernel ready to launch: its function handle (null on the recorder's stand-in device) and
/// which kernel it is (the recorder lists its name).
#[derive(Clone, Copy)]
pub(crate) struct Kernel {
    f: sys::CUfunction,
    key: KernelKey,
}

/// One call the host code would make of the driver, as the recorder lists it: `event` is
/// "launch", "memset", "alloc" or "free"; a launch names its kernel and gives its grid and
/// block; the others name the driver call and give their size in `grid.0` (32-bit words for a
/// memset, bytes for alloc and free), the rest of `grid` and `block` 1. `stream` is the
/// `CUstream` it was enqueued on; `args` a launch's kernel arguments (see [`Arg::value`]; the
/// memset's address; empty for the others), so a caller's test can check which buffers a kernel
/// was given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub event: &'static str,
    pub name: String,
    pub grid: (u64, u64, u64),
    pub block: (u32, u32, u32),
    pub stream: u64,
    pub args: Vec<Option<u64>>,
}

impl Event {
    fn sized(event: &'static str, name: &str, size: usize, stream: Stream) -> Event {
        Event {
            event,
            name: name.to_string(),
            grid: (size as u64, 1, 1),
            block: (1, 1, 1),
            stream: stream.handle,
            args: Vec::new(),
        }
    }
}

/// One kernel argument: its address (what `cuLaunchKernel` takes) and its size (what the
/// recorder reads back). Made by [`params!`] from a local that must outlive the launch.
#[derive(Clone, Copy)]
pub(crate) struct Arg {
    ptr: *mut c_void,
    size: usize,
}

impl Arg {
    pub(crate) fn of<T: Copy>(value: &T) -> Arg {
        Arg {
            ptr: value as *const T as *mut c_void,
            size: std::mem::size_of::<T>(),
        }
    }

    /// The argument as an integer where it is one of 4 or 8 bytes (a device address, an
    /// integer, a float's bits); None for the argument blocks (structs, which may hold padding).
    ///
    /// Safety: the value `of` was made from is still alive.
    unsafe fn value(self) -> Option<u64> {
        match self.size {
            4 => Some(u64::from(self.ptr.cast::<u32>().read_unaligned())),
            8 => Some(self.ptr.cast::<u64>().read_unaligned()),
            _ => None,
        }
    }
}

/// The most arguments a kernel takes (the launch copies their addresses to the stack).
const MAX_ARGS: usize = 16;

thread_local! {
    static RECORD: RefCell<Option<Vec<Event>>> = const { RefCell::new(None) };
}

/// Turns the calling thread's dry-run recorder on (`on`) or off, returning what it recorded
/// since the previous call (None where it was off). While it is on, the entry points touch no
/// driver: see the module docs.
pub fn record(on: bool) -> Option<Vec<Event>> {
    RECORD.with(|r| std::mem::replace(&mut *r.borrow_mut(), on.then(Vec::new)))
}

fn recording() -> bool {
    RECORD.with(|r| r.borrow().is_some())
}

/// Appends `event()` to the record where the recorder is on; whether it did (the caller then
/// skips the driver call).
fn recorded(event: impl FnOnce() -> Event) -> bool {
    RECORD.with(|r| match r.borrow_mut().as_mut() {
        Some(list) => {
            list.push(event());
            true
        }
        None => false,
    })
}

// The handles are process-wide driver objects, usable from any thread.
unsafe impl Send for Device {}

fn ok(rc: CUresult, what: &str) -> Result<()> {
    if rc == CUresult::CUDA_SUCCESS {
        return Ok(());
    }
    let mut msg: *const std::ffi::c_char = std::ptr::null();
    // Safety: an out-pointer; the driver returns a static string or leaves it null.
    let text = unsafe {
        if sys::cuGetErrorString(rc, &mut msg) == CUresult::CUDA_SUCCESS && !msg.is_null() {
            std::ffi::CStr::from_ptr(msg).to_string_lossy().into_owned()
        } else {
            String::new()
        }
    };
    Err(Error::Device(format!("{what} failed: {rc:?} {text}")))
}

fn driver() -> Result<()> {
    static INIT: OnceLock<Result<()>> = OnceLock::new();
    INIT.get_or_init(|| {
        // Safety: only tries to dlopen the candidate library names.
        if !unsafe { sys::is_culib_present() } {
            return Err(Error::Unavailable(
                "the CUDA driver library (libcuda.so.1) was not found: this machine has no NVIDIA \
                 driver"
                    .into(),
            ));
        }
        // Safety: plain driver initialisation.
        ok(unsafe { sys::cuInit(0) }, "cuInit").map_err(|e| Error::Unavailable(e.to_string()))
    })
    .clone()
}

fn attribute(dev: sys::CUdevice, attr: Attr) -> Result<i32> {
    let mut v = 0;
    // Safety: out-pointer to a local.
    ok(
        unsafe { sys::cuDeviceGetAttribute(&mut v, attr, dev) },
        "cuDeviceGetAttribute",
    )?;
    Ok(v)
}

fn open(ordinal: i32) -> Result<Device> {
    let mut dev = 0;
    // Safety: out-pointers to locals.
    unsafe {
        ok(sys::cuDeviceGet(&mut dev, ordinal), "cuDeviceGet")?;
    }
    let mut ctx = std::ptr::null_mut();
    // Safety: as above; the retained context lives as long as the process.
    ok(
        unsafe { sys::cuDevicePrimaryCtxRetain(&mut ctx, dev) },
        "cuDevicePrimaryCtxRetain",
    )?;
    let major = attribute(dev, Attr::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
    let minor = attribute(dev, Attr::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
    let sms = attribute(dev, Attr::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
    Ok(Device {
        ctx,
        arch: format!("sm_{major}{minor}"),
        sms: sms.max(1) as u32,
        modules: HashMap::new(),
        functions: Table::new(),
        dry_run: false,
    })
}

/// The recorder's device: an H100 (sm_90, 132 SMs), the plans' reference.
fn stand_in() -> Device {
    Device {
        ctx: std::ptr::null_mut(),
        arch: "sm_90".into(),
        sms: 132,
        modules: HashMap::new(),
        functions: Table::new(),
        dry_run: true,
    }
}

static DEVICES: Mutex<Vec<(i32, Device)>> = Mutex::new(Vec::new());

/// Runs `f` with device `ordinal`'s primary context current on this thread (with the stand-in
/// device where the recorder is on).
pub(crate) fn with_device<R>(ordinal: i32, f: impl FnOnce(&mut Device) -> Result<R>) -> Result<R> {
    if recording() {
        return f(&mut stand_in());
    }
    driver()?;
    ensure_nvrtc()?;
    let mut devices = DEVICES.lock().unwrap_or_else(|p| p.into_inner());
    let at = match devices.iter().position(|(o, _)| *o == ordinal) {
        Some(at) => at,
        None => {
            let d = open(ordinal)?;
            devices.push((ordinal, d));
            devices.len() - 1
        }
    };
    let device = &mut devices[at].1;
    let mut current = std::ptr::null_mut();
    // Safety: an out-pointer to a local.
    ok(
        unsafe { sys::cuCtxGetCurrent(&mut current) },
        "cuCtxGetCurrent",
    )?;
    if current == device.ctx {
        // The caller's framework made it current already (torch and CuPy use the primary
        // context): nothing to push or restore.
        return f(device);
    }
    // Safety: a context retained above; popped again below on every path.
    ok(
        unsafe { sys::cuCtxPushCurrent_v2(device.ctx) },
        "cuCtxPushCurrent",
    )?;
    let result = f(device);
    let mut popped = std::ptr::null_mut();
    // Safety: pops exactly the context pushed above.
    let pop = ok(
        unsafe { sys::cuCtxPopCurrent_v2(&mut popped) },
        "cuCtxPopCurrent",
    );
    let value = result?;
    pop?;
    Ok(value)
}

/// Why a cubin may not load: NVRTC newer than the driver (say which versions met).
fn version_hint() -> String {
    let mut driver = 0;
    // Safety: out-pointer to a local.
    let _ = unsafe { sys::cuDriverGetVersion(&mut driver) };
    match crate::nvrtc_version() {
        Ok((major, minor)) if major * 1000 > driver - driver % 1000 => format!(
            " (NVRTC {major}.{minor} is newer than this driver's CUDA {}.{}: load an NVRTC of the \
             driver's major version first, e.g. the nvidia-cuda-nvrtc wheel matching your PyTorch)",
            driver / 1000,
            driver % 1000 / 10
        ),
        _ => String::new(),
    }
}

/// The device's name and architecture, e.g. "NVIDIA H100 80GB HBM3 (sm_90)".
pub fn device_name(ordinal: i32) -> Result<String> {
    with_device(ordinal, |d| {
        if d.dry_run {
            return Ok(format!("the dry-run recorder's stand-in ({})", d.arch));
        }
        let mut dev = 0;
        let mut name = [0 as std::ffi::c_char; 256];
        // Safety: out-pointers to locals of the stated sizes.
        unsafe {
            ok(sys::cuDeviceGet(&mut dev, ordinal), "cuDeviceGet")?;
            ok(
                sys::cuDeviceGetName(name.as_mut_ptr(), 255, dev),
                "cuDeviceGetName",
            )?;
            let name = std::ffi::CStr::from_ptr(name.as_ptr()).to_string_lossy();
            Ok(format!("{name} ({})", d.arch))
        }
    })
}

impl Device {
    /// The kernel `key`, compiling and loading its module on first use.
    pub(crate) fn kernel(&mut self, key: KernelKey) -> Result<Kernel> {
        if self.dry_run {
            return Ok(Kernel {
                f: std::ptr::null_mut(),
                key,
            });
        }
        if let Some(f) = self.functions.get(key) {
            return Ok(Kernel { f, key });
        }
        let module = key.op.module();
        let m = match self.modules.get(module) {
            Some(&m) => m,
            None => {
                let image = compile(module, &self.arch)?;
                let mut m = std::ptr::null_mut();
                // Safety: a complete cubin image; the context is current (with_device).
                ok(
                    unsafe { sys::cuModuleLoadData(&mut m, image.as_ptr().cast()) },
                    "cuModuleLoadData",
                )
                .map_err(|e| Error::Device(format!("{e}{}", version_hint())))?;
                self.modules.insert(module, m);
                m
            }
        };
        let name = key.name();
        let cname = CString::new(name.as_str()).expect("kernel names have no NUL");
        let mut f = std::ptr::null_mut();
        // Safety: a loaded module and a NUL-terminated name.
        ok(
            unsafe { sys::cuModuleGetFunction(&mut f, m, cname.as_ptr()) },
            &name,
        )?;
        self.functions.insert(key, f);
        Ok(Kernel { f, key })
    }
}

/// Launches `f` with `grid` blocks of `block` threads on `stream`. `params` are the kernel's
/// arguments, in order and of exactly the kernel's parameter types.
///
/// Safety: the arguments must match the kernel's signature and every address in them must be
/// valid device memory of the sizes the kernel reads and writes.
pub(crate) unsafe fn launch(
    f: Kernel,
    grid: u32,
    block: (u32, u32),
    stream: Stream,
    params: &mut [Arg],
) -> Result<()> {
    launch_2d(f, (grid, 1), block, stream, params)
}

/// Sets `count` 32-bit words at `ptr` to `value`, enqueued on `stream` (cuMemsetD32Async: no
/// kernel, no host synchronization). The device's context must be current (within
/// [`with_device`]).
///
/// Safety: `ptr` must be valid device memory of `count` 4-byte-aligned words.
pub(crate) unsafe fn memset_u32(ptr: u64, value: u32, count: usize, stream: Stream) -> Result<()> {
    let event = || Event {
        args: vec![Some(ptr)],
        ..Event::sized("memset", "cuMemsetD32Async", count, stream)
    };
    if recorded(event) {
        return Ok(());
    }
    ok(
        sys::cuMemsetD32Async(ptr, value, count, stream.handle as sys::CUstream),
        "cuMemsetD32Async",
    )
}

/// Sets the `b.len` float32 elements of `b` to `value`, enqueued on `s` (a memset: no kernel).
pub fn fill_f32(s: Stream, b: Buf, value: f32) -> Result<()> {
    crate::launch::check("fill", &b, DType::F32, b.len)?;
    if b.len == 0 {
        return Ok(());
    }
    // Safety: b holds b.len float32 elements (4-byte words) of device memory.
    with_device(s.device, |_| unsafe {
        memset_u32(b.ptr, value.to_bits(), b.len, s)
    })
}

/// Stream-ordered device scratch, freed (also stream-ordered) when dropped.
pub(crate) struct Scratch {
    pub(crate) ptr: u64,
    bytes: usize,
    stream: Stream,
    /// Recorded, not allocated (the dry-run recorder; `ptr` is 0).
    dry_run: bool,
}

impl Scratch {
    pub(crate) fn new(bytes: usize, stream: Stream) -> Result<Scratch> {
        let bytes = bytes.max(1);
        if recorded(|| Event::sized("alloc", "cuMemAllocAsync", bytes, stream)) {
            return Ok(Scratch {
                ptr: 0,
                bytes,
                stream,
                dry_run: true,
            });
        }
        let mut ptr = 0;
        // Safety: out-pointer; the stream belongs to the current context's device.
        ok(
            unsafe { sys::cuMemAllocAsync(&mut ptr, bytes, stream.handle as sys::CUstream) },
            "cuMemAllocAsync",
        )?;
        Ok(Scratch {
            ptr,
            bytes,
            stream,
            dry_run: false,
        })
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if self.dry_run {
            recorded(|| Event::sized("free", "cuMemFreeAsync", self.bytes, self.stream));
            return;
        }
        // Safety: allocated by cuMemAllocAsync on this stream; the kernels using it were enqueued
        // before, so the free is ordered after them.
        unsafe {
            sys::cuMemFreeAsync(self.ptr, self.stream.handle as sys::CUstream);
        }
    }
}

/// The kernel arguments ([`Arg`]s), for [`launch`]; the arguments must outlive the call.
macro_rules! params {
    ($($a:expr),* $(,)?) => {
        [$($crate::device::Arg::of(&$a)),*]
    };
}
pub(crate) use params;

/// [`launch`] with a 2-D grid. Safety: as [`launch`].
pub(crate) unsafe fn launch_2d(
    f: Kernel,
    grid: (u32, u32),
    block: (u32, u32),
    stream: Stream,
    params: &mut [Arg],
) -> Result<()> {
    let event = || Event {
        event: "launch",
        name: f.key.name(),
        grid: (grid.0.into(), grid.1.into(), 1),
        block: (block.0, block.1, 1),
        stream: stream.handle,
        // Safety: the caller keeps the arguments alive for the call.
        args: params.iter().map(|a| unsafe { a.value() }).collect(),
    };
    if params.len() > MAX_ARGS {
        return Err(Error::Device(format!(
            "{}: {} kernel arguments, at most {MAX_ARGS}",
            f.key.name(),
            params.len()
        )));
    }
    if recorded(event) {
        return Ok(());
    }
    let mut pointers = [std::ptr::null_mut(); MAX_ARGS];
    for (p, a) in pointers.iter_mut().zip(params.iter()) {
        *p = a.ptr;
    }
    ok(
        sys::cuLaunchKernel(
            f.f,
            grid.0,
            grid.1,
            1,
            block.0,
            block.1,
            1,
            0,
            stream.handle as sys::CUstream,
            pointers.as_mut_ptr(),
            std::ptr::null_mut(),
        ),
        "cuLaunchKernel",
    )
}
