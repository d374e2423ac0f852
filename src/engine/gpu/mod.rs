//! The wgpu backend: a context (instance, adapter, device, queue, pipeline cache) built
//! once and shared, and one GPU kernel per primitive family, each the twin of a CPU kernel
//! (tests/engine_gpu.rs compares them on random shapes). Kernels run in f32 on device
//! buffers; shape data goes in a small read-only `params` buffer per dispatch. [`exec`]
//! runs whole programs (forward and backward) with the slots on the device. Adapter
//! choice: `auto` takes a hardware adapter only, `gpu` accepts software ones (lavapipe).
//! [`pl`] holds the PL criterion's kernels (Grams, eigenvalues, Hutchinson, gate).

pub mod exec;
pub mod kernels;
pub mod pl;
pub mod shaders;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use wgpu::util::DeviceExt;

use super::DeviceChoice;
use crate::error::{Error, Result};

pub struct GpuContext {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub info: wgpu::AdapterInfo,
    pipelines: Mutex<HashMap<&'static str, wgpu::ComputePipeline>>,
    /// Weights already on the device (see `exec.rs`).
    weights: Mutex<WeightCache>,
    /// Dispatches recorded but not submitted yet, and how many (see [`GpuContext::dispatch`]).
    pending: Mutex<Option<(wgpu::CommandEncoder, usize)>>,
}

/// Dispatches recorded into one command buffer before it is submitted. With one submission
/// per dispatch, MiniLM-L6's forward + backward on an H100 (Vulkan) took 0.167 s instead of
/// 0.144 s: ~35 µs per submission, more than most of its kernels take.
const SUBMIT_EVERY: usize = 32;

/// Device copies of weights by the address of their `Arc`; the `Weak` tells whether that
/// `Arc` is still the one uploaded.
type WeightCache = HashMap<usize, (Weak<Vec<f32>>, wgpu::Buffer)>;

/// The backend a run uses.
#[derive(Clone)]
pub enum Device {
    Cpu,
    Gpu(Arc<GpuContext>),
}

impl Device {
    pub fn describe(&self) -> String {
        match self {
            Device::Cpu => format!("cpu ({} threads)", rayon::current_num_threads()),
            Device::Gpu(c) => format!("gpu: {} ({:?}, {:?})", c.info.name, c.info.backend, c.info.device_type),
        }
    }
}

/// Resolves `--device`: auto = a hardware GPU adapter when present, else the CPU; gpu =
/// any wgpu adapter, software included (an error when there is none).
pub fn select(choice: DeviceChoice) -> Result<Device> {
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Auto => Ok(GpuContext::new(false)?.map(|c| Device::Gpu(Arc::new(c))).unwrap_or(Device::Cpu)),
        DeviceChoice::Gpu => GpuContext::new(true)?.map(|c| Device::Gpu(Arc::new(c))).ok_or_else(|| {
            Error::Option(
                "--device gpu: no wgpu adapter found (install a Vulkan driver, e.g. mesa-vulkan-drivers)".into(),
            )
        }),
    }
}

impl GpuContext {
    /// The first adapter (hardware first; software ones only when `allow_software`).
    pub fn new(allow_software: bool) -> Result<Option<GpuContext>> {
        let instance = wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
        let mut adapters = pollster::block_on(instance.enumerate_adapters(wgpu::Backends::all()));
        adapters.sort_by_key(|a| match a.get_info().device_type {
            wgpu::DeviceType::DiscreteGpu => 0,
            wgpu::DeviceType::IntegratedGpu => 1,
            wgpu::DeviceType::VirtualGpu => 2,
            wgpu::DeviceType::Other => 3,
            wgpu::DeviceType::Cpu => 4,
        });
        let Some(adapter) =
            adapters.into_iter().find(|a| allow_software || a.get_info().device_type != wgpu::DeviceType::Cpu)
        else {
            return Ok(None);
        };
        let info = adapter.get_info();
        let mut limits = wgpu::Limits::downlevel_defaults();
        let al = adapter.limits();
        limits.max_storage_buffer_binding_size = al.max_storage_buffer_binding_size;
        limits.max_buffer_size = al.max_buffer_size;
        limits.max_storage_buffers_per_shader_stage = al.max_storage_buffers_per_shader_stage.min(8);
        // The Jacobi eigenvalue kernel keeps a 64 × 64 matrix in workgroup memory.
        limits.max_compute_workgroup_storage_size =
            al.max_compute_workgroup_storage_size.max(limits.max_compute_workgroup_storage_size);
        let desc =
            wgpu::DeviceDescriptor { label: Some("plprune-engine"), required_limits: limits, ..Default::default() };
        let (device, queue) = pollster::block_on(adapter.request_device(&desc))
            .map_err(|e| Error::Other(format!("wgpu device on {}: {e}", info.name)))?;
        Ok(Some(GpuContext {
            device,
            queue,
            info,
            pipelines: Mutex::new(HashMap::new()),
            weights: Mutex::new(HashMap::new()),
            pending: Mutex::new(None),
        }))
    }

    fn pipeline(&self, name: &'static str) -> Result<wgpu::ComputePipeline> {
        let mut cache = self.pipelines.lock().map_err(|_| Error::Other("gpu pipeline cache poisoned".into()))?;
        if let Some(p) = cache.get(name) {
            return Ok(p.clone());
        }
        let src = shaders::source(name).ok_or_else(|| Error::Other(format!("no shader '{name}'")))?;
        let module = self.device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some(name),
            source: wgpu::ShaderSource::Wgsl(src.into()),
        });
        let p = self.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(name),
            layout: None,
            module: &module,
            entry_point: Some("main"),
            compilation_options: Default::default(),
            cache: None,
        });
        cache.insert(name, p.clone());
        Ok(p)
    }

    pub fn upload(&self, data: &[f32]) -> wgpu::Buffer {
        let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.upload_bytes(
            bytes,
            wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
        )
    }

    pub fn upload_u32(&self, data: &[u32]) -> wgpu::Buffer {
        let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.upload_bytes(bytes, wgpu::BufferUsages::STORAGE)
    }

    /// A storage buffer holding `bytes` (4 zero bytes when empty: wgpu rejects empty bindings).
    fn upload_bytes(&self, mut bytes: Vec<u8>, usage: wgpu::BufferUsages) -> wgpu::Buffer {
        if bytes.is_empty() {
            bytes = vec![0; 4];
        }
        self.device.create_buffer_init(&wgpu::util::BufferInitDescriptor { label: None, contents: &bytes, usage })
    }

    pub fn empty(&self, n: usize) -> wgpu::Buffer {
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: (4 * n.max(1)) as u64,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        })
    }

    /// Runs shader `name` once with `buffers` bound at 0, 1, 2, … and `groups` workgroups:
    /// recorded into the pending command buffer, submitted every [`SUBMIT_EVERY`]
    /// dispatches or at the next [`GpuContext::flush`] (reads flush first).
    pub fn dispatch(&self, name: &'static str, buffers: &[&wgpu::Buffer], groups: (u32, u32, u32)) -> Result<()> {
        let limit = self.device.limits().max_storage_buffers_per_shader_stage as usize;
        if buffers.len() > limit {
            return Err(Error::Other(format!(
                "gpu kernel '{name}' binds {} storage buffers, the adapter allows {limit}",
                buffers.len()
            )));
        }
        let p = self.pipeline(name)?;
        let layout = p.get_bind_group_layout(0);
        let entries: Vec<wgpu::BindGroupEntry> = buffers
            .iter()
            .enumerate()
            .map(|(i, b)| wgpu::BindGroupEntry { binding: i as u32, resource: b.as_entire_binding() })
            .collect();
        let bg = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(name),
            layout: &layout,
            entries: &entries,
        });
        let mut pending = self.pending.lock().map_err(|_| Error::Other("gpu command encoder poisoned".into()))?;
        let (enc, count) = pending.get_or_insert_with(|| {
            (self.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("dispatches") }), 0)
        });
        {
            let mut pass =
                enc.begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some(name), timestamp_writes: None });
            pass.set_pipeline(&p);
            pass.set_bind_group(0, &bg, &[]);
            pass.dispatch_workgroups(groups.0, groups.1, groups.2);
        }
        *count += 1;
        if *count >= SUBMIT_EVERY {
            if let Some((enc, _)) = pending.take() {
                self.queue.submit([enc.finish()]);
            }
        }
        Ok(())
    }

    /// Submits the dispatches recorded so far. Reads and error scopes call it; wgpu orders
    /// later submissions after it, and a dispatch's passes keep their buffers alive.
    pub fn flush(&self) -> Result<()> {
        let enc = self.pending.lock().map_err(|_| Error::Other("gpu command encoder poisoned".into()))?.take();
        if let Some((enc, _)) = enc {
            self.queue.submit([enc.finish()]);
        }
        Ok(())
    }

    /// Reads `n` f32 values back (waits for the queue).
    pub fn read(&self, buf: &wgpu::Buffer, n: usize) -> Result<Vec<f32>> {
        self.flush()?;
        let size = (4 * n.max(1)) as u64;
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("staging"),
            size,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut enc = self.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("read") });
        enc.copy_buffer_to_buffer(buf, 0, &staging, 0, size);
        self.queue.submit([enc.finish()]);
        let slice = staging.slice(..);
        let (tx, rx) = std::sync::mpsc::channel();
        slice.map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        self.device.poll(wgpu::PollType::wait_indefinitely()).map_err(|e| Error::Other(format!("gpu poll: {e}")))?;
        rx.recv()
            .map_err(|e| Error::Other(format!("gpu map: {e}")))?
            .map_err(|e| Error::Other(format!("gpu map: {e}")))?;
        let data = slice.get_mapped_range().map_err(|e| Error::Other(format!("gpu map: {e}")))?;
        let out = data.chunks_exact(4).take(n).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        drop(data);
        staging.unmap();
        Ok(out)
    }
}

/// Workgroup counts for `n` invocations of `size` lanes, split over x and y to respect the
/// 65,535 per-dimension limit. Returns (groups, row width in invocations).
pub fn grid(n: usize, size: usize) -> ((u32, u32, u32), u32) {
    let g = n.div_ceil(size).max(1);
    let gx = g.min(65_535);
    let gy = g.div_ceil(gx);
    ((gx as u32, gy as u32, 1), (gx * size) as u32)
}
