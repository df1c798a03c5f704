//! Image folders: one subfolder per class, each holding PNG or JPEG images.
//!
//! Classes are the subfolders' names in sorted (byte) order, so label `k` is the `k`-th name;
//! images within a class are read in sorted file-name order. Files are recognised by their
//! first bytes, PNG or JPEG, whatever their extension; other files and hidden entries are
//! skipped, except that a file named as an image (`.png`, `.jpg`, `.jpeg`) that is not one is
//! an error rather than data quietly left out. Every image is brought to the requested
//! channels (grey repeated into RGB, or RGB to grey by luma; alpha dropped), centre-cropped to
//! the requested aspect ratio, and resized with the antialiased bilinear filter of
//! [`super::resize`].

use std::fs;
use std::io::{BufRead, Cursor, Seek};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use rayon::prelude::*;
use zune_core::bytestream::ZCursor;
use zune_core::colorspace::ColorSpace;
use zune_core::options::DecoderOptions;
use zune_jpeg::JpegDecoder;

use super::external::folder_test_part;
use super::orientation::{exif_orientation, upright};
use super::resize::{Filter, Resampler, luma, luma_of};
use super::{DataError, Dataset, Pixels};

/// ImageNet's per-channel mean and std, which ImageNet-trained backbones (torchvision's
/// `vit_b_32`, timm's DeiT) expect.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// A decoded image: interleaved 8-bit samples, `[H, W, channels]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Decoded {
    pub width: usize,
    pub height: usize,
    pub channels: usize,
    pub samples: Vec<u8>,
}

/// Read the folder at `dir` into images of `shape` (`[channels, height, width]`, channels 1
/// or 3), normalised with ImageNet's statistics (their average, for one channel).
pub fn load_folder(dir: &Path, shape: [usize; 3]) -> Result<Dataset, DataError> {
    // The model will know its classes by these names (a test part scored as OOD never does).
    named_classes(dir)?;
    let listing = list_folder(dir)?;
    decode_files(&listing, &listing.files, shape, file_name(dir))
}

/// Only the images of the folder at `dir` that its split ([`split_seeded`]) puts in the test
/// part, named `<folder>/test`, as that part of [`load_folder`] is: the others are never
/// decoded. An error when the part would be empty, as an empty set cannot be scored.
///
/// [`split_seeded`]: super::external::split_seeded
pub fn load_folder_test(dir: &Path, shape: [usize; 3]) -> Result<Dataset, DataError> {
    let listing = list_folder(dir)?;
    let labels: Vec<u32> = listing.files.iter().map(|(_, l)| *l).collect();
    let names: Vec<String> = listing.classes.iter().map(|d| file_name(d)).collect();
    let test = folder_test_part(&labels, &names, &file_name(dir))?;
    let files: Vec<(PathBuf, u32)> = test.iter().map(|&i| listing.files[i].clone()).collect();
    decode_files(&listing, &files, shape, format!("{}/test", file_name(dir)))
}

/// A folder's classes (its subfolders, sorted) and image files, each with its label.
struct Listing {
    classes: Vec<PathBuf>,
    files: Vec<(PathBuf, u32)>,
}

fn list_folder(dir: &Path) -> Result<Listing, DataError> {
    let classes = class_folders(dir)?;
    let mut files = Vec::new();
    for (label, class_dir) in classes.iter().enumerate() {
        let images = image_files(class_dir)?;
        files.extend(images.into_iter().map(|f| (f, label as u32)));
    }
    Ok(Listing { classes, files })
}

/// `files` decoded into the dataset `name` of images of `shape`, with `listing`'s classes.
fn decode_files(
    listing: &Listing,
    files: &[(PathBuf, u32)],
    shape: [usize; 3],
    name: String,
) -> Result<Dataset, DataError> {
    let paths: Vec<PathBuf> = files.iter().map(|(p, _)| p.clone()).collect();
    let pixels = read_images(&paths, shape)?;
    let names = listing.classes.iter().map(|d| file_name(d)).collect();
    let (mean, std) = imagenet_normalization(shape[0]);
    Dataset::new(
        name,
        shape,
        pixels,
        files.iter().map(|(_, l)| *l).collect(),
        names,
    )?
    .with_normalization(mean, std)
}

/// Whether the folder at `dir` is an image folder of classes (two or more class subfolders),
/// as [`load_folder`] reads one.
pub fn has_classes(dir: &Path) -> bool {
    class_folders(dir).is_ok()
}

/// Every image under the folder at `dir` ([`find_images`]), as one set of a single class named
/// after the folder: images with no classes, such as out-of-distribution ones, whose labels
/// mean nothing. Normalised with ImageNet's statistics, as [`load_folder`]'s.
pub fn load_unlabelled(dir: &Path, shape: [usize; 3]) -> Result<Dataset, DataError> {
    let files = find_images(&[dir.to_path_buf()])?;
    let pixels = read_images(&files, shape)?;
    let (mean, std) = imagenet_normalization(shape[0]);
    let name = file_name(dir);
    Dataset::new(
        name.clone(),
        shape,
        pixels,
        vec![0; files.len()],
        vec![name],
    )?
    .with_normalization(mean, std)
}

/// Image files decoded and brought to `shape` (`[channels, height, width]`, channels 1 or 3),
/// in order, as a folder dataset reads its images: the same pixels an image folder's test part
/// holds. Every file is read before an error: one that cannot be is named with every other
/// ([`DataError::Unreadable`] where there are two or more).
pub fn read_images(files: &[PathBuf], shape: [usize; 3]) -> Result<Pixels, DataError> {
    let (pixels, mut failed) = read_readable(files, shape)?;
    match failed.len() {
        0 => Ok(pixels),
        1 => Err(failed.remove(0).1),
        _ => Err(DataError::Unreadable(
            failed.into_iter().map(|(_, e)| e).collect(),
        )),
    }
}

/// Image files [`read_readable`] has tried in this process so far, read or not: what a progress
/// display counts while a folder is read (on rayon's threads, which report to no one).
static IMAGES_TRIED: AtomicUsize = AtomicUsize::new(0);

/// How many image files this process has tried to read so far: a display polls it while a
/// dataset loads.
pub fn images_tried() -> usize {
    IMAGES_TRIED.load(Ordering::Relaxed)
}

/// [`read_images`] of the files that can be read, in order, and each other's index in `files`
/// with its error: what a prediction over many files makes of the readable ones.
pub fn read_readable(
    files: &[PathBuf],
    shape: [usize; 3],
) -> Result<(Pixels, Vec<(usize, DataError)>), DataError> {
    let [channels, height, width] = shape;
    let bad = |reason: &str| DataError::ImageShape {
        shape,
        reason: reason.into(),
    };
    check_image_shape(shape)?;
    // Each image goes straight to its place: collecting them and concatenating would hold the
    // whole set twice at the peak. Kept as bytes, a quarter of f32, each pixel rounded to the
    // nearest 1/255 after the resize, as an 8-bit image resized (PIL's, say) holds it.
    let too_many = || {
        bad(&format!(
            "{} of them take more memory than there is",
            files.len()
        ))
    };
    let per_image = channels
        .checked_mul(height)
        .and_then(|n| n.checked_mul(width))
        .ok_or_else(too_many)?;
    let total = per_image.checked_mul(files.len()).ok_or_else(too_many)?;
    let mut bytes = Vec::new();
    bytes.try_reserve_exact(total).map_err(|_| too_many())?;
    bytes.resize(total, 0u8);
    let failed: Vec<(usize, DataError)> = bytes
        .par_chunks_mut(per_image)
        .zip(files)
        .enumerate()
        .filter_map(|(i, (out, path))| {
            let image = load_image(path, shape);
            IMAGES_TRIED.fetch_add(1, Ordering::Relaxed);
            match image {
                Ok(image) => {
                    out.copy_from_slice(&Pixels::quantized(&image, 255));
                    None
                }
                Err(e) => Some((i, e)),
            }
        })
        .collect();
    // The readable ones close up over the others' places, in order.
    let mut unread = vec![false; files.len()];
    for (i, _) in &failed {
        unread[*i] = true;
    }
    let mut kept = 0;
    for i in (0..files.len()).filter(|&i| !unread[i]) {
        bytes.copy_within(i * per_image..(i + 1) * per_image, kept * per_image);
        kept += 1;
    }
    bytes.truncate(kept * per_image);
    Ok((Pixels::Steps { bytes, levels: 255 }, failed))
}

/// The PNG and JPEG files `paths` name: a file as it is (an error when it is not an image), a
/// folder as every image under it, subfolders included, in sorted order. Inside folders, hidden
/// entries and files that are not images are skipped (by their first bytes, whatever their
/// names; a file named as an image that is not one is an error), and each folder and image is
/// taken once, where it is first reached, however paths and links name it again. An error when
/// there are none.
pub fn find_images(paths: &[PathBuf]) -> Result<Vec<PathBuf>, DataError> {
    Ok(find_images_noting(paths)?.images)
}

/// What [`find_images_noting`] found under some paths, and what it left out.
#[derive(Debug, Default)]
pub struct Found {
    pub images: Vec<PathBuf>,
    /// The files inside folders that are not images it reads, with what each is (hidden ones
    /// are not listed).
    pub passed_over: PassedOver,
    /// Paths that named images found already (the same file or folder twice, or through a
    /// link).
    pub repeats: usize,
}

/// [`find_images`], with what it passed over: so that a user is told what a folder held that
/// was not read.
pub fn find_images_noting(paths: &[PathBuf]) -> Result<Found, DataError> {
    let mut found = Found::default();
    let mut seen = std::collections::HashSet::new();
    for path in paths {
        if path.is_dir() {
            // A folder given again (or one inside a folder given) adds nothing: said as a repeat.
            if seen.contains(&canonical(path)?) {
                found.repeats += 1;
                continue;
            }
            images_under(path, &mut seen, &mut found)?;
        } else {
            check_image(path)?;
            match seen.insert(canonical(path)?) {
                true => found.images.push(path.clone()),
                false => found.repeats += 1,
            }
        }
    }
    if found.images.is_empty() {
        let first = paths.first().cloned().unwrap_or_default();
        let others = match paths.len() {
            0 | 1 => String::new(),
            2 => ", nor does the other path given".to_string(),
            n => format!(", nor do the other {} paths given", n - 1),
        };
        return Err(DataError::BadFile {
            path: first,
            msg: format!("holds no PNG or JPEG images{others}"),
        });
    }
    Ok(found)
}

/// What reading the folder at `dir` as a set of images passes over: as [`passed_over`] says
/// for a folder of classes, else every file under it that is not an image it reads.
pub fn passed_over_set(dir: &Path) -> PassedOver {
    if has_classes(dir) {
        return passed_over(dir);
    }
    let mut left = find_images_noting(&[dir.to_path_buf()])
        .map(|f| f.passed_over)
        .unwrap_or_default();
    for (file, _) in &mut left.files {
        *file = file.strip_prefix(dir).unwrap_or(file).to_path_buf();
    }
    left
}

fn canonical(path: &Path) -> Result<PathBuf, DataError> {
    fs::canonicalize(path).map_err(|reason| DataError::Io {
        path: path.to_path_buf(),
        reason,
    })
}

fn images_under(
    dir: &Path,
    seen: &mut std::collections::HashSet<PathBuf>,
    found: &mut Found,
) -> Result<(), DataError> {
    // A link back up the tree would otherwise be followed for ever.
    if !seen.insert(canonical(dir)?) {
        return Ok(());
    }
    for path in sorted_entries(dir)? {
        if path.is_dir() {
            images_under(&path, seen, found)?;
        } else if !listed_image(&path)? {
            found
                .passed_over
                .files
                .extend(what_it_is(&path).map(|w| (path, w)));
        } else if seen.insert(canonical(&path)?) {
            found.images.push(path);
        } else {
            found.repeats += 1;
        }
    }
    Ok(())
}

/// What a file that is not an image loren reads is, as a note names it; none for one whose
/// first bytes cannot be read, which the reading names if it reads it.
fn what_it_is(path: &Path) -> Option<String> {
    // Only a regular file is opened: a pipe's read would wait for ever.
    if !path.is_file() {
        let link = fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink());
        return Some(match (link, fs::metadata(path)) {
            (true, Err(_)) => "a symbolic link that leads to no file".into(),
            _ => "not a regular file".into(),
        });
    }
    let head = head(path).ok()?;
    Some(match other_image_format(&head) {
        Some(format) => format!("a {format} image"),
        None => "not an image".into(),
    })
}

/// The class names of the image folder at `dir`: its subfolders' names, sorted.
pub fn folder_class_names(dir: &Path) -> Result<Vec<String>, DataError> {
    Ok(named_classes(dir)?.iter().map(|d| file_name(d)).collect())
}

/// [`class_folders`], each named in text: a class is known by its name (in the checkpoint, in
/// predictions, to `--holdout-classes`), and a name that is not UTF-8 would be written with
/// `�` in place of its bytes, so that two classes could read as one.
fn named_classes(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let classes = class_folders(dir)?;
    match classes
        .iter()
        .find(|c| c.file_name().and_then(|n| n.to_str()).is_none())
    {
        Some(c) => Err(DataError::BadFile {
            path: c.clone(),
            msg: "a class folder's name must be text (UTF-8), as the class is known by it: \
                  rename the folder"
                .into(),
        }),
        None => Ok(classes),
    }
}

/// ImageNet's statistics for 3 channels, or for 1 their luma, as for any colour data made grey
/// ([`Dataset::with_channels`]).
pub fn imagenet_normalization(channels: usize) -> (Vec<f32>, Vec<f32>) {
    if channels == 3 {
        return (IMAGENET_MEAN.to_vec(), IMAGENET_STD.to_vec());
    }
    (
        vec![luma_of(&IMAGENET_MEAN); channels],
        vec![luma_of(&IMAGENET_STD); channels],
    )
}

fn file_name(p: &Path) -> String {
    p.file_name().map_or_else(
        || p.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

/// Hidden, or the `__MACOSX` folder a zip made on a Mac unpacks beside its files (copies of
/// their metadata, not images), which would read as a class of no images.
fn is_hidden(p: &Path) -> bool {
    let name = file_name(p);
    name.starts_with('.') || name == "__MACOSX"
}

/// The entries of `dir`, sorted, hidden ones left out.
fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let io = |reason| DataError::Io {
        path: dir.to_path_buf(),
        reason,
    };
    let mut entries = fs::read_dir(dir)
        .map_err(io)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(io)?;
    entries.retain(|p| !is_hidden(p));
    entries.sort();
    Ok(entries)
}

fn class_folders(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let classes: Vec<PathBuf> = sorted_entries(dir)?
        .into_iter()
        .filter(|p| p.is_dir())
        .collect();
    if classes.len() < 2 {
        return Err(DataError::BadFile {
            path: dir.to_path_buf(),
            msg: format!(
                "{} class subfolder{}; an image folder needs at least 2 (DIR/CLASS/IMAGE.png or .jpg)",
                classes.len(),
                if classes.len() == 1 { "" } else { "s" }
            ),
        });
    }
    Ok(classes)
}

/// The PNG and JPEG files of one class folder, as [`listed_image`] tells them.
fn image_files(class_dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let mut files = Vec::new();
    for path in sorted_entries(class_dir)? {
        if listed_image(&path)? {
            files.push(path);
        }
    }
    if files.is_empty() {
        let nested = sorted_entries(class_dir)?.iter().any(|p| p.is_dir());
        return Err(DataError::BadFile {
            path: class_dir.to_path_buf(),
            msg: format!(
                "the class folder holds no PNG or JPEG images{}",
                match nested {
                    true =>
                        " (its subfolders are not read: a class's images go directly in \
                             DIR/CLASS/)",
                    false => "",
                }
            ),
        });
    }
    Ok(files)
}

/// What an image folder holds that [`load_folder`] leaves out, for a caller to say: files in the
/// class folders that are not PNG or JPEG (with their format, where known), folders inside
/// them (a class's images are read from the class folder alone), and images beside the class
/// folders. Hidden entries are left out of this too.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PassedOver {
    /// Each file, relative to the image folder, with what it is.
    pub files: Vec<(PathBuf, String)>,
    /// Relative to the image folder.
    pub folders: Vec<PathBuf>,
}

impl PassedOver {
    pub fn is_empty(&self) -> bool {
        self.files.is_empty() && self.folders.is_empty()
    }
}

/// What the folder at `dir` holds that [`load_folder`] leaves out ([`PassedOver`]). Best
/// effort, and cheap beside the loading: files named as images are not opened again (the
/// dataset takes them, or fails on them itself), and an entry that cannot be read is left out
/// of the list, as the dataset never opens it.
pub fn passed_over(dir: &Path) -> PassedOver {
    let relative = |p: &Path| p.strip_prefix(dir).unwrap_or(p).to_path_buf();
    let entries = |d: &Path| sorted_entries(d).unwrap_or_default();
    let mut out = PassedOver::default();
    for entry in entries(dir) {
        if entry.is_dir() {
            for inner in entries(&entry) {
                if inner.is_dir() {
                    out.folders.push(relative(&inner));
                } else if !named_as_image(&inner) {
                    let image =
                        inner.is_file() && head(&inner).is_ok_and(|h| image_kind(&h).is_some());
                    if !image {
                        out.files
                            .extend(what_it_is(&inner).map(|w| (relative(&inner), w)));
                    }
                }
            }
        } else if entry.is_file() && head(&entry).is_ok_and(|h| image_kind(&h).is_some()) {
            let what = "an image beside the class folders, in none of them".to_string();
            out.files.push((relative(&entry), what));
        }
    }
    out
}

/// Whether an entry met in a folder is an image to take. By its first bytes, whatever its name,
/// but an entry named as an image that is not one is an error: a failed download or a broken
/// link would otherwise leave the data smaller with no word. Folders are not images.
fn listed_image(path: &Path) -> Result<bool, DataError> {
    if path.is_dir() {
        return Ok(false);
    }
    if named_as_image(path) {
        check_image(path)?;
        return Ok(true);
    }
    Ok(path.is_file() && image_kind(&head(path)?).is_some())
}

/// Whether the name ends in `.png`, `.jpg` or `.jpeg`, in any case.
fn named_as_image(path: &Path) -> bool {
    path.extension().and_then(|e| e.to_str()).is_some_and(|e| {
        ["png", "jpg", "jpeg"]
            .iter()
            .any(|x| e.eq_ignore_ascii_case(x))
    })
}

/// An error saying what the file at `path` is when it is not a PNG or JPEG.
fn check_image(path: &Path) -> Result<(), DataError> {
    let not_image = |what: String| {
        let named = if named_as_image(path) {
            "named as an image but "
        } else {
            ""
        };
        Err(DataError::BadFile {
            path: path.to_path_buf(),
            msg: format!("{named}{what}"),
        })
    };
    match fs::metadata(path) {
        // Opening a FIFO or a device to read its first bytes could wait for ever.
        Ok(meta) if !meta.is_file() => return not_image("it is not a regular file".into()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Ok(target) = fs::read_link(path) {
                return not_image(format!(
                    "it is a broken symbolic link (to {}, which does not exist)",
                    target.display()
                ));
            }
        }
        // Anything else unreadable is told by the read below.
        _ => {}
    }
    let head = head(path)?;
    if head.is_empty() {
        return not_image("it is an empty file (0 bytes)".into());
    }
    match image_kind(&head) {
        Some(_) => Ok(()),
        None => not_image(format!(
            "it is not a PNG or JPEG image ({})",
            describe_start(&head)
        )),
    }
}

/// A file's first bytes as a reader can tell its kind from: an image format loren does not read
/// by its name, else as text when they are text (an HTML error page), else in hex.
fn describe_start(head: &[u8]) -> String {
    if let Some(format) = other_image_format(head) {
        return format!("it is a {format} image");
    }
    if head
        .iter()
        .all(|b| b.is_ascii_graphic() || b.is_ascii_whitespace())
    {
        return format!("it begins with `{}`", head.escape_ascii());
    }
    let hex: Vec<String> = head.iter().map(|b| format!("{b:02x}")).collect();
    format!("its first bytes are {}", hex.join(" "))
}

/// The image formats a folder may hold that loren does not read, by their first bytes.
fn other_image_format(head: &[u8]) -> Option<&'static str> {
    let at = |from: usize, bytes: &[u8]| head.get(from..from + bytes.len()) == Some(bytes);
    if at(0, b"GIF87a") || at(0, b"GIF89a") {
        Some("GIF")
    } else if at(0, b"RIFF") && at(8, b"WEBP") {
        Some("WebP")
    } else if at(0, b"II*\0") || at(0, b"MM\0*") {
        Some("TIFF")
    } else if at(0, b"\0\0\0\x0cjP  ") || at(0, b"\xff\x4f\xff\x51") {
        Some("JPEG 2000")
    } else if at(4, b"ftypavif") {
        Some("AVIF")
    } else if at(4, b"ftypheic") || at(4, b"ftypheix") || at(4, b"ftypmif1") {
        Some("HEIF")
    } else if at(0, b"BM") && at(6, b"\0\0\0\0") {
        Some("BMP")
    } else {
        None
    }
}

/// The first bytes of a file, enough to tell its format.
fn head(path: &Path) -> Result<Vec<u8>, DataError> {
    use std::io::Read;
    let mut buf = Vec::with_capacity(12);
    fs::File::open(path)
        .and_then(|f| f.take(12).read_to_end(&mut buf))
        .map_err(|reason| DataError::Io {
            path: path.to_path_buf(),
            reason,
        })?;
    Ok(buf)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ImageKind {
    Png,
    Jpeg,
}

fn image_kind(bytes: &[u8]) -> Option<ImageKind> {
    if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        Some(ImageKind::Png)
    } else if bytes.starts_with(&[0xff, 0xd8, 0xff]) {
        Some(ImageKind::Jpeg)
    } else {
        None
    }
}

/// Whether images can be brought to `shape`: 1 or 3 channels of a positive size.
fn check_image_shape(shape: [usize; 3]) -> Result<(), DataError> {
    let [channels, height, width] = shape;
    match matches!(channels, 1 | 3) && height > 0 && width > 0 {
        true => Ok(()),
        false => Err(DataError::ImageShape {
            shape,
            reason: "images are read into 1 or 3 channels of a positive size".into(),
        }),
    }
}

/// One image file, decoded and brought to `shape` with pixels in `[0, 1]`.
pub fn load_image(path: &Path, shape: [usize; 3]) -> Result<Vec<f32>, DataError> {
    check_image_shape(shape)?;
    let io = |reason| DataError::Io {
        path: path.to_path_buf(),
        reason,
    };
    let bad = |msg: String| DataError::BadFile {
        path: path.to_path_buf(),
        msg: format!("cannot decode the image: {msg}"),
    };
    if image_kind(&head(path)?) == Some(ImageKind::Png) {
        let file = fs::File::open(path).map_err(io)?;
        return png_to_shape(std::io::BufReader::new(file), shape).map_err(bad);
    }
    let bytes = fs::read(path).map_err(io)?;
    to_shape(&decode_samples(&bytes).map_err(bad)?, shape)
}

/// Decode PNG or JPEG bytes into 8-bit samples ([`DataError::Undecodable`] when they are not
/// an image it reads).
pub fn decode(bytes: &[u8]) -> Result<Decoded, DataError> {
    decode_samples(bytes).map_err(|reason| DataError::Undecodable { reason })
}

fn decode_samples(bytes: &[u8]) -> Result<Decoded, String> {
    match image_kind(bytes) {
        Some(ImageKind::Png) => decode_png(bytes),
        Some(ImageKind::Jpeg) => decode_jpeg(bytes),
        None => Err("not a PNG or JPEG file".into()),
    }
}

/// The most pixels an image may have: PIL's limit, past which it refuses an image as a
/// decompression bomb (twice its `MAX_IMAGE_PIXELS`).
pub const MAX_PIXELS: usize = 2 * 89_478_485;

/// Refuses an image whose header claims more than [`MAX_PIXELS`]. Decoders size their output
/// from the header, so a file of a few bytes could otherwise ask for any amount of memory, and
/// a failed allocation aborts the process rather than returning an error.
fn check_pixels(width: usize, height: usize) -> Result<(), String> {
    match width.checked_mul(height) {
        Some(n) if n <= MAX_PIXELS => Ok(()),
        _ => Err(format!(
            "the header says {width}x{height}, more than the {MAX_PIXELS} pixels an image may have"
        )),
    }
}

/// The png crate's error in loren's words, its own message kept as the detail.
fn png_error(e: png::DecodingError) -> String {
    match e {
        png::DecodingError::IoError(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            "not a valid PNG: the file ends before its image data does (truncated)".into()
        }
        png::DecodingError::IoError(e) => format!("cannot read: {e}"),
        png::DecodingError::LimitsExceeded => {
            "the PNG needs more memory to decode than the decoder's limit".into()
        }
        other => format!(
            "not a valid PNG: its data is corrupt (png: {})",
            plain_chunk_types(&other.to_string()).trim_end_matches('.')
        ),
    }
}

/// `msg` with the chunk types the png crate writes as Debug structs (`ChunkType { type: IDAT,
/// critical: true, .. }`) written as their four-letter names.
fn plain_chunk_types(msg: &str) -> String {
    const START: &str = "ChunkType { type: ";
    let mut out = String::new();
    let mut rest = msg;
    while let Some(at) = rest.find(START) {
        let after = &rest[at + START.len()..];
        // A type is four characters, so the first `, critical:` ends it; the other fields are
        // booleans, so the first `}` after it ends the struct.
        let Some(name_end) = after.find(", critical:") else {
            break;
        };
        let Some(close) = after[name_end..].find('}') else {
            break;
        };
        out.push_str(&rest[..at]);
        out.push_str(&format!("`{}`", &after[..name_end]));
        rest = &after[name_end + close + 1..];
    }
    out.push_str(rest);
    out
}

fn decode_png(bytes: &[u8]) -> Result<Decoded, String> {
    png_frame(png_reader(Cursor::new(bytes))?)
}

fn png_reader<R: BufRead + Seek>(input: R) -> Result<png::Reader<R>, String> {
    let mut decoder = png::Decoder::new(input);
    // Palettes and low bit depths expand to 8 bits, 16-bit samples keep their high byte.
    decoder.set_transformations(png::Transformations::normalize_to_color8());
    let reader = decoder.read_info().map_err(png_error)?;
    let info = reader.info();
    check_pixels(info.width as usize, info.height as usize)?;
    Ok(reader)
}

fn png_frame<R: BufRead + Seek>(mut reader: png::Reader<R>) -> Result<Decoded, String> {
    let size = reader
        .output_buffer_size()
        .ok_or("the image is too large to decode")?;
    let mut samples = vec![0; size];
    let info = reader.next_frame(&mut samples).map_err(png_error)?;
    samples.truncate(info.buffer_size());
    Ok(Decoded {
        width: info.width as usize,
        height: info.height as usize,
        channels: info.color_type.samples(),
        samples,
    })
}

/// A PNG brought to `shape` as [`to_shape`] brings a decoded image, but resized as it is
/// decoded, a row at a time, so that only a row of samples is held whatever the image's size.
/// Every row is decoded, those outside the crop too, so that a cut-off file fails as it does
/// decoded whole. An interlaced PNG, whose rows come in seven passes, is decoded whole.
fn png_to_shape<R: BufRead + Seek>(input: R, shape: [usize; 3]) -> Result<Vec<f32>, String> {
    let mut reader = png_reader(input)?;
    if reader.info().interlaced {
        return to_shape(&png_frame(reader)?, shape).map_err(|e| e.to_string());
    }
    let (width, height) = (reader.info().width as usize, reader.info().height as usize);
    let depth = reader.output_color_type().0.samples();
    let channels = shape[0];
    let [top, left, crop_h, crop_w] = centre_crop([height, width], [shape[1], shape[2]]);
    // The next row, into `out` when given one (else read and passed over).
    let mut next_row = |out: Option<&mut [f32]>| -> Result<(), String> {
        let row = reader
            .next_row()
            .map_err(png_error)?
            .ok_or("the image data ends before its last row")?;
        if let Some(out) = out {
            fill_row(row.data(), depth, left, channels, out);
        }
        Ok(())
    };
    for _ in 0..top {
        next_row(None)?;
    }
    let out = resize_rows([crop_h, crop_w], shape, |_, row| next_row(Some(row)))?;
    for _ in top + crop_h..height {
        next_row(None)?;
    }
    // Asked for a row past the last, the decoder reads the rest of the image data as a whole
    // decode does, so a damaged checksum or a file cut after the last row fails here too.
    match reader.next_row().map_err(png_error)? {
        None => Ok(out),
        Some(_) => Err("the image data has more rows than its header says".into()),
    }
}

/// Whether a JPEG's segments lead to its end-of-image marker: walked from the start, each
/// segment skipped by its length and each scan's entropy-coded data to the next marker (a 0xFF
/// there is followed by 0 or a restart marker). Whatever follows the marker (a motion photo's
/// video, say) is not looked at; stray bytes between segments are passed over, as libjpeg does.
fn reaches_end_of_image(bytes: &[u8]) -> bool {
    let mut i = 2;
    while i + 1 < bytes.len() {
        if bytes[i] != 0xFF || bytes[i + 1] == 0xFF {
            i += 1;
            continue;
        }
        let marker = bytes[i + 1];
        match marker {
            0xD9 => return true,
            0x01 | 0xD0..=0xD8 => i += 2,
            _ => {
                let Some(len) = bytes.get(i + 2..i + 4) else {
                    return false;
                };
                i += 2 + usize::from(u16::from_be_bytes([len[0], len[1]]));
                if marker == 0xDA {
                    // The scan's data runs to the first marker that is not a stuffed 0xFF or a
                    // restart.
                    let ends_scan = |a: u8, b: u8| a == 0xFF && !matches!(b, 0x00 | 0xD0..=0xD7);
                    while i + 1 < bytes.len() && !ends_scan(bytes[i], bytes[i + 1]) {
                        i += 1;
                    }
                }
            }
        }
    }
    false
}

/// zune-jpeg's error in loren's words. Its messages are written by `Debug`, which quotes the
/// free-text ones, so those are taken from the variant itself.
fn jpeg_error(e: zune_jpeg::errors::DecodeErrors) -> String {
    use zune_jpeg::errors::DecodeErrors as E;
    let detail = match &e {
        E::Format(msg) => msg.clone(),
        E::FormatStatic(msg) => (*msg).to_string(),
        E::Unsupported(_) => return format!("a kind of JPEG that cannot be read here ({e})"),
        _ => e.to_string(),
    };
    format!(
        "not a valid JPEG: its data is corrupt (jpeg: {})",
        detail.trim().trim_end_matches('.')
    )
}

fn decode_jpeg(bytes: &[u8]) -> Result<Decoded, String> {
    // The decoder fills what a cut-off file lacks with grey and says nothing; PIL refuses such a
    // file ("image file is truncated"), and so does this.
    if !reaches_end_of_image(bytes) {
        let msg = "not a valid JPEG: its data stops before its end marker (the file is truncated \
                   or corrupt)";
        return Err(msg.into());
    }
    // The decoder's own side limit (16384) is lifted to what a JPEG header can say: a phone's
    // panorama is wider, and PIL reads it. The size is checked here, by its pixels, as a PNG's.
    let options = DecoderOptions::default()
        .jpeg_set_out_colorspace(ColorSpace::RGB)
        .set_max_width(usize::from(u16::MAX))
        .set_max_height(usize::from(u16::MAX));
    let mut decoder = JpegDecoder::new_with_options(ZCursor::new(bytes), options);
    decoder.decode_headers().map_err(jpeg_error)?;
    let info = decoder
        .info()
        .ok_or("not a valid JPEG: it has no frame header")?;
    let (width, height) = (usize::from(info.width), usize::from(info.height));
    check_pixels(width, height)?;
    let samples = decoder.decode().map_err(jpeg_error)?;
    if samples.len() != width * height * 3 {
        return Err(format!(
            "{} samples for a {width}x{height} RGB image",
            samples.len()
        ));
    }
    let stored = Decoded {
        width,
        height,
        channels: 3,
        samples,
    };
    Ok(match decoder.exif().and_then(|e| exif_orientation(e)) {
        Some(orientation) => upright(stored, orientation),
        None => stored,
    })
}

/// Planar `[C, H, W]` pixels in `[0, 1]` at `shape` (channels 1 or 3): channels converted
/// (alpha dropped), then the centre crop of the target's aspect ratio resized to it.
/// [`DataError::ImageShape`] for another `shape`, or an image whose samples are not its
/// width × height × channels (1 to 4).
pub fn to_shape(img: &Decoded, shape: [usize; 3]) -> Result<Vec<f32>, DataError> {
    check_image_shape(shape)?;
    let whole = img
        .width
        .checked_mul(img.height)
        .and_then(|n| n.checked_mul(img.channels));
    let empty = img.width == 0 || img.height == 0;
    if !(1..=4).contains(&img.channels) || empty || whole != Some(img.samples.len()) {
        return Err(DataError::ImageShape {
            shape: [img.channels, img.height, img.width],
            reason: format!(
                "a decoded image of 1 to 4 channels, of a positive size, and {} samples, one \
                 per channel of each pixel",
                img.samples.len()
            ),
        });
    }
    let [top, left, crop_h, crop_w] = centre_crop([img.height, img.width], [shape[1], shape[2]]);
    let line = img.width * img.channels;
    let row = |y: usize, out: &mut [f32]| {
        let samples = &img.samples[(top + y) * line..][..line];
        fill_row(samples, img.channels, left, shape[0], out);
        Ok::<(), std::convert::Infallible>(())
    };
    let Ok(out) = resize_rows([crop_h, crop_w], shape, row);
    Ok(out)
}

/// `shape`'s planar pixels, in [0, 1], resized from a crop of `crop`'s size whose rows
/// `row(y, out)` gives one at a time, in order, as [`Resampler::apply_rows`] asks: never the
/// whole image as f32 (a photo of 10000x10000 pixels would be 1.2 GB of it, brought down to
/// 224x224).
fn resize_rows<E>(
    crop: [usize; 2],
    shape: [usize; 3],
    row: impl FnMut(usize, &mut [f32]) -> Result<(), E>,
) -> Result<Vec<f32>, E> {
    let [channels, height, width] = shape;
    let mut out = vec![0.0f32; channels * height * width];
    Resampler::new(crop, [height, width], Filter::Bilinear).apply_rows(channels, row, &mut out)?;
    // Interpolation weights can round a hair past the ends; datasets promise [0, 1].
    out.iter_mut().for_each(|x| *x = x.clamp(0.0, 1.0));
    Ok(out)
}

/// One row of the crop, `[channels, crop width]` values in [0, 1] into `out`, from a whole row
/// of 8-bit samples with `depth` samples a pixel (alpha, the last of 2 or 4, is dropped): grey
/// is repeated into each colour channel, and colour made grey by luma.
fn fill_row(samples: &[u8], depth: usize, left: usize, channels: usize, out: &mut [f32]) {
    let sample = |x: usize, c: usize| f32::from(samples[(left + x) * depth + c]) / 255.0;
    let colour = depth >= 3;
    for (c, plane) in out.chunks_exact_mut(out.len() / channels).enumerate() {
        for (x, v) in plane.iter_mut().enumerate() {
            *v = match (colour, channels) {
                (true, 1) => luma(sample(x, 0), sample(x, 1), sample(x, 2)),
                (true, _) => sample(x, c),
                (false, _) => sample(x, 0),
            };
        }
    }
}

/// `[top, left, height, width]` of the largest centred region of `size` with `target`'s
/// aspect ratio.
fn centre_crop(size: [usize; 2], target: [usize; 2]) -> [usize; 4] {
    let [h, w] = size;
    let [th, tw] = target;
    // Compare h/w with th/tw without rounding: h·tw against w·th.
    let (ch, cw) = if h * tw > w * th {
        ((w * th).div_ceil(tw).min(h), w)
    } else {
        (h, (h * tw).div_ceil(th).min(w))
    };
    [(h - ch) / 2, (w - cw) / 2, ch, cw]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::resize::resize;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("loren-folder-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A distinct 8-bit RGB pattern per seed.
    fn rgb(seed: usize, w: usize, h: usize) -> Vec<u8> {
        (0..w * h * 3)
            .map(|i| ((i * 13 + seed * 57) % 256) as u8)
            .collect()
    }

    fn write_png(path: &Path, w: usize, h: usize, color: png::ColorType, samples: &[u8]) {
        let file = fs::File::create(path).unwrap();
        let mut enc = png::Encoder::new(std::io::BufWriter::new(file), w as u32, h as u32);
        enc.set_color(color);
        enc.set_depth(png::BitDepth::Eight);
        enc.write_header()
            .unwrap()
            .write_image_data(samples)
            .unwrap();
    }

    fn write_jpeg(path: &Path, w: usize, h: usize, samples: &[u8]) {
        let enc = jpeg_encoder::Encoder::new_file(path, 100).unwrap();
        enc.encode(samples, w as u16, h as u16, jpeg_encoder::ColorType::Rgb)
            .unwrap();
    }

    /// What a folder's dataset leaves out is listed, each entry with what it is, and the
    /// dataset is the same for it: images beside the class folders, folders inside a class
    /// folder, files of formats loren does not read (named) and other files. Hidden ones are
    /// left out of both.
    #[test]
    fn data_what_a_folder_passes_over_is_listed() {
        let dir = temp_dir("passed-over");
        for class in ["a", "b"] {
            fs::create_dir_all(dir.join(class)).unwrap();
            write_png(
                &dir.join(class).join("0.png"),
                2,
                2,
                png::ColorType::Rgb,
                &rgb(1, 2, 2),
            );
        }
        let clean = load_folder(&dir, [3, 2, 2]).unwrap();
        assert_eq!(passed_over(&dir), PassedOver::default());
        fs::create_dir_all(dir.join("a/more")).unwrap();
        write_png(
            &dir.join("a/more/1.png"),
            2,
            2,
            png::ColorType::Rgb,
            &rgb(2, 2, 2),
        );
        write_png(
            &dir.join("stray.png"),
            2,
            2,
            png::ColorType::Rgb,
            &rgb(3, 2, 2),
        );
        fs::write(dir.join("a/x.gif"), b"GIF89a\x01\x00\x01\x00\x00\x00").unwrap();
        fs::write(dir.join("b/y.webp"), b"RIFF\x10\x00\x00\x00WEBPVP8 ").unwrap();
        fs::write(dir.join("b/notes.txt"), b"some notes").unwrap();
        fs::write(dir.join("b/.DS_Store"), b"\x00\x00\x00\x01Bud1").unwrap();
        // What a zip made on a Mac unpacks beside the classes: no class, and nothing said.
        fs::create_dir_all(dir.join("__MACOSX/a")).unwrap();
        fs::write(dir.join("__MACOSX/a/._0.png"), b"\x00\x05\x16\x07").unwrap();
        // A link that cannot be read beside the class folders: passed over without a word, as
        // the dataset never opens it.
        std::os::unix::fs::symlink("/proc/self/mem", dir.join("unreadable")).unwrap();
        // Links that lead to no file, one through a loop of itself.
        std::os::unix::fs::symlink("nowhere", dir.join("b/gone")).unwrap();
        std::os::unix::fs::symlink("self", dir.join("b/self")).unwrap();
        // Pipes, which a read would wait on for ever: beside the classes, and in one.
        for pipe in [dir.join("pipe"), dir.join("b/pipe")] {
            let made = std::process::Command::new("mkfifo").arg(&pipe).status();
            assert!(made.is_ok_and(|s| s.success()), "mkfifo {}", pipe.display());
        }
        let left = passed_over(&dir);
        let files: Vec<(String, &str)> = left
            .files
            .iter()
            .map(|(p, what)| (p.display().to_string(), what.as_str()))
            .collect();
        let sep = std::path::MAIN_SEPARATOR;
        assert_eq!(
            files,
            [
                (format!("a{sep}x.gif"), "a GIF image"),
                (
                    format!("b{sep}gone"),
                    "a symbolic link that leads to no file"
                ),
                (format!("b{sep}notes.txt"), "not an image"),
                (format!("b{sep}pipe"), "not a regular file"),
                (
                    format!("b{sep}self"),
                    "a symbolic link that leads to no file"
                ),
                (format!("b{sep}y.webp"), "a WebP image"),
                (
                    "stray.png".to_string(),
                    "an image beside the class folders, in none of them"
                ),
            ]
        );
        assert_eq!(left.folders, [PathBuf::from("a").join("more")]);
        // Read as a set of images (--ood-data), a folder of classes is its test part: what it
        // passes over is the same, the subfolder's image and the stray one among it.
        assert_eq!(passed_over_set(&dir), left);
        assert_eq!(load_folder(&dir, [3, 2, 2]).unwrap(), clean);
        // A class folder with its images in a subfolder alone says why it is empty.
        fs::remove_file(dir.join("a/0.png")).unwrap();
        let e = load_folder(&dir, [3, 2, 2]).unwrap_err().to_string();
        assert!(e.contains("its subfolders are not read"), "{e}");
        let _ = fs::remove_dir_all(&dir);
    }

    /// A shape no image folder gives, or more pixels than can be counted, is an error before
    /// any allocation (the model's image size comes from a checkpoint's metadata).
    #[test]
    fn data_images_of_an_impossible_shape_are_refused() {
        let files = [PathBuf::from("a.png"), PathBuf::from("b.png")];
        let e = read_images(&files, [2, 8, 8]).unwrap_err().to_string();
        assert!(
            e.contains("images of 2x8x8") && e.contains("1 or 3 channels"),
            "{e}"
        );
        let e = read_images(&files, [3, 1 << 32, 1 << 32])
            .unwrap_err()
            .to_string();
        assert!(e.contains("more memory than there is"), "{e}");
        // One image, from a file or decoded, is refused the same shapes, not a panic.
        let dir = temp_dir("impossible-shape");
        let path = dir.join("a.png");
        write_png(&path, 3, 2, png::ColorType::Rgb, &rgb(0, 3, 2));
        let img = decode(&fs::read(&path).unwrap()).unwrap();
        for shape in [[0, 8, 8], [1, 0, 0], [2, 8, 8]] {
            let e = load_image(&path, shape).unwrap_err().to_string();
            assert!(e.contains("1 or 3 channels"), "{shape:?}: {e}");
            let e = to_shape(&img, shape).unwrap_err().to_string();
            assert!(e.contains("1 or 3 channels"), "{shape:?}: {e}");
        }
        // A decoded image whose fields disagree with its samples.
        let wrong = [
            (3, 3, 3),
            (3, 2, 5),
            (0, 2, 3),
            (3, 0, 3),
            (usize::MAX, 2, 3),
        ];
        for (width, height, channels) in wrong {
            let wrong = Decoded {
                width,
                height,
                channels,
                ..img.clone()
            };
            let e = to_shape(&wrong, [3, 4, 4]).unwrap_err().to_string();
            assert!(e.contains("18 samples"), "{width}x{height}x{channels}: {e}");
        }
        assert_eq!(to_shape(&img, [3, 4, 4]).unwrap().len(), 48);
        let e = decode(b"GIF89a").unwrap_err().to_string();
        assert_eq!(e, "cannot decode the image: not a PNG or JPEG file");
    }

    /// The test part decoded alone is the test part of the whole folder, split: the same
    /// images, labels, names and scaling. A broken file outside the test part shows that only
    /// the test part is decoded.
    #[test]
    fn data_a_folders_test_part_loads_alone() {
        let dir = temp_dir("test-part");
        for (c, class) in ["a", "b", "c"].iter().enumerate() {
            fs::create_dir_all(dir.join(class)).unwrap();
            for i in 0..(7 + 2 * c) {
                let path = dir.join(class).join(format!("{i:02}.png"));
                write_png(&path, 5, 4, png::ColorType::Rgb, &rgb(c * 20 + i, 5, 4));
            }
        }
        let whole = load_folder(&dir, [3, 3, 3]).unwrap();
        let want = super::super::external::split_seeded(&whole, &[], false)
            .unwrap()
            .test;
        assert_eq!(load_folder_test(&dir, [3, 3, 3]).unwrap(), want);
        // A fifth of 7, 9 and 11 images, rounded.
        assert_eq!(want.len(), 1 + 2 + 2);
        let labels: Vec<u32> = whole.labels.clone();
        let test = super::super::external::folder_test_indices(&labels, 3);
        let outside = (0..whole.len()).find(|i| !test.contains(i)).unwrap();
        let listing = list_folder(&dir).unwrap();
        // A PNG by its first bytes, so it is still listed, that does not decode.
        fs::write(&listing.files[outside].0, b"\x89PNG\r\n\x1a\nbroken").unwrap();
        assert!(load_folder(&dir, [3, 3, 3]).is_err());
        assert_eq!(load_folder_test(&dir, [3, 3, 3]).unwrap(), want);
    }

    /// Planar [3, H, W] in [0, 1] from interleaved RGB bytes.
    fn planar(samples: &[u8], w: usize, h: usize) -> Vec<f32> {
        (0..3)
            .flat_map(|c| (0..w * h).map(move |p| f32::from(samples[p * 3 + c]) / 255.0))
            .collect()
    }

    #[test]
    fn data_folder_reads_classes_in_order_sample_by_sample() {
        let dir = temp_dir("read");
        for class in ["b-dogs", "a-cats"] {
            fs::create_dir_all(dir.join(class)).unwrap();
        }
        let (w, h) = (4, 4);
        write_png(
            &dir.join("a-cats/2.png"),
            w,
            h,
            png::ColorType::Rgb,
            &rgb(2, w, h),
        );
        write_png(
            &dir.join("a-cats/1.png"),
            w,
            h,
            png::ColorType::Rgb,
            &rgb(1, w, h),
        );
        write_png(
            &dir.join("b-dogs/x.PNG"),
            w,
            h,
            png::ColorType::Rgb,
            &rgb(3, w, h),
        );
        // A smooth JPEG, so quality-100 compression stays within a few levels.
        let smooth: Vec<u8> = (0..w * h * 3).map(|i| (100 + (i / 3) * 4) as u8).collect();
        write_jpeg(&dir.join("b-dogs/y.jpg"), w, h, &smooth);
        fs::write(dir.join("b-dogs/notes.txt"), "not an image").unwrap();
        fs::create_dir_all(dir.join(".cache")).unwrap();

        let d = load_folder(&dir, [3, h, w]).unwrap();
        assert_eq!(d.class_names, vec!["a-cats", "b-dogs"]);
        assert_eq!(d.labels, vec![0, 0, 1, 1]);
        assert_eq!(d.name, file_name(&dir));
        for (i, seed) in [(0, 1), (1, 2), (2, 3)] {
            assert_eq!(
                d.image(i),
                planar(&rgb(seed, w, h), w, h).as_slice(),
                "image {i}"
            );
        }
        let want = planar(&smooth, w, h);
        let worst = d
            .image(3)
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .max_by(f32::total_cmp)
            .unwrap_or(0.0);
        assert!(worst < 4.0 / 255.0, "JPEG off by {worst}");
        assert_eq!(d.norm_mean, IMAGENET_MEAN.to_vec());
    }

    /// Sorted, not in the order the filesystem lists them: with 16 classes of 3 images, made in
    /// a scrambled order, a listing that happens to come sorted is out of the question.
    #[test]
    fn data_folder_classes_and_images_are_in_byte_order_whatever_the_listing() {
        let dir = temp_dir("order");
        let (classes, images) = (16, 3);
        let scrambled = |k: usize, n: usize| (k * 7 + 5) % n;
        for made in 0..classes {
            let class = scrambled(made, classes);
            fs::create_dir_all(dir.join(format!("class-{class:02}"))).unwrap();
            for j in (0..images).rev() {
                let path = dir.join(format!("class-{class:02}/{j}.png"));
                let seed = class * images + j;
                write_png(&path, 1, 1, png::ColorType::Rgb, &rgb(seed, 1, 1));
            }
        }
        let d = load_folder(&dir, [3, 1, 1]).unwrap();
        let names: Vec<String> = (0..classes).map(|c| format!("class-{c:02}")).collect();
        assert_eq!(d.class_names, names);
        for i in 0..classes * images {
            assert_eq!(d.labels[i] as usize, i / images, "image {i}");
            assert_eq!(
                d.image(i),
                planar(&rgb(i, 1, 1), 1, 1).as_slice(),
                "image {i}"
            );
        }
    }

    #[test]
    fn data_grey_folders_scale_by_the_luma_of_imagenets_statistics() {
        let rgb = Dataset::new("t", [3, 1, 1], vec![0.5; 3], vec![0], vec!["a".into()]).unwrap();
        let (mean, std) = imagenet_normalization(3);
        assert_eq!(
            (&mean[..], &std[..]),
            (&[0.485, 0.456, 0.406][..], &[0.229, 0.224, 0.225][..])
        );
        let grey = rgb.with_normalization(mean, std).unwrap().with_channels(1);
        assert_eq!(imagenet_normalization(1), (grey.norm_mean, grey.norm_std));
        let (mean, _) = imagenet_normalization(1);
        assert!((mean[0] - (0.299 * 0.485 + 0.587 * 0.456 + 0.114 * 0.406)).abs() < 1e-6);
    }

    #[test]
    fn data_folder_converts_channels_crops_and_resizes() {
        let dir = temp_dir("convert");
        for class in ["x", "y"] {
            fs::create_dir_all(dir.join(class)).unwrap();
        }
        // Grey 2x2 -> RGB 4x4: each grey value repeated in all three planes, resized.
        let grey = [0u8, 255, 255, 0];
        write_png(&dir.join("x/g.png"), 2, 2, png::ColorType::Grayscale, &grey);
        // RGBA 6x2 -> the centre 2x2 crop, alpha dropped.
        let rgba: Vec<u8> = (0..12).flat_map(|p| [p as u8 * 20, 7, 9, 128]).collect();
        write_png(&dir.join("y/c.png"), 6, 2, png::ColorType::Rgba, &rgba);
        let d = load_folder(&dir, [3, 4, 4]).unwrap();
        // Kept as bytes: each resized pixel rounded to the nearest 1/255.
        assert!(matches!(d.images, Pixels::Steps { levels: 255, .. }));
        let stepped = |v: Vec<f32>| -> Vec<f32> {
            let bytes = Pixels::quantized(&v, 255);
            bytes.iter().map(|&b| f32::from(b) / 255.0).collect()
        };
        let g: Vec<f32> = grey.iter().map(|&v| f32::from(v) / 255.0).collect();
        let want = stepped(resize(&g, [2, 2], [4, 4], Filter::Bilinear));
        assert_ne!(want, resize(&g, [2, 2], [4, 4], Filter::Bilinear));
        for c in 0..3 {
            assert_eq!(&d.image(0)[c * 16..(c + 1) * 16], want.as_slice());
        }
        let centre: Vec<u8> = [2, 3, 8, 9]
            .iter()
            .flat_map(|&p| [p as u8 * 20, 7, 9])
            .collect();
        let want = stepped(resize(
            &planar(&centre, 2, 2),
            [2, 2],
            [4, 4],
            Filter::Bilinear,
        ));
        assert_eq!(d.image(1), want.as_slice());
        // One channel asked for: luma of the colour image, the grey image as it is.
        let d1 = load_folder(&dir, [1, 2, 2]).unwrap();
        assert_eq!(d1.image(0), g.as_slice());
        let luma: Vec<f32> = centre
            .chunks_exact(3)
            .map(|p| (0.299 * p[0] as f32 + 0.587 * p[1] as f32 + 0.114 * p[2] as f32) / 255.0)
            .collect();
        assert_ne!(luma, stepped(luma.clone()));
        assert_eq!(d1.image(1), stepped(luma).as_slice());
        assert_eq!(centre_crop([2, 6], [4, 4]), [0, 2, 2, 2]);
        assert_eq!(centre_crop([10, 4], [2, 2]), [3, 0, 4, 4]);
    }

    #[test]
    fn data_grey_jpegs_become_three_equal_planes() {
        let dir = temp_dir("grey-jpeg");
        let grey: Vec<u8> = (0..16).map(|i| 60 + i * 8).collect();
        let path = dir.join("g.jpg");
        let enc = jpeg_encoder::Encoder::new_file(&path, 100).unwrap();
        enc.encode(&grey, 4, 4, jpeg_encoder::ColorType::Luma)
            .unwrap();
        let img = load_image(&path, [3, 4, 4]).unwrap();
        let (r, rest) = img.split_at(16);
        assert_eq!((r, r), (&rest[..16], &rest[16..]));
        for (got, want) in r.iter().zip(&grey) {
            assert!(
                (got - f32::from(*want) / 255.0).abs() < 4.0 / 255.0,
                "{got} vs {want}"
            );
        }
    }

    /// A valid 1×1 PNG whose header then claims `width` × `height`, its checksum fixed so
    /// that the decoder believes it.
    fn png_claiming(width: u32, height: u32) -> Vec<u8> {
        let mut bytes = Vec::new();
        let mut enc = png::Encoder::new(&mut bytes, 1, 1);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        enc.write_header()
            .unwrap()
            .write_image_data(&[1, 2, 3])
            .unwrap();
        // Signature (8), then IHDR: length (4), type (4), width, height, ..., CRC at 29.
        bytes[16..20].copy_from_slice(&width.to_be_bytes());
        bytes[20..24].copy_from_slice(&height.to_be_bytes());
        let mut crc = flate2::Crc::new();
        crc.update(&bytes[12..29]);
        bytes[29..33].copy_from_slice(&crc.sum().to_be_bytes());
        bytes
    }

    #[test]
    fn data_images_too_large_to_hold_are_refused_before_allocating() {
        // 70-byte files whose headers claim huge images: the output buffer was allocated from
        // the header, and 100000 × 100000 RGB (30 GB) aborted the whole process ("memory
        // allocation of 30000000000 bytes failed") where it could not be had.
        for (w, h) in [(100_000, 100_000), (1 << 20, 1 << 20), (20_000, 20_000)] {
            let e = decode_samples(&png_claiming(w, h)).unwrap_err();
            assert!(
                e.contains(&format!("{w}x{h}")) && e.contains("pixels"),
                "{e}"
            );
        }
        // A JPEG's header is read before its buffer is made, and held to the same limit.
        let mut jpeg = Vec::new();
        jpeg_encoder::Encoder::new(&mut jpeg, 90)
            .encode(&rgb(0, 16, 16), 16, 16, jpeg_encoder::ColorType::Rgb)
            .unwrap();
        // SOF0: marker, length (2), precision (1), then height and width (2 each).
        let sof = jpeg.windows(2).position(|m| m == [0xff, 0xc0]).unwrap();
        jpeg[sof + 5..sof + 9].copy_from_slice(&[0x3e, 0x80, 0x3e, 0x80]);
        let e = decode_samples(&jpeg).unwrap_err();
        assert!(e.contains("16000x16000") && e.contains("pixels"), "{e}");
        // Ordinary sizes are untouched.
        assert_eq!(decode(&png_claiming(1, 1)).unwrap().samples, vec![1, 2, 3]);
    }

    /// A PNG resized a row at a time as it is decoded gives exactly the pixels of the same PNG
    /// decoded whole, for each colour type, both depths, and grey and colour targets cropped
    /// either way; cut off inside its image data, in the crop or in the rows below it, it fails
    /// as it does decoded whole.
    #[test]
    fn data_png_resized_as_decoded_matches_the_whole_image() {
        use png::{BitDepth, ColorType};
        let dir = temp_dir("png-rows");
        // Taller than wide, so that a square crop leaves rows out above and below it.
        let (w, h) = (23, 37);
        let cases = [
            (ColorType::Grayscale, BitDepth::Eight, 1),
            (ColorType::GrayscaleAlpha, BitDepth::Eight, 2),
            (ColorType::Rgb, BitDepth::Eight, 3),
            (ColorType::Rgba, BitDepth::Eight, 4),
            (ColorType::Rgb, BitDepth::Sixteen, 6),
        ];
        for (color, depth, bytes_per_pixel) in cases {
            let samples: Vec<u8> = (0..w * h * bytes_per_pixel)
                .map(|i| (i * 37 % 253) as u8)
                .collect();
            let mut bytes = Vec::new();
            let mut enc = png::Encoder::new(&mut bytes, w as u32, h as u32);
            enc.set_color(color);
            enc.set_depth(depth);
            // Stored, so that a cut's place in the file is its place among the rows.
            enc.set_compression(png::Compression::NoCompression);
            enc.write_header()
                .unwrap()
                .write_image_data(&samples)
                .unwrap();
            let path = dir.join("image.png");
            fs::write(&path, &bytes).unwrap();
            for shape in [[1, 8, 8], [3, 8, 8], [3, 16, 5], [1, 40, 60]] {
                let whole = to_shape(&decode(&bytes).unwrap(), shape).unwrap();
                assert_eq!(
                    load_image(&path, shape).unwrap(),
                    whole,
                    "{color:?} {depth:?} to {shape:?}"
                );
            }
            // In the crop (rows 7 to 29), and in the rows below it.
            for fraction in [0.6, 0.92] {
                let cut = &bytes[..(bytes.len() as f64 * fraction) as usize];
                assert!(
                    decode(cut).is_err(),
                    "{color:?} {depth:?}: cut, decoded whole"
                );
                fs::write(&path, cut).unwrap();
                let e = load_image(&path, [3, 8, 8]).unwrap_err().to_string();
                assert!(
                    e.contains("image.png") && e.contains("cannot decode"),
                    "{e}"
                );
            }
        }
    }

    #[test]
    fn data_a_cut_off_jpeg_is_refused_and_what_follows_a_whole_one_is_ignored() {
        let mut jpeg = Vec::new();
        let samples: Vec<u8> = (0..32 * 24 * 3).map(|i| (i * 37 % 251) as u8).collect();
        jpeg_encoder::Encoder::new(&mut jpeg, 90)
            .encode(&samples, 32, 24, jpeg_encoder::ColorType::Rgb)
            .unwrap();
        let whole = decode(&jpeg).unwrap();
        // Cut inside the scan, inside a header, and just before the end marker: the decoder
        // would fill the rest with grey.
        let scan = jpeg.windows(2).position(|m| m == [0xff, 0xda]).unwrap();
        for cut in [jpeg.len() / 2, scan + 3, jpeg.len() - 2, 20] {
            let e = decode_samples(&jpeg[..cut]).unwrap_err();
            assert!(e.contains("truncated"), "cut at {cut}: {e}");
        }
        // Bytes after the end marker (a motion photo's video), markers among them, change nothing.
        let mut longer = jpeg.clone();
        longer.extend([0xff, 0xda, 0x00, 0x08, 1, 2, 3, 0xff, 0xc4, 7]);
        assert_eq!(decode(&longer).unwrap(), whole);
    }

    /// Damaged files (bytes changed, cut out or put in, at seeded places) are read or refused
    /// with an error, never a panic, and alike by the row-by-row PNG path and the whole decode.
    #[test]
    fn data_damaged_files_are_read_or_refused_never_a_panic() {
        let dir = temp_dir("damaged");
        let (png, grey, jpg) = (dir.join("a.png"), dir.join("g.png"), dir.join("a.jpg"));
        write_png(&png, 20, 13, png::ColorType::Rgb, &rgb(1, 20, 13));
        write_png(
            &grey,
            9,
            17,
            png::ColorType::Grayscale,
            &rgb(2, 9, 17)[..9 * 17],
        );
        write_jpeg(&jpg, 24, 16, &rgb(3, 24, 16));
        let originals = [&png, &grey, &jpg].map(|p| fs::read(p).unwrap());
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = |n: usize| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((state >> 33) as usize) % n.max(1)
        };
        // Per original: how many were read, and how many refused.
        let mut outcomes = [[0usize; 2]; 3];
        let damaged = dir.join("damaged");
        for i in 0..600 {
            let mut b = originals[i % 3].clone();
            for _ in 0..1 + next(6) {
                let at = next(b.len());
                match next(4) {
                    0 => b[at] = next(256) as u8,
                    1 => b[at] ^= 1 << next(8),
                    2 => drop(b.drain(at..(at + 1 + next(32)).min(b.len()))),
                    _ => b
                        .splice(at..at, (0..1 + next(8)).map(|_| next(256) as u8))
                        .for_each(drop),
                }
                if b.is_empty() {
                    break;
                }
            }
            fs::write(&damaged, &b).unwrap();
            let loaded = std::panic::catch_unwind(|| load_image(&damaged, [3, 8, 8]));
            let decoded = std::panic::catch_unwind(|| decode(&b));
            assert!(
                loaded.is_ok() && decoded.is_ok(),
                "damaged file {i} panicked"
            );
            let (loaded, decoded) = (loaded.unwrap(), decoded.unwrap());
            assert_eq!(
                loaded.is_err(),
                decoded.is_err(),
                "damaged file {i}: read a row at a time {:?}, whole {:?}",
                loaded.err(),
                decoded.err()
            );
            outcomes[i % 3][loaded.is_err() as usize] += 1;
        }
        // Each kind was both read and refused: the damage reached past the checks.
        for (counts, name) in outcomes.iter().zip(["RGB PNG", "grey PNG", "JPEG"]) {
            assert!(
                counts.iter().all(|&n| n > 0),
                "{name}: read, refused {counts:?}"
            );
        }
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn data_folder_errors_name_the_file_or_folder() {
        let dir = temp_dir("errors");
        let err = || load_folder(&dir, [3, 4, 4]).unwrap_err().to_string();
        let missing = dir.join("absent");
        let e = load_folder(&missing, [3, 4, 4]).unwrap_err().to_string();
        assert!(e.contains("absent") && e.contains("cannot read"), "{e}");
        fs::create_dir_all(dir.join("only")).unwrap();
        let e = err();
        assert!(e.contains("1 class subfolder;"), "{e}");
        fs::create_dir_all(dir.join("second")).unwrap();
        write_png(
            &dir.join("only/a.png"),
            1,
            1,
            png::ColorType::Rgb,
            &[1, 2, 3],
        );
        let e = err();
        assert!(e.contains("second") && e.contains("no PNG or JPEG"), "{e}");
        // PNG magic and then garbage; a JPEG cut short.
        fs::write(dir.join("second/bad.png"), b"\x89PNG\r\n\x1a\nnot really").unwrap();
        let e = err();
        assert!(e.contains("bad.png") && e.contains("cannot decode"), "{e}");
        fs::remove_file(dir.join("second/bad.png")).unwrap();
        write_jpeg(&dir.join("second/cut.jpg"), 8, 8, &rgb(1, 8, 8));
        let bytes = fs::read(dir.join("second/cut.jpg")).unwrap();
        fs::write(dir.join("second/cut.jpg"), &bytes[..bytes.len() / 3]).unwrap();
        let e = err();
        assert!(e.contains("cut.jpg") && e.contains("cannot decode"), "{e}");
    }

    /// A folder of classes `a` and `b`, each holding one good PNG.
    fn two_good_classes(name: &str) -> PathBuf {
        let dir = temp_dir(name);
        for class in ["a", "b"] {
            fs::create_dir_all(dir.join(class)).unwrap();
            write_png(
                &dir.join(class).join("ok.png"),
                2,
                2,
                png::ColorType::Rgb,
                &rgb(1, 2, 2),
            );
        }
        dir
    }

    /// A file named as an image that is not one (a failed download, an empty file, a broken
    /// link) was left out of the data with no word; it is an error naming it and saying what
    /// it is, in a training folder and in `predict`'s walk alike. Other files are passed over.
    #[test]
    fn data_files_named_as_images_that_are_not_are_errors() {
        let dir = two_good_classes("named-as-image");
        let shape = [3, 2, 2];
        // Passed over as before: not named as images, or hidden.
        fs::write(dir.join("b/notes.txt"), "not an image").unwrap();
        fs::write(dir.join("b/Thumbs.db"), [0u8; 16]).unwrap();
        fs::write(dir.join("b/.hidden.png"), "").unwrap();
        assert_eq!(load_folder(&dir, shape).unwrap().len(), 2);
        assert_eq!(find_images(std::slice::from_ref(&dir)).unwrap().len(), 2);

        let bad = dir.join("b/html3.PNG");
        let cases: [(&[u8], &str); 4] = [
            (
                b"<html>404 Not Found</html>\n",
                "named as an image but it is not a PNG or JPEG image (it begins with `<html>404 No`)",
            ),
            (b"", "named as an image but it is an empty file (0 bytes)"),
            (
                b"\x00\x01\x02\x03",
                "named as an image but it is not a PNG or JPEG image (its first bytes are 00 01 \
                 02 03)",
            ),
            (
                b"\x00\x00\x00\x0cjP  \r\n",
                "named as an image but it is not a PNG or JPEG image (it is a JPEG 2000 image)",
            ),
        ];
        for (bytes, says) in cases {
            fs::write(&bad, bytes).unwrap();
            let want = format!("{}: {says}", bad.display());
            let e = load_folder(&dir, shape).unwrap_err().to_string();
            assert_eq!(e, want);
            let e = find_images(std::slice::from_ref(&dir))
                .unwrap_err()
                .to_string();
            assert_eq!(e, want);
        }
        fs::remove_file(&bad).unwrap();

        let link = dir.join("a/gone.jpeg");
        std::os::unix::fs::symlink("/nonexistent/loren/0.png", &link).unwrap();
        let e = load_folder(&dir, shape).unwrap_err().to_string();
        assert!(
            e.contains("gone.jpeg: named as an image but it is a broken symbolic link")
                && e.contains("/nonexistent/loren/0.png"),
            "{e}"
        );
        assert_eq!(
            find_images(std::slice::from_ref(&link))
                .unwrap_err()
                .to_string(),
            e,
            "given by name"
        );
        fs::remove_file(&link).unwrap();

        // A class folder of such files alone names the first, not "no images".
        fs::remove_file(dir.join("b/ok.png")).unwrap();
        fs::write(dir.join("b/x.jpg"), "").unwrap();
        fs::write(dir.join("b/y.jpg"), "<html>").unwrap();
        let e = load_folder(&dir, shape).unwrap_err().to_string();
        assert!(
            e.contains("x.jpg: named as an image but it is an empty file"),
            "{e}"
        );
        let _ = fs::remove_dir_all(&dir);
    }

    /// A decoder's errors were passed on as they came: the png crate's Debug structs
    /// (`ChunkType { type: …, critical: false, … }`) and zune-jpeg's quoted text with its
    /// advice to call `set_limits`. They read as loren's words, the decoder's detail kept.
    #[test]
    fn data_decoder_errors_are_in_loren_words() {
        // A PNG signature, then a chunk of made-up type where the header should be.
        let mut png = b"\x89PNG\r\n\x1a\n\x00\x00\x00\x04xyzw\x01\x02\x03\x04".to_vec();
        png.extend([0u8; 16]);
        let e = decode_samples(&png).unwrap_err();
        assert_eq!(
            e,
            "not a valid PNG: its data is corrupt (png: `xyzw` chunk appeared before IHDR chunk)"
        );
        assert_eq!(
            plain_chunk_types(
                "CRC error: expected 0x1 have 0x2 while decoding ChunkType { type: I}A\u{9b}, \
                 critical: true, private: false, reserved: false, safecopy: false } chunk."
            ),
            "CRC error: expected 0x1 have 0x2 while decoding `I}A\u{9b}` chunk."
        );

        let mut jpeg = Vec::new();
        jpeg_encoder::Encoder::new(&mut jpeg, 90)
            .encode(&rgb(0, 16, 16), 16, 16, jpeg_encoder::ColorType::Rgb)
            .unwrap();
        // SOF0: marker, length (2), precision (1), then height and width (2 each).
        let sof = jpeg.windows(2).position(|m| m == [0xff, 0xc0]).unwrap();
        let side = 65_000u16.to_be_bytes();
        jpeg[sof + 5..sof + 9].copy_from_slice(&[side, side].concat());
        assert_eq!(
            decode_samples(&jpeg).unwrap_err(),
            "the header says 65000x65000, more than the 178956970 pixels an image may have"
        );
        // A frame header cut short: zune-jpeg's free text, unquoted.
        jpeg[sof + 2..sof + 4].copy_from_slice(&[0x00, 0x03]);
        let e = decode_samples(&jpeg).unwrap_err();
        assert!(
            e.starts_with("not a valid JPEG: its data is corrupt (jpeg: ") && !e.contains('"'),
            "{e}"
        );
    }

    /// A phone's photo is stored as the sensor read it, with an EXIF tag saying how it was held;
    /// it is read upright, as every viewer shows it (it was read lying on its side). A panorama
    /// wider than the decoder's own 16384 px reads too, as in PIL.
    #[test]
    fn data_a_jpeg_is_read_upright_and_a_panorama_whole() {
        let (w, h) = (6, 4);
        let stored = rgb(3, w, h);
        let encode = |exif: Option<Vec<u8>>| {
            let mut jpeg = Vec::new();
            let mut enc = jpeg_encoder::Encoder::new(&mut jpeg, 100);
            enc.set_sampling_factor(jpeg_encoder::SamplingFactor::R_4_4_4);
            if let Some(tiff) = exif {
                enc.add_app_segment(1, [b"Exif\0\0".to_vec(), tiff].concat())
                    .unwrap();
            }
            enc.encode(&stored, w as u16, h as u16, jpeg_encoder::ColorType::Rgb)
                .unwrap();
            jpeg
        };
        let plain = decode_samples(&encode(None)).unwrap();
        // A little-endian TIFF header, one entry: orientation 6, a quarter turn clockwise.
        let mut tiff = b"II\x2a\x00\x08\x00\x00\x00\x01\x00".to_vec();
        tiff.extend([0x12, 0x01, 3, 0, 1, 0, 0, 0, 6, 0, 0, 0, 0, 0, 0, 0]);
        let turned = decode_samples(&encode(Some(tiff))).unwrap();
        assert_eq!([turned.width, turned.height], [h, w]);
        // The stored image's bottom-left pixel is the upright one's top-left.
        assert_eq!(turned.samples[..3], plain.samples[(h - 1) * w * 3..][..3]);
        assert_eq!(turned, upright(plain, 6));

        let (w, h) = (17_000, 8);
        let mut jpeg = Vec::new();
        jpeg_encoder::Encoder::new(&mut jpeg, 50)
            .encode(
                &rgb(1, w, h),
                w as u16,
                h as u16,
                jpeg_encoder::ColorType::Rgb,
            )
            .unwrap();
        let wide = decode_samples(&jpeg).unwrap();
        assert_eq!([wide.width, wide.height], [w, h]);
    }

    /// Every file that cannot be read is named in one error (one a run took as many runs as
    /// files to find them), and the readable ones are what they are alone.
    #[test]
    fn data_every_unreadable_image_is_named_at_once() {
        let dir = temp_dir("unreadable");
        fs::create_dir_all(&dir).unwrap();
        let mut files = Vec::new();
        for i in 0..6 {
            let path = dir.join(format!("{i}.png"));
            write_png(&path, 3, 3, png::ColorType::Rgb, &rgb(i, 3, 3));
            files.push(path);
        }
        let whole = read_images(&files, [3, 3, 3]).unwrap();
        for i in [1, 4] {
            let bytes = fs::read(&files[i]).unwrap();
            fs::write(&files[i], &bytes[..bytes.len() / 2]).unwrap();
        }
        let before = images_tried();
        let e = read_images(&files, [3, 3, 3]).unwrap_err().to_string();
        // Each file tried counts, read or not, for a display of the reading (tests beside this
        // one may read too).
        assert!(images_tried() - before >= files.len());
        assert!(e.starts_with("2 image files cannot be read:\n  "), "{e}");
        assert!(
            e.contains("1.png: cannot decode") && e.contains("4.png: cannot decode"),
            "{e}"
        );
        let (read, failed) = read_readable(&files, [3, 3, 3]).unwrap();
        assert_eq!(failed.iter().map(|(i, _)| *i).collect::<Vec<_>>(), [1, 4]);
        let per = 27;
        let kept: Vec<f32> = [0, 2, 3, 5]
            .iter()
            .flat_map(|&i| whole.to_f32()[i * per..][..per].to_vec())
            .collect();
        assert_eq!(read.to_f32(), kept);
        // One alone is its own error, as it was.
        let e = read_images(&files[..2], [3, 3, 3]).unwrap_err().to_string();
        assert!(
            e.contains("1.png: cannot decode") && !e.contains("image files"),
            "{e}"
        );
        // Past twenty, the rest are counted.
        let many: Vec<PathBuf> = std::iter::repeat_n(files[1].clone(), 23).collect();
        let e = read_images(&many, [3, 3, 3]).unwrap_err().to_string();
        assert!(e.ends_with("\n  and 3 more"), "{e}");
        let _ = fs::remove_dir_all(&dir);
    }

    /// Two class folders whose names are not text read as one name (`caf\u{fffd}`): refused, by
    /// the list of classes and by the data.
    #[cfg(unix)]
    #[test]
    fn data_a_class_folder_named_in_other_than_text_is_refused() {
        use std::os::unix::ffi::OsStrExt;
        let dir = temp_dir("not-text");
        for (name, seed) in [(&b"caf\xe9"[..], 1), (&b"caf\xe8"[..], 2)] {
            let class = dir.join(std::ffi::OsStr::from_bytes(name));
            fs::create_dir_all(&class).unwrap();
            for i in 0..3 {
                let path = class.join(format!("{i}.png"));
                write_png(&path, 2, 2, png::ColorType::Rgb, &rgb(seed + i, 2, 2));
            }
        }
        let said = "a class folder's name must be text (UTF-8)";
        let e = folder_class_names(&dir).unwrap_err().to_string();
        assert!(e.contains(said) && e.contains("caf"), "{e}");
        let e = load_folder(&dir, [3, 2, 2]).unwrap_err().to_string();
        assert!(e.contains(said), "{e}");
        // As OOD images, whose classes are never named, they read.
        assert_eq!(load_folder_test(&dir, [3, 2, 2]).unwrap().len(), 2);
        let _ = fs::remove_dir_all(&dir);
    }

    /// Links in a folder of images (a photo library's albums, say) take each image once, where
    /// it is first reached: an image linked again is a repeat, counted for predict's note; a
    /// folder linked again, or a link back up the tree, adds nothing and is not followed for
    /// ever. What such a folder holds that is not read is said relative to it.
    #[cfg(unix)]
    #[test]
    fn data_images_reached_again_through_links_are_taken_once() {
        use std::os::unix::fs::symlink;
        let dir = temp_dir("links");
        // One folder at the top: not a folder of classes.
        let lib = dir.join("library");
        fs::create_dir_all(lib.join("a")).unwrap();
        fs::create_dir_all(lib.join("b")).unwrap();
        for i in 0..2 {
            let path = lib.join(format!("a/{i}.png"));
            write_png(&path, 2, 2, png::ColorType::Rgb, &rgb(i, 2, 2));
        }
        symlink("../a", lib.join("b/album")).unwrap();
        symlink("../a/0.png", lib.join("b/favourite.png")).unwrap();
        symlink("..", lib.join("b/up")).unwrap();
        fs::write(lib.join("b/notes.txt"), "not an image").unwrap();
        let found = find_images_noting(std::slice::from_ref(&dir)).unwrap();
        assert_eq!(found.images, [lib.join("a/0.png"), lib.join("a/1.png")]);
        assert_eq!(found.repeats, 1, "the linked image");
        let notes = ["library", "b", "notes.txt"].iter().collect::<PathBuf>();
        assert_eq!(
            passed_over_set(&dir).files,
            [(notes, "not an image".into())]
        );
        // Given again, by a link or by itself: each a repeat.
        let again = [dir.clone(), lib.join("b/album"), lib.join("a/1.png")];
        let found = find_images_noting(&again).unwrap();
        assert_eq!((found.images.len(), found.repeats), (2, 3));
        // None anywhere: the first path is named, and how many others hold none.
        let empty: Vec<PathBuf> = ["x", "y", "z"].iter().map(|n| dir.join(n)).collect();
        for e in &empty {
            fs::create_dir_all(e).unwrap();
        }
        let e = find_images_noting(&empty).unwrap_err().to_string();
        assert!(
            e.ends_with("x: holds no PNG or JPEG images, nor do the other 2 paths given"),
            "{e}"
        );
        let e = find_images_noting(&empty[..2]).unwrap_err().to_string();
        assert!(e.ends_with("nor does the other path given"), "{e}");
        let _ = fs::remove_dir_all(&dir);
    }

    /// A folder whose classes are too small for its split to give the test part an image gave
    /// an empty set, which failed later, as an `--ood-data` set, with "samples must be at least
    /// 1, got 0", naming neither the data nor the cause.
    #[test]
    fn data_a_folders_empty_test_part_is_an_error_naming_it() {
        let dir = two_good_classes("empty-test");
        write_png(
            &dir.join("b/two.png"),
            2,
            2,
            png::ColorType::Rgb,
            &rgb(2, 2, 2),
        );
        let e = load_folder_test(&dir, [3, 2, 2]).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "the test part of the split would be empty (`{}`): every class is too small to give it \
                 an image: a class needs at least 3, and the largest, `b`, has 2",
                file_name(&dir)
            )
        );
        let _ = fs::remove_dir_all(&dir);
    }
}
