//! The GGUF container (v2 and v3): header, metadata key/values, tensor infos.
//!
//! ```text
//! magic "GGUF" | version u32 | tensor_count u64 | kv_count u64
//! kv_count × (key: string, type: u32, value)
//! tensor_count × (name: string, n_dims: u32, dims: n_dims × u64 (innermost first), type: u32, offset: u64)
//! padding to `general.alignment` (default 32)
//! tensor data, each tensor at data_start + offset
//! ```
//! Strings are a u64 byte length followed by UTF-8 bytes; everything is little-endian.

use std::collections::HashMap;

/// A metadata value, of any of the GGUF value types.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<GgufValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl GgufValue {
    /// Any integer type (negative values give `None`).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v as u64),
            GgufValue::U16(v) => Some(v as u64),
            GgufValue::U32(v) => Some(v as u64),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) => u64::try_from(v).ok(),
            GgufValue::I16(v) => u64::try_from(v).ok(),
            GgufValue::I32(v) => u64::try_from(v).ok(),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(v as f64),
            GgufValue::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(v) => Some(v),
            _ => None,
        }
    }
}

/// Where a tensor lies and how it is stored, as the file declares it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    /// GGUF order: innermost (contiguous) dimension first, the reverse of the checkpoint's shape.
    pub dims: Vec<u64>,
    /// The raw ggml type id (see `GgmlType`).
    pub type_id: u32,
    /// Byte offset from the start of the data section.
    pub offset: u64,
}

/// Everything before the tensor data.
pub struct Header {
    pub version: u32,
    pub metadata: HashMap<String, GgufValue>,
    pub tensors: Vec<TensorInfo>,
    /// Absolute byte offset of the data section.
    pub data_start: usize,
}

pub const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml tensors have at most this many dimensions.
const MAX_DIMS: u32 = 4;

/// Parses the header of `bytes`; errors are plain messages, the caller adds the file name.
pub fn parse_header(bytes: &[u8]) -> Result<Header, String> {
    let mut r = Reader { bytes, pos: 0 };
    let magic = r.take(4, "magic")?;
    if magic != MAGIC {
        return Err(format!("not a GGUF file (magic {magic:02x?}, expected \"GGUF\")"));
    }
    let version = r.u32("version")?;
    if !(2..=3).contains(&version) {
        return Err(format!("unsupported GGUF version {version} (supported: 2 and 3)"));
    }
    let tensor_count = r.u64("tensor count")?;
    let kv_count = r.u64("metadata count")?;
    let mut metadata = HashMap::new();
    for i in 0..kv_count {
        let key = r.string(&format!("metadata key #{i}"))?;
        let ty = r.u32(&format!("type of metadata `{key}`"))?;
        let value = r.value(ty, &key, 0)?;
        metadata.insert(key, value);
    }
    // Each tensor info takes at least 8 + 4 + 4 + 8 bytes; refuse absurd counts before allocating.
    if tensor_count > (r.remaining() / 24) as u64 {
        return Err(format!(
            "header declares {tensor_count} tensors, more than the file can hold: the file is truncated or corrupt"
        ));
    }
    let mut tensors = Vec::with_capacity(tensor_count as usize);
    for i in 0..tensor_count {
        let name = r.string(&format!("name of tensor #{i}"))?;
        let n_dims = r.u32(&format!("dimension count of tensor `{name}`"))?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(format!("tensor `{name}` has {n_dims} dimensions (expected 1 to {MAX_DIMS})"));
        }
        let dims =
            (0..n_dims).map(|_| r.u64(&format!("dimensions of tensor `{name}`"))).collect::<Result<Vec<_>, _>>()?;
        let type_id = r.u32(&format!("type of tensor `{name}`"))?;
        let offset = r.u64(&format!("offset of tensor `{name}`"))?;
        tensors.push(TensorInfo { name, dims, type_id, offset });
    }
    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => match v.as_u64() {
            Some(a) if a > 0 && a.is_power_of_two() => a,
            _ => return Err(format!("`general.alignment` is {v:?}, expected a power of two")),
        },
    };
    if let Some(t) = tensors.iter().find(|t| t.offset % alignment != 0) {
        return Err(format!("tensor `{}` has offset {} not aligned to {alignment} bytes", t.name, t.offset));
    }
    let data_start = (r.pos as u64).div_ceil(alignment) * alignment;
    Ok(Header { version, metadata, tensors, data_start: data_start as usize })
}

/// The most elements a metadata array may hold (vocabularies and merges have ~10^5).
const MAX_ARRAY_LEN: u64 = 1 << 24;

/// The fewest bytes a value of GGUF type `ty` takes in the file (a string: its length).
fn min_value_size(ty: u32) -> u64 {
    match ty {
        2 | 3 => 2,
        4..=6 => 4,
        8 | 10..=12 => 8,
        9 => 12,
        _ => 1,
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        if n > self.remaining() {
            return Err(format!(
                "unexpected end of file at byte {} reading {what} ({n} bytes needed, {} left): the file is truncated or corrupt",
                self.pos,
                self.remaining()
            ));
        }
        let out = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], String> {
        Ok(self.take(N, what)?.try_into().expect("take returns N bytes"))
    }

    fn u32(&mut self, what: &str) -> Result<u32, String> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> Result<u64, String> {
        self.array(what).map(u64::from_le_bytes)
    }

    fn string(&mut self, what: &str) -> Result<String, String> {
        let len = self.u64(what)?;
        if len > self.remaining() as u64 {
            return Err(format!(
                "{what}: string of {len} bytes at byte {} runs past the end of the file: the file is truncated or corrupt",
                self.pos
            ));
        }
        let raw = self.take(len as usize, what)?;
        String::from_utf8(raw.to_vec()).map_err(|_| format!("{what}: invalid UTF-8"))
    }

    fn value(&mut self, ty: u32, key: &str, depth: usize) -> Result<GgufValue, String> {
        let what = || format!("value of metadata `{key}`");
        Ok(match ty {
            0 => GgufValue::U8(self.array::<1>(&what())?[0]),
            1 => GgufValue::I8(self.array::<1>(&what())?[0] as i8),
            2 => GgufValue::U16(u16::from_le_bytes(self.array(&what())?)),
            3 => GgufValue::I16(i16::from_le_bytes(self.array(&what())?)),
            4 => GgufValue::U32(u32::from_le_bytes(self.array(&what())?)),
            5 => GgufValue::I32(i32::from_le_bytes(self.array(&what())?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.array(&what())?)),
            7 => match self.array::<1>(&what())?[0] {
                0 => GgufValue::Bool(false),
                1 => GgufValue::Bool(true),
                b => return Err(format!("metadata `{key}`: invalid bool byte {b}")),
            },
            8 => GgufValue::String(self.string(&what())?),
            9 if depth > 0 => return Err(format!("metadata `{key}`: nested arrays are not supported")),
            9 => {
                let elem = self.u32(&what())?;
                let count = self.u64(&what())?;
                // Refused before anything is allocated for it: a count the rest of the file
                // cannot hold means a corrupt file, and beyond MAX_ARRAY_LEN (far more than
                // any vocabulary) a valid file would still take too much memory to hold.
                if count.saturating_mul(min_value_size(elem)) > self.remaining() as u64 {
                    return Err(format!(
                        "metadata `{key}`: array of {count} elements runs past the end of the file: the file is truncated or corrupt"
                    ));
                }
                if count > MAX_ARRAY_LEN {
                    return Err(format!("metadata `{key}`: array of {count} elements, more than {MAX_ARRAY_LEN}"));
                }
                let items = (0..count).map(|_| self.value(elem, key, depth + 1)).collect::<Result<Vec<_>, _>>()?;
                GgufValue::Array(items)
            }
            10 => GgufValue::U64(u64::from_le_bytes(self.array(&what())?)),
            11 => GgufValue::I64(i64::from_le_bytes(self.array(&what())?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.array(&what())?)),
            other => return Err(format!("metadata `{key}` has unknown value type {other}")),
        })
    }
}
