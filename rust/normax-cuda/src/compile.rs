//! The kernel sources and their compilation by NVRTC (to a cubin for the device's own
//! architecture, so no PTX JIT and no driver/toolkit PTX version mismatch at load time).

use crate::{Error, Result};
use cudarc::nvrtc::{result as nvrtc, sys};
use std::ffi::CString;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

const COMMON: &str = include_str!("../kernels/common.cuh");

/// The modules: (name, source without the common prelude).
pub const MODULES: [(&str, &str); 6] = [
    ("softmax", include_str!("../kernels/softmax.cu")),
    // Class-index targets' two kernels use the general kernels' CeArgs: one module.
    (
        "cross_entropy",
        concat!(
            include_str!("../kernels/cross_entropy.cu"),
            include_str!("../kernels/cross_entropy_classes.cu")
        ),
    ),
    ("norms", include_str!("../kernels/norms.cu")),
    ("power_norm", include_str!("../kernels/power_norm.cu")),
    ("stablemax", include_str!("../kernels/stablemax.cu")),
    ("logprobs", include_str!("../kernels/logprobs.cu")),
];

/// Whether NVRTC was found: probed until found once, then never again (a probe dlopens up to
/// 17 candidate names, ~200 µs; a failed probe is retried, as the caller may load NVRTC later).
static NVRTC_FOUND: AtomicBool = AtomicBool::new(false);
static NVRTC_PROBES: AtomicUsize = AtomicUsize::new(0);

/// How many times this process has looked for the NVRTC library.
pub fn nvrtc_probes() -> usize {
    NVRTC_PROBES.load(Ordering::Relaxed)
}

pub(crate) fn ensure_nvrtc() -> Result<()> {
    if NVRTC_FOUND.load(Ordering::Acquire) {
        return Ok(());
    }
    NVRTC_PROBES.fetch_add(1, Ordering::Relaxed);
    // Safety: only tries to dlopen the candidate library names.
    if unsafe { sys::is_culib_present() } {
        NVRTC_FOUND.store(true, Ordering::Release);
        Ok(())
    } else {
        Err(Error::Unavailable(
            "NVRTC (libnvrtc.so) was not found: install it (pip install nvidia-cuda-nvrtc, or a CUDA \
             toolkit) or put it on the library path"
                .into(),
        ))
    }
}

/// NVRTC's (major, minor) version.
pub fn nvrtc_version() -> Result<(i32, i32)> {
    ensure_nvrtc()?;
    let (mut major, mut minor) = (0, 0);
    // Safety: two out-pointers to live locals.
    let rc = unsafe { sys::nvrtcVersion(&mut major, &mut minor) };
    nvrtc_ok(rc, "nvrtcVersion")?;
    Ok((major, minor))
}

fn nvrtc_ok(rc: sys::nvrtcResult, what: &str) -> Result<()> {
    if rc == sys::nvrtcResult::NVRTC_SUCCESS {
        Ok(())
    } else {
        Err(Error::Device(format!("{what} failed: {rc:?}")))
    }
}

/// Compiles one module for `arch` ("sm_90": a cubin). The error carries NVRTC's log.
pub(crate) fn compile(module: &str, arch: &str) -> Result<Vec<u8>> {
    ensure_nvrtc()?;
    let body = MODULES
        .iter()
        .find(|(name, _)| *name == module)
        .map(|(_, src)| *src)
        .ok_or_else(|| Error::Value(format!("no CUDA module named {module:?}")))?;
    let source = CString::new(format!("{COMMON}\n{body}")).expect("kernel sources have no NUL");
    let name = CString::new(format!("normax_{module}.cu")).expect("no NUL");
    let prog = nvrtc::create_program(&source, Some(&name))
        .map_err(|e| Error::Device(format!("nvrtcCreateProgram: {e:?}")))?;
    let options = [format!("--gpu-architecture={arch}"), "--std=c++17".into()];
    // Safety: `prog` is a live program, destroyed once below on every path.
    let result = unsafe {
        match nvrtc::compile_program(prog, &options) {
            Ok(()) => cubin(prog),
            Err(e) => {
                let log = nvrtc::get_program_log(prog)
                    .map(|l| l.iter().map(|&c| c as u8 as char).collect::<String>())
                    .unwrap_or_default();
                Err(Error::Device(format!(
                    "NVRTC could not compile the {module} kernels for {arch} ({e:?}):\n{}",
                    log.trim_end_matches('\0')
                )))
            }
        }
    };
    // Safety: `prog` came from create_program and is not used after this.
    let _ = unsafe { nvrtc::destroy_program(prog) };
    result
}

/// Safety: `prog` compiled successfully for an sm_ architecture.
unsafe fn cubin(prog: sys::nvrtcProgram) -> Result<Vec<u8>> {
    let mut size = 0usize;
    nvrtc_ok(sys::nvrtcGetCUBINSize(prog, &mut size), "nvrtcGetCUBINSize")?;
    let mut image = vec![0u8; size];
    nvrtc_ok(
        sys::nvrtcGetCUBIN(prog, image.as_mut_ptr().cast()),
        "nvrtcGetCUBIN",
    )?;
    Ok(image)
}

fn check_arch(arch: &str) -> Result<()> {
    if !arch.starts_with("sm_") || !arch[3..].bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(Error::Value(format!(
            "arch: expected an sm_XY architecture such as 'sm_90', got {arch:?}"
        )));
    }
    Ok(())
}

/// The cubins [`compile_all`] and [`compile_cubin`] made, by (module, arch): the checks that
/// compile every module (tests/cuda) pay NVRTC (about a minute for all) once per process.
static CHECKED: Mutex<Vec<CheckedImage>> = Mutex::new(Vec::new());

/// (module, arch, cubin).
type CheckedImage = (String, String, Arc<[u8]>);

fn compile_checked(module: &str, arch: &str) -> Result<Arc<[u8]>> {
    let found = |images: &Vec<CheckedImage>| {
        images
            .iter()
            .find(|(m, a, _)| m == module && a == arch)
            .map(|(_, _, image)| image.clone())
    };
    if let Some(image) = found(&CHECKED.lock().unwrap_or_else(|e| e.into_inner())) {
        return Ok(image);
    }
    // Compiled without the lock held: a thread asking for the same module meanwhile compiles
    // it too, and the images are the same.
    let image: Arc<[u8]> = compile(module, arch)?.into();
    let mut images = CHECKED.lock().unwrap_or_else(|e| e.into_inner());
    if found(&images).is_none() {
        images.push((module.to_string(), arch.to_string(), image.clone()));
    }
    Ok(image)
}

/// Compiles every module for `arch` (no GPU needed): (module, cubin bytes) or the first error.
pub fn compile_all(arch: &str) -> Result<Vec<(&'static str, usize)>> {
    check_arch(arch)?;
    MODULES
        .iter()
        .map(|(name, _)| compile_checked(name, arch).map(|image| (*name, image.len())))
        .collect()
}

/// The cubin of one module for `arch` (no GPU needed), as the device would load it: what the
/// SASS checks disassemble.
pub fn compile_cubin(module: &str, arch: &str) -> Result<Arc<[u8]>> {
    check_arch(arch)?;
    compile_checked(module, arch)
}
