//! Spatial and normalisation ops: Conv, ConvInteger, ConvTranspose, MaxPool, AveragePool,
//! LpPool, GlobalAveragePool / GlobalMaxPool / GlobalLpPool, BatchNormalization,
//! InstanceNormalization, LayerNormalization, GroupNormalization and the other
//! same-shape normalisations, Pad and Resize / Upsample.
//!
//! Convolutions and pools share one window computation: `pads` are
//! `[x1_begin, x2_begin, …, x1_end, x2_end, …]`; `auto_pad` SAME_UPPER / SAME_LOWER give
//! `ceil(in / stride)` (ConvTranspose: `in * stride`), VALID means no padding, NOTSET uses
//! `pads`. `ceil_mode` (pools, opset 10+) rounds the window count up, dropping a last window
//! that would start in the end padding (as ONNX Runtime and PyTorch do). Pool `dilations`
//! exist from opset 10 (MaxPool) / 19 (AveragePool) and are read when present.
//! BatchNormalization had five outputs before opset 9 (with saved mean/variance), `spatial`
//! before 9 and `training_mode` from 14; its optional outputs are per-channel `[C]`.
//! Pad takes `pads` (and `value`) as attributes before opset 11 (`paddings` before 2) and
//! as inputs from 11 on, with an optional `axes` input from 18. Resize has `scales` only at
//! opset 10, `roi, scales, sizes` from 11, and an `axes` attribute from 18; Upsample takes
//! `scales` as an attribute at opset 7 and as an input from 9. Nothing here is folded.

use super::common::{broadcast, dim_i64, fact, norm_axes, norm_axis, numel, to_dims, Arg, Res};
use super::{Fact, InferFn, OpCtx};
use crate::tensor::DType;

pub(crate) fn rule(op_type: &str) -> Option<InferFn> {
    Some(match op_type {
        "Conv" | "ConvInteger" => conv,
        "ConvTranspose" => conv_transpose,
        "MaxPool" | "AveragePool" | "LpPool" => pool,
        "GlobalAveragePool" | "GlobalMaxPool" | "GlobalLpPool" => global_pool,
        "BatchNormalization" => batch_norm,
        "LayerNormalization" => layer_norm,
        "InstanceNormalization" | "GroupNormalization" | "LpNormalization" | "LRN" | "MeanVarianceNormalization" => {
            same_shape
        }
        "Pad" => pad,
        "Resize" | "Upsample" => resize,
        _ => return None,
    })
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum AutoPad {
    NotSet,
    SameUpper,
    SameLower,
    Valid,
}

/// Window attributes of a convolution or pool over `rank` spatial axes.
struct Window {
    kernel: Vec<usize>,
    strides: Vec<usize>,
    dilations: Vec<usize>,
    /// (begin, end) per spatial axis.
    pads: Vec<(i64, i64)>,
    auto_pad: AutoPad,
    ceil_mode: bool,
}

impl Window {
    /// Reads strides, dilations, pads, auto_pad and ceil_mode for the given kernel.
    fn read(ctx: &OpCtx, kernel: Vec<usize>) -> Res<Window> {
        let rank = kernel.len();
        let per_axis = |name: &str| -> Res<Vec<usize>> {
            match ctx.op.attr_ints(name) {
                None => Ok(vec![1; rank]),
                Some(v) if v.len() == rank && v.iter().all(|&x| x >= 1) => to_dims(v),
                Some(v) => Err(ctx.err(format!("attribute {name}={v:?} must hold {rank} positive values"))),
            }
        };
        let pads = match ctx.op.attr_ints("pads") {
            None => vec![(0, 0); rank],
            Some(p) if p.len() == 2 * rank => (0..rank).map(|i| (p[i], p[i + rank])).collect(),
            Some(p) => return Err(ctx.err(format!("attribute pads={p:?} must hold {} values", 2 * rank))),
        };
        let auto_pad = match ctx.op.attr_str("auto_pad").unwrap_or("NOTSET") {
            "NOTSET" | "" => AutoPad::NotSet,
            "SAME_UPPER" => AutoPad::SameUpper,
            "SAME_LOWER" => AutoPad::SameLower,
            "VALID" => AutoPad::Valid,
            other => return Err(ctx.err(format!("has an unknown auto_pad '{other}'"))),
        };
        Ok(Window {
            strides: per_axis("strides")?,
            dilations: per_axis("dilations")?,
            kernel,
            pads,
            auto_pad,
            ceil_mode: ctx.op.attr_i("ceil_mode", 0) != 0,
        })
    }

    /// Spatial output sizes of a convolution or pool over `input`.
    fn output(&self, input: &[usize]) -> Res<Vec<usize>> {
        if input.len() != self.kernel.len() {
            return Err(format!(
                "kernel {:?} does not match the {} spatial dims of the input",
                self.kernel,
                input.len()
            ));
        }
        (0..self.kernel.len()).map(|i| self.output_at(i, dim_i64(input[i]))).collect()
    }

    fn output_at(&self, i: usize, size: i64) -> Res<usize> {
        let stride = dim_i64(self.strides[i]);
        let span =
            dim_i64(self.dilations[i]).saturating_mul(dim_i64(self.kernel[i]).saturating_sub(1)).saturating_add(1);
        let (begin, end) = match self.auto_pad {
            AutoPad::SameUpper | AutoPad::SameLower => {
                return usize::try_from(ceil_div(size, stride)).map_err(|e| e.to_string())
            }
            AutoPad::Valid => (0, 0),
            AutoPad::NotSet => self.pads[i],
        };
        let padded = size.saturating_add(begin).saturating_add(end);
        let room = padded.saturating_sub(span);
        if room < 0 {
            return Err(format!("window of {span} on spatial axis {i} is larger than the padded input {padded}"));
        }
        let mut n = if self.ceil_mode { ceil_div(room, stride) } else { room / stride } + 1;
        if self.ceil_mode && (n - 1).saturating_mul(stride) >= size.saturating_add(begin) {
            n -= 1;
        }
        usize::try_from(n).map_err(|e| e.to_string())
    }
}

fn ceil_div(a: i64, b: i64) -> i64 {
    let q = a / b;
    if (a % b != 0) && ((a < 0) == (b < 0)) {
        q + 1
    } else {
        q
    }
}

/// The kernel shape: attribute `kernel_shape` when present (checked against the weight's
/// spatial dims when those are known), else the weight's spatial dims.
fn kernel_shape(ctx: &OpCtx, weight_spatial: Option<&[usize]>) -> Res<Option<Vec<usize>>> {
    match (ctx.op.attr_ints("kernel_shape"), weight_spatial) {
        (Some(k), w) => {
            let k = to_dims(k).map_err(|e| ctx.err(format!("kernel_shape: {e}")))?;
            if let Some(w) = w.filter(|&w| w != k.as_slice()) {
                return Err(ctx.err(format!("kernel_shape {k:?} does not match the weight's {w:?}")));
            }
            Ok(Some(k))
        }
        (None, w) => Ok(w.map(<[usize]>::to_vec)),
    }
}

/// The input's batch and channel dims and spatial dims; Err when the rank is below 3 or
/// not `expected` (when given).
fn split_nc<'a>(ctx: &OpCtx, x: &'a [usize], expected: Option<usize>) -> Res<(usize, usize, &'a [usize])> {
    match x {
        [n, c, spatial @ ..] if !spatial.is_empty() && expected.is_none_or(|r| r == x.len()) => Ok((*n, *c, spatial)),
        _ => Err(ctx.err(format!(
            "input of shape {x:?} has the wrong rank (expected {})",
            expected.map_or("3 or more".to_string(), |r| r.to_string())
        ))),
    }
}

/// A convolution weight's first two dims and its kernel dims; its rank must be the input's.
fn split_weight<'a>(ctx: &OpCtx, w: &'a [usize], rank: usize) -> Res<(usize, usize, &'a [usize])> {
    match w {
        [a, b, kernel @ ..] if w.len() == rank => Ok((*a, *b, kernel)),
        _ => Err(ctx.err(format!("weight of shape {w:?} does not match an input of rank {rank}"))),
    }
}

fn group(ctx: &OpCtx) -> Res<usize> {
    match ctx.attr_usize("group", 1)? {
        0 => Err(ctx.err("attribute group=0 must be positive")),
        g => Ok(g),
    }
}

/// Checks an optional per-channel input (bias) against `[channels]`.
fn check_channels(ctx: &OpCtx, slot: usize, what: &str, channels: usize) -> Res<()> {
    match ctx.shape(slot) {
        Some(s) if s != [channels] => Err(ctx.err(format!("{what} of shape {s:?} does not match {channels} channels"))),
        _ => Ok(()),
    }
}

fn conv(ctx: &OpCtx) -> Res<Vec<Fact>> {
    ctx.require(0)?;
    ctx.require(1)?;
    let dtype = if ctx.op.op_type == "ConvInteger" { Some(DType::I32) } else { ctx.dtype(0) };
    let group = group(ctx)?;
    let (Some(x), Some(w)) = (ctx.shape(0), ctx.shape(1)) else {
        return Ok(vec![fact(dtype, None)]);
    };
    let (n, c, spatial) = split_nc(ctx, x, None)?;
    let (m, c_per_group, w_spatial) = split_weight(ctx, w, x.len())?;
    if c_per_group.checked_mul(group) != Some(c) {
        return Err(ctx.err(format!("input has {c} channels but the weight expects {c_per_group} × group {group}")));
    }
    if m % group != 0 {
        return Err(ctx.err(format!("{m} output channels are not divisible by group {group}")));
    }
    if ctx.op.op_type == "Conv" {
        check_channels(ctx, 2, "bias", m)?;
    }
    let kernel = kernel_shape(ctx, Some(w_spatial))?.unwrap_or_default();
    let window = Window::read(ctx, kernel)?;
    let mut out = vec![n, m];
    out.extend(window.output(spatial).map_err(|e| ctx.err(e))?);
    Ok(vec![fact(dtype, Some(out))])
}

fn conv_transpose(ctx: &OpCtx) -> Res<Vec<Fact>> {
    ctx.require(0)?;
    ctx.require(1)?;
    let dtype = ctx.dtype(0);
    let group = group(ctx)?;
    let (Some(x), Some(w)) = (ctx.shape(0), ctx.shape(1)) else {
        return Ok(vec![fact(dtype, None)]);
    };
    let (n, c, spatial) = split_nc(ctx, x, None)?;
    let (wc, m_per_group, w_spatial) = split_weight(ctx, w, x.len())?;
    if wc != c {
        return Err(ctx.err(format!("input has {c} channels but the weight has {wc}")));
    }
    let m = m_per_group.checked_mul(group).ok_or_else(|| ctx.err("output channel count overflows"))?;
    check_channels(ctx, 2, "bias", m)?;
    let kernel = kernel_shape(ctx, Some(w_spatial))?.unwrap_or_default();
    let window = Window::read(ctx, kernel)?;
    let rank = spatial.len();
    let mut out = vec![n, m];
    if let Some(os) = ctx.op.attr_ints("output_shape") {
        // Either the spatial shape or the full shape.
        let os = if os.len() == rank + 2 { &os[2..] } else { os };
        if os.len() != rank {
            return Err(ctx.err(format!("output_shape {os:?} does not have {rank} spatial dims")));
        }
        out.extend(to_dims(os).map_err(|e| ctx.err(e))?);
        return Ok(vec![fact(dtype, Some(out))]);
    }
    let output_padding = match ctx.op.attr_ints("output_padding") {
        None => vec![0; rank],
        Some(p) if p.len() == rank => p.to_vec(),
        Some(p) => return Err(ctx.err(format!("output_padding {p:?} does not have {rank} values"))),
    };
    for i in 0..rank {
        let (size, stride) = (dim_i64(spatial[i]), dim_i64(window.strides[i]));
        let o = match window.auto_pad {
            AutoPad::SameUpper | AutoPad::SameLower => size.saturating_mul(stride),
            AutoPad::NotSet | AutoPad::Valid => {
                let (b, e) = if window.auto_pad == AutoPad::Valid { (0, 0) } else { window.pads[i] };
                let span = dim_i64(window.dilations[i])
                    .saturating_mul(dim_i64(window.kernel[i]).saturating_sub(1))
                    .saturating_add(1);
                stride
                    .saturating_mul(size.saturating_sub(1))
                    .saturating_add(output_padding[i])
                    .saturating_add(span)
                    .saturating_sub(b)
                    .saturating_sub(e)
            }
        };
        out.push(usize::try_from(o).map_err(|_| ctx.err(format!("spatial axis {i} would have negative size {o}")))?);
    }
    Ok(vec![fact(dtype, Some(out))])
}

fn pool(ctx: &OpCtx) -> Res<Vec<Fact>> {
    ctx.require(0)?;
    let dtype = ctx.dtype(0);
    let kernel = kernel_shape(ctx, None)?.ok_or_else(|| ctx.err("has no kernel_shape attribute"))?;
    let window = Window::read(ctx, kernel)?;
    let shape = match ctx.shape(0) {
        Some(x) => {
            let (n, c, spatial) = split_nc(ctx, x, Some(window.kernel.len() + 2))?;
            let mut out = vec![n, c];
            out.extend(window.output(spatial).map_err(|e| ctx.err(e))?);
            Some(out)
        }
        None => None,
    };
    // MaxPool's optional second output holds flat indices.
    Ok(vec![fact(dtype, shape.clone()), fact(Some(DType::I64), shape)])
}

fn global_pool(ctx: &OpCtx) -> Res<Vec<Fact>> {
    ctx.require(0)?;
    let shape = match ctx.shape(0) {
        Some(x) => {
            let (n, c, spatial) = split_nc(ctx, x, None)?;
            Some([n, c].into_iter().chain(spatial.iter().map(|_| 1)).collect())
        }
        None => None,
    };
    Ok(vec![fact(ctx.dtype(0), shape)])
}

/// Same shape and dtype as input 0 (the normalisations without statistics outputs); the
/// channel count of InstanceNormalization's scale and bias is checked.
fn same_shape(ctx: &OpCtx) -> Res<Vec<Fact>> {
    ctx.require(0)?;
    let shape = ctx.shape(0);
    if ctx.op.op_type == "InstanceNormalization" {
        if let Some(&[_, c, ..]) = shape {
            check_channels(ctx, 1, "scale", c)?;
            check_channels(ctx, 2, "bias", c)?;
        }
    }
    Ok(vec![fact(ctx.dtype(0), shape.map(<[usize]>::to_vec))])
}

fn batch_norm(ctx: &OpCtx) -> Res<Vec<Fact>> {
    ctx.require(0)?;
    let shape = ctx.shape(0);
    let channels = match shape {
        Some([_, c, ..]) => Some(*c),
        Some(s) => return Err(ctx.err(format!("input of shape {s:?} has no channel axis"))),
        None => None,
    };
    if let Some(c) = channels {
        for (slot, what) in [(1, "scale"), (2, "bias"), (3, "mean"), (4, "variance")] {
            check_channels(ctx, slot, what, c)?;
        }
    }
    let stats_dtype = ctx.dtype(3).or(ctx.dtype(0));
    let stat = fact(stats_dtype, channels.map(|c| vec![c]));
    // Y, then running mean / var (and, before opset 9, saved mean / var).
    Ok(vec![fact(ctx.dtype(0), shape.map(<[usize]>::to_vec)), stat.clone(), stat.clone(), stat.clone(), stat])
}

fn layer_norm(ctx: &OpCtx) -> Res<Vec<Fact>> {
    ctx.require(0)?;
    let dtype = ctx.dtype(0);
    let stash = match ctx.op.attr_i("stash_type", 1) {
        1 => Some(DType::F32),
        code => i32::try_from(code).ok().and_then(DType::from_onnx),
    };
    let Some(x) = ctx.shape(0) else {
        return Ok(vec![fact(dtype, None), fact(stash, None), fact(stash, None)]);
    };
    let axis = norm_axis(ctx.op.attr_i("axis", -1), x.len()).map_err(|e| ctx.err(e))?;
    if let Some(s) = ctx.shape(1) {
        if broadcast(&[s, &x[axis..]]).ok().as_deref() != Some(&x[axis..]) {
            return Err(
                ctx.err(format!("scale of shape {s:?} does not broadcast to the normalised dims {:?}", &x[axis..]))
            );
        }
    }
    let stats: Vec<usize> = x.iter().enumerate().map(|(i, &d)| if i < axis { d } else { 1 }).collect();
    Ok(vec![fact(dtype, Some(x.to_vec())), fact(stash, Some(stats.clone())), fact(stash, Some(stats))])
}

fn pad(ctx: &OpCtx) -> Res<Vec<Fact>> {
    ctx.require(0)?;
    let dtype = ctx.dtype(0);
    let pads = match ctx.ints_arg("pads", 1)? {
        Arg::Known(p) => p,
        Arg::Absent => match ctx.op.attr_ints("paddings") {
            Some(p) => p.to_vec(),
            None => return Err(ctx.err("has no pads")),
        },
        Arg::Unknown => return Ok(vec![fact(dtype, None)]),
    };
    let Some(x) = ctx.shape(0) else {
        return Ok(vec![fact(dtype, None)]);
    };
    let axes = match (ctx.input(3), ctx.ints(3)?) {
        (None, _) => (0..x.len()).collect(),
        (Some(_), Some(a)) => norm_axes(&a, x.len()).map_err(|e| ctx.err(e))?,
        (Some(_), None) => return Ok(vec![fact(dtype, None)]),
    };
    if pads.len() != 2 * axes.len() {
        return Err(ctx.err(format!("has {} pads for {} axes", pads.len(), axes.len())));
    }
    let mut out = x.to_vec();
    for (i, &a) in axes.iter().enumerate() {
        let size = dim_i64(x[a]).saturating_add(pads[i]).saturating_add(pads[i + axes.len()]);
        out[a] =
            usize::try_from(size).map_err(|_| ctx.err(format!("axis {a} of size {} would become {size}", x[a])))?;
    }
    Ok(vec![fact(dtype, Some(out))])
}

/// Resize and Upsample: the output size is `sizes` when given, else `floor(in * scale)`.
fn resize(ctx: &OpCtx) -> Res<Vec<Fact>> {
    ctx.require(0)?;
    let dtype = ctx.dtype(0);
    let unknown = Ok(vec![fact(dtype, None)]);
    let Some(x) = ctx.shape(0) else {
        return unknown;
    };
    // Resize-10 and Upsample-9 have scales at slot 1; Resize-11+ has roi, scales, sizes.
    let (scales_slot, sizes_slot) =
        if ctx.op.op_type == "Upsample" || ctx.opset < 11 { (1, None) } else { (2, Some(3)) };
    let axes = match ctx.op.attr_ints("axes") {
        Some(a) => norm_axes(a, x.len()).map_err(|e| ctx.err(e))?,
        None => (0..x.len()).collect(),
    };
    let stretch = ctx.op.attr_str("keep_aspect_ratio_policy").unwrap_or("stretch") == "stretch";
    let crop = ctx.op.attr_str("coordinate_transformation_mode") == Some("tf_crop_and_resize");
    if !stretch || crop {
        return unknown;
    }
    let mut out = x.to_vec();
    let sizes = match sizes_slot {
        Some(s) if ctx.input(s).is_some() => match ctx.ints(s)? {
            Some(v) if !v.is_empty() => Some(v),
            Some(_) => None,
            None => return unknown,
        },
        _ => None,
    };
    if let Some(sizes) = sizes {
        if sizes.len() != axes.len() {
            return Err(ctx.err(format!("has {} sizes for {} axes", sizes.len(), axes.len())));
        }
        for (&a, d) in axes.iter().zip(to_dims(&sizes).map_err(|e| ctx.err(e))?) {
            out[a] = d;
        }
        return Ok(vec![fact(dtype, Some(out))]);
    }
    let scales: Vec<f64> = if ctx.input(scales_slot).is_some() {
        match ctx.value(scales_slot)? {
            Some(t) => t.to_f64_vec(),
            None => return unknown,
        }
    } else if let Some(crate::ir::Attr::Floats(f)) = ctx.op.attr("scales") {
        f.iter().map(|&s| s as f64).collect()
    } else {
        return Err(ctx.err("has neither scales nor sizes"));
    };
    if scales.len() != axes.len() {
        return Err(ctx.err(format!("has {} scales for {} axes", scales.len(), axes.len())));
    }
    for (&a, s) in axes.iter().zip(scales) {
        let d = (x[a] as f64 * s).floor();
        if !(0.0..=(usize::MAX as f64)).contains(&d) {
            return Err(ctx.err(format!("scale {s} gives an invalid size for axis {a}")));
        }
        out[a] = d as usize;
    }
    if numel(&out).is_none() {
        return Err(ctx.err(format!("output shape {out:?} is too large")));
    }
    Ok(vec![fact(dtype, Some(out))])
}

#[cfg(test)]
mod tests {
    use super::super::common::tests::{floats, infer, ints, op, shaped, unknown};
    use super::*;
    use crate::ir::Attr;

    fn conv_op(attrs: Vec<(&str, Attr)>) -> crate::ir::Op {
        op("Conv", attrs)
    }

    #[test]
    fn conv_strides_pads_group() {
        let c = conv_op(vec![("strides", Attr::Ints(vec![2, 2])), ("pads", Attr::Ints(vec![3, 3, 3, 3]))]);
        let r = infer(
            &c,
            vec![shaped(DType::F32, &[1, 3, 224, 224]), shaped(DType::F32, &[64, 3, 7, 7]), shaped(DType::F32, &[64])],
            13,
        )
        .unwrap();
        assert_eq!(r[0].shape, Some(vec![1, 64, 112, 112]));
        // Depthwise 3×3, stride 1, pad 1.
        let dw = conv_op(vec![("group", Attr::Int(32)), ("pads", Attr::Ints(vec![1, 1, 1, 1]))]);
        let r = infer(&dw, vec![shaped(DType::F32, &[2, 32, 56, 56]), shaped(DType::F32, &[32, 1, 3, 3])], 13).unwrap();
        assert_eq!(r[0].shape, Some(vec![2, 32, 56, 56]));
        // Grouped, dilated, 1-D.
        let g = conv_op(vec![("group", Attr::Int(2)), ("dilations", Attr::Ints(vec![2]))]);
        let r = infer(&g, vec![shaped(DType::F32, &[1, 8, 20]), shaped(DType::F32, &[6, 4, 3])], 13).unwrap();
        assert_eq!(r[0].shape, Some(vec![1, 6, 16]));
        let e = infer(&g, vec![shaped(DType::F32, &[1, 8, 20]), shaped(DType::F32, &[6, 8, 3])], 13).unwrap_err();
        assert!(e.contains("channels"), "{e}");
        let e = infer(
            &c,
            vec![shaped(DType::F32, &[1, 3, 224, 224]), shaped(DType::F32, &[64, 3, 7, 7]), shaped(DType::F32, &[32])],
            13,
        )
        .unwrap_err();
        assert!(e.contains("bias"), "{e}");
        assert!(infer(&c, vec![shaped(DType::F32, &[1, 3, 2, 2]), shaped(DType::F32, &[64, 3, 9, 9])], 13).is_err());
        assert!(infer(
            &conv_op(vec![("strides", Attr::Ints(vec![0, 1]))]),
            vec![shaped(DType::F32, &[1, 3, 8, 8]), shaped(DType::F32, &[4, 3, 3, 3])],
            13
        )
        .is_err());
        let r = infer(&c, vec![unknown(), shaped(DType::F32, &[64, 3, 7, 7])], 13).unwrap();
        assert_eq!(r[0].shape, None);
    }

    #[test]
    fn conv_auto_pad() {
        let same =
            conv_op(vec![("auto_pad", Attr::String(b"SAME_UPPER".to_vec())), ("strides", Attr::Ints(vec![2, 2]))]);
        let r =
            infer(&same, vec![shaped(DType::F32, &[1, 3, 225, 224]), shaped(DType::F32, &[8, 3, 3, 3])], 13).unwrap();
        assert_eq!(r[0].shape, Some(vec![1, 8, 113, 112]));
        let valid =
            conv_op(vec![("auto_pad", Attr::String(b"VALID".to_vec())), ("pads", Attr::Ints(vec![5, 5, 5, 5]))]);
        let r =
            infer(&valid, vec![shaped(DType::F32, &[1, 3, 10, 10]), shaped(DType::F32, &[8, 3, 3, 3])], 13).unwrap();
        assert_eq!(r[0].shape, Some(vec![1, 8, 8, 8]));
    }

    #[test]
    fn conv_transpose_shapes() {
        let ct = op(
            "ConvTranspose",
            vec![
                ("strides", Attr::Ints(vec![2, 2])),
                ("pads", Attr::Ints(vec![1, 1, 1, 1])),
                ("output_padding", Attr::Ints(vec![1, 1])),
            ],
        );
        let r = infer(&ct, vec![shaped(DType::F32, &[1, 16, 8, 8]), shaped(DType::F32, &[16, 4, 3, 3])], 13).unwrap();
        assert_eq!(r[0].shape, Some(vec![1, 4, 16, 16]));
        let os = op("ConvTranspose", vec![("group", Attr::Int(2)), ("output_shape", Attr::Ints(vec![30, 31]))]);
        let r = infer(&os, vec![shaped(DType::F32, &[1, 16, 8, 8]), shaped(DType::F32, &[16, 4, 3, 3])], 13).unwrap();
        assert_eq!(r[0].shape, Some(vec![1, 8, 30, 31]));
    }

    #[test]
    fn max_pool_ceil_mode() {
        let mk = |ceil: i64| {
            op(
                "MaxPool",
                vec![
                    ("kernel_shape", Attr::Ints(vec![3, 3])),
                    ("strides", Attr::Ints(vec![2, 2])),
                    ("ceil_mode", Attr::Int(ceil)),
                ],
            )
        };
        let x = shaped(DType::F32, &[1, 64, 112, 112]);
        assert_eq!(infer(&mk(0), vec![x.clone()], 12).unwrap()[0].shape, Some(vec![1, 64, 55, 55]));
        let r = infer(&mk(1), vec![x], 12).unwrap();
        assert_eq!(r[0].shape, Some(vec![1, 64, 56, 56]));
        assert_eq!(r[1], fact(Some(DType::I64), Some(vec![1, 64, 56, 56])));
        // The last window would start in the end padding: dropped (6 → 3, not 4).
        let p = op(
            "MaxPool",
            vec![
                ("kernel_shape", Attr::Ints(vec![2])),
                ("strides", Attr::Ints(vec![2])),
                ("pads", Attr::Ints(vec![1, 1])),
                ("ceil_mode", Attr::Int(1)),
            ],
        );
        assert_eq!(infer(&p, vec![shaped(DType::F32, &[1, 1, 5])], 12).unwrap()[0].shape, Some(vec![1, 1, 3]));
        let avg =
            op("AveragePool", vec![("kernel_shape", Attr::Ints(vec![2, 2])), ("strides", Attr::Ints(vec![2, 2]))]);
        assert_eq!(infer(&avg, vec![shaped(DType::F32, &[1, 3, 7, 7])], 12).unwrap()[0].shape, Some(vec![1, 3, 3, 3]));
        assert!(infer(&avg, vec![shaped(DType::F32, &[1, 3, 7])], 12).is_err());
        assert!(infer(&op("MaxPool", vec![]), vec![shaped(DType::F32, &[1, 3, 7, 7])], 12).is_err());
    }

    #[test]
    fn global_pool_and_norms() {
        let r = infer(&op("GlobalAveragePool", vec![]), vec![shaped(DType::F32, &[2, 512, 7, 7])], 13).unwrap();
        assert_eq!(r[0].shape, Some(vec![2, 512, 1, 1]));
        let c = |n: usize| shaped(DType::F32, &[n]);
        let r = infer(
            &op("BatchNormalization", vec![]),
            vec![shaped(DType::F32, &[2, 16, 5, 5]), c(16), c(16), c(16), c(16)],
            15,
        )
        .unwrap();
        assert_eq!(r[0].shape, Some(vec![2, 16, 5, 5]));
        assert_eq!(r[1].shape, Some(vec![16]));
        assert!(infer(
            &op("BatchNormalization", vec![]),
            vec![shaped(DType::F32, &[2, 16, 5, 5]), c(8), c(16), c(16), c(16)],
            15
        )
        .is_err());
        let ln = op("LayerNormalization", vec![("axis", Attr::Int(-1))]);
        let r = infer(&ln, vec![shaped(DType::F32, &[2, 7, 768]), c(768), c(768)], 17).unwrap();
        assert_eq!(r[0].shape, Some(vec![2, 7, 768]));
        assert_eq!(r[1].shape, Some(vec![2, 7, 1]));
        assert!(infer(&ln, vec![shaped(DType::F32, &[2, 7, 768]), c(512)], 17).is_err());
        let inorm =
            infer(&op("InstanceNormalization", vec![]), vec![shaped(DType::F32, &[1, 4, 9]), c(4), c(4)], 13).unwrap();
        assert_eq!(inorm[0].shape, Some(vec![1, 4, 9]));
    }

    #[test]
    fn pad_both_forms() {
        let x = shaped(DType::F32, &[1, 3, 4, 4]);
        let r = infer(&op("Pad", vec![]), vec![x.clone(), ints(&[8], &[0, 0, 1, 2, 0, 0, 1, 2])], 13).unwrap();
        assert_eq!(r[0].shape, Some(vec![1, 3, 6, 8]));
        let r =
            infer(&op("Pad", vec![("pads", Attr::Ints(vec![0, 0, 0, -1, 0, 0, 0, -1]))]), vec![x.clone()], 2).unwrap();
        assert_eq!(r[0].shape, Some(vec![1, 3, 4, 2]));
        let r = infer(&op("Pad", vec![]), vec![x.clone(), ints(&[2], &[1, 1]), None, ints(&[1], &[-1])], 18).unwrap();
        assert_eq!(r[0].shape, Some(vec![1, 3, 4, 6]));
        assert!(infer(&op("Pad", vec![]), vec![x.clone(), ints(&[2], &[1, 1])], 13).is_err());
        assert!(infer(&op("Pad", vec![]), vec![x, ints(&[8], &[0, 0, 0, -9, 0, 0, 0, 0])], 13).is_err());
    }

    #[test]
    fn resize_scales_and_sizes() {
        let x = shaped(DType::F32, &[1, 3, 10, 10]);
        let r = infer(&op("Resize", vec![]), vec![x.clone(), None, floats(&[4], &[1.0, 1.0, 2.0, 2.5])], 13).unwrap();
        assert_eq!(r[0].shape, Some(vec![1, 3, 20, 25]));
        let r = infer(
            &op("Resize", vec![]),
            vec![x.clone(), floats(&[0], &[]), floats(&[0], &[]), ints(&[4], &[1, 3, 7, 7])],
            13,
        )
        .unwrap();
        assert_eq!(r[0].shape, Some(vec![1, 3, 7, 7]));
        let r = infer(&op("Upsample", vec![("scales", Attr::Floats(vec![1.0, 1.0, 2.0, 2.0]))]), vec![x], 7).unwrap();
        assert_eq!(r[0].shape, Some(vec![1, 3, 20, 20]));
    }
}
