//! The process-wide device, the compiled kernels, and the one routine that runs a kernel over
//! rows: chunks sized to the device's limits, upload, dispatch, read back.

use crate::Error;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};

/// Largest buffer a chunk uses, whatever the device allows: bounds the memory one call holds
/// (input, output and read-back copies of a chunk) and keeps every index within u32.
const MAX_CHUNK_BYTES: u64 = 1 << 27;

/// Test hook: the most rows one chunk may hold (0 = no extra limit).
static CHUNK_ROWS_LIMIT: AtomicUsize = AtomicUsize::new(0);

pub(crate) fn set_chunk_rows_limit(rows: usize) {
    CHUNK_ROWS_LIMIT.store(rows, Ordering::Relaxed);
}

#[derive(Clone, Copy)]
pub(crate) enum Kernel {
    Softmax,
    Norms,
    CrossEntropy,
}

pub(crate) struct Gpu {
    device: wgpu::Device,
    queue: wgpu::Queue,
    info: wgpu::AdapterInfo,
    max_binding: u64,
    max_groups: u32,
    softmax: wgpu::ComputePipeline,
    norms: wgpu::ComputePipeline,
    cross_entropy: wgpu::ComputePipeline,
    /// The first error no error scope caught (or the device's loss): every later call fails with it.
    failure: Arc<Mutex<Option<String>>>,
}

static GPU: OnceLock<Result<Gpu, Error>> = OnceLock::new();

/// The device, created on first use; the error (no adapter, no device) is kept and repeated.
pub(crate) fn gpu() -> Result<&'static Gpu, Error> {
    let g = GPU
        .get_or_init(|| {
            std::panic::catch_unwind(init).unwrap_or_else(|p| {
                Err(Error::Unavailable(format!(
                    "wgpu panicked while starting: {}",
                    panic_text(&p)
                )))
            })
        })
        .as_ref()
        .map_err(Clone::clone)?;
    if let Some(f) = g.failure.lock().map_err(|_| lock_error())?.as_ref() {
        return Err(Error::Device(format!(
            "the wgpu device failed earlier: {f}"
        )));
    }
    Ok(g)
}

pub(crate) fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".into()
    }
}

fn lock_error() -> Error {
    Error::Device("wgpu error state lock poisoned".into())
}

fn source(body: &str) -> String {
    format!("{}\n{}", include_str!("shaders/common.wgsl"), body)
}

fn init() -> Result<Gpu, Error> {
    // WGPU_BACKEND and friends select backends, as in every wgpu program.
    let instance =
        wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
    // High performance prefers a discrete, then an integrated GPU; a CPU (software) adapter such
    // as lavapipe is taken when there is nothing else.
    let adapter = pollster::block_on(instance.request_adapter(&wgpu::RequestAdapterOptions {
        power_preference: wgpu::PowerPreference::HighPerformance,
        force_fallback_adapter: false,
        compatible_surface: None,
        apply_limit_buckets: false,
    }))
    .map_err(|e| Error::NoDevice(format!("no wgpu adapter: {e}")))?;
    let info = adapter.get_info();
    let limits = adapter.limits();
    let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
        label: Some("normax"),
        required_features: wgpu::Features::empty(),
        // The adapter's own limits: the largest buffers and dispatches it can do.
        required_limits: limits.clone(),
        experimental_features: wgpu::ExperimentalFeatures::disabled(),
        memory_hints: wgpu::MemoryHints::Performance,
        trace: wgpu::Trace::Off,
    }))
    .map_err(|e| Error::Unavailable(format!("wgpu adapter {:?} gave no device: {e}", info.name)))?;

    // wgpu's default handler panics on an uncaught error; record it instead.
    let failure = Arc::new(Mutex::new(None::<String>));
    let f = failure.clone();
    device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
        if let Ok(mut slot) = f.lock() {
            slot.get_or_insert_with(|| e.to_string());
        }
    }));
    let f = failure.clone();
    device.set_device_lost_callback(move |reason, msg| {
        if let Ok(mut slot) = f.lock() {
            slot.get_or_insert_with(|| format!("device lost ({reason:?}): {msg}"));
        }
    });

    let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
    let pipeline = |label: &str, body: &str| {
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some(label),
            source: wgpu::ShaderSource::Wgsl(source(body).into()),
        });
        device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(label),
            layout: None,
            module: &module,
            entry_point: Some("main"),
            compilation_options: Default::default(),
            cache: None,
        })
    };
    let softmax = pipeline("softmax", include_str!("shaders/softmax.wgsl"));
    let norms = pipeline("norms", include_str!("shaders/norms.wgsl"));
    let cross_entropy = pipeline("cross_entropy", include_str!("shaders/cross_entropy.wgsl"));
    if let Some(e) = pollster::block_on(scope.pop()) {
        return Err(Error::Unavailable(format!(
            "the normax shaders failed to compile on {:?}: {e}",
            info.name
        )));
    }
    Ok(Gpu {
        max_binding: limits
            .max_storage_buffer_binding_size
            .min(limits.max_buffer_size)
            .min(MAX_CHUNK_BYTES),
        max_groups: limits.max_compute_workgroups_per_dimension.max(1),
        device,
        queue,
        info,
        softmax,
        norms,
        cross_entropy,
        failure,
    })
}

impl Gpu {
    pub(crate) fn describe(&self) -> String {
        let i = &self.info;
        format!("{} ({:?}, {:?})", i.name, i.backend, i.device_type)
    }

    fn pipeline(&self, k: Kernel) -> &wgpu::ComputePipeline {
        match k {
            Kernel::Softmax => &self.softmax,
            Kernel::Norms => &self.norms,
            Kernel::CrossEntropy => &self.cross_entropy,
        }
    }
}

/// A kernel input of 4-byte elements.
pub(crate) enum Input<'a> {
    /// `per_row` elements for each row; each chunk gets its rows' part.
    Rows(&'a [u8], usize),
    /// The same for every chunk (weights); None binds a placeholder the kernel does not read.
    Whole(Option<&'a [u8]>),
}

/// The uniform block of a kernel: u32/f32 fields in declaration order.
#[derive(Default)]
pub(crate) struct Uniform(Vec<u8>);

impl Uniform {
    pub(crate) fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_ne_bytes());
        self
    }
    pub(crate) fn f32(mut self, v: f32) -> Self {
        self.0.extend_from_slice(&v.to_ne_bytes());
        self
    }
}

pub(crate) fn f32_bytes(x: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding and every byte pattern is a valid u8; same memory, 4x the length.
    unsafe { std::slice::from_raw_parts(x.as_ptr().cast::<u8>(), std::mem::size_of_val(x)) }
}

pub(crate) fn i32_bytes(x: &[i32]) -> &[u8] {
    // SAFETY: as f32_bytes.
    unsafe { std::slice::from_raw_parts(x.as_ptr().cast::<u8>(), std::mem::size_of_val(x)) }
}

/// Runs `kernel` over `rows` rows. Bindings: 0 the uniform block (from `uniform(chunk_rows, nx)`,
/// which must start with rows, cols, nx), then `inputs`, then one output per entry of `outputs`
/// (elements per row; 0 binds a placeholder and returns nothing). Returns the outputs, all rows.
/// A panic inside wgpu becomes an error.
pub(crate) fn run(
    kernel: Kernel,
    rows: usize,
    inputs: &[Input],
    outputs: &[usize],
    uniform: &dyn Fn(u32, u32) -> Uniform,
) -> Result<Vec<Vec<f32>>, Error> {
    let gpu = gpu()?;
    let per_row_bytes = inputs
        .iter()
        .filter_map(|i| match i {
            Input::Rows(_, n) => Some(*n),
            Input::Whole(_) => None,
        })
        .chain(outputs.iter().copied())
        .chain(inputs.iter().filter_map(|i| match i {
            Input::Whole(Some(w)) => Some(w.len() / 4),
            _ => None,
        }))
        .max()
        .unwrap_or(1)
        .max(1) as u64
        * 4;
    if per_row_bytes > gpu.max_binding {
        return Err(Error::Value(format!(
            "a row of {} bytes exceeds the largest buffer the wgpu device {:?} binds ({} bytes)",
            per_row_bytes, gpu.info.name, gpu.max_binding
        )));
    }
    let groups = gpu.max_groups as usize;
    let mut chunk = ((gpu.max_binding / per_row_bytes) as usize).min(groups.saturating_mul(groups));
    let limit = CHUNK_ROWS_LIMIT.load(Ordering::Relaxed);
    if limit > 0 {
        chunk = chunk.min(limit);
    }
    let chunk = chunk.max(1);

    let mut results: Vec<Vec<f32>> = outputs
        .iter()
        .map(|&n| Vec::with_capacity(rows * n))
        .collect();
    crate::guarded(|| {
        let mut start = 0;
        while start < rows {
            let n = chunk.min(rows - start);
            run_chunk(
                gpu,
                kernel,
                start,
                n,
                inputs,
                outputs,
                uniform,
                &mut results,
            )?;
            start += n;
        }
        Ok(results)
    })
}

#[allow(clippy::too_many_arguments)]
fn run_chunk(
    gpu: &Gpu,
    kernel: Kernel,
    start: usize,
    n: usize,
    inputs: &[Input],
    outputs: &[usize],
    uniform: &dyn Fn(u32, u32) -> Uniform,
    results: &mut [Vec<f32>],
) -> Result<(), Error> {
    use wgpu::util::DeviceExt;
    let dev = &gpu.device;
    let nx = n.min(gpu.max_groups as usize);
    let ny = n.div_ceil(nx);
    let oom = dev.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
    let invalid = dev.push_error_scope(wgpu::ErrorFilter::Validation);

    let mut u = uniform(n as u32, nx as u32).0;
    u.resize(u.len().next_multiple_of(16), 0);
    let ubuf = dev.create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: Some("params"),
        contents: &u,
        usage: wgpu::BufferUsages::UNIFORM,
    });
    let placeholder = [0u8; 4];
    let mut buffers = vec![ubuf];
    for i in inputs {
        let data = match i {
            Input::Rows(d, per) => &d[start * per * 4..(start + n) * per * 4],
            Input::Whole(Some(d)) => *d,
            Input::Whole(None) => &placeholder[..],
        };
        let data = if data.is_empty() {
            &placeholder[..]
        } else {
            data
        };
        buffers.push(dev.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("input"),
            contents: data,
            usage: wgpu::BufferUsages::STORAGE,
        }));
    }
    let first_out = buffers.len();
    let mut readbacks = Vec::new();
    for &per in outputs {
        let size = ((n * per * 4) as u64).max(4);
        buffers.push(dev.create_buffer(&wgpu::BufferDescriptor {
            label: Some("output"),
            size,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        }));
        readbacks.push((per > 0).then(|| {
            dev.create_buffer(&wgpu::BufferDescriptor {
                label: Some("readback"),
                size,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            })
        }));
    }
    let pipeline = gpu.pipeline(kernel);
    let entries: Vec<wgpu::BindGroupEntry> = buffers
        .iter()
        .enumerate()
        .map(|(i, b)| wgpu::BindGroupEntry {
            binding: i as u32,
            resource: b.as_entire_binding(),
        })
        .collect();
    let group = dev.create_bind_group(&wgpu::BindGroupDescriptor {
        label: None,
        layout: &pipeline.get_bind_group_layout(0),
        entries: &entries,
    });
    let mut enc = dev.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
    {
        let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: None,
            timestamp_writes: None,
        });
        pass.set_pipeline(pipeline);
        pass.set_bind_group(0, &group, &[]);
        pass.dispatch_workgroups(nx as u32, ny as u32, 1);
    }
    for (k, rb) in readbacks.iter().enumerate() {
        if let Some(rb) = rb {
            enc.copy_buffer_to_buffer(&buffers[first_out + k], 0, rb, 0, rb.size());
        }
    }
    let submitted = gpu.queue.submit([enc.finish()]);
    let invalid = pollster::block_on(invalid.pop());
    let oom = pollster::block_on(oom.pop());
    if let Some(e) = oom {
        return Err(Error::Device(format!("wgpu device out of memory: {e}")));
    }
    if let Some(e) = invalid {
        return Err(Error::Device(format!("wgpu rejected the work: {e}")));
    }

    let (tx, rx) = mpsc::channel();
    let mut pending = 0;
    for rb in readbacks.iter().flatten() {
        pending += 1;
        let tx = tx.clone();
        rb.slice(..).map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
    }
    drop(tx);
    let wait = wgpu::PollType::Wait {
        submission_index: Some(submitted),
        timeout: None,
    };
    let poll_error =
        |e: wgpu::PollError| Error::Device(format!("waiting for the wgpu device: {e}"));
    gpu.device.poll(wait).map_err(poll_error)?;
    // Another thread's poll may be running our callbacks right now: wait for them (they always
    // run, with an error if the device is lost), polling again now and then.
    while pending > 0 {
        match rx.recv_timeout(std::time::Duration::from_millis(20)) {
            Ok(r) => {
                pending -= 1;
                r.map_err(|e| Error::Device(format!("reading back from the wgpu device: {e}")))?;
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                gpu.device.poll(wgpu::PollType::Poll).map_err(poll_error)?;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(Error::Device(
                    "the wgpu device dropped a read-back without finishing it".into(),
                ));
            }
        }
    }
    for (k, rb) in readbacks.iter().enumerate() {
        let Some(rb) = rb else { continue };
        let want = n * outputs[k];
        {
            let view = rb
                .slice(..)
                .get_mapped_range()
                .map_err(|e| Error::Device(format!("reading back from the wgpu device: {e}")))?;
            results[k].extend(
                view[..want * 4]
                    .chunks_exact(4)
                    .map(|b| f32::from_ne_bytes([b[0], b[1], b[2], b[3]])),
            );
        }
        rb.unmap();
    }
    if let Some(f) = gpu.failure.lock().map_err(|_| lock_error())?.as_ref() {
        return Err(Error::Device(format!("wgpu device error: {f}")));
    }
    Ok(())
}
