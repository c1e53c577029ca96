//! Which SIMD implementation runs: detected once, overridable by `NORMAX_ISA` or [`set_active`].
//! [`dispatch`] is the only place that picks an implementation.

use crate::float::Float;
use crate::simd::Vector;
use crate::Error;
use std::sync::atomic::{AtomicU8, Ordering};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Scalar = 1,
    Avx2 = 2,
    Avx512 = 3,
    Neon = 4,
}

impl Isa {
    /// Narrowest first within an architecture; a CPU supports scalar and one architecture's.
    pub const ALL: [Isa; 4] = [Isa::Scalar, Isa::Avx2, Isa::Avx512, Isa::Neon];

    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Neon => "neon",
        }
    }

    pub fn parse(name: &str) -> Result<Isa, Error> {
        Isa::ALL
            .into_iter()
            .find(|isa| isa.name() == name.trim().to_ascii_lowercase())
            .ok_or_else(|| {
                Error::Value(format!(
                    "unknown ISA {name:?}: expected one of scalar, avx2, avx512, neon"
                ))
            })
    }

    /// Whether this CPU can run the implementation.
    pub fn is_supported(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => is_x86_feature_detected!("avx512f"),
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => std::arch::is_aarch64_feature_detected!("neon"),
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    fn from_u8(v: u8) -> Isa {
        match v {
            4 => Isa::Neon,
            3 => Isa::Avx512,
            2 => Isa::Avx2,
            _ => Isa::Scalar,
        }
    }
}

/// Every implementation this CPU runs, narrowest first.
pub fn supported() -> Vec<Isa> {
    Isa::ALL.into_iter().filter(|i| i.is_supported()).collect()
}

/// The widest implementation this CPU runs.
pub fn best() -> Isa {
    *supported().last().unwrap_or(&Isa::Scalar)
}

/// The ISA named by `NORMAX_ISA`, if set; an unknown or unsupported name is an error.
pub fn from_env() -> Result<Option<Isa>, Error> {
    match std::env::var("NORMAX_ISA") {
        Ok(name) if !name.trim().is_empty() => {
            let isa = Isa::parse(&name)?;
            if !isa.is_supported() {
                return Err(Error::Value(format!(
                    "NORMAX_ISA={name}: this CPU does not support it (supported: {})",
                    supported()
                        .iter()
                        .map(|i| i.name())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
            Ok(Some(isa))
        }
        _ => Ok(None),
    }
}

static ACTIVE: AtomicU8 = AtomicU8::new(0);

/// The implementation kernels use now: `NORMAX_ISA` if valid, else the widest supported.
pub fn active() -> Isa {
    match ACTIVE.load(Ordering::Relaxed) {
        0 => {
            let isa = from_env().ok().flatten().unwrap_or_else(best);
            ACTIVE.store(isa as u8, Ordering::Relaxed);
            isa
        }
        v => Isa::from_u8(v),
    }
}

/// Forces an implementation for the whole process (tests run every path this way).
pub fn set_active(isa: Isa) -> Result<(), Error> {
    if !isa.is_supported() {
        return Err(Error::Value(format!(
            "this CPU does not support the {} kernels",
            isa.name()
        )));
    }
    ACTIVE.store(isa as u8, Ordering::Relaxed);
    Ok(())
}

/// Tests that change the process-wide ISA or thread count hold this lock: one lock for every
/// module's tests, so one module's ISA loop never runs under another's.
#[cfg(test)]
pub(crate) static TEST_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Work generic over the vector type: the dispatch point instantiates it once per ISA.
pub trait Kernel<T: Float> {
    type Output;
    fn run<V: Vector<Elem = T>>(self) -> Self::Output;
}

/// Runs `kernel` with the active ISA, inside a function compiled for it.
pub fn dispatch<T: Float, K: Kernel<T>>(kernel: K) -> K::Output {
    match active() {
        // SAFETY: `active()` only returns ISAs this CPU supports.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { run_avx512(kernel) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { run_avx2(kernel) },
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => unsafe { run_neon(kernel) },
        _ => kernel.run::<T::Scalar>(),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn run_avx2<T: Float, K: Kernel<T>>(kernel: K) -> K::Output {
    kernel.run::<T::Avx2>()
}

#[cfg(target_arch = "aarch64")]
#[target_feature(enable = "neon")]
unsafe fn run_neon<T: Float, K: Kernel<T>>(kernel: K) -> K::Output {
    kernel.run::<T::Neon>()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn run_avx512<T: Float, K: Kernel<T>>(kernel: K) -> K::Output {
    kernel.run::<T::Avx512>()
}
