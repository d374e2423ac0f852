//! The GPU executor: runs a lowered program, or a range of its instructions, with every
//! slot in a device buffer, and reads back only the slots asked for.
//!
//! It mirrors the CPU arena (`cpu::Arena::run`): constants are uploaded on first use, a
//! reshape (`Copy`) shares its input's buffer, and temporaries are dropped per the same
//! free plan (`cpu::plan_frees`), so device memory follows the schedule. Inputs are
//! validated and converted by the CPU path's `feed`; weights are uploaded once and cached
//! on the context by the address of their `Arc` (a weight changed through `Arc::make_mut`
//! moves, so a stale buffer is never reused). Index kernels report out-of-range indices
//! through one flag per instruction, read back with the outputs and turned into the same
//! kind of error the CPU gives; wgpu validation and out-of-memory errors are captured in
//! error scopes and returned, never panicked on. `Engine::forward_on` and
//! `GradProgram::run_on` pick the backend from a [`Device`]; on the GPU they return a CPU
//! `Arena<f32>` holding the read-back slots, so code reading `run.arena` works unchanged.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use super::{kernels, Device, GpuContext};
use crate::engine::cpu::{self, Arena};
use crate::engine::lower::Lowered;
use crate::engine::program::{Instr, Prim, Program, Slot, SlotKind};
use crate::engine::{collect_outputs, feed, Engine, GradProgram, Params, Run};
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// Instructions between two non-blocking polls, which let wgpu reclaim freed buffers.
const POLL_EVERY: usize = 64;

/// The slot buffers of one run on the device.
pub struct GpuArena<'a> {
    cx: &'a GpuContext,
    prog: &'a Program,
    bufs: Vec<Option<wgpu::Buffer>>,
    /// One u32 per instruction, set by index kernels on an out-of-range index.
    flags: wgpu::Buffer,
    /// Instructions whose flag has not been checked yet.
    unchecked: Vec<usize>,
}

impl<'a> GpuArena<'a> {
    pub fn new(cx: &'a GpuContext, prog: &'a Program) -> GpuArena<'a> {
        GpuArena { cx, prog, bufs: vec![None; prog.slots.len()], flags: cx.empty(prog.instrs.len()), unchecked: vec![] }
    }

    pub fn has(&self, s: Slot) -> bool {
        self.bufs.get(s).is_some_and(|b| b.is_some())
    }

    /// Uploads `data` into slot `s`.
    pub fn set(&mut self, s: Slot, data: &[f32]) -> Result<()> {
        self.check_size(s, "upload")?;
        self.bufs[s] = Some(self.cx.upload(data));
        Ok(())
    }

    /// Binds a weight, reusing the context's buffer when this `Arc` was uploaded before.
    pub fn set_weight(&mut self, s: Slot, w: &Arc<Vec<f32>>) -> Result<()> {
        self.check_size(s, "upload")?;
        let mut cache = self.cx.weights.lock().map_err(|_| Error::Other("gpu weight cache poisoned".into()))?;
        let key = Arc::as_ptr(w) as usize;
        let hit = cache.get(&key).and_then(|(weak, b)| weak.upgrade().filter(|a| Arc::ptr_eq(a, w)).map(|_| b.clone()));
        let buf = match hit {
            Some(b) => b,
            None => {
                let b = self.cx.upload(w);
                cache.insert(key, (Arc::downgrade(w), b.clone()));
                b
            }
        };
        self.bufs[s] = Some(buf);
        Ok(())
    }

    /// Uploads what the CPU-side `feed` put in `arena`: graph inputs and weights.
    pub fn load(&mut self, l: &Lowered, arena: &Arena<f32>) -> Result<()> {
        if let Ok(mut cache) = self.cx.weights.lock() {
            cache.retain(|_, (w, _)| w.strong_count() > 0);
        }
        for &s in l.inputs.values() {
            if let Some(d) = arena.get(s) {
                self.set(s, d)?;
            }
        }
        for &s in l.params.values() {
            if let Some(w) = arena.bufs.get(s).and_then(|b| b.as_ref()) {
                self.set_weight(s, w)?;
            }
        }
        Ok(())
    }

    /// An error when slot `s` does not fit one storage binding of the adapter.
    fn check_size(&self, s: Slot, what: &str) -> Result<()> {
        let bytes = 4 * self.prog.slots[s].numel() as u64;
        let limits = self.cx.device.limits();
        let max = limits.max_storage_buffer_binding_size.min(limits.max_buffer_size);
        if bytes > max {
            return Err(Error::Other(format!(
                "engine (gpu): {what}: a tensor of shape {:?} ({bytes} bytes) exceeds the adapter's {max}-byte buffer limit",
                self.prog.slots[s].shape
            )));
        }
        Ok(())
    }

    /// Runs `instrs` in order, uploading constants on first use and freeing per `frees`.
    /// With `PLPRUNE_PROFILE=1` each instruction is waited for and its time added to the
    /// profile (`cpu::profile::report` prints it): per-primitive device times, each with
    /// one submission and wait of overhead.
    pub fn run(&mut self, instrs: std::ops::Range<usize>, frees: &[Vec<Slot>]) -> Result<()> {
        let prog = self.prog;
        let profile = cpu::profile::enabled();
        for (k, i) in instrs.enumerate() {
            let ins = &prog.instrs[i];
            let t0 = profile.then(std::time::Instant::now);
            for &s in &ins.ins {
                if self.bufs[s].is_none() {
                    match &prog.slots[s].kind {
                        SlotKind::Const(d) => {
                            let v: Vec<f32> = d.iter().map(|&x| x as f32).collect();
                            self.set(s, &v)?;
                        }
                        kind => {
                            return Err(Error::Other(format!(
                                "engine: slot {s} ({kind:?} '{}') read by {} of node '{}' has no value",
                                prog.slots[s].name,
                                ins.prim.name(),
                                ins.node
                            )))
                        }
                    }
                }
            }
            let out = if ins.prim == Prim::Copy {
                // A reshape shares the buffer, as on the CPU.
                self.bufs[ins.ins[0]].clone()
            } else {
                let fail = |m: String| {
                    Error::Other(format!("engine (gpu): {} in node '{}' failed: {m}", ins.prim.name(), ins.node))
                };
                self.check_size(ins.out, "output").map_err(|e| fail(e.to_string()))?;
                Some(self.exec(i, ins).map_err(|e| fail(e.to_string()))?)
            };
            self.bufs[ins.out] = out;
            if let Some(t0) = t0 {
                cpu::profile::record_gpu_host(t0.elapsed());
                self.cx.flush()?;
                self.cx
                    .device
                    .poll(wgpu::PollType::wait_indefinitely())
                    .map_err(|e| Error::Other(format!("gpu poll: {e}")))?;
                cpu::profile::record(prog, ins, t0.elapsed());
            }
            if is_index(&ins.prim) {
                self.unchecked.push(i);
            }
            for &s in &frees[i] {
                self.bufs[s] = None;
            }
            if k % POLL_EVERY == POLL_EVERY - 1 {
                self.cx.device.poll(wgpu::PollType::Poll).map_err(|e| Error::Other(format!("gpu poll: {e}")))?;
            }
        }
        Ok(())
    }

    /// Runs one instruction (not a `Copy`) on the device.
    fn exec(&self, i: usize, ins: &Instr) -> Result<wgpu::Buffer> {
        let cx = self.cx;
        let prog = self.prog;
        let b = |k: usize| -> &wgpu::Buffer { self.bufs[ins.ins[k]].as_ref().expect("inputs materialised") };
        let sh = |k: usize| -> &[usize] { prog.shape(ins.ins[k]) };
        let out_shape = prog.shape(ins.out);
        let n_out = prog.slots[ins.out].numel();
        let flag = kernels::Flag { flags: &self.flags, at: i };
        match &ins.prim {
            Prim::Unary(op) => kernels::unary(cx, *op, b(0), n_out),
            Prim::UnaryGrad(op) => kernels::unary_grad(cx, *op, b(0), b(1), n_out),
            Prim::Binary(op) => kernels::binary(cx, *op, b(0), sh(0), b(1), sh(1), out_shape),
            Prim::Where => kernels::where_(cx, (b(0), sh(0)), (b(1), sh(1)), (b(2), sh(2)), out_shape),
            Prim::Reduce { op, axes } => kernels::reduce(cx, *op, b(0), sh(0), axes),
            Prim::Broadcast => kernels::broadcast(cx, b(0), sh(0), out_shape),
            Prim::MatMul { ta, tb } => kernels::matmul(cx, b(0), sh(0), b(1), sh(1), *ta, *tb, out_shape),
            Prim::Copy => Ok(b(0).clone()),
            Prim::Transpose { perm } => kernels::transpose(cx, b(0), sh(0), perm),
            Prim::Slice { starts, steps } => kernels::slice(cx, b(0), sh(0), starts, steps, out_shape),
            Prim::Embed { starts, steps, fill } => kernels::embed(cx, b(0), sh(0), starts, steps, *fill, out_shape),
            Prim::Concat { axis } => {
                let parts: Vec<(&wgpu::Buffer, &[usize])> = (0..ins.ins.len()).map(|k| (b(k), sh(k))).collect();
                kernels::concat(cx, &parts, *axis, out_shape)
            }
            Prim::Gather { axis } => kernels::gather(cx, b(0), sh(0), b(1), numel(sh(1)), *axis, flag),
            Prim::GatherGrad { axis } => kernels::gather_grad(cx, b(0), numel(sh(0)), b(1), out_shape, *axis, flag),
            Prim::GatherElements { axis } => kernels::gather_elements(cx, b(0), sh(0), b(1), sh(1), *axis, flag),
            Prim::ScatterElements { axis, add } => {
                kernels::scatter_elements(cx, b(0), sh(0), b(1), sh(1), b(2), *axis, *add, flag)
            }
            Prim::ArgMax { axis, select_last, min } => kernels::argmax(cx, b(0), sh(0), *axis, *select_last, *min),
            Prim::TopKIndices { axis, k, largest } => kernels::topk_indices(cx, b(0), sh(0), *axis, *k, *largest),
            Prim::Im2Col(w) => kernels::im2col(cx, b(0), w),
            Prim::Col2Im(w) => kernels::col2im(cx, b(0), w),
            Prim::Pool(kind, w) => kernels::pool(cx, *kind, b(0), w),
            Prim::PoolGrad(kind, w) => kernels::pool_grad(cx, *kind, b(0), b(1), w),
            Prim::Rows(op) => kernels::rows(cx, *op, &[b(0)], n_out, sh(0)),
            Prim::RowsGrad(op) => kernels::rows(cx, *op, &[b(0), b(1)], n_out, sh(0)),
        }
    }

    /// Reads the given slots back (one transfer for all); absent slots give `None`. Also
    /// checks the index flags of the instructions run so far.
    pub fn read(&mut self, slots: &[Slot]) -> Result<Vec<Option<Vec<f32>>>> {
        let mut bufs: Vec<(&wgpu::Buffer, usize)> = vec![(&self.flags, self.prog.instrs.len())];
        let mut which = Vec::new();
        for &s in slots {
            if let Some(b) = self.bufs.get(s).and_then(|b| b.as_ref()) {
                which.push(Some(bufs.len()));
                bufs.push((b, self.prog.slots[s].numel()));
            } else {
                which.push(None);
            }
        }
        let mut data = read_many(self.cx, &bufs)?;
        let flags = std::mem::take(&mut data[0]);
        for i in std::mem::take(&mut self.unchecked) {
            if flags[i].to_bits() != 0 {
                let ins = &self.prog.instrs[i];
                return Err(Error::Other(format!(
                    "engine (gpu): {} in node '{}' failed: an index is out of range",
                    ins.prim.name(),
                    ins.node
                )));
            }
        }
        Ok(which.into_iter().map(|w| w.map(|k| std::mem::take(&mut data[k]))).collect())
    }
}

fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// Primitives whose kernels can meet an out-of-range index.
fn is_index(p: &Prim) -> bool {
    matches!(
        p,
        Prim::Gather { .. } | Prim::GatherGrad { .. } | Prim::GatherElements { .. } | Prim::ScatterElements { .. }
    )
}

/// Reads several buffers (each its first `n` f32 values) through one staging buffer.
fn read_many(cx: &GpuContext, bufs: &[(&wgpu::Buffer, usize)]) -> Result<Vec<Vec<f32>>> {
    cx.flush()?;
    let total: usize = bufs.iter().map(|(_, n)| n).sum();
    let staging = cx.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("staging"),
        size: (4 * total.max(1)) as u64,
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let mut enc = cx.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("read") });
    let mut off = 0u64;
    for (b, n) in bufs {
        if *n > 0 {
            enc.copy_buffer_to_buffer(b, 0, &staging, off, (4 * n) as u64);
        }
        off += (4 * n) as u64;
    }
    cx.queue.submit([enc.finish()]);
    let slice = staging.slice(..);
    let (tx, rx) = std::sync::mpsc::channel();
    slice.map_async(wgpu::MapMode::Read, move |r| {
        let _ = tx.send(r);
    });
    cx.device.poll(wgpu::PollType::wait_indefinitely()).map_err(|e| Error::Other(format!("gpu poll: {e}")))?;
    rx.recv().map_err(|e| Error::Other(format!("gpu map: {e}")))?.map_err(|e| Error::Other(format!("gpu map: {e}")))?;
    let mapped = slice.get_mapped_range().map_err(|e| Error::Other(format!("gpu map: {e}")))?;
    let all: Vec<f32> = mapped.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    drop(mapped);
    staging.unmap();
    let mut out = Vec::with_capacity(bufs.len());
    let mut at = 0;
    for (_, n) in bufs {
        out.push(all[at..at + n].to_vec());
        at += n;
    }
    Ok(out)
}

/// Runs `body` with wgpu's validation and out-of-memory errors captured: they become an
/// `Error` (the first one wins over the body's own result, which they explain).
fn scoped<R>(cx: &GpuContext, body: impl FnOnce() -> Result<R>) -> Result<R> {
    let validation = cx.device.push_error_scope(wgpu::ErrorFilter::Validation);
    let oom = cx.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
    let r = body();
    // Dispatches still pending are submitted inside the scopes, so their errors land here.
    let flushed = cx.flush();
    let oom = pollster::block_on(oom.pop());
    let validation = pollster::block_on(validation.pop());
    if let Some(e) = oom {
        return Err(Error::Other(format!("engine (gpu): out of device memory: {e}")));
    }
    if let Some(e) = validation {
        return Err(Error::Other(format!("engine (gpu): wgpu error: {e}")));
    }
    flushed?;
    r
}

/// Copies what `g` read back into the CPU arena.
fn store(arena: &mut Arena<f32>, slots: &[Slot], data: Vec<Option<Vec<f32>>>) {
    for (&s, d) in slots.iter().zip(data) {
        if let Some(d) = d {
            arena.set(s, d);
        }
    }
}

impl Engine {
    /// Forward only, on `device`: the CPU backend, or the GPU with every slot on the device
    /// and only the outputs read back. Same contract as [`Engine::forward`].
    #[allow(clippy::type_complexity)] // the return type of `Engine::forward`
    pub fn forward_on(
        &self,
        device: &Device,
        inputs: &[(String, Tensor)],
        params: &Params<f32>,
    ) -> Result<Vec<(String, Vec<usize>, Vec<f32>)>> {
        if let Device::Cpu = device {
            return self.forward::<f32>(inputs, params);
        }
        let arena = self.forward_keep_on(device, inputs, params, &HashSet::new())?;
        collect_outputs(&self.lowered, &arena)
    }

    /// Forward only, on `device`, keeping the outputs and the slots in `keep` (activations a
    /// caller reads): on the GPU they are read back into the returned arena in one
    /// transfer. Same contract as [`Engine::forward_keep`].
    pub fn forward_keep_on(
        &self,
        device: &Device,
        inputs: &[(String, Tensor)],
        params: &Params<f32>,
        keep: &HashSet<Slot>,
    ) -> Result<Arena<f32>> {
        let l = &self.lowered;
        let mut keep = keep.clone();
        keep.extend(l.outputs.iter().map(|(_, s)| *s));
        let cx = match device {
            Device::Cpu => return self.forward_keep::<f32>(inputs, params, &keep),
            Device::Gpu(cx) => cx.as_ref(),
        };
        let p = &l.program;
        let mut arena = Arena::new(p);
        feed(l, &mut arena, inputs, params)?;
        let frees = cpu::plan_frees(p, 0..p.instrs.len(), &keep);
        scoped(cx, || {
            let mut g = GpuArena::new(cx, p);
            g.load(l, &arena)?;
            g.run(0..p.instrs.len(), &frees)?;
            let mut want: Vec<Slot> = keep.iter().copied().filter(|&s| arena.get(s).is_none()).collect();
            want.sort_unstable();
            let data = g.read(&want)?;
            store(&mut arena, &want, data);
            Ok(())
        })?;
        Ok(arena)
    }
}

impl GradProgram {
    /// Forward, seed, backward on `device`. Same contract as [`GradProgram::run`]; on the GPU
    /// the returned arena holds the inputs, weights, seeds, outputs, gradients and the
    /// slots in `keep` (those the program computed), read back from the device.
    pub fn run_on(
        &self,
        device: &Device,
        inputs: &[(String, Tensor)],
        params: &Params<f32>,
        seed: impl FnOnce(&[(String, Vec<usize>, Vec<f32>)]) -> Result<(f64, Vec<Vec<f32>>)>,
        keep: &HashSet<Slot>,
    ) -> Result<Run<f32>> {
        let cx = match device {
            Device::Cpu => return self.run::<f32>(inputs, params, seed, keep),
            Device::Gpu(cx) => cx.as_ref(),
        };
        Ok(self.run_gpu(cx, inputs, params, seed, keep, true)?.0)
    }

    /// [`GradProgram::run_on`] on the GPU that leaves the slots in `keep` on the device:
    /// they come back as buffers (by slot) instead of in the arena, for kernels that
    /// continue from them (the per-unit Grams).
    pub fn run_device(
        &self,
        cx: &GpuContext,
        inputs: &[(String, Tensor)],
        params: &Params<f32>,
        seed: impl FnOnce(&[(String, Vec<usize>, Vec<f32>)]) -> Result<(f64, Vec<Vec<f32>>)>,
        keep: &HashSet<Slot>,
    ) -> Result<(Run<f32>, BTreeMap<Slot, wgpu::Buffer>)> {
        self.run_gpu(cx, inputs, params, seed, keep, false)
    }

    fn run_gpu(
        &self,
        cx: &GpuContext,
        inputs: &[(String, Tensor)],
        params: &Params<f32>,
        seed: impl FnOnce(&[(String, Vec<usize>, Vec<f32>)]) -> Result<(f64, Vec<Vec<f32>>)>,
        keep: &HashSet<Slot>,
        read_keep: bool,
    ) -> Result<(Run<f32>, BTreeMap<Slot, wgpu::Buffer>)> {
        let l = &self.lowered;
        let p = &l.program;
        let nf = self.grad.n_forward;
        let mut arena = Arena::new(p);
        feed(l, &mut arena, inputs, params)?;
        let mut keep_all = keep.clone();
        keep_all.extend(l.outputs.iter().map(|(_, s)| *s));
        keep_all.extend(self.grad.grads.values().copied());
        let frees = cpu::plan_frees(p, 0..p.instrs.len(), &keep_all);
        let mut on_device = BTreeMap::new();
        let (outputs, loss) = scoped(cx, || {
            let mut g = GpuArena::new(cx, p);
            g.load(l, &arena)?;
            g.run(0..nf, &frees)?;
            let outs: Vec<Slot> = l.outputs.iter().map(|(_, s)| *s).filter(|&s| arena.get(s).is_none()).collect();
            let data = g.read(&outs)?;
            store(&mut arena, &outs, data);
            let outputs = collect_outputs(l, &arena)?;
            let (loss, cot) = seed(&outputs)?;
            self.check_cotangents(&cot)?;
            for (&s, c) in self.grad.seeds.iter().zip(cot) {
                g.set(s, &c)?;
                arena.set(s, c);
            }
            g.run(nf..p.instrs.len(), &frees)?;
            let mut want: Vec<Slot> = self.grad.grads.values().copied().collect();
            let mut kept: Vec<Slot> = keep.iter().copied().collect();
            kept.sort_unstable();
            if read_keep {
                want.extend(kept);
            } else {
                for s in kept {
                    if let Some(b) = g.bufs.get(s).and_then(|b| b.clone()) {
                        on_device.insert(s, b);
                    } else if let SlotKind::Const(d) = &p.slots[s].kind {
                        let v: Vec<f32> = d.iter().map(|&x| x as f32).collect();
                        on_device.insert(s, cx.upload(&v));
                    }
                }
            }
            want.sort_unstable();
            want.dedup();
            want.retain(|&s| arena.get(s).is_none() && g.has(s));
            let data = g.read(&want)?;
            store(&mut arena, &want, data);
            Ok((outputs, loss))
        })?;
        let mut grads = BTreeMap::new();
        for (&id, &s) in &self.wrt {
            let g = match self.grad.grads.get(&s) {
                Some(&gs) => arena.get(gs).map(|v| v.to_vec()).unwrap_or_default(),
                None => vec![0.0; p.slots[s].numel()],
            };
            grads.insert(id, g);
        }
        Ok((Run { outputs, grads, loss, arena }, on_device))
    }
}
