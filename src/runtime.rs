//! Running a model with tract, our independent CPU executor: verification of every rewrite
//! (slim vs masked dense) and reference outputs in tests.

use tract_onnx::prelude::{
    DatumType, Framework, InferenceFact, InferenceModelExt, IntoRunnable, TValue, Tensor as TractTensor,
};

use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor};

fn datum(dt: DType) -> DatumType {
    match dt {
        DType::F32 => DatumType::F32,
        DType::F64 => DatumType::F64,
        DType::F16 => DatumType::F16,
        DType::I64 => DatumType::I64,
        DType::I32 => DatumType::I32,
        DType::I16 => DatumType::I16,
        DType::I8 => DatumType::I8,
        DType::U8 => DatumType::U8,
        DType::U16 => DatumType::U16,
        DType::U32 => DatumType::U32,
        DType::U64 => DatumType::U64,
        DType::Bool => DatumType::Bool,
        // tract has no bf16 inputs; such models are verified through f32 casts upstream.
        DType::BF16 => DatumType::F32,
    }
}

/// Runs an ONNX model (serialized, self-contained) on named inputs given in graph-input
/// order; returns every output converted to f32, with its name.
pub fn run(model_bytes: &[u8], inputs: &[(String, Tensor)], output_names: &[String]) -> Result<Vec<(String, Tensor)>> {
    let err = |e: tract_onnx::prelude::TractError| Error::Other(format!("tract could not run the model: {e:#}"));
    let bytes = crate::onnx_io::strip_value_info(model_bytes)?;
    let mut model = tract_onnx::onnx().model_for_read(&mut &bytes[..]).map_err(err)?;
    let mut values = tract_onnx::prelude::TVec::new();
    for (i, (_, t)) in inputs.iter().enumerate() {
        let dt = datum(t.dtype);
        model = model.with_input_fact(i, InferenceFact::dt_shape(dt, t.dims.clone())).map_err(err)?;
        // SAFETY: the byte buffer's length equals numel * size_of(dt), checked by Tensor::new.
        let tt = unsafe { TractTensor::from_raw_dt(dt, &t.dims, &t.bytes) }.map_err(err)?;
        values.push(TValue::from(tt));
    }
    let typed = model.into_typed().map_err(err)?;
    // tract's optimizer has rewrite rules that reject some valid graphs (e.g. a Gemm with
    // one output feature); the unoptimized plan computes the same function, only slower.
    let plan = match typed.clone().into_optimized().and_then(|m| m.into_runnable()) {
        Ok(p) => p,
        Err(_) => typed.into_runnable().map_err(err)?,
    };
    let outs = plan.run(values).map_err(err)?;
    let mut result = Vec::with_capacity(outs.len());
    for (k, o) in outs.iter().enumerate() {
        let f = o.cast_to::<f32>().map_err(err)?;
        let view = f.to_plain_array_view::<f32>().map_err(err)?;
        let data: Vec<f32> = view.iter().copied().collect();
        let name = output_names.get(k).cloned().unwrap_or_else(|| format!("output_{k}"));
        result.push((name, Tensor::from_f32(view.shape().to_vec(), &data)));
    }
    Ok(result)
}
