//! The bundled 8×8 handwritten digits (UCI "Optical Recognition of Handwritten Digits", the
//! copy scikit-learn ships; see `assets/digits/LICENSE.md`).
//!
//! The file is gzip-compressed CSV: one image per line, 64 integer pixels in `0..=16` (row by
//! row), then the label `0..=9`. Pixels are scaled by 1/16 into `[0, 1]`.

use std::io::Read;
use std::num::IntErrorKind;
use std::path::{Path, PathBuf};

use flate2::read::GzDecoder;

use super::{DataError, Dataset, Pixels};

const SIDE: usize = 8;
const PIXELS: usize = SIDE * SIDE;
const MAX_PIXEL: i64 = 16;
const CLASSES: usize = 10;
/// The real file decompresses to 265 KB; anything far larger is not this dataset, and reading
/// it whole could exhaust memory.
const MAX_DECOMPRESSED: u64 = 64 << 20;

/// Digits are normalised to `[-1, 1]` by mean 0.5 and std 0.5: a fixed, symmetric choice that
/// does not depend on which images land in which split.
pub const DIGITS_MEAN: f32 = 0.5;
pub const DIGITS_STD: f32 = 0.5;

const BUNDLED: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../assets/digits/digits.csv.gz"
));

/// Where the bundled file lives in the source tree.
pub fn bundled_digits_path() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../assets/digits/digits.csv.gz"
    ))
}

/// The digits compiled into the binary, so it works from any directory.
pub fn bundled_digits() -> Result<Dataset, DataError> {
    parse_digits_gz(BUNDLED, &bundled_digits_path())
}

/// Reads a digits file in the format described in the module docs.
pub fn load_digits(path: &Path) -> Result<Dataset, DataError> {
    let bytes = std::fs::read(path).map_err(|reason| DataError::Io {
        path: path.to_path_buf(),
        reason,
    })?;
    parse_digits_gz(&bytes, path)
}

/// The one parser behind both loaders; `path` only names the origin in errors.
fn parse_digits_gz(bytes: &[u8], path: &Path) -> Result<Dataset, DataError> {
    let text = gunzip(bytes, path)?;
    let (pixels, labels) = parse_rows(&text, path)?;
    let images = Pixels::Steps {
        bytes: pixels,
        levels: MAX_PIXEL as u8,
    };
    let class_names = (0..CLASSES).map(|c| c.to_string()).collect();
    Dataset::new("digits", [1, SIDE, SIDE], images, labels, class_names)?
        .with_normalization(vec![DIGITS_MEAN], vec![DIGITS_STD])
}

fn gunzip(bytes: &[u8], path: &Path) -> Result<Vec<u8>, DataError> {
    let path = || path.to_path_buf();
    if bytes.is_empty() {
        return Err(DataError::EmptyFile { path: path() });
    }
    if !bytes.starts_with(&[0x1f, 0x8b]) {
        return Err(DataError::NotGzip { path: path() });
    }
    let mut out = Vec::new();
    GzDecoder::new(bytes)
        .take(MAX_DECOMPRESSED + 1)
        .read_to_end(&mut out)
        .map_err(|reason| DataError::CorruptGzip {
            path: path(),
            reason,
        })?;
    if out.len() as u64 > MAX_DECOMPRESSED {
        return Err(DataError::TooLarge {
            path: path(),
            limit: MAX_DECOMPRESSED,
        });
    }
    Ok(out)
}

/// Pixels (`0..=16`, 64 per row) and labels of every non-blank line.
fn parse_rows(text: &[u8], path: &Path) -> Result<(Vec<u8>, Vec<u32>), DataError> {
    let (mut pixels, mut labels) = (Vec::new(), Vec::new());
    // The byte-order mark a spreadsheet writes at the start of its CSV.
    let text = text.strip_prefix(b"\xef\xbb\xbf").unwrap_or(text);
    for (index, raw) in text.split(|&b| b == b'\n').enumerate() {
        let line = index + 1;
        let row = std::str::from_utf8(raw).map_err(|_| DataError::NotText {
            path: path.to_path_buf(),
            line,
        })?;
        if row.trim().is_empty() {
            continue;
        }
        let header = DataError::HeaderLine {
            path: path.to_path_buf(),
            line,
            value: shortened(row),
        };
        // Column numbers, as pandas writes an array's: 0 to 64, which would read as an image.
        let numbered = row
            .split(',')
            .map(str::trim)
            .eq((0..=PIXELS).map(|i| i.to_string()));
        if labels.is_empty() && numbered {
            return Err(header);
        }
        let label = parse_row(row, line, path, &mut pixels).map_err(|e| match e {
            // Column names where the first row's numbers should be.
            DataError::NotNumeric {
                value, field: 1, ..
            } if labels.is_empty() && value.chars().any(|c| c.is_ascii_alphabetic()) => header,
            e => e,
        })?;
        labels.push(label);
    }
    if labels.is_empty() {
        return Err(DataError::NoRows {
            path: path.to_path_buf(),
        });
    }
    Ok((pixels, labels))
}

/// Appends one row's pixels to `pixels` and returns its label.
fn parse_row(row: &str, line: usize, path: &Path, pixels: &mut Vec<u8>) -> Result<u32, DataError> {
    let fields: Vec<&str> = row.split(',').collect();
    if fields.len() != PIXELS + 1 {
        return Err(DataError::FieldCount {
            path: path.to_path_buf(),
            line,
            expected: PIXELS + 1,
            found: fields.len(),
        });
    }
    for (i, field) in fields[..PIXELS].iter().enumerate() {
        match parse_integer(field, line, i + 1, path)? {
            Some(value @ 0..=MAX_PIXEL) => pixels.push(value as u8),
            _ => {
                return Err(DataError::PixelRange {
                    path: path.to_path_buf(),
                    line,
                    field: i + 1,
                    value: shortened(field),
                });
            }
        }
    }
    let label = fields[PIXELS];
    match parse_integer(label, line, PIXELS + 1, path)? {
        Some(l) if (0..CLASSES as i64).contains(&l) => Ok(l as u32),
        _ => Err(DataError::LabelRange {
            path: path.to_path_buf(),
            line,
            value: shortened(label),
        }),
    }
}

/// The whole number `field` holds, or `None` for one too large for an `i64` (out of any range
/// the file allows, and not to be called "not a whole number").
fn parse_integer(
    field: &str,
    line: usize,
    column: usize,
    path: &Path,
) -> Result<Option<i64>, DataError> {
    let field = field.trim();
    match field.parse::<i64>() {
        Ok(value) => Ok(Some(value)),
        Err(e)
            if matches!(
                e.kind(),
                IntErrorKind::PosOverflow | IntErrorKind::NegOverflow
            ) =>
        {
            Ok(None)
        }
        Err(_) => Err(DataError::NotNumeric {
            path: path.to_path_buf(),
            line,
            field: column,
            value: shortened(field),
        }),
    }
}

/// A field as an error shows it: a whole garbage line would drown the message, and its start
/// says enough.
fn shortened(field: &str) -> String {
    const SHOWN: usize = 32;
    let field = field.trim();
    let mut out: String = field.chars().take(SHOWN).collect();
    if field.chars().count() > SHOWN {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use flate2::Compression;
    use flate2::write::GzEncoder;
    use loren_tensor::Rng;

    use super::*;

    /// Class counts of scikit-learn's copy, counted from the file itself with `zcat | awk`.
    const CLASS_COUNTS: [usize; 10] = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180];

    fn temp_file(name: &str, bytes: &[u8]) -> PathBuf {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let unique = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("loren-data-{}-{unique}-{name}", std::process::id()));
        std::fs::write(&path, bytes).unwrap();
        path
    }

    fn gzip(text: &str) -> Vec<u8> {
        let mut enc = GzEncoder::new(Vec::new(), Compression::default());
        enc.write_all(text.as_bytes()).unwrap();
        enc.finish().unwrap()
    }

    fn good_row(label: &str) -> String {
        let pixels: Vec<String> = (0..64).map(|i| (i % 17).to_string()).collect();
        format!("{},{label}", pixels.join(","))
    }

    /// Loads `bytes` from a temp file and returns the error message, checking it names the file.
    fn load_error(name: &str, bytes: &[u8]) -> String {
        let path = temp_file(name, bytes);
        let result = load_digits(&path);
        std::fs::remove_file(&path).unwrap();
        let message = result.expect_err("bad input must be an error").to_string();
        assert!(message.contains(&path.display().to_string()), "{message}");
        message
    }

    #[test]
    fn data_bundled_digits_have_known_size_classes_and_range() {
        let d = bundled_digits().unwrap();
        assert_eq!(d.len(), 1797);
        assert_eq!((d.channels, d.height, d.width, d.classes), (1, 8, 8, 10));
        assert_eq!(d.images.len(), 1797 * 64);
        assert_eq!(d.class_counts(), CLASS_COUNTS);
        assert_eq!(d.class_names[3], "3");
        assert!(d.images.to_f32().iter().all(|x| (0.0..=1.0).contains(x)));
        assert_eq!(
            d.images.to_f32().iter().cloned().fold(f32::MIN, f32::max),
            1.0
        );
        assert_eq!(
            d.images.to_f32().iter().cloned().fold(f32::MAX, f32::min),
            0.0
        );
        // Every pixel is a multiple of 1/16, as the 0..=16 counts promise.
        assert!(d.images.to_f32().iter().all(|x| (x * 16.0).fract() == 0.0));
        // The first row of the file, as printed by `zcat | head -1`.
        let first = [0, 0, 5, 13, 9, 1, 0, 0];
        let got: Vec<f32> = d.image(0)[..8].iter().map(|x| x * 16.0).collect();
        assert_eq!(got, first.map(|v| v as f32));
        assert_eq!((d.labels[0], d.labels[1], d.labels[1796]), (0, 1, 8));
        assert_eq!(
            (d.norm_mean.clone(), d.norm_std.clone()),
            (vec![0.5], vec![0.5])
        );
    }

    #[test]
    fn data_bundled_and_path_loaders_agree() {
        let from_path = load_digits(&bundled_digits_path()).unwrap();
        assert_eq!(from_path, bundled_digits().unwrap());
    }

    #[test]
    fn data_missing_file_is_named() {
        let path = std::env::temp_dir().join("loren-data-surely-missing-digits.csv.gz");
        let message = load_digits(&path).unwrap_err().to_string();
        assert!(message.contains(&path.display().to_string()), "{message}");
        assert!(message.contains("cannot read"), "{message}");
    }

    #[test]
    fn data_each_corrupt_input_names_its_problem() {
        let valid = gzip(&format!("{}\n{}\n", good_row("3"), good_row("9")));
        let cases: Vec<(&str, Vec<u8>, &[&str])> = vec![
            ("empty", vec![], &["empty"]),
            (
                "plain.csv",
                good_row("1").into_bytes(),
                &["not a gzip", "`gzip -k FILE`"],
            ),
            (
                "header",
                gzip(&format!(
                    "{},label\n{}\n",
                    (0..64)
                        .map(|i| format!("p{i}"))
                        .collect::<Vec<_>>()
                        .join(","),
                    good_row("1")
                )),
                &["line 1 is a header (`p0,p1,p2,", "remove the line"],
            ),
            (
                "numbered-header",
                gzip(&format!(
                    "{}\n{}\n",
                    (0..=64)
                        .map(|i| i.to_string())
                        .collect::<Vec<_>>()
                        .join(","),
                    good_row("1")
                )),
                &["line 1 is a header (`0,1,2,3,", "remove the line"],
            ),
            (
                "truncated",
                valid[..valid.len() / 2].to_vec(),
                &["corrupt gzip"],
            ),
            ("no-rows", gzip("\n\n"), &["no images"]),
            (
                "fields",
                gzip(&format!("{}\n1,2,3\n", good_row("0"))),
                &["line 2", "65", "found 3"],
            ),
            (
                "text",
                gzip(&good_row("7").replacen(",5,", ",five,", 1)),
                &["field 6", "`five`"],
            ),
            (
                "float",
                gzip(&good_row("2.5")),
                &["field 65", "`2.5`", "whole number"],
            ),
            (
                "pixel",
                gzip(&good_row("1").replacen("16", "17", 1)),
                &["field 17", "17", "0..=16"],
            ),
            (
                "negative",
                gzip(&format!("-1{}", &good_row("1")[1..])),
                &["field 1", "-1"],
            ),
            (
                "label",
                gzip(&good_row("10")),
                &["line 1", "label 10", "0..=9"],
            ),
        ];
        for (name, bytes, needles) in cases {
            let message = load_error(name, &bytes);
            for needle in needles {
                assert!(
                    message.contains(needle),
                    "{name}: `{needle}` not in: {message}"
                );
            }
        }
        let mut flipped = valid.clone();
        let crc = flipped.len() - 8;
        flipped[crc] ^= 0xff;
        assert!(load_error("crc", &flipped).contains("corrupt gzip"));
        let mut raw = GzEncoder::new(Vec::new(), Compression::default());
        raw.write_all(&[0xff, 0xfe, b'\n']).unwrap();
        let message = load_error("bytes", &raw.finish().unwrap());
        assert!(
            message.contains("UTF-8") && message.contains("line 1"),
            "{message}"
        );
    }

    #[test]
    fn data_good_rows_with_blank_lines_and_crlf_parse() {
        // With a spreadsheet's byte-order mark before the first row.
        let text = format!("\u{feff}{}\r\n\n{}\r\n", good_row("3"), good_row(" 9 "));
        let path = temp_file("crlf", &gzip(&text));
        let d = load_digits(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(d.labels, vec![3, 9]);
        assert_eq!(d.image(1)[16], 16.0 / 16.0);
    }

    #[test]
    fn data_mangled_bytes_never_panic() {
        let original = gzip(&format!("{}\n{}\n", good_row("3"), good_row("9")));
        let mut rng = Rng::new(11);
        for _ in 0..2000 {
            let mut bytes = original.clone();
            for _ in 0..1 + rng.below(4) {
                let at = rng.below(bytes.len());
                bytes[at] = rng.below(256) as u8;
            }
            bytes.truncate(1 + rng.below(bytes.len()));
            let _ = parse_digits_gz(&bytes, Path::new("mangled"));
        }
        for _ in 0..500 {
            let mut text = format!("{}\n{}\n", good_row("3"), good_row("9")).into_bytes();
            let at = rng.below(text.len());
            text[at] = b",-x9\n. "[rng.below(7)];
            let mut enc = GzEncoder::new(Vec::new(), Compression::fast());
            enc.write_all(&text).unwrap();
            let _ = parse_digits_gz(&enc.finish().unwrap(), Path::new("mangled"));
        }
    }

    /// A label or pixel too large for an `i64` was called "not a whole number"; it is one, out
    /// of range. Text stays "not a whole number".
    #[test]
    fn data_integers_too_large_are_out_of_range_not_text() {
        let message = load_error("huge-label", &gzip(&good_row("18446744073709551615")));
        assert!(
            message.ends_with("line 1: label 18446744073709551615 is outside 0..=9"),
            "{message}"
        );
        let long = "9".repeat(40);
        let message = load_error("huge-pixel", &gzip(&good_row("1").replacen("0", &long, 1)));
        assert!(
            message.ends_with(&format!(
                "line 1, field 1: pixel value {}… is outside 0..=16",
                &long[..32]
            )),
            "{message}"
        );
        let message = load_error("negative", &gzip(&good_row("-99999999999999999999")));
        assert!(
            message.contains("label -99999999999999999999 is outside"),
            "{message}"
        );
        let message = load_error("text", &gzip(&good_row("1e3")));
        assert!(message.contains("`1e3` is not a whole number"), "{message}");
    }
}
