//! The output-path checks every command makes before its work (`loren::outputs`).

pub use loren::outputs::{writable_dir, writable_file};
