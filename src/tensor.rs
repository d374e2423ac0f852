//! Dense tensors as the IR holds them: a data type, a concrete shape and the elements as
//! little-endian bytes, exactly as ONNX's `raw_data` stores them.
//!
//! Keeping bytes (not a typed `Vec`) lets structural operations — slicing along an axis,
//! zeroing a unit's slice — work for every dtype, f16 and bf16 included, without a
//! conversion round trip that could change a weight's bits. Numeric views convert on demand.

use serde::Serialize;

/// Element types the tool understands. Numbers are the ONNX `TensorProto.DataType` codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum DType {
    F32,
    U8,
    I8,
    U16,
    I16,
    I32,
    I64,
    Bool,
    F16,
    F64,
    U32,
    U64,
    BF16,
}

impl DType {
    pub fn from_onnx(code: i32) -> Option<DType> {
        Some(match code {
            1 => DType::F32,
            2 => DType::U8,
            3 => DType::I8,
            4 => DType::U16,
            5 => DType::I16,
            6 => DType::I32,
            7 => DType::I64,
            9 => DType::Bool,
            10 => DType::F16,
            11 => DType::F64,
            12 => DType::U32,
            13 => DType::U64,
            16 => DType::BF16,
            _ => return None,
        })
    }

    pub fn onnx(self) -> i32 {
        match self {
            DType::F32 => 1,
            DType::U8 => 2,
            DType::I8 => 3,
            DType::U16 => 4,
            DType::I16 => 5,
            DType::I32 => 6,
            DType::I64 => 7,
            DType::Bool => 9,
            DType::F16 => 10,
            DType::F64 => 11,
            DType::U32 => 12,
            DType::U64 => 13,
            DType::BF16 => 16,
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::U8 | DType::I8 | DType::Bool => 1,
            DType::U16 | DType::I16 | DType::F16 | DType::BF16 => 2,
            DType::F32 | DType::I32 | DType::U32 => 4,
            DType::F64 | DType::I64 | DType::U64 => 8,
        }
    }

    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F64 | DType::F16 | DType::BF16)
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::U8 => "uint8",
            DType::I8 => "int8",
            DType::U16 => "uint16",
            DType::I16 => "int16",
            DType::I32 => "int32",
            DType::I64 => "int64",
            DType::Bool => "bool",
            DType::F16 => "float16",
            DType::F64 => "float64",
            DType::U32 => "uint32",
            DType::U64 => "uint64",
            DType::BF16 => "bfloat16",
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A dense tensor: dtype, shape, little-endian element bytes (row-major).
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub dtype: DType,
    pub dims: Vec<usize>,
    pub bytes: Vec<u8>,
}

/// Error for a byte buffer that does not match its declared shape.
#[derive(Debug, thiserror::Error)]
#[error("tensor of {dtype} {dims:?} needs {expected} bytes, got {got}")]
pub struct SizeMismatch {
    pub dtype: DType,
    pub dims: Vec<usize>,
    pub expected: usize,
    pub got: usize,
}

impl Tensor {
    pub fn new(dtype: DType, dims: Vec<usize>, bytes: Vec<u8>) -> Result<Tensor, SizeMismatch> {
        let expected = dims.iter().product::<usize>() * dtype.size();
        if expected != bytes.len() {
            return Err(SizeMismatch { dtype, dims, expected, got: bytes.len() });
        }
        Ok(Tensor { dtype, dims, bytes })
    }

    pub fn zeros(dtype: DType, dims: Vec<usize>) -> Tensor {
        let n = dims.iter().product::<usize>() * dtype.size();
        Tensor { dtype, dims, bytes: vec![0; n] }
    }

    pub fn numel(&self) -> usize {
        self.dims.iter().product()
    }

    pub fn rank(&self) -> usize {
        self.dims.len()
    }

    pub fn from_f32(dims: Vec<usize>, data: &[f32]) -> Tensor {
        Tensor::from_f64_as(DType::F32, dims, &data.iter().map(|&x| x as f64).collect::<Vec<_>>())
    }

    pub fn from_i64(dims: Vec<usize>, data: &[i64]) -> Tensor {
        Tensor::from_i64_as(DType::I64, dims, data)
    }

    pub fn scalar_i64(v: i64) -> Tensor {
        Tensor::from_i64(vec![], &[v])
    }

    /// Builds a tensor of `dtype` from f64 values (rounded / truncated as a cast would).
    pub fn from_f64_as(dtype: DType, dims: Vec<usize>, data: &[f64]) -> Tensor {
        debug_assert_eq!(dims.iter().product::<usize>(), data.len());
        let mut bytes = Vec::with_capacity(data.len() * dtype.size());
        for &x in data {
            push_f64(&mut bytes, dtype, x);
        }
        Tensor { dtype, dims, bytes }
    }

    /// Builds a tensor of `dtype` from i64 values.
    pub fn from_i64_as(dtype: DType, dims: Vec<usize>, data: &[i64]) -> Tensor {
        debug_assert_eq!(dims.iter().product::<usize>(), data.len());
        let mut bytes = Vec::with_capacity(data.len() * dtype.size());
        for &x in data {
            if dtype.is_float() {
                push_f64(&mut bytes, dtype, x as f64);
            } else {
                push_i64(&mut bytes, dtype, x);
            }
        }
        Tensor { dtype, dims, bytes }
    }

    /// Element `i` as f64 (any dtype).
    pub fn get_f64(&self, i: usize) -> f64 {
        let s = self.dtype.size();
        let b = &self.bytes[i * s..(i + 1) * s];
        match self.dtype {
            DType::F32 => f32::from_le_bytes(b.try_into().unwrap()) as f64,
            DType::F64 => f64::from_le_bytes(b.try_into().unwrap()),
            DType::F16 => half::f16::from_le_bytes(b.try_into().unwrap()).to_f64(),
            DType::BF16 => half::bf16::from_le_bytes(b.try_into().unwrap()).to_f64(),
            _ => self.get_i64(i) as f64,
        }
    }

    /// Element `i` as i64 (floats are truncated toward zero).
    pub fn get_i64(&self, i: usize) -> i64 {
        let s = self.dtype.size();
        let b = &self.bytes[i * s..(i + 1) * s];
        match self.dtype {
            DType::U8 | DType::Bool => b[0] as i64,
            DType::I8 => b[0] as i8 as i64,
            DType::U16 => u16::from_le_bytes(b.try_into().unwrap()) as i64,
            DType::I16 => i16::from_le_bytes(b.try_into().unwrap()) as i64,
            DType::I32 => i32::from_le_bytes(b.try_into().unwrap()) as i64,
            DType::U32 => u32::from_le_bytes(b.try_into().unwrap()) as i64,
            DType::I64 => i64::from_le_bytes(b.try_into().unwrap()),
            DType::U64 => u64::from_le_bytes(b.try_into().unwrap()) as i64,
            _ => self.get_f64(i) as i64,
        }
    }

    pub fn to_f64_vec(&self) -> Vec<f64> {
        (0..self.numel()).map(|i| self.get_f64(i)).collect()
    }

    pub fn to_f32_vec(&self) -> Vec<f32> {
        (0..self.numel()).map(|i| self.get_f64(i) as f32).collect()
    }

    pub fn to_i64_vec(&self) -> Vec<i64> {
        (0..self.numel()).map(|i| self.get_i64(i)).collect()
    }

    /// The same values converted to another dtype (a Cast).
    pub fn cast(&self, to: DType) -> Tensor {
        if to == self.dtype {
            return self.clone();
        }
        if self.dtype.is_float() || to.is_float() {
            let v = self.to_f64_vec();
            let v: Vec<f64> = if to == DType::Bool { v.iter().map(|&x| (x != 0.0) as i64 as f64).collect() } else { v };
            Tensor::from_f64_as(to, self.dims.clone(), &v)
        } else {
            let v = self.to_i64_vec();
            let v: Vec<i64> = if to == DType::Bool { v.iter().map(|&x| (x != 0) as i64).collect() } else { v };
            Tensor::from_i64_as(to, self.dims.clone(), &v)
        }
    }

    /// Keeps only `indices` (in the given order) along `axis`.
    pub fn take(&self, axis: usize, indices: &[usize]) -> Tensor {
        let (outer, len, inner) = self.split_at_axis(axis);
        let es = self.dtype.size();
        let row = inner * es;
        let mut bytes = Vec::with_capacity(outer * indices.len() * row);
        for o in 0..outer {
            for &i in indices {
                debug_assert!(i < len);
                let start = (o * len + i) * row;
                bytes.extend_from_slice(&self.bytes[start..start + row]);
            }
        }
        let mut dims = self.dims.clone();
        dims[axis] = indices.len();
        Tensor { dtype: self.dtype, dims, bytes }
    }

    /// Sets the elements at `indices` along `axis` to zero, in place (0 is all-zero bytes
    /// for every supported dtype).
    pub fn zero_along(&mut self, axis: usize, indices: &[usize]) {
        let (outer, len, inner) = self.split_at_axis(axis);
        let row = inner * self.dtype.size();
        for o in 0..outer {
            for &i in indices {
                let start = (o * len + i) * row;
                self.bytes[start..start + row].fill(0);
            }
        }
    }

    /// Sets the elements at `indices` along `axis` to `value` (converted to the dtype).
    pub fn fill_along(&mut self, axis: usize, indices: &[usize], value: f64) {
        let (outer, len, inner) = self.split_at_axis(axis);
        let mut one = Vec::new();
        push_f64(&mut one, self.dtype, value);
        for o in 0..outer {
            for &i in indices {
                let start = (o * len + i) * inner;
                for k in start..start + inner {
                    self.bytes[k * one.len()..(k + 1) * one.len()].copy_from_slice(&one);
                }
            }
        }
    }

    /// (product of dims before axis, dims[axis], product of dims after axis)
    fn split_at_axis(&self, axis: usize) -> (usize, usize, usize) {
        let outer = self.dims[..axis].iter().product();
        let inner = self.dims[axis + 1..].iter().product();
        (outer, self.dims[axis], inner)
    }

    /// Squared L2 norm of the elements at `indices` along `axis`.
    pub fn sum_sq_along(&self, axis: usize, indices: &[usize]) -> f64 {
        let (outer, len, inner) = self.split_at_axis(axis);
        let mut s = 0.0;
        for o in 0..outer {
            for &i in indices {
                let start = (o * len + i) * inner;
                for k in start..start + inner {
                    let x = self.get_f64(k);
                    s += x * x;
                }
            }
        }
        s
    }
}

fn push_f64(bytes: &mut Vec<u8>, dtype: DType, x: f64) {
    match dtype {
        DType::F32 => bytes.extend_from_slice(&(x as f32).to_le_bytes()),
        DType::F64 => bytes.extend_from_slice(&x.to_le_bytes()),
        DType::F16 => bytes.extend_from_slice(&half::f16::from_f64(x).to_le_bytes()),
        DType::BF16 => bytes.extend_from_slice(&half::bf16::from_f64(x).to_le_bytes()),
        DType::Bool => bytes.push((x != 0.0) as u8),
        _ => push_i64(bytes, dtype, x as i64),
    }
}

fn push_i64(bytes: &mut Vec<u8>, dtype: DType, x: i64) {
    match dtype {
        DType::U8 | DType::Bool => bytes.push(x as u8),
        DType::I8 => bytes.push(x as i8 as u8),
        DType::U16 => bytes.extend_from_slice(&(x as u16).to_le_bytes()),
        DType::I16 => bytes.extend_from_slice(&(x as i16).to_le_bytes()),
        DType::I32 => bytes.extend_from_slice(&(x as i32).to_le_bytes()),
        DType::U32 => bytes.extend_from_slice(&(x as u32).to_le_bytes()),
        DType::I64 => bytes.extend_from_slice(&x.to_le_bytes()),
        DType::U64 => bytes.extend_from_slice(&(x as u64).to_le_bytes()),
        _ => push_f64(bytes, dtype, x as f64),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn take_and_zero_along_axis() {
        let t = Tensor::from_f32(vec![2, 3], &[1., 2., 3., 4., 5., 6.]);
        let k = t.take(1, &[0, 2]);
        assert_eq!(k.dims, vec![2, 2]);
        assert_eq!(k.to_f32_vec(), vec![1., 3., 4., 6.]);
        let k0 = t.take(0, &[1]);
        assert_eq!(k0.to_f32_vec(), vec![4., 5., 6.]);
        let mut z = t.clone();
        z.zero_along(1, &[1]);
        assert_eq!(z.to_f32_vec(), vec![1., 0., 3., 4., 0., 6.]);
        assert_eq!(t.sum_sq_along(1, &[1]), 4. + 25.);
    }

    #[test]
    fn half_types_round_trip() {
        for dt in [DType::F16, DType::BF16, DType::F64, DType::I8, DType::I32] {
            let t = Tensor::from_f64_as(dt, vec![3], &[1.0, -2.0, 3.0]);
            assert_eq!(t.to_f64_vec(), vec![1.0, -2.0, 3.0], "{dt}");
            assert_eq!(t.take(0, &[2]).to_f64_vec(), vec![3.0]);
        }
    }
}
