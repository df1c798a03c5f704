//! `loren predict`: a trained ensemble's class and uncertainty for each image of a set.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use clap::Args;

use super::args::{Common, checkpoint_arg, note_passed_over, text_path};

use serde::Serialize;

use super::say;
use loren::Ensemble;
use loren::ensemble::{DEFAULT_BATCH, EnsembleError, Prediction};
use loren::outputs::{same_file, writable_file};
use loren::progress::{EvalBar, Verbosity};
use loren::report::method_title;
use loren::tensor::DeviceSpec;
use loren_nn::NnError;
use loren_nn::checkpoint::write_atomic;
use loren_nn::data::DataError;
use loren_nn::data::folder::{find_images_noting, read_readable};
use loren_nn::data::prefetch::{DEPTH, prefetch};
use loren_nn::metrics::argmax;

#[derive(Args, Clone)]
pub struct PredictArgs {
    #[command(flatten)]
    pub common: Common,
    /// The ensemble: a file written by `loren export`, or a training checkpoint (or the folder
    /// `loren train --out` wrote it into).
    #[arg(long, value_parser = checkpoint_arg)]
    pub model: PathBuf,
    /// The backbone a checkpoint was trained from (default: the path recorded in it; an
    /// exported file holds its own).
    #[arg(long, value_parser = text_path)]
    pub backbone: Option<PathBuf>,
    /// PNG or JPEG files, or folders searched for them (subfolders too, in sorted order; each
    /// image once). Each image is brought to the model's input as an image folder's are for
    /// training: centre-cropped to a square, resized, and scaled as the model's training data
    /// was. Under mc-dropout an image's masks are drawn from its values, so it draws the same
    /// ones wherever it is in this list, or alone.
    #[arg(required = true, value_name = "IMAGES")]
    pub images: Vec<PathBuf>,
    /// Write every image's prediction to FILE: .csv (a row per image: its path, the class and its
    /// name, its probability, the entropy, the mutual information, the members' votes, then the
    /// mean probability of every class) or .json (each member's probabilities too). Replaces
    /// predictions written before, and no other file.
    #[arg(long, value_parser = text_path, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// How many images to print a row for, in order (--out writes every one).
    #[arg(
        long,
        default_value_t = 20,
        value_name = "N",
        allow_negative_numbers = true
    )]
    pub show: usize,
    /// Images per forward pass: fewer need less memory.
    #[arg(long, default_value_t = DEFAULT_BATCH, value_name = "N")]
    pub batch_size: usize,
}

/// What --out gets: where to write, and how.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Format {
    Csv,
    Json,
}

fn out_format(out: &Path) -> Result<Format> {
    match out.extension().and_then(|e| e.to_str()) {
        Some(e) if e.eq_ignore_ascii_case("csv") => Ok(Format::Csv),
        Some(e) if e.eq_ignore_ascii_case("json") => Ok(Format::Json),
        _ => bail!(
            "--out {}: name a .csv or a .json file (the format follows the extension)",
            out.display()
        ),
    }
}

pub fn predict(a: &PredictArgs) -> Result<()> {
    if a.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let format = a.out.as_deref().map(out_format).transpose()?;
    if let Some(out) = &a.out {
        writable_file(out, "--out")?;
        if same_file(out, &a.model) {
            bail!("--out {}: is the model itself", out.display());
        }
    }
    let found = find_images_noting(&a.images)?;
    let files = found.images;
    if let Some(out) = &a.out
        && let Some(f) = files.iter().find(|f| same_file(out, f))
    {
        bail!(
            "--out {}: is one of the images ({}); write the predictions elsewhere",
            out.display(),
            f.display()
        );
    }
    if let Some(out) = &a.out
        && out.is_file()
        && !written_by_predict(out)
    {
        bail!(
            "--out {}: is a file loren predict did not write (a run's report, say), which the \
             predictions would replace; name another file",
            out.display()
        );
    }
    // Opened here for the note on an `auto` that took the CPU; the ensemble opens it again (a
    // GPU once a process), on the CPU where `auto` chose it.
    let spec = match loren::open_device(a.common.device()?)?.is_cpu() {
        true => DeviceSpec::Cpu,
        false => a.common.device()?,
    };
    let mut ens = Ensemble::open(&a.model, a.backbone.as_deref(), spec)?;
    ens.set_batch_size(a.batch_size);
    let shape = ens.image_shape();
    if !matches!(shape[0], 1 | 3) {
        bail!(
            "--model {}: takes {}-channel images; images are read as grey or RGB",
            a.model.display(),
            shape[0]
        );
    }
    let device = ens.device_name();
    if a.common.verbosity() == Verbosity::Normal {
        loren::note!(
            "predict: {} on {device}, {}",
            a.model.display(),
            images(files.len())
        );
    }
    if a.common.verbosity() == Verbosity::Normal {
        note_passed_over(&"predict", &found.passed_over);
        if found.repeats > 0 {
            loren::note!(
                "note: predict: {} named images given already; each image has one row",
                match found.repeats {
                    1 => "1 path".to_string(),
                    n => format!("{n} paths"),
                }
            );
        }
    }
    let members = format == Some(Format::Json);
    let (rows, unread) = predict_files(&ens, &files, a.batch_size, members, a.common.verbosity())?;
    // Not one row: nothing to show, and no file to write over an earlier one.
    if rows.is_empty() {
        return Err(unreadable(unread, files.len()));
    }
    let config = ens.config();
    let title = method_title(
        config.method,
        config.members,
        config.method.uses_lora().then_some(config.lora.rank),
    );
    // Written before anything is printed: a reader that stops early (| head) loses nothing.
    if let (Some(out), Some(format)) = (&a.out, format) {
        let bytes = match format {
            Format::Csv => csv(&ens, &rows).into_bytes(),
            Format::Json => serde_json::to_vec(&PredictFile {
                model: a.model.display().to_string(),
                title: &title,
                device: &device,
                class_names: ens.class_names(),
                images: &rows,
            })?,
        };
        write_atomic(out, &bytes)?;
    }
    say(format_args!(
        "{title} from {}, on {}\n{}",
        a.model.display(),
        images(rows.len()),
        table(&ens, &rows, a.show, a.out.is_some())
    ))?;
    if let Some(out) = &a.out {
        say(format_args!("wrote {}\n", out.display()))?;
    }
    // Every image that could be read has its row, written and shown; the others are named
    // together, and the command fails for them.
    match unread.is_empty() {
        true => Ok(()),
        false => Err(unreadable(unread, files.len())),
    }
}

/// The error of the `unread` images of `total`, which have no row.
fn unreadable(mut unread: Vec<DataError>, total: usize) -> anyhow::Error {
    let rows = total - unread.len();
    let error = match unread.len() {
        1 => unread.remove(0),
        _ => DataError::Unreadable(unread),
    };
    let have = match (rows, total) {
        // One image alone: its own error says it all.
        (_, 1) => return error.into(),
        (0, _) => format!("none of the {} has a row", images(total)),
        _ => format!("only {rows} of the {} have a row", images(total)),
    };
    anyhow::Error::from(error).context(have)
}

/// "1 image", "12 images".
fn images(n: usize) -> String {
    format!("{n} image{}", if n == 1 { "" } else { "s" })
}

/// A chunk of images as the background thread reads it: the readable ones' normalised pixels,
/// and each other's place in the chunk with its error.
type ReadChunk = (Vec<f32>, Vec<(usize, DataError)>);

/// Every readable image's row (with each member's probabilities when `members`), predicted a
/// batch at a time, each batch decoded on a background thread while the one before it runs;
/// and the error of each image that could not be read, in order: one bad file among many loses
/// none of the others' predictions.
fn predict_files(
    ens: &Ensemble,
    files: &[PathBuf],
    batch: usize,
    members: bool,
    verbosity: Verbosity,
) -> Result<(Vec<Row>, Vec<DataError>)> {
    let shape = ens.image_shape();
    let chunks: Vec<&[PathBuf]> = files.chunks(batch).collect();
    let mut bar = EvalBar::new("predict", files.len(), verbosity);
    let _ctrl_c = loren::interrupt::Guard::install();
    std::thread::scope(|scope| -> Result<(Vec<Row>, Vec<DataError>)> {
        let decode = |i: usize| -> Result<ReadChunk> {
            let (pixels, failed) = read_readable(chunks[i], shape)?;
            match chunks[i].len() - failed.len() {
                0 => Ok((Vec::new(), failed)),
                read => Ok((ens.normalize(&pixels.to_f32(), read)?, failed)),
            }
        };
        let decoded = prefetch(scope, chunks.len(), DEPTH, decode);
        let mut rows = Vec::with_capacity(files.len());
        let mut unread = Vec::new();
        for (decoded, chunk) in decoded.zip(&chunks) {
            let (images, failed) = decoded?;
            let read: Vec<&PathBuf> = (chunk.iter().enumerate())
                .filter(|(i, _)| failed.iter().all(|(f, _)| f != i))
                .map(|(_, path)| path)
                .collect();
            unread.extend(failed.into_iter().map(|(_, e)| e));
            bar.inc(chunk.len());
            if !read.is_empty() {
                let p = ens.predict(&images, read.len()).map_err(|e| match e {
                    // Named by its file: the image's place is within this chunk.
                    EnsembleError::Engine(NnError::NotANumber {
                        member,
                        image,
                        value,
                    }) => anyhow::anyhow!(
                        "{}: member {member}'s probabilities are not numbers ({value}): the \
                         model's weights have diverged",
                        read[image].display()
                    ),
                    e => e.into(),
                })?;
                // Into rows at once: every member's probabilities over a large set would be M
                // times the memory of the rows, and only the JSON file wants them.
                rows.extend((0..p.batch).map(|b| row(ens, read[b], &p, b, members)));
            }
            loren::interrupt::scoring_stop("nothing was written")?;
        }
        Ok((rows, unread))
    })
}

/// One image's prediction.
#[derive(Serialize)]
struct Row {
    path: String,
    /// The most probable class under the mean prediction, and its name.
    class: usize,
    name: String,
    /// The mean probability of that class.
    probability: f32,
    /// Entropy of the mean prediction, and the mutual information between prediction and
    /// member: the total uncertainty, and the part of it the members' disagreement makes (nats).
    entropy: f64,
    mutual_information: f64,
    /// How many members' own most probable class is the ensemble's.
    votes: usize,
    mean: Vec<f32>,
    /// Each member's probabilities, [M][C]: kept only for the JSON file, since M times the
    /// mean's size over a large set of images is memory worth sparing.
    #[serde(skip_serializing_if = "Option::is_none")]
    members: Option<Vec<Vec<f32>>>,
}

/// Image `b` of a batch's prediction as its row.
fn row(ens: &Ensemble, path: &Path, p: &Prediction, b: usize, members: bool) -> Row {
    let class = p.predicted(b);
    Row {
        path: path.display().to_string(),
        class,
        name: ens.class_names()[class].clone(),
        probability: p.mean(b)[class],
        entropy: p.entropy[b],
        mutual_information: p.mutual_information[b],
        votes: (0..p.members)
            .filter(|&m| argmax(p.member(m, b)) == class)
            .count(),
        mean: p.mean(b).to_vec(),
        members: members.then(|| (0..p.members).map(|m| p.member(m, b).to_vec()).collect()),
    }
}

/// Whether the file at `path` is predictions this command wrote, which a new run may replace:
/// a CSV under its header, or JSON under its first key (`{"model":`, as serde writes it).
fn written_by_predict(path: &Path) -> bool {
    use std::io::Read;
    // The start alone: the file may be far larger than memory.
    let mut head = Vec::new();
    let read = std::fs::File::open(path).and_then(|f| f.take(4096).read_to_end(&mut head));
    read.is_ok()
        && (head.starts_with(b"path,class,name,probability,") || head.starts_with(b"{\"model\":"))
}

#[derive(Serialize)]
struct PredictFile<'a> {
    model: String,
    title: &'a str,
    device: &'a str,
    class_names: &'a [String],
    images: &'a [Row],
}

fn csv(ens: &Ensemble, rows: &[Row]) -> String {
    let mut header: Vec<String> = [
        "path",
        "class",
        "name",
        "probability",
        "entropy",
        "mutual_information",
        "votes",
    ]
    .map(String::from)
    .into();
    header.extend(ens.class_names().iter().map(|n| format!("p:{n}")));
    let mut out = csv_line(&header);
    for r in rows {
        let mut fields = vec![
            r.path.clone(),
            r.class.to_string(),
            r.name.clone(),
            r.probability.to_string(),
            r.entropy.to_string(),
            r.mutual_information.to_string(),
            r.votes.to_string(),
        ];
        fields.extend(r.mean.iter().map(f32::to_string));
        out.push_str(&csv_line(&fields));
    }
    out
}

/// Fields joined by commas, each quoted (RFC 4180) where it holds a comma, a quote or a line
/// break.
fn csv_line(fields: &[String]) -> String {
    let quoted: Vec<String> = fields
        .iter()
        .map(|f| match f.contains([',', '"', '\n', '\r']) {
            true => format!("\"{}\"", f.replace('"', "\"\"")),
            false => f.clone(),
        })
        .collect();
    quoted.join(",") + "\n"
}

/// The `n` rows of the highest entropy, highest first (in the rows' order among equals).
fn most_uncertain(rows: &[Row], n: usize) -> Vec<&Row> {
    let mut order: Vec<&Row> = rows.iter().collect();
    order.sort_by(|a, b| b.entropy.total_cmp(&a.entropy));
    order.truncate(n);
    order
}

/// A path as the table shows it: a line break or other control character in a file's name
/// escaped (`\n`), which printed as it is would break the table's rows (the CSV and JSON
/// quote it).
fn printable(path: &str) -> String {
    path.chars()
        .map(|c| match c.is_control() {
            true => c.escape_debug().to_string(),
            false => c.to_string(),
        })
        .collect()
}

/// The first `show` rows, then the most uncertain images.
fn table(ens: &Ensemble, rows: &[Row], show: usize, written: bool) -> String {
    let shown = &rows[..show.min(rows.len())];
    let width = shown
        .iter()
        .map(|r| printable(&r.path).chars().count())
        .max()
        .unwrap_or(0)
        .max(5);
    let name_width = shown
        .iter()
        .map(|r| r.name.chars().count())
        .max()
        .unwrap_or(0)
        .max(5);
    let m = ens.members();
    let mut s = String::new();
    if !shown.is_empty() {
        s += &format!(
            "  {:width$}  {:name_width$}  probability  entropy  mutual info  votes\n",
            "image", "class"
        );
    }
    for r in shown {
        s += &format!(
            "  {:width$}  {:name_width$}  {:>11.4}  {:>7.4}  {:>11.4}  {:>5}\n",
            printable(&r.path),
            r.name,
            r.probability,
            r.entropy,
            r.mutual_information,
            format!("{}/{m}", r.votes)
        );
    }
    if !shown.is_empty() && rows.len() > shown.len() {
        let more = rows.len() - shown.len();
        s += &match written {
            true => format!("  … {more} more (every one is in --out)\n"),
            false => {
                format!("  … {more} more (--show N prints more; --out FILE writes every one)\n")
            }
        };
    }
    if rows.len() > 1 {
        let top = most_uncertain(rows, 3);
        let width = top
            .iter()
            .map(|r| printable(&r.path).chars().count())
            .max()
            .unwrap_or(0);
        s += "  most uncertain (highest entropy):
";
        for r in top {
            s += &format!(
                "    {:width$}  entropy {:.4}, {} at {:.4}, {}/{m} votes\n",
                printable(&r.path),
                r.entropy,
                r.name,
                r.probability,
                r.votes
            );
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_control_character_in_a_name_is_shown_escaped() {
        assert_eq!(printable("a\nb\tc.png"), "a\\nb\\tc.png");
        assert_eq!(printable("ünïcode é.png"), "ünïcode é.png");
    }

    #[test]
    fn csv_fields_with_a_comma_quote_or_line_break_are_quoted() {
        let fields = ["a,b.png", "q\"x", "line\nbreak", "plain"].map(String::from);
        assert_eq!(
            csv_line(&fields),
            "\"a,b.png\",\"q\"\"x\",\"line\nbreak\",plain\n"
        );
    }

    #[test]
    fn the_most_uncertain_are_the_highest_entropies_highest_first() {
        let row = |path: &str, entropy: f64| Row {
            path: path.into(),
            class: 0,
            name: "0".into(),
            probability: 1.0,
            entropy,
            mutual_information: 0.0,
            votes: 1,
            mean: Vec::new(),
            members: None,
        };
        let rows = [row("a", 0.1), row("b", 0.9), row("c", 0.5), row("d", 0.7)];
        let top: Vec<&str> = most_uncertain(&rows, 3)
            .iter()
            .map(|r| r.path.as_str())
            .collect();
        assert_eq!(top, ["b", "d", "c"]);
    }
}
