//! The output-path checks every command makes before its work (`loren::outputs`).

pub use loren::outputs::{same_file, writable_dir, writable_file};
