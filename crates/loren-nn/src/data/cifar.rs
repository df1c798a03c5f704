//! CIFAR-10 and CIFAR-100 in their official binary format.
//!
//! Each file is a run of fixed-size records: the label byte(s), then 3072 pixel bytes, the red,
//! green and blue 32×32 planes one after another, rows top to bottom. CIFAR-10 has one label
//! byte (`data_batch_1.bin` … `data_batch_5.bin` and `test_batch.bin`, class names in
//! `batches.meta.txt`); CIFAR-100 has two, the coarse then the fine label (`train.bin` and
//! `test.bin`, names in `fine_label_names.txt`). The fine labels are used.

use std::fs;
use std::path::{Path, PathBuf};

use super::{DataError, Dataset, Pixels};

const SIDE: usize = 32;
const PIXELS: usize = 3 * SIDE * SIDE;

/// Which CIFAR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cifar {
    Ten,
    Hundred,
}

impl Cifar {
    pub fn name(self) -> &'static str {
        match self {
            Cifar::Ten => "cifar10",
            Cifar::Hundred => "cifar100",
        }
    }

    pub fn classes(self) -> usize {
        match self {
            Cifar::Ten => 10,
            Cifar::Hundred => 100,
        }
    }

    /// Label bytes before the pixels, and which of them is the label used.
    fn label_layout(self) -> (usize, usize) {
        match self {
            Cifar::Ten => (1, 0),
            Cifar::Hundred => (2, 1),
        }
    }

    pub fn train_files(self) -> Vec<String> {
        match self {
            Cifar::Ten => (1..=5).map(|i| format!("data_batch_{i}.bin")).collect(),
            Cifar::Hundred => vec!["train.bin".into()],
        }
    }

    pub fn test_file(self) -> &'static str {
        match self {
            Cifar::Ten => "test_batch.bin",
            Cifar::Hundred => "test.bin",
        }
    }

    fn names_file(self) -> &'static str {
        match self {
            Cifar::Ten => "batches.meta.txt",
            Cifar::Hundred => "fine_label_names.txt",
        }
    }

    /// The folder the official archive unpacks to.
    fn archive_folder(self) -> &'static str {
        match self {
            Cifar::Ten => "cifar-10-batches-bin",
            Cifar::Hundred => "cifar-100-binary",
        }
    }

    /// Per-channel mean and std of the training images (on the 0..=1 scale): the statistics the
    /// LoRA-Ensemble paper's configuration lists (its code, though, only scales to [0, 1]).
    pub fn normalization(self) -> (Vec<f32>, Vec<f32>) {
        let (mean, std) = match self {
            Cifar::Ten => ([125.3069, 122.9501, 113.866], [62.9933, 62.0886, 66.7050]),
            Cifar::Hundred => ([129.3039, 124.0699, 112.4336], [68.1702, 65.3917, 70.4181]),
        };
        let scale = |v: [f32; 3]| v.iter().map(|x| x / 255.0).collect();
        (scale(mean), scale(std))
    }
}

/// A dataset's official training and test parts.
#[derive(Clone, Debug, PartialEq)]
pub struct OfficialParts {
    pub train: Dataset,
    pub test: Dataset,
}

/// Read CIFAR from `dir`: the unpacked archive's folder, or a folder holding it.
pub fn load_cifar(dir: &Path, kind: Cifar) -> Result<OfficialParts, DataError> {
    Ok(OfficialParts {
        train: load_part(dir, kind, &kind.train_files(), "train-all")?,
        test: load_cifar_test(dir, kind)?,
    })
}

/// The official test part of the CIFAR at `dir` alone, without reading the training files.
pub fn load_cifar_test(dir: &Path, kind: Cifar) -> Result<Dataset, DataError> {
    load_part(dir, kind, &[kind.test_file().to_string()], "test")
}

/// The records of `files` in the CIFAR at `dir`, as the dataset `<kind>/<part>`.
fn load_part(dir: &Path, kind: Cifar, files: &[String], part: &str) -> Result<Dataset, DataError> {
    let dir = locate(dir, kind);
    let (mut pixels, mut labels) = (Vec::new(), Vec::new());
    for f in files {
        read_records(&dir.join(f), kind, &mut pixels, &mut labels)?;
    }
    let (mean, std) = kind.normalization();
    Dataset::new(
        format!("{}/{part}", kind.name()),
        [3, SIDE, SIDE],
        Pixels::Steps {
            bytes: pixels,
            levels: 255,
        },
        labels,
        class_names(&dir, kind)?,
    )?
    .with_normalization(mean, std)
}

/// The class names of the CIFAR at `dir` (from its meta file, else "0", "1", …), without
/// reading the images.
pub fn cifar_class_names(dir: &Path, kind: Cifar) -> Result<Vec<String>, DataError> {
    class_names(&locate(dir, kind), kind)
}

impl Cifar {
    /// Which CIFAR the folder at `dir` holds, by its first training file, there or in the
    /// archive's folder inside it.
    pub fn detect(dir: &Path) -> Option<Cifar> {
        [Cifar::Ten, Cifar::Hundred]
            .into_iter()
            .find(|&kind| locate(dir, kind).join(&kind.train_files()[0]).exists())
    }
}

/// `dir` itself when it holds the first training file, else the archive's folder inside it.
fn locate(dir: &Path, kind: Cifar) -> PathBuf {
    let inner = dir.join(kind.archive_folder());
    if !dir.join(&kind.train_files()[0]).exists() && inner.is_dir() {
        inner
    } else {
        dir.to_path_buf()
    }
}

/// The names in the meta file, one per non-empty line, when it is there; else "0", "1", ….
fn class_names(dir: &Path, kind: Cifar) -> Result<Vec<String>, DataError> {
    let path = dir.join(kind.names_file());
    let Ok(text) = fs::read_to_string(&path) else {
        return Ok((0..kind.classes()).map(|c| c.to_string()).collect());
    };
    let names: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    if names.len() != kind.classes() {
        return Err(DataError::BadFile {
            path,
            msg: format!("{} class names, expected {}", names.len(), kind.classes()),
        });
    }
    Ok(names)
}

/// Append the records of one file: pixels as bytes and the labels.
fn read_records(
    path: &Path,
    kind: Cifar,
    pixels: &mut Vec<u8>,
    labels: &mut Vec<u32>,
) -> Result<(), DataError> {
    let bytes = fs::read(path).map_err(|reason| {
        // The other CIFAR's folder, named with the wrong prefix: none of this one's files there.
        let first = path.file_name() == Some(kind.train_files()[0].as_ref());
        let dir = path.parent().unwrap_or(Path::new(""));
        let not_found = reason.kind() == std::io::ErrorKind::NotFound;
        match Cifar::detect(dir).filter(|&other| first && not_found && other != kind) {
            Some(other) => DataError::BadFile {
                path: path.to_path_buf(),
                msg: format!(
                    "not found, and the folder holds {} ({}): pass it as {}:{}",
                    other.name(),
                    other.train_files()[0],
                    other.name(),
                    dir.display()
                ),
            },
            None => DataError::Io {
                path: path.to_path_buf(),
                reason,
            },
        }
    })?;
    let (label_bytes, which) = kind.label_layout();
    let record = label_bytes + PIXELS;
    if bytes.is_empty() {
        return Err(DataError::EmptyFile {
            path: path.to_path_buf(),
        });
    }
    if !bytes.len().is_multiple_of(record) {
        return Err(DataError::BadFile {
            path: path.to_path_buf(),
            msg: format!(
                "{} bytes is not a whole number of {record}-byte {} records: the file is truncated or not {}",
                bytes.len(),
                kind.name(),
                kind.name()
            ),
        });
    }
    for (i, rec) in bytes.chunks_exact(record).enumerate() {
        let label = rec[which];
        if usize::from(label) >= kind.classes() {
            return Err(DataError::BadFile {
                path: path.to_path_buf(),
                msg: format!(
                    "record {i} has label {label}, but {} has {} classes (0..={})",
                    kind.name(),
                    kind.classes(),
                    kind.classes() - 1
                ),
            });
        }
        labels.push(u32::from(label));
        pixels.extend_from_slice(&rec[label_bytes..]);
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The statistics every CIFAR codebase quotes on the 0..=1 scale, per channel in RGB order:
    /// a typo or a swap among the twelve constants shows.
    #[test]
    fn data_cifar_normalization_is_the_usual_per_channel_statistics() {
        let near =
            |got: &[f32], want: [f32; 3]| got.iter().zip(want).all(|(g, w)| (g - w).abs() < 1e-4);
        let (mean, std) = Cifar::Ten.normalization();
        assert!(near(&mean, [0.4914, 0.4822, 0.4465]), "{mean:?}");
        assert!(near(&std, [0.2470, 0.2435, 0.2616]), "{std:?}");
        let (mean, std) = Cifar::Hundred.normalization();
        assert!(near(&mean, [0.5071, 0.4865, 0.4409]), "{mean:?}");
        assert!(near(&std, [0.2673, 0.2564, 0.2762]), "{std:?}");
    }

    /// A record's pixels, distinct per (file, record, position) so any mix-up shows.
    pub fn pixels(seed: usize) -> Vec<u8> {
        (0..PIXELS)
            .map(|p| ((p * 7 + seed * 31) % 256) as u8)
            .collect()
    }

    /// Write `labels` as records of `kind` to `path`; CIFAR-100's coarse label is `fine / 5`.
    pub fn write_records(path: &Path, kind: Cifar, labels: &[u8], seed: usize) {
        let mut bytes = Vec::new();
        for (i, &l) in labels.iter().enumerate() {
            if kind == Cifar::Hundred {
                bytes.push(l / 5);
            }
            bytes.push(l);
            bytes.extend(pixels(seed * 100 + i));
        }
        fs::write(path, bytes).unwrap();
    }

    pub fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("loren-cifar-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn check_sample(d: &Dataset, i: usize, label: u32, seed: usize) {
        assert_eq!(d.labels[i], label, "{} #{i}", d.name);
        let want: Vec<f32> = pixels(seed).iter().map(|&p| f32::from(p) / 255.0).collect();
        assert_eq!(d.image(i), want.as_slice(), "{} #{i}", d.name);
    }

    #[test]
    fn data_cifar10_reads_every_record_in_file_order() {
        let dir = temp_dir("ten");
        let mut expected = Vec::new();
        for f in 1..=5 {
            let labels: Vec<u8> = (0..3).map(|i| ((f * 3 + i) % 10) as u8).collect();
            write_records(
                &dir.join(format!("data_batch_{f}.bin")),
                Cifar::Ten,
                &labels,
                f,
            );
            expected.extend(labels.iter().enumerate().map(|(i, &l)| (l, f * 100 + i)));
        }
        write_records(&dir.join("test_batch.bin"), Cifar::Ten, &[9, 0], 7);
        let names = "airplane\nautomobile\nbird\ncat\ndeer\ndog\nfrog\nhorse\nship\ntruck\n\n";
        fs::write(dir.join("batches.meta.txt"), names).unwrap();
        let parts = load_cifar(&dir, Cifar::Ten).unwrap();
        assert_eq!(parts.train.len(), 15);
        for (i, &(label, seed)) in expected.iter().enumerate() {
            check_sample(&parts.train, i, u32::from(label), seed);
        }
        check_sample(&parts.test, 0, 9, 700);
        check_sample(&parts.test, 1, 0, 701);
        assert_eq!(parts.test.class_names[9], "truck");
        assert_eq!(parts.train.shape(), [3, 32, 32]);
        assert!((parts.train.norm_mean[0] - 125.3069 / 255.0).abs() < 1e-7);
        // The folder the archive unpacks to is found from its parent.
        let parent = temp_dir("ten-parent");
        fs::rename(&dir, parent.join("cifar-10-batches-bin")).unwrap();
        assert_eq!(load_cifar(&parent, Cifar::Ten).unwrap(), parts);
    }

    #[test]
    fn data_cifar100_uses_the_fine_label() {
        let dir = temp_dir("hundred");
        write_records(&dir.join("train.bin"), Cifar::Hundred, &[99, 3, 57], 1);
        write_records(&dir.join("test.bin"), Cifar::Hundred, &[42], 2);
        let parts = load_cifar(&dir, Cifar::Hundred).unwrap();
        for (i, l) in [99, 3, 57].into_iter().enumerate() {
            check_sample(&parts.train, i, l, 100 + i);
        }
        check_sample(&parts.test, 0, 42, 200);
        assert_eq!(parts.train.classes, 100);
        assert_eq!(parts.train.class_names[57], "57");
        let names: String = (0..100).map(|c| format!("class{c}\n")).collect();
        fs::write(dir.join("fine_label_names.txt"), names).unwrap();
        let parts = load_cifar(&dir, Cifar::Hundred).unwrap();
        assert_eq!(parts.train.class_names[57], "class57");
    }

    #[test]
    fn data_cifar_errors_name_the_file() {
        let dir = temp_dir("errors");
        let err = |kind| load_cifar(&dir, kind).unwrap_err().to_string();
        let e = err(Cifar::Hundred);
        assert!(e.contains("train.bin") && e.contains("cannot read"), "{e}");
        // A CIFAR-10 folder passed as CIFAR-100 is named as the other.
        write_records(&dir.join("data_batch_1.bin"), Cifar::Ten, &[0], 1);
        let e = err(Cifar::Hundred);
        assert!(
            e.contains(&format!(
                "train.bin: not found, and the folder holds cifar10 (data_batch_1.bin): pass it \
                 as cifar10:{}",
                dir.display()
            )),
            "{e}"
        );
        fs::remove_file(dir.join("data_batch_1.bin")).unwrap();

        write_records(&dir.join("train.bin"), Cifar::Hundred, &[1, 2], 1);
        write_records(&dir.join("test.bin"), Cifar::Hundred, &[1], 1);
        let mut bytes = fs::read(dir.join("train.bin")).unwrap();
        bytes.pop();
        fs::write(dir.join("train.bin"), &bytes).unwrap();
        let e = err(Cifar::Hundred);
        assert!(
            e.contains("train.bin") && e.contains("6147 bytes") && e.contains("3074-byte"),
            "{e}"
        );

        write_records(&dir.join("train.bin"), Cifar::Hundred, &[1, 100], 1);
        let e = err(Cifar::Hundred);
        assert!(
            e.contains("train.bin") && e.contains("record 1 has label 100"),
            "{e}"
        );

        fs::write(dir.join("test.bin"), b"").unwrap();
        write_records(&dir.join("train.bin"), Cifar::Hundred, &[1], 1);
        let e = err(Cifar::Hundred);
        assert!(e.contains("test.bin") && e.contains("empty"), "{e}");

        write_records(&dir.join("test.bin"), Cifar::Hundred, &[1], 1);
        fs::write(dir.join("fine_label_names.txt"), "a\nb\n").unwrap();
        let e = err(Cifar::Hundred);
        assert!(
            e.contains("fine_label_names.txt") && e.contains("2 class names"),
            "{e}"
        );

        // CIFAR-10: a missing batch is named; a label byte of 10 is out of range.
        for f in 1..=4 {
            write_records(
                &dir.join(format!("data_batch_{f}.bin")),
                Cifar::Ten,
                &[0],
                f,
            );
        }
        let e = err(Cifar::Ten);
        assert!(e.contains("data_batch_5.bin"), "{e}");
        write_records(&dir.join("data_batch_5.bin"), Cifar::Ten, &[10], 5);
        let e = err(Cifar::Ten);
        assert!(
            e.contains("data_batch_5.bin") && e.contains("label 10"),
            "{e}"
        );
    }
}
