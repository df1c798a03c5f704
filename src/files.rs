//! loren's own kinds of safetensors file, told apart by their `format` metadata: what a command
//! may read where, and what it may replace.

use std::collections::HashMap;
use std::path::Path;

/// What a safetensors file is to loren.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileKind {
    /// An ensemble `loren export` wrote ([`crate::ensemble::FORMAT`]).
    Export,
    /// A training checkpoint, which `--resume` and `eval` read (`loren_nn::train::FORMAT`).
    Checkpoint,
    /// A backbone `loren pretrain` wrote, or one imported from another library's weights
    /// ([`crate::backbone::FORMAT`]).
    Backbone,
    /// Anything else: another library's weights, a file of no format, one that cannot be read.
    Other,
}

impl FileKind {
    /// The kind a file's metadata says.
    pub fn of(metadata: &HashMap<String, String>) -> FileKind {
        match metadata.get("format").map(String::as_str) {
            Some(crate::ensemble::FORMAT) => FileKind::Export,
            Some(loren_nn::train::FORMAT) => FileKind::Checkpoint,
            Some(crate::backbone::FORMAT) => FileKind::Backbone,
            _ => FileKind::Other,
        }
    }

    /// The kind of the file at `path`, read from its header alone.
    pub fn at(path: &Path) -> FileKind {
        loren_nn::checkpoint::read_metadata(path).map_or(FileKind::Other, |m| FileKind::of(&m))
    }
}
