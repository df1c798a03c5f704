//! Named f32 tensors in safetensors files: written atomically, read with every problem named.
//!
//! Files may hold f32, f16 or bf16 tensors; all are read as f32. Writes go to a temporary file
//! beside the target that is synced and then renamed over it, so a crash never leaves half a file.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use half::{bf16, f16};
pub use safetensors::tensor::Dtype;
use safetensors::tensor::{SafeTensorError, SafeTensors, TensorView};

use crate::error::{NnError, Result};

/// The largest header safetensors reads (its own limit).
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// Refuse what cannot be a safetensors file before reading it whole: a device such as /dev/zero
/// would be read without end, and a large file of anything else would be read into memory only
/// to be refused. Returns the file, read up to its header, and the header's length.
fn check_header_length(path: &Path) -> Result<(fs::File, u64)> {
    let io = |e| NnError::io(path, e);
    let mut file = fs::File::open(path).map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    if !meta.is_file() {
        return Err(NnError::checkpoint(
            path,
            "not a regular file (a safetensors file is read from disk)",
        ));
    }
    let mut head = [0u8; 8];
    if file.read_exact(&mut head).is_err() {
        return Err(NnError::checkpoint(
            path,
            format!(
                "not a valid safetensors file ({} bytes, shorter than the 8 that give its header's length)",
                meta.len()
            ),
        ));
    }
    let n = u64::from_le_bytes(head);
    // A file's reported length may be 0 with content behind it (procfs).
    if n == 0 || n > MAX_HEADER_BYTES || n > meta.len().saturating_sub(8) {
        // A safetensors header is JSON: a file whose header begins is one cut short, however its
        // length bytes read.
        let mut next = [0u8; 1];
        let json = file.read_exact(&mut next).is_ok() && next[0] == b'{';
        let why = match other_file_kind(&head).filter(|_| !json) {
            Some(kind) => format!("it is {kind}"),
            None => format!(
                "its first 8 bytes give a header of {n} bytes, in a file of {}",
                meta.len()
            ),
        };
        return Err(NnError::checkpoint(
            path,
            format!("not a valid safetensors file ({why})"),
        ));
    }
    Ok((file, n))
}

/// What a file given for a safetensors one is, by its first bytes, where that is commonly
/// mistaken for one: an image, or PyTorch's own formats.
fn other_file_kind(head: &[u8; 8]) -> Option<&'static str> {
    let starts = |bytes: &[u8]| head.starts_with(bytes);
    if starts(b"\x89PNG") {
        Some("a PNG image")
    } else if starts(&[0xff, 0xd8, 0xff]) {
        Some("a JPEG image")
    } else if starts(b"PK\x03\x04") {
        Some(
            "a zip archive, as torch.save writes a .pt, .pth or .bin file: the README's \
             one-liner converts one to safetensors",
        )
    } else if head[0] == 0x80 && (2..=5).contains(&head[1]) {
        Some("a Python pickle, as older torch.save writes: the README's one-liner converts it")
    } else if starts(&[0x1f, 0x8b]) {
        Some("a gzip file")
    } else {
        None
    }
}

/// The metadata of a safetensors file, read from its header alone.
pub fn read_metadata(path: &Path) -> Result<HashMap<String, String>> {
    let (mut file, n) = check_header_length(path)?;
    let mut header = vec![0u8; n as usize];
    file.read_exact(&mut header)
        .map_err(|e| NnError::io(path, e))?;
    let bad = |what: String| NnError::checkpoint(path, format!("unreadable header ({what})"));
    let json: serde_json::Value =
        serde_json::from_slice(&header).map_err(|e| bad(e.to_string()))?;
    match json.get("__metadata__") {
        None => Ok(HashMap::new()),
        Some(m) => serde_json::from_value(m.clone()).map_err(|e| bad(e.to_string())),
    }
}

/// One tensor read from a file.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// The tensors and metadata of one safetensors file.
#[derive(Debug)]
pub struct TensorFile {
    path: PathBuf,
    tensors: BTreeMap<String, Entry>,
    metadata: HashMap<String, String>,
    /// [`TensorFile::fingerprint`], hashed once: a ViT-B backbone is 86M values.
    fingerprint: std::sync::OnceLock<String>,
}

impl TensorFile {
    pub fn read(path: &Path) -> Result<TensorFile> {
        // The file checked is the file read: opened once, and sized up front as fs::read
        // sizes it, so a large file is not grown (and copied) in doublings.
        let (mut file, _) = check_header_length(path)?;
        let len = file.metadata().map_or(0, |m| m.len());
        let mut bytes = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
        file.rewind()
            .and_then(|()| file.read_to_end(&mut bytes))
            .map_err(|e| NnError::io(path, e))?;
        TensorFile::parse(&bytes, path)
    }

    /// Parse file contents; `path` only names the file in errors.
    pub fn parse(bytes: &[u8], path: &Path) -> Result<TensorFile> {
        let st = SafeTensors::deserialize(bytes).map_err(|e| {
            let why = match (&e, described_bytes(bytes)) {
                (SafeTensorError::MetadataIncompleteBuffer, Some(want)) => {
                    cut_or_grown(bytes.len(), want)
                }
                _ => format!("not a valid safetensors file ({e})"),
            };
            NnError::checkpoint(path, why)
        })?;
        let (_, meta) = SafeTensors::read_metadata(bytes)
            .map_err(|e| NnError::checkpoint(path, format!("unreadable header ({e})")))?;
        let mut tensors = BTreeMap::new();
        for (name, view) in st.iter() {
            let data = to_f32(&view)
                .map_err(|msg| NnError::checkpoint(path, format!("tensor '{name}': {msg}")))?;
            tensors.insert(
                name.to_string(),
                Entry {
                    shape: view.shape().to_vec(),
                    data,
                },
            );
        }
        Ok(TensorFile {
            path: path.to_path_buf(),
            tensors,
            metadata: meta.metadata().clone().unwrap_or_default(),
            fingerprint: Default::default(),
        })
    }

    /// A file made in memory (by an importer that renames and reshapes another file's
    /// tensors); `path` names it in errors.
    pub fn from_entries(
        path: &Path,
        tensors: BTreeMap<String, Entry>,
        metadata: HashMap<String, String>,
    ) -> TensorFile {
        TensorFile {
            path: path.to_path_buf(),
            tensors,
            metadata,
            fingerprint: Default::default(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }

    /// A metadata value, or an error naming the missing key.
    pub fn meta(&self, key: &str) -> Result<&str> {
        self.metadata
            .get(key)
            .map(String::as_str)
            .ok_or_else(|| NnError::checkpoint(&self.path, format!("metadata '{key}' is missing")))
    }

    /// A metadata value holding JSON, parsed.
    pub fn meta_json<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<T> {
        serde_json::from_str(self.meta(key)?).map_err(|e| {
            NnError::checkpoint(&self.path, format!("metadata '{key}' is unreadable: {e}"))
        })
    }

    /// How many values its tensors hold, all together.
    pub fn values(&self) -> usize {
        self.tensors.values().map(|e| e.data.len()).sum()
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// A tensor by name, or an error naming the file and the tensor.
    pub fn get(&self, name: &str) -> Result<&Entry> {
        self.tensors
            .get(name)
            .ok_or_else(|| NnError::checkpoint(&self.path, format!("tensor '{name}' is missing")))
    }

    /// A tensor that must have `shape` and hold numbers: a mismatch names the tensor and both
    /// shapes, a NaN or infinity names the tensor and the element (a model loaded with one would
    /// otherwise fail much later, at a probability that is not a number).
    pub fn get_shaped(&self, name: &str, shape: &[usize]) -> Result<&[f32]> {
        let e = self.get(name)?;
        if e.shape != shape {
            return Err(NnError::checkpoint(
                &self.path,
                format!(
                    "tensor '{name}' has shape {:?}, expected {:?}",
                    e.shape, shape
                ),
            ));
        }
        if let Some(i) = e.data.iter().position(|v| !v.is_finite()) {
            return Err(NnError::checkpoint(
                &self.path,
                format!("tensor '{name}' holds {} at element {i}", e.data[i]),
            ));
        }
        Ok(&e.data)
    }

    /// A 64-bit FNV-1a hash of every tensor's name, shape and bits, in name order, as 16 hex
    /// digits: what a checkpoint records of the backbone it was trained from, so a run resumed,
    /// evaluated or exported against other weights (a backbone pretrained again, another file)
    /// is refused rather than silently wrong.
    pub fn fingerprint(&self) -> String {
        self.fingerprint.get_or_init(|| self.hash()).clone()
    }

    fn hash(&self) -> String {
        const PRIME: u64 = 0x0000_0100_0000_01b3;
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut eat = |word: u64| h = (h ^ word).wrapping_mul(PRIME);
        for (name, e) in &self.tensors {
            name.bytes().for_each(|b| eat(b as u64));
            eat(e.shape.len() as u64);
            e.shape.iter().for_each(|&d| eat(d as u64));
            e.data.iter().for_each(|v| eat(v.to_bits() as u64));
        }
        format!("{h:016x}")
    }

    /// Take a tensor out, for importers that rearrange weights.
    pub fn take(&mut self, name: &str) -> Result<Entry> {
        self.fingerprint = Default::default();
        self.tensors
            .remove(name)
            .ok_or_else(|| NnError::checkpoint(&self.path, format!("tensor '{name}' is missing")))
    }
}

/// The length of a file whose header parses: the 8 bytes of its length, the header, and the
/// tensors' bytes up to the last one's end.
fn described_bytes(bytes: &[u8]) -> Option<usize> {
    let n = usize::try_from(u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?)).ok()?;
    let header: HashMap<String, serde_json::Value> =
        serde_json::from_slice(bytes.get(8..8usize.checked_add(n)?)?).ok()?;
    let end = header
        .iter()
        .filter(|(name, _)| name.as_str() != "__metadata__")
        .map(|(_, t)| t.get("data_offsets")?.get(1)?.as_u64())
        .try_fold(0u64, |most, e| Some(most.max(e?)))?;
    8usize
        .checked_add(n)?
        .checked_add(usize::try_from(end).ok()?)
}

/// What a file of `have` bytes whose header describes `want` is: cut short (a copy or a write
/// that did not finish), or followed by bytes no tensor holds.
fn cut_or_grown(have: usize, want: usize) -> String {
    match have < want {
        true => format!(
            "truncated: its header describes {want} bytes, and the file holds {have} (a copy or \
             a write that did not finish?)"
        ),
        false => format!(
            "not a valid safetensors file: its header describes {want} bytes, and {} more follow",
            have - want
        ),
    }
}

fn to_f32(view: &TensorView<'_>) -> std::result::Result<Vec<f32>, String> {
    let raw = view.data();
    let words = |n: usize| raw.chunks_exact(n);
    Ok(match view.dtype() {
        Dtype::F32 => words(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => words(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => words(2)
            .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        other => {
            return Err(format!(
                "dtype {other:?} is not supported (f32, f16 or bf16)"
            ));
        }
    })
}

/// Write named tensors and `metadata` to `path` atomically, in f32.
pub fn write(
    path: &Path,
    tensors: &[(String, Entry)],
    metadata: HashMap<String, String>,
) -> Result<()> {
    let out = tensors
        .iter()
        .map(|(name, e)| Out {
            name,
            dtype: Dtype::F32,
            shape: &e.shape,
            values: Values::F32(&e.data),
        })
        .collect();
    write_out(path, out, metadata)
}

/// One tensor as a file holds it: its values' little-endian bytes, of any safetensors dtype.
pub struct RawTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

/// Write tensors of any dtype and `metadata` to `path` atomically; a tensor whose bytes do not
/// fill its shape is an error naming it.
pub fn write_raw(
    path: &Path,
    tensors: &[RawTensor],
    metadata: HashMap<String, String>,
) -> Result<()> {
    let out = tensors
        .iter()
        .map(|t| Out {
            name: &t.name,
            dtype: t.dtype,
            shape: &t.shape,
            values: Values::Bytes(&t.bytes),
        })
        .collect();
    write_out(path, out, metadata)
}

/// A tensor's values as [`write_out`] takes them.
pub(crate) enum Values<'a> {
    /// Written as little-endian f32, a piece at a time: never a second copy of them all.
    F32(&'a [f32]),
    Bytes(&'a [u8]),
}

impl Values<'_> {
    fn byte_len(&self) -> usize {
        match self {
            Values::F32(v) => v.len() * 4,
            Values::Bytes(b) => b.len(),
        }
    }

    fn write_to(&self, w: &mut impl Write) -> std::io::Result<()> {
        match self {
            Values::Bytes(b) => w.write_all(b),
            Values::F32(v) => v.chunks(1 << 14).try_for_each(|chunk| {
                let bytes: Vec<u8> = chunk.iter().flat_map(|x| x.to_le_bytes()).collect();
                w.write_all(&bytes)
            }),
        }
    }
}

/// One tensor to write.
pub(crate) struct Out<'a> {
    pub name: &'a str,
    pub dtype: Dtype,
    pub shape: &'a [usize],
    pub values: Values<'a>,
}

/// Write `tensors` and `metadata` to `path` atomically as safetensors, streamed: the header,
/// then each tensor's bytes straight from its values, so that writing holds no copy of them
/// all (a checkpoint of an explicit ViT-B ensemble's weights and moments is tens of GiB). The
/// header's keys are sorted and the data ordered as the safetensors crate orders it (by
/// alignment, then name): the same contents make the same bytes.
pub(crate) fn write_out(
    path: &Path,
    mut tensors: Vec<Out>,
    metadata: HashMap<String, String>,
) -> Result<()> {
    let mut names = std::collections::HashSet::new();
    if let Some(t) = tensors.iter().find(|t| !names.insert(t.name)) {
        return Err(NnError::checkpoint(
            path,
            format!("tensor '{}' is named twice", t.name),
        ));
    }
    for t in &tensors {
        let bits = t.values.byte_len() * 8;
        if t.shape.iter().product::<usize>() * t.dtype.bitsize() != bits {
            return Err(NnError::checkpoint(
                path,
                format!(
                    "tensor '{}': {} values for shape {:?}",
                    t.name,
                    bits / t.dtype.bitsize(),
                    t.shape
                ),
            ));
        }
    }
    tensors.sort_by(|a, b| b.dtype.cmp(&a.dtype).then(a.name.cmp(b.name)));
    // serde_json's maps are BTreeMaps: the header's keys come out sorted at every level.
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!(metadata));
    let mut offset = 0;
    for t in &tensors {
        let end = offset + t.values.byte_len();
        let info = serde_json::json!({
            "dtype": t.dtype,
            "shape": t.shape,
            "data_offsets": [offset, end],
        });
        header.insert(t.name.to_string(), info);
        offset = end;
    }
    let mut header = serde_json::Value::Object(header).to_string().into_bytes();
    // The data starts 8-byte aligned, as the format asks.
    header.resize(header.len().next_multiple_of(8), b' ');
    write_atomic_with(path, |w| {
        w.write_all(&(header.len() as u64).to_le_bytes())?;
        w.write_all(&header)?;
        tensors.iter().try_for_each(|t| t.values.write_to(w))
    })
}

/// Write `bytes` to `path` through a synced temporary file and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |w| w.write_all(bytes))
}

/// [`write_atomic`] of what `write` writes, through a buffer.
fn write_atomic_with(
    path: &Path,
    write: impl FnOnce(&mut std::io::BufWriter<fs::File>) -> std::io::Result<()>,
) -> Result<()> {
    let tmp = make_folder_for(path)?;
    let result = (|| {
        let mut f = std::io::BufWriter::new(fs::File::create(&tmp)?);
        write(&mut f)?;
        let f = f.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        sync_folder(path);
        Ok(())
    })();
    result.map_err(|e| {
        let _ = fs::remove_file(&tmp);
        NnError::io(path, e)
    })
}

/// The rename into `path` made durable: until its folder is synced, a power cut may lose the
/// rename, leaving the old file (each is whole either way). Best effort, and Unix only, where a
/// folder opens as a file.
fn sync_folder(path: &Path) {
    #[cfg(unix)]
    if let Some(dir) = path.parent() {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        if let Ok(d) = fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
}

/// Whether [`write_atomic`] can write `path`: it names no folder, and its temporary file can be
/// made beside it (the folder is made, as `write_atomic` makes it). A run checks this before its
/// first step, rather than learn at the end of its first epoch that it cannot keep its work.
pub fn check_writable(path: &Path) -> Result<()> {
    if path.is_dir() {
        return Err(NnError::checkpoint(
            path,
            "is a folder: name the file to write",
        ));
    }
    let tmp = make_folder_for(path)?;
    // A file of its own name, so that nothing at `path` is touched.
    fs::File::create(&tmp).map_err(|e| NnError::io(path, e))?;
    let _ = fs::remove_file(&tmp);
    Ok(())
}

/// Whether the disk `path` goes on has room for a file of about `bytes` (written beside the one
/// it replaces, which keeps its room until the rename). A run checks this before its first step:
/// an empty file can be made on a full disk, so [`check_writable`] alone would let it train an
/// epoch it cannot keep. Where the free space cannot be read, it is taken to be enough.
pub fn check_room(path: &Path, bytes: u64) -> Result<()> {
    let dir = match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(d) => d,
        None => Path::new("."),
    };
    match free_bytes(dir) {
        Some(free) if free < bytes => {
            let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
            Err(NnError::checkpoint(
                path,
                format!(
                    "each checkpoint takes about {:.1} MiB, and its disk has {:.1} MiB free: \
                     free some space, or write it elsewhere",
                    mib(bytes),
                    mib(free)
                ),
            ))
        }
        _ => Ok(()),
    }
}

/// The bytes an unprivileged process may still write on the disk holding `dir`.
#[cfg(unix)]
fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let name = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: a zeroed statvfs is a valid value for statvfs(3) to fill; `name` is a C string.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(name.as_ptr(), &mut stat) } != 0 {
        return None;
    }
    (stat.f_bavail as u64).checked_mul(stat.f_frsize as u64)
}

#[cfg(not(unix))]
fn free_bytes(_: &Path) -> Option<u64> {
    None
}

/// Make `path`'s folder; the temporary file [`write_atomic`] writes first.
fn make_folder_for(path: &Path) -> Result<PathBuf> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).map_err(|e| NnError::io(dir, e))?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    Ok(PathBuf::from(tmp))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fingerprint tells apart names, shapes of one rank, and values, and describes what
    /// is left after a `take`.
    #[test]
    fn the_fingerprint_covers_names_shapes_and_values_and_follows_take() {
        let file = |tensors: &[(&str, Vec<usize>, Vec<f32>)]| {
            let entries = tensors
                .iter()
                .map(|(name, shape, data)| {
                    let entry = Entry {
                        shape: shape.clone(),
                        data: data.clone(),
                    };
                    (name.to_string(), entry)
                })
                .collect();
            TensorFile::from_entries(Path::new("mem"), entries, HashMap::new())
        };
        let six: Vec<f32> = (0..6).map(|i| i as f32).collect();
        let fp = file(&[("a", vec![2, 3], six.clone())]).fingerprint();
        assert_ne!(fp, file(&[("a", vec![3, 2], six.clone())]).fingerprint());
        assert_ne!(fp, file(&[("a", vec![6], six.clone())]).fingerprint());
        assert_ne!(fp, file(&[("b", vec![2, 3], six.clone())]).fingerprint());
        let other: Vec<f32> = (1..7).map(|i| i as f32).collect();
        assert_ne!(fp, file(&[("a", vec![2, 3], other)]).fingerprint());

        let mut two = file(&[("a", vec![1], vec![1.0]), ("b", vec![1], vec![2.0])]);
        let before = two.fingerprint();
        two.take("b").unwrap();
        assert_ne!(two.fingerprint(), before);
        assert_eq!(
            two.fingerprint(),
            file(&[("a", vec![1], vec![1.0])]).fingerprint()
        );
    }

    /// The same tensors and metadata make the same bytes, whatever order the metadata's map
    /// iterates in, and the file reads back whole.
    #[test]
    fn the_same_contents_write_the_same_bytes() {
        let dir = temp("same-bytes");
        let tensors = [
            ("w", vec![2, 2], vec![1.0, 2.0, 3.0, 4.0]),
            ("b", vec![3], vec![5.0, 6.0, 7.0]),
        ]
        .map(|(name, shape, data)| (name.to_string(), Entry { shape, data }));
        let metadata = || -> HashMap<String, String> {
            (0..40)
                .map(|i| (format!("key{i}"), format!("value {i}")))
                .collect()
        };
        let files = ["one", "two"].map(|name| {
            let path = dir.join(format!("{name}.safetensors"));
            write(&path, &tensors, metadata()).unwrap();
            path
        });
        let bytes = files.each_ref().map(|f| fs::read(f).unwrap());
        assert!(bytes[0] == bytes[1], "two writes differ");
        let back = TensorFile::read(&files[0]).unwrap();
        assert_eq!(back.metadata(), &metadata());
        assert_eq!(back.get("b").unwrap().data, [5.0, 6.0, 7.0]);
    }

    /// Streamed tensors of mixed dtypes read back through the safetensors crate itself, each in
    /// its place, the wider dtype first so that every tensor stays aligned.
    #[test]
    fn mixed_dtypes_stream_into_a_file_safetensors_reads() {
        let path = temp("mixed");
        let halves: Vec<u8> = [1.5f32, -2.0, 3.25]
            .iter()
            .flat_map(|&x| bf16::from_f32(x).to_le_bytes())
            .collect();
        let floats: Vec<u8> = [7.0f32, 8.5].iter().flat_map(|x| x.to_le_bytes()).collect();
        let tensors = [
            ("a/halves", Dtype::BF16, vec![3], halves.clone()),
            ("b/floats", Dtype::F32, vec![2], floats.clone()),
        ]
        .map(|(name, dtype, shape, bytes)| RawTensor {
            name: name.into(),
            dtype,
            shape,
            bytes,
        });
        let meta = HashMap::from([("k".to_string(), "v".to_string())]);
        write_raw(&path, &tensors, meta.clone()).unwrap();
        let bytes = fs::read(&path).unwrap();
        let (_, read) = SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(read.metadata().as_ref(), Some(&meta));
        let file = SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(file.tensor("a/halves").unwrap().data(), &halves[..]);
        assert_eq!(file.tensor("b/floats").unwrap().data(), &floats[..]);
        assert_eq!(read.info("b/floats").unwrap().data_offsets, (0, 8));
        // And a tensor whose bytes do not fill its shape is refused, naming it.
        let short = [RawTensor {
            name: "w".into(),
            dtype: Dtype::F32,
            shape: vec![3],
            bytes: floats,
        }];
        let e = write_raw(&path, &short, HashMap::new())
            .unwrap_err()
            .to_string();
        assert!(e.contains("tensor 'w': 2 values for shape [3]"), "{e}");
    }

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("loren-ckpt-{}-{name}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        dir.join("t.safetensors")
    }

    #[test]
    fn round_trips_tensors_and_metadata() {
        let p = temp("round");
        let meta = HashMap::from([("step".to_string(), "7".to_string())]);
        let a = Entry {
            shape: vec![2, 3],
            data: (0..6).map(|i| i as f32 * 0.5).collect(),
        };
        let b = Entry {
            shape: vec![1],
            data: vec![-1.0],
        };
        write(&p, &[("a".into(), a), ("b".into(), b)], meta).unwrap();
        let f = TensorFile::read(&p).unwrap();
        assert_eq!(
            f.get_shaped("a", &[2, 3]).unwrap(),
            &[0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
        );
        assert_eq!(f.meta("step").unwrap(), "7");
        assert!(!p.with_extension("safetensors.tmp").exists());
    }

    /// A file cut short after its header says so, with both lengths; one with bytes past its
    /// last tensor says that.
    #[test]
    fn a_truncated_file_is_called_truncated() {
        let p = temp("cut");
        let a = Entry {
            shape: vec![4],
            data: vec![1.0, 2.0, 3.0, 4.0],
        };
        write(&p, &[("a".into(), a)], HashMap::new()).unwrap();
        let whole = fs::read(&p).unwrap();
        let cut = &whole[..whole.len() - 3];
        let e = TensorFile::parse(cut, &p).unwrap_err().to_string();
        let (want, have) = (whole.len(), whole.len() - 3);
        let says =
            format!("truncated: its header describes {want} bytes, and the file holds {have}");
        assert!(e.contains(&says), "{e}");
        let mut grown = whole.clone();
        grown.extend([0; 5]);
        let e = TensorFile::parse(&grown, &p).unwrap_err().to_string();
        assert!(
            e.contains(&format!("describes {want} bytes, and 5 more follow")),
            "{e}"
        );
    }

    #[test]
    fn problems_name_the_file_and_the_tensor() {
        let p = temp("bad");
        write(
            &p,
            &[(
                "w".into(),
                Entry {
                    shape: vec![2, 2],
                    data: vec![1.0; 4],
                },
            )],
            HashMap::new(),
        )
        .unwrap();
        let f = TensorFile::read(&p).unwrap();
        let e = f.get_shaped("w", &[4, 1]).unwrap_err().to_string();
        assert!(
            e.contains("'w'")
                && e.contains("[2, 2]")
                && e.contains("[4, 1]")
                && e.contains("t.safetensors"),
            "{e}"
        );
        let e = f.get("nope").unwrap_err().to_string();
        assert!(e.contains("'nope'") && e.contains("missing"), "{e}");

        let nan = temp("nan");
        let data = vec![1.0, 2.0, f32::NAN, 4.0];
        write(
            &nan,
            &[(
                "w".into(),
                Entry {
                    shape: vec![2, 2],
                    data,
                },
            )],
            HashMap::new(),
        )
        .unwrap();
        let e = TensorFile::read(&nan)
            .unwrap()
            .get_shaped("w", &[2, 2])
            .unwrap_err()
            .to_string();
        assert!(e.contains("'w'") && e.contains("NaN at element 2"), "{e}");

        let bytes = fs::read(&p).unwrap();
        let e = TensorFile::parse(&bytes[..bytes.len() - 3], &p)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("t.safetensors") && e.contains("truncated: its header describes 104 bytes"),
            "{e}"
        );
        let e = TensorFile::parse(b"garbage", &p).unwrap_err().to_string();
        assert!(e.contains("not a valid safetensors"), "{e}");
        let e = TensorFile::read(&p.with_file_name("absent.safetensors"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("absent.safetensors"), "{e}");
    }

    #[test]
    fn what_cannot_be_a_safetensors_file_is_refused_before_it_is_read() {
        // A large file of zeros: its header length is 0, seen in its first 8 bytes. The file is
        // sparse, so this reads 8 bytes and allocates nothing of its size.
        let zeros = temp("zeros");
        fs::File::create(&zeros).unwrap().set_len(64 << 30).unwrap();
        let e = TensorFile::read(&zeros).unwrap_err().to_string();
        assert!(
            e.contains("t.safetensors") && e.contains("header of 0 bytes"),
            "{e}"
        );
        fs::remove_file(&zeros).unwrap();
        // A header longer than the file.
        let long = temp("long");
        fs::write(&long, [&1000u64.to_le_bytes()[..], b"{}"].concat()).unwrap();
        let e = TensorFile::read(&long).unwrap_err().to_string();
        assert!(e.contains("header of 1000 bytes, in a file of 10"), "{e}");
        // A safetensors file cut short is not taken for a pickle, whatever its length bytes.
        let pickle_length = u64::from_le_bytes(*b"\x80\x04\0\0\0\0\0\0");
        fs::write(
            &long,
            [&pickle_length.to_le_bytes()[..], b"{\"a\":"].concat(),
        )
        .unwrap();
        let e = TensorFile::read(&long).unwrap_err().to_string();
        assert!(
            e.contains("its first 8 bytes give a header of 1152 bytes"),
            "{e}"
        );
        // Files commonly given for one are named.
        for (bytes, kind) in [
            (&b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR"[..], "it is a PNG image"),
            (
                b"PK\x03\x04\x14\0\0\0\0\0",
                "it is a zip archive, as torch.save writes",
            ),
            (b"\x80\x02\x8a\x0al\xfc\x9cF\xf9", "it is a Python pickle"),
        ] {
            fs::write(&long, bytes).unwrap();
            let e = TensorFile::read(&long).unwrap_err().to_string();
            assert!(e.contains(kind), "{e}");
        }
        let short = temp("short");
        fs::write(&short, b"abc").unwrap();
        let e = TensorFile::read(&short).unwrap_err().to_string();
        assert!(e.contains("3 bytes, shorter than the 8"), "{e}");
        // procfs reports a length of 0 for files with content.
        let auxv = Path::new("/proc/self/auxv");
        if auxv.exists() {
            let e = TensorFile::read(auxv).unwrap_err().to_string();
            assert!(e.contains("auxv"), "{e}");
        }
        // A device reads without end.
        let e = TensorFile::read(Path::new("/dev/zero"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a regular file"), "{e}");
        let dir = temp("dir").with_file_name("folder.safetensors");
        fs::create_dir_all(&dir).unwrap();
        let e = TensorFile::read(&dir).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
    }

    #[test]
    fn reads_half_precision_files() {
        let vals = [1.5f32, -2.25, 0.125];
        let h: Vec<u8> = vals
            .iter()
            .flat_map(|v| f16::from_f32(*v).to_le_bytes())
            .collect();
        let b: Vec<u8> = vals
            .iter()
            .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
            .collect();
        let views = vec![
            ("h", TensorView::new(Dtype::F16, vec![3], &h).unwrap()),
            ("b", TensorView::new(Dtype::BF16, vec![3], &b).unwrap()),
        ];
        let bytes = safetensors::serialize(views, None).unwrap();
        let f = TensorFile::parse(&bytes, Path::new("mem")).unwrap();
        assert_eq!(f.get("h").unwrap().data, vals);
        assert_eq!(f.get("b").unwrap().data, vals);
    }
}
