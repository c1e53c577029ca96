//! The contract of every op, written once for every backend (CPU here, `normax-cuda`,
//! `normax-wgpu`): the option types, their checks and the one error type.
//!
//! A backend takes its data in its own form (host slices, device buffers), so the types are
//! generic over where the data lives; the checks depend only on sizes and values.

/// Why a call failed, whatever the backend; the bindings map each variant to one Python exception.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// A bad value, length or option (Python ValueError).
    Value(String),
    /// An index out of range (Python IndexError).
    Index(String),
    /// No device at all for a GPU backend: no driver, no adapter (Python RuntimeError; the wgpu
    /// tests skip on this one only).
    NoDevice(String),
    /// The backend cannot run here: a library that does not load, kernels that do not compile
    /// (Python RuntimeError).
    Unavailable(String),
    /// The device failed: out of memory, rejected work, a driver error (Python RuntimeError).
    Device(String),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Value(m)
            | Error::Index(m)
            | Error::NoDevice(m)
            | Error::Unavailable(m)
            | Error::Device(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for Error {}

/// `name` must have `expected` elements.
pub fn check_len(name: &str, actual: usize, expected: usize) -> Result<(), Error> {
    if actual != expected {
        return Err(Error::Value(format!(
            "{name} has {actual} elements; expected {expected}"
        )));
    }
    Ok(())
}

/// rows * cols, or an error where that overflows.
pub fn size(rows: usize, cols: usize) -> Result<usize, Error> {
    rows.checked_mul(cols)
        .ok_or_else(|| Error::Value("array too large".into()))
}

/// How the per-row losses combine, as torch's `reduction`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reduction {
    None,
    Sum,
    Mean,
}

impl Reduction {
    pub fn parse(name: &str) -> Result<Reduction, Error> {
        match name {
            "none" => Ok(Reduction::None),
            "sum" => Ok(Reduction::Sum),
            "mean" => Ok(Reduction::Mean),
            _ => Err(Error::Value(format!(
                "reduction: must be 'mean', 'sum' or 'none', got {name:?}"
            ))),
        }
    }

    /// The reduced loss of rows whose losses add up to `total`, `denom` being the mean's
    /// denominator (the summed weight of the rows not ignored); None has nothing to reduce.
    /// A mean over zero total weight is NaN, as torch's, also when label smoothing or z-loss
    /// make `total` nonzero (torch: the NLL part's 0 / 0).
    pub fn reduce(self, total: f64, denom: f64) -> Option<f64> {
        match self {
            Reduction::None => None,
            Reduction::Sum => Some(total),
            Reduction::Mean if denom == 0.0 => Some(f64::NAN),
            Reduction::Mean => Some(total / denom),
        }
    }

    /// The length of the loss output for `rows` rows: one per row for None, else one.
    pub fn loss_len(self, rows: usize) -> usize {
        match self {
            Reduction::None => rows,
            Reduction::Sum | Reduction::Mean => 1,
        }
    }
}

/// What each row of a cross-entropy is scored against: `C` holds class indices (int64, one per
/// row; rows equal to `ignore_index` are left out), `P` class probabilities (rows x classes).
#[derive(Clone, Copy, Debug)]
pub enum Target<C, P> {
    Classes(C),
    Probs(P),
}

/// d(loss)/d(output) a gradient is scaled by: one number, or one per row (reduction None only).
#[derive(Clone, Copy, Debug)]
pub enum GradOutput<R> {
    Scalar(f64),
    Rows(R),
}

/// The class of target `y` at `position`: None where it is `ignore_index`, an IndexError naming
/// the value and its position where it is outside [0, classes).
pub fn check_class(
    position: usize,
    y: i64,
    classes: usize,
    ignore_index: i64,
) -> Result<Option<usize>, Error> {
    if y == ignore_index {
        return Ok(None);
    }
    if y < 0 || y as u64 >= classes as u64 {
        return Err(Error::Index(format!(
            "target: class index {y} at position {position} is out of range [0, {classes}) \
             and is not ignore_index ({ignore_index})"
        )));
    }
    Ok(Some(y as usize))
}

/// Something with a number of elements: a host slice, a device buffer.
pub trait Elements {
    fn elements(&self) -> usize;
}

impl<T> Elements for &[T] {
    fn elements(&self) -> usize {
        self.len()
    }
}

/// The cross-entropy options, named and defaulted as in torch.nn.functional.cross_entropy;
/// `W` is the per-class weight as the backend holds it.
#[derive(Clone, Copy, Debug)]
pub struct CeOptions<W> {
    /// One weight per class.
    pub weight: Option<W>,
    pub ignore_index: i64,
    pub reduction: Reduction,
    pub label_smoothing: f64,
    /// PaLM's auxiliary loss: z_loss * lse^2 per row not ignored.
    pub z_loss: f64,
    /// Gemma 2's logit cap: logits become softcap * tanh(logits / softcap).
    pub softcap: Option<f64>,
    /// The logits are divided by it before everything else (before the softcap); the gradient
    /// carries the 1 / temperature.
    pub temperature: f64,
    /// One factor per row on its loss, z-loss and gradient; the mean divides by the summed
    /// token_weight * class weight of the rows kept. Not differentiated.
    pub token_weight: Option<W>,
    /// StableMax (Prieto et al. 2025) instead of softmax: the loss is the softmax one of
    /// phi(x) = log s(x) = sign(x) log1p(|x|) (x divided by the temperature and capped first),
    /// the gradient chained through phi'(x) = 1 / (1 + |x|) = exp(-|phi|). Row kernels only
    /// (`cross_entropy*`): the linear and vocabulary-parallel forms refuse it.
    pub stablemax: bool,
}

impl<W> Default for CeOptions<W> {
    fn default() -> Self {
        CeOptions {
            weight: None,
            ignore_index: -100,
            reduction: Reduction::Mean,
            label_smoothing: 0.0,
            z_loss: 0.0,
            softcap: None,
            temperature: 1.0,
            token_weight: None,
            stablemax: false,
        }
    }
}

impl<W: Elements> CeOptions<W> {
    /// An error naming `op` where `stablemax` is set: for the forms that run softmax only.
    pub fn softmax_only(&self, op: &str) -> Result<(), Error> {
        if self.stablemax {
            return Err(Error::Value(format!(
                "stablemax: {op} supports the softmax normalizer only"
            )));
        }
        Ok(())
    }

    /// Every option in range and one weight per class: the same check on every backend (the
    /// token weights' length, one per row, is checked where the rows are known:
    /// [`CeOptions::check_rows`]).
    pub fn check(&self, classes: usize) -> Result<(), Error> {
        if !(0.0..=1.0).contains(&self.label_smoothing) {
            return Err(Error::Value(format!(
                "label_smoothing: must be between 0.0 and 1.0, got {}",
                self.label_smoothing
            )));
        }
        if !(self.z_loss >= 0.0 && self.z_loss.is_finite()) {
            return Err(Error::Value(format!(
                "z_loss: must be a finite number >= 0, got {}",
                self.z_loss
            )));
        }
        if let Some(s) = self.softcap {
            if !(s > 0.0 && s.is_finite()) {
                return Err(Error::Value(format!(
                    "softcap: must be a finite number > 0, got {s}"
                )));
            }
        }
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return Err(Error::Value(format!(
                "temperature: must be a finite number > 0, got {}",
                self.temperature
            )));
        }
        if let Some(w) = &self.weight {
            if w.elements() != classes {
                return Err(Error::Value(format!(
                    "weight has {} elements; expected one per class ({classes})",
                    w.elements()
                )));
            }
        }
        Ok(())
    }

    /// One token weight per row (the per-row loss's length).
    pub fn check_rows(&self, rows: usize) -> Result<(), Error> {
        match &self.token_weight {
            Some(t) if t.elements() != rows => Err(Error::Value(format!(
                "token_weight has {} elements; expected one per row ({rows})",
                t.elements()
            ))),
            _ => Ok(()),
        }
    }
}

/// Which normalization of a row. The discriminants are the `kind` codes of the CUDA kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NormKind {
    /// y = x / sqrt(mean(x^2) + eps) * weight
    Rms = 0,
    /// RMSNorm of the zero-mean vector (x, -sum(x)) of length len + 1, restricted to x:
    /// y = x / sqrt((sum(x^2) + sum(x)^2) / (len + 1) + eps) * weight
    Crms = 1,
    /// y = (x - mean) / sqrt(var + eps) * weight + bias, biased variance
    Layer = 2,
}

impl NormKind {
    pub fn parse(name: &str) -> Result<NormKind, Error> {
        match name {
            "rms" => Ok(NormKind::Rms),
            "layer" => Ok(NormKind::Layer),
            "crms" => Ok(NormKind::Crms),
            _ => Err(Error::Value(format!(
                "unknown normalization {name:?}: expected rms, layer or crms"
            ))),
        }
    }

    /// Whether the normalization takes a bias (LayerNorm only).
    pub fn has_bias(self) -> bool {
        self == NormKind::Layer
    }
}

/// A norm's `eps` must be finite and >= 0.
pub fn check_eps(eps: f64) -> Result<(), Error> {
    if !(eps >= 0.0 && eps.is_finite()) {
        return Err(Error::Value(format!(
            "eps: must be finite and >= 0, got {eps}"
        )));
    }
    Ok(())
}
