//! GGUF (version 2 and 3) reader: header, metadata key/values of every type (arrays
//! included), tensor infos, alignment, and tensor data as f32.

use std::collections::BTreeMap;
use std::path::Path;

use crate::quant;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
}

impl Value {
    /// The value as an unsigned integer, when it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::I8(v) => Some(v as i64),
            Value::I16(v) => Some(v as i64),
            Value::I32(v) => Some(v as i64),
            Value::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// Tensor element types this reader can turn into f32 (GGML type ids).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q8_0,
    /// Any other GGML type, by id: listed, but not readable as f32.
    Other(u32),
}

impl GgmlType {
    fn from_id(id: u32) -> GgmlType {
        match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            8 => GgmlType::Q8_0,
            other => GgmlType::Other(other),
        }
    }

    /// (elements per block, bytes per block).
    pub fn block(self) -> Option<(usize, usize)> {
        match self {
            GgmlType::F32 => Some((1, 4)),
            GgmlType::F16 => Some((1, 2)),
            GgmlType::Q4_0 => Some((32, 18)),
            GgmlType::Q4_1 => Some((32, 20)),
            GgmlType::Q8_0 => Some((32, 34)),
            GgmlType::Other(_) => None,
        }
    }
}

/// One tensor's description. `dims` are GGML's `ne`: `dims[0]` is the contiguous (row)
/// length, so a matrix of `rows x cols` in row-major order has `dims = [cols, rows]`.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Offset of the data from the start of the tensor data section.
    pub offset: u64,
}

impl TensorInfo {
    pub fn num_elements(&self) -> usize {
        self.dims.iter().product::<u64>() as usize
    }

    /// Bytes of the tensor's data, when the type is known.
    pub fn num_bytes(&self) -> Option<usize> {
        let (be, bb) = self.ggml_type.block()?;
        Some(self.num_elements() / be * bb)
    }
}

/// A parsed GGUF file held in memory.
pub struct Gguf {
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    pub alignment: usize,
    data: Vec<u8>,
    data_start: usize,
}

/// Errors while reading a GGUF file: what went wrong and where.
#[derive(Debug)]
pub struct GgufError(pub String);

impl std::fmt::Display for GgufError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for GgufError {}

type Result<T> = std::result::Result<T, GgufError>;

fn err<T>(msg: impl Into<String>) -> Result<T> {
    Err(GgufError(msg.into()))
}

struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.pos.checked_add(n).is_none_or(|e| e > self.b.len()) {
            return err(format!("unexpected end of file at byte {} (needed {n} more bytes)", self.pos));
        }
        let s = &self.b[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn arr<const N: usize>(&mut self) -> Result<[u8; N]> {
        Ok(self.take(N)?.try_into().unwrap())
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.arr()?))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.arr()?))
    }
    fn string(&mut self) -> Result<String> {
        let n = self.u64()? as usize;
        let at = self.pos;
        let s = self.take(n)?;
        String::from_utf8(s.to_vec()).or_else(|_| err(format!("string at byte {at} is not UTF-8")))
    }

    fn value(&mut self, ty: u32, depth: usize) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(self.arr::<1>()?[0]),
            1 => Value::I8(self.arr::<1>()?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.arr()?)),
            3 => Value::I16(i16::from_le_bytes(self.arr()?)),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(i32::from_le_bytes(self.arr()?)),
            6 => Value::F32(f32::from_le_bytes(self.arr()?)),
            7 => match self.arr::<1>()?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return err(format!("bool value {b} at byte {}", self.pos - 1)),
            },
            8 => Value::Str(self.string()?),
            9 => {
                if depth > 4 {
                    return err("arrays nested more than 4 deep");
                }
                let elem = self.u32()?;
                let n = self.u64()? as usize;
                // Every element takes at least one byte: refuse lengths past the file.
                if n > self.b.len() - self.pos {
                    return err(format!("array of {n} elements at byte {} is longer than the file", self.pos));
                }
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.value(elem, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(i64::from_le_bytes(self.arr()?)),
            12 => Value::F64(f64::from_le_bytes(self.arr()?)),
            t => return err(format!("unknown metadata value type {t} at byte {}", self.pos)),
        })
    }
}

impl Gguf {
    pub fn open(path: &Path) -> Result<Gguf> {
        let data = std::fs::read(path).or_else(|e| err(format!("{}: {e}", path.display())))?;
        Gguf::parse(data)
    }

    pub fn parse(data: Vec<u8>) -> Result<Gguf> {
        let mut c = Cursor { b: &data, pos: 0 };
        if c.take(4)? != b"GGUF" {
            return err("not a GGUF file (magic is not \"GGUF\")");
        }
        let version = c.u32()?;
        if !(2..=3).contains(&version) {
            return err(format!("GGUF version {version} (this reader knows 2 and 3)"));
        }
        let n_tensors = c.u64()? as usize;
        let n_kv = c.u64()? as usize;
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = c.string()?;
            let ty = c.u32()?;
            let v = c.value(ty, 0)?;
            metadata.insert(key, v);
        }
        let mut tensors = Vec::with_capacity(n_tensors.min(1 << 16));
        for _ in 0..n_tensors {
            let name = c.string()?;
            let nd = c.u32()? as usize;
            if nd > 4 {
                return err(format!("tensor {name}: {nd} dimensions (GGUF allows at most 4)"));
            }
            let dims = (0..nd).map(|_| c.u64()).collect::<Result<Vec<_>>>()?;
            let ggml_type = GgmlType::from_id(c.u32()?);
            let offset = c.u64()?;
            tensors.push(TensorInfo { name, dims, ggml_type, offset });
        }
        let alignment = match metadata.get("general.alignment") {
            None => 32,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() => a as usize,
                _ => return err(format!("general.alignment {v:?} is not a power of two")),
            },
        };
        let data_start = c.pos.div_ceil(alignment) * alignment;
        for t in &tensors {
            if !(t.offset as usize).is_multiple_of(alignment) {
                return err(format!(
                    "tensor {}: offset {} is not a multiple of the alignment {alignment}",
                    t.name, t.offset
                ));
            }
            if let Some(n) = t.num_bytes() {
                let end = data_start as u64 + t.offset + n as u64;
                if end > data.len() as u64 {
                    return err(format!(
                        "tensor {}: data ends at byte {end}, past the file's {} bytes",
                        t.name,
                        data.len()
                    ));
                }
            }
        }
        Ok(Gguf { version, metadata, tensors, alignment, data, data_start })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    pub fn require(&self, key: &str) -> Result<&Value> {
        self.get(key).ok_or_else(|| GgufError(format!("metadata key {key} is missing")))
    }

    pub fn u64(&self, key: &str) -> Result<u64> {
        let v = self.require(key)?;
        v.as_u64().ok_or_else(|| GgufError(format!("metadata {key}: expected an unsigned integer, got {v:?}")))
    }

    pub fn f64(&self, key: &str) -> Result<f64> {
        let v = self.require(key)?;
        v.as_f64().ok_or_else(|| GgufError(format!("metadata {key}: expected a number, got {v:?}")))
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Raw bytes of a tensor.
    pub fn tensor_bytes(&self, t: &TensorInfo) -> Result<&[u8]> {
        let n = t
            .num_bytes()
            .ok_or_else(|| GgufError(format!("tensor {}: GGML type {:?} is not supported", t.name, t.ggml_type)))?;
        let start = self.data_start + t.offset as usize;
        Ok(&self.data[start..start + n])
    }

    /// A tensor's elements as f32, in storage order (`dims[0]` fastest).
    pub fn tensor_f32(&self, name: &str) -> Result<Vec<f32>> {
        let t = self.tensor(name).ok_or_else(|| GgufError(format!("tensor {name} is missing")))?;
        let bytes = self.tensor_bytes(t)?;
        let mut out = vec![0f32; t.num_elements()];
        quant::dequantize(t.ggml_type, bytes, &mut out).map_err(|e| GgufError(format!("tensor {name}: {e}")))?;
        Ok(out)
    }
}
