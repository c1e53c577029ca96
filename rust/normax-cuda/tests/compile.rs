//! Every kernel module compiles with NVRTC for sm_75 (Turing: no bf16 instructions, its own code
//! path; sm_80 and sm_90 are compiled by tests/test_cuda.py), no GPU needed. CI sets
//! NORMAX_REQUIRE_NVRTC=1 and puts the nvidia-cuda-nvrtc wheel's library on the loader path, so
//! there a missing NVRTC fails instead of skipping.

use normax_cuda::{compile_all, compile_cubin, nvrtc_version, Error, MODULES};
use std::sync::Arc;

fn nvrtc_or_skip() -> bool {
    match nvrtc_version() {
        Ok(_) => true,
        Err(Error::Unavailable(why))
            if std::env::var("NORMAX_REQUIRE_NVRTC").as_deref() != Ok("1") =>
        {
            eprintln!("skipped: {why}");
            false
        }
        Err(e) => panic!("NVRTC is required here: {e}"),
    }
}

#[test]
fn every_module_compiles_for_sm75() {
    if !nvrtc_or_skip() {
        return;
    }
    for arch in ["sm_75"] {
        let built = compile_all(arch).unwrap_or_else(|e| panic!("{arch}: {e}"));
        assert_eq!(built.len(), MODULES.len());
        for (module, size) in built {
            assert!(size > 10_000, "{module} for {arch}: a {size}-byte cubin");
            // The same image again, compiled once per process.
            let image = compile_cubin(module, arch).unwrap();
            assert_eq!(image.len(), size);
            assert!(Arc::ptr_eq(&image, &compile_cubin(module, arch).unwrap()));
        }
        let unknown = compile_cubin("softmax; x", arch);
        assert!(matches!(unknown, Err(Error::Value(_))));
    }
}

#[test]
fn a_bad_architecture_is_a_value_error() {
    assert!(matches!(compile_all("sm_9; x"), Err(Error::Value(_))));
    assert!(matches!(compile_all("compute_90"), Err(Error::Value(_))));
    assert!(matches!(
        compile_cubin("softmax", "sm_9; x"),
        Err(Error::Value(_))
    ));
}
