//! Reading and writing NumPy `.npz` archives (zip of `.npy` arrays, format versions 1–3),
//! the calibration-data format. Little-endian, C-ordered arrays of numeric and bool dtypes.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::Path;

use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor};

fn npy_dtype(descr: &str) -> Option<DType> {
    Some(match descr {
        "<f4" => DType::F32,
        "<f8" => DType::F64,
        "<f2" => DType::F16,
        "<i8" => DType::I64,
        "<i4" => DType::I32,
        "<i2" => DType::I16,
        "|i1" => DType::I8,
        "|u1" => DType::U8,
        "<u2" => DType::U16,
        "<u4" => DType::U32,
        "<u8" => DType::U64,
        "|b1" => DType::Bool,
        _ => return None,
    })
}

fn npy_descr(dt: DType) -> &'static str {
    match dt {
        DType::F32 => "<f4",
        DType::F64 => "<f8",
        DType::F16 => "<f2",
        DType::I64 => "<i8",
        DType::I32 => "<i4",
        DType::I16 => "<i2",
        DType::I8 => "|i1",
        DType::U8 => "|u1",
        DType::U16 => "<u2",
        DType::U32 => "<u4",
        DType::U64 => "<u8",
        DType::Bool => "|b1",
        DType::BF16 => "<V2",
    }
}

/// Parses one `.npy` payload.
pub fn parse_npy(bytes: &[u8]) -> std::result::Result<Tensor, String> {
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err("not a .npy array (bad magic)".into());
    }
    let major = bytes[6];
    let (hlen, start) = match major {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 => {
            if bytes.len() < 12 {
                return Err("truncated .npy header".into());
            }
            (u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize, 12)
        }
        v => return Err(format!("unsupported .npy format version {v}")),
    };
    let header = bytes.get(start..start + hlen).ok_or("truncated .npy header")?;
    let header = std::str::from_utf8(header).map_err(|_| "the .npy header is not text")?;
    let field = |key: &str| -> Option<&str> {
        let i = header.find(&format!("'{key}'"))?;
        let rest = header[i + key.len() + 2..].trim_start().strip_prefix(':')?.trim_start();
        Some(rest)
    };
    let descr = field("descr")
        .and_then(|r| r.strip_prefix('\''))
        .and_then(|r| r.split('\'').next())
        .ok_or("no dtype in .npy header")?;
    let dtype =
        npy_dtype(descr).ok_or_else(|| format!("unsupported array dtype '{descr}' (big-endian, string or object)"))?;
    if field("fortran_order").is_some_and(|r| r.starts_with("True")) {
        return Err("Fortran-ordered arrays are not supported (save with np.ascontiguousarray)".into());
    }
    let shape_txt = field("shape")
        .and_then(|r| r.strip_prefix('('))
        .and_then(|r| r.split(')').next())
        .ok_or("no shape in .npy header")?;
    let dims: Vec<usize> = shape_txt
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>().map_err(|_| format!("bad dimension '{s}' in .npy header")))
        .collect::<std::result::Result<_, _>>()?;
    let data = &bytes[start + hlen..];
    Tensor::new(dtype, dims, data.to_vec()).map_err(|e| format!("array data is truncated: {e}"))
}

/// Serializes a tensor as a version-1 `.npy` payload.
pub fn write_npy(t: &Tensor) -> Vec<u8> {
    let shape = match t.dims.len() {
        1 => format!("({},)", t.dims[0]),
        _ => format!("({})", t.dims.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")),
    };
    let mut header = format!("{{'descr': '{}', 'fortran_order': False, 'shape': {}, }}", npy_descr(t.dtype), shape);
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(&t.bytes);
    out
}

/// Reads every array of an `.npz` file, by key (the member name without `.npy`).
pub fn read(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    read_where(path, |_| true)
}

/// Reads the arrays of an `.npz` file whose key is in `keys` (other members, e.g. the
/// string arrays of metadata that ../bench/ntk_ref.py writes, are not parsed).
pub fn read_keys(path: &Path, keys: &[&str]) -> Result<BTreeMap<String, Tensor>> {
    read_where(path, |k| keys.contains(&k))
}

fn read_where(path: &Path, wanted: impl Fn(&str) -> bool) -> Result<BTreeMap<String, Tensor>> {
    let err = |msg: String| Error::Calibration { path: path.to_path_buf(), msg };
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| err(format!("not an .npz archive ({e})")))?;
    let mut out = BTreeMap::new();
    for i in 0..zip.len() {
        let mut f = zip.by_index(i).map_err(|e| err(format!("corrupt archive member ({e})")))?;
        let name = f.name().trim_end_matches(".npy").to_string();
        if !wanted(&name) {
            continue;
        }
        let mut buf = Vec::with_capacity(f.size() as usize);
        f.read_to_end(&mut buf).map_err(|e| err(format!("array '{name}': {e}")))?;
        let t = parse_npy(&buf).map_err(|m| err(format!("array '{name}': {m}")))?;
        out.insert(name, t);
    }
    Ok(out)
}

/// Writes arrays to an `.npz` file (stored, uncompressed).
pub fn write(path: &Path, arrays: &BTreeMap<String, Tensor>) -> Result<()> {
    let mut buf = std::io::Cursor::new(Vec::new());
    {
        let mut zip = zip::ZipWriter::new(&mut buf);
        let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
        for (k, t) in arrays {
            zip.start_file(format!("{k}.npy"), opts).map_err(|e| Error::Other(e.to_string()))?;
            zip.write_all(&write_npy(t)).map_err(|e| Error::io(path, e))?;
        }
        zip.finish().map_err(|e| Error::Other(e.to_string()))?;
    }
    crate::onnx_io::write_atomic(path, buf.get_ref())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npy_round_trip() {
        let t = Tensor::from_f32(vec![2, 3], &[1., 2., 3., 4., 5., 6.]);
        let back = parse_npy(&write_npy(&t)).unwrap();
        assert_eq!(back, t);
        let v = Tensor::from_i64(vec![4], &[1, -2, 3, 4]);
        assert_eq!(parse_npy(&write_npy(&v)).unwrap(), v);
    }

    /// ntk_ref.py's feature files carry string arrays (metadata) next to the projections:
    /// `read` refuses them, `read_keys` skips them.
    #[test]
    fn read_keys_skips_other_members() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("feats.npz");
        let proj = Tensor::from_f32(vec![2, 3], &[1., 2., 3., 4., 5., 6.]);
        let mut text = write_npy(&Tensor::from_f32(vec![1], &[0.0]));
        let at = text.windows(3).position(|w| w == b"<f4").unwrap();
        text[at..at + 3].copy_from_slice(b"<U1");
        let mut buf = std::io::Cursor::new(Vec::new());
        {
            let mut zip = zip::ZipWriter::new(&mut buf);
            let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
            zip.start_file("meta.npy", opts).unwrap();
            zip.write_all(&text).unwrap();
            zip.start_file("projections.npy", opts).unwrap();
            zip.write_all(&write_npy(&proj)).unwrap();
            zip.finish().unwrap();
        }
        std::fs::write(&path, buf.get_ref()).unwrap();
        assert!(read(&path).unwrap_err().to_string().contains("unsupported array dtype '<U1'"));
        let got = read_keys(&path, &["projections"]).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got["projections"], proj);
    }

    #[test]
    fn npy_rejects_garbage() {
        assert!(parse_npy(b"hello world, not numpy").is_err());
        let mut b = write_npy(&Tensor::from_f32(vec![8], &[0.0; 8]));
        b.truncate(b.len() - 4);
        assert!(parse_npy(&b).unwrap_err().contains("truncated"));
    }
}
