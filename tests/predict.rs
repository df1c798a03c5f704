//! `loren predict`: image files in, each image's class and uncertainty out, the same numbers the
//! library's `Ensemble` gives for those pixels; and its refusals.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

mod common;
use common::{fails_with, loren, run_ok, temp_dir};

use loren::Ensemble;
use loren::dataset::{DataSource, Normalize};
use loren_tensor::DeviceSpec;

/// A model of `method` trained for `epochs` on the digits, its folder and its export.
fn train(method: &str, epochs: &str) -> (PathBuf, PathBuf) {
    let dir = temp_dir(method);
    let out = dir.to_str().unwrap();
    run_ok(&[
        "train",
        "--method",
        method,
        "--members",
        "3",
        "--rank",
        "4",
        "--epochs",
        epochs,
        "--no-shift",
        "--no-ood",
        "-q",
        "--out",
        out,
    ]);
    let exported = dir.join("ensemble.safetensors");
    let ckpt = dir.join("checkpoint.safetensors");
    run_ok(&[
        "export",
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--out",
        exported.to_str().unwrap(),
    ]);
    (dir, exported)
}

/// The LoRA-Ensemble every test here shares, trained once.
fn lora() -> &'static (PathBuf, PathBuf) {
    static MODEL: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    MODEL.get_or_init(|| train("lora", "3"))
}

/// The first `n` digits test images, their labels, and their pixels as 8-bit PNGs hold them.
fn test_images(n: usize) -> (Vec<Vec<u8>>, Vec<u32>) {
    let vit = loren_nn::config::VitConfig::tiny();
    let test = DataSource::Digits(None)
        .splits(&[], &vit, Normalize::Dataset, false)
        .unwrap()
        .test;
    let per = test.image_len();
    let all = test.images.to_f32();
    let bytes = (0..n)
        .map(|i| {
            all[i * per..][..per]
                .iter()
                .map(|v| (v * 255.0).round() as u8)
                .collect()
        })
        .collect();
    (bytes, test.labels[..n].to_vec())
}

fn write_png(path: &Path, grey: &[u8], side: u32) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let file = std::fs::File::create(path).unwrap();
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), side, side);
    enc.set_color(png::ColorType::Grayscale);
    enc.set_depth(png::BitDepth::Eight);
    enc.write_header().unwrap().write_image_data(grey).unwrap();
}

/// `n` test images as PNGs under `dir`, in two subfolders, beside a text file and a hidden
/// image that the search skips: their paths in the order predict reads them, and their labels.
fn image_folder(dir: &Path, n: usize) -> (Vec<PathBuf>, Vec<u32>, Vec<Vec<u8>>) {
    let (pixels, labels) = test_images(n);
    let paths: Vec<PathBuf> = (0..n)
        .map(|i| {
            dir.join(if i < n / 2 { "a" } else { "b" })
                .join(format!("{i:03}.png"))
        })
        .collect();
    for (p, px) in paths.iter().zip(&pixels) {
        write_png(p, px, 8);
    }
    std::fs::write(dir.join("a/notes.txt"), "not an image").unwrap();
    write_png(&dir.join("b/.hidden.png"), &pixels[0], 8);
    (paths, labels, pixels)
}

/// `loren predict --model MODEL INPUTS... --out OUT -q EXTRA...`: what it printed.
fn predict_into(model: &Path, inputs: &[PathBuf], out: &Path, extra: &[&str]) -> String {
    let mut args = vec!["predict", "--model", model.to_str().unwrap()];
    args.extend(inputs.iter().map(|p| p.to_str().unwrap()));
    args.extend(["--out", out.to_str().unwrap(), "-q"]);
    args.extend(extra);
    run_ok(&args)
}

/// 8-bit pixels as the [0, 1] values they stand for.
fn unit(pixels: &[Vec<u8>]) -> Vec<f32> {
    pixels
        .concat()
        .iter()
        .map(|&b| f32::from(b) / 255.0)
        .collect()
}

fn json_file(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn predict_gives_the_librarys_numbers_for_image_files() {
    let (model, exported) = lora();
    let dir = temp_dir("files");
    let n = 40;
    let (paths, labels, pixels) = image_folder(&dir.join("images"), n);
    let json = dir.join("p.json");
    let printed = predict_into(model, &[dir.join("images")], &json, &[]);
    assert!(printed.contains("on 40 images"), "{printed}");
    assert!(printed.contains("20 more"), "{printed}");
    assert!(printed.contains("most uncertain"), "{printed}");
    let got = json_file(&json);
    let rows = got["images"].as_array().unwrap();
    let listed: Vec<&str> = rows.iter().map(|r| r["path"].as_str().unwrap()).collect();
    let want: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    assert_eq!(listed, want, "the images, in sorted order, others skipped");

    // The library on the PNGs' own pixels, at predict's default batch: bit for bit.
    let ens = Ensemble::load(model, DeviceSpec::Cpu).unwrap();
    let lib = ens.predict_pixels(&unit(&pixels), pixels.len()).unwrap();
    let mut correct = 0;
    for (b, row) in rows.iter().enumerate() {
        assert_eq!(bits(&floats(&row["mean"])), bits(lib.mean(b)), "image {b}");
        let members = row["members"].as_array().unwrap();
        for (m, p) in members.iter().enumerate() {
            assert_eq!(
                bits(&floats(p)),
                bits(lib.member(m, b)),
                "image {b} member {m}"
            );
        }
        let class = row["class"].as_u64().unwrap() as usize;
        assert_eq!(class, lib.predicted(b));
        assert_eq!(row["name"], class.to_string());
        assert_eq!(
            row["probability"].as_f64().unwrap() as f32,
            lib.mean(b)[class]
        );
        // serde_json reads a float back to within an ulp, not always to the bit.
        let close = |key: &str, want: f64| {
            let got = row[key].as_f64().unwrap();
            assert!(
                (got - want).abs() <= 1e-15 * want.abs().max(1e-3),
                "{key}: {got} {want}"
            );
        };
        close("entropy", lib.entropy[b]);
        close("mutual_information", lib.mutual_information[b]);
        let votes = (0..3)
            .filter(|&m| {
                let p = lib.member(m, b);
                (0..p.len()).fold(0, |best, c| if p[c] > p[best] { c } else { best }) == class
            })
            .count();
        assert_eq!(row["votes"].as_u64().unwrap() as usize, votes);
        correct += (class == labels[b] as usize) as usize;
    }
    // The images are the test split's, so they score as it does: a wrong orientation or scale
    // would not.
    assert!(correct >= 36, "{correct} of {n} right");

    // The export predicts the same; the CSV holds the same numbers.
    let csv = dir.join("p.csv");
    predict_into(exported, &[dir.join("images")], &csv, &[]);
    let text = std::fs::read_to_string(&csv).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), n + 1);
    assert!(
        lines[0].starts_with("path,class,name,probability,entropy,mutual_information,votes,p:0,")
    );
    for (b, line) in lines[1..].iter().enumerate() {
        let f: Vec<&str> = line.split(',').collect();
        assert_eq!(f.len(), 7 + 10, "{line}");
        assert_eq!(f[0], want[b]);
        let class = lib.predicted(b);
        assert_eq!(f[1].parse::<usize>().unwrap(), class);
        // Every column its own figure, to the bit: Rust writes the shortest exact decimal.
        assert_eq!(f[2], class.to_string(), "{line}");
        assert_eq!(f[3].parse::<f32>().unwrap(), lib.mean(b)[class], "{line}");
        assert_eq!(f[4].parse::<f64>().unwrap(), lib.entropy[b], "{line}");
        assert_eq!(
            f[5].parse::<f64>().unwrap(),
            lib.mutual_information[b],
            "{line}"
        );
        assert_eq!(
            f[6].parse::<u64>().ok(),
            rows[b]["votes"].as_u64(),
            "{line}"
        );
        let mean: Vec<f32> = f[7..].iter().map(|x| x.parse().unwrap()).collect();
        assert_eq!(bits(&mean), bits(lib.mean(b)), "csv image {b}");
    }
}

#[test]
fn files_and_folders_mix_and_any_size_is_brought_to_the_model() {
    let (model, _) = lora();
    let dir = temp_dir("mix");
    let (pixels, _) = test_images(2);
    // The second image at 4 times the size, each pixel a 4x4 block.
    let big: Vec<u8> = (0..32 * 32)
        .map(|i| pixels[1][(i / 32 / 4) * 8 + (i % 32) / 4])
        .collect();
    write_png(&dir.join("one.png"), &pixels[0], 8);
    write_png(&dir.join("more/big.png"), &big, 32);
    write_png(&dir.join("more/small.png"), &pixels[1], 8);
    let json = dir.join("p.json");
    // Each image once, where it is first named, however often it is named again.
    let inputs = [
        dir.join("more"),
        dir.join("one.png"),
        dir.join("more/small.png"),
        dir.join("more/../one.png"),
        dir.join("more"),
    ];
    predict_into(model, &inputs, &json, &[]);
    let got = json_file(&json);
    let rows = got["images"].as_array().unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r["path"].as_str().unwrap()).collect();
    assert_eq!(names.len(), 3, "{names:?}");
    assert!(names[0].ends_with("more/big.png") && names[1].ends_with("more/small.png"));
    assert!(names[2].ends_with("one.png"), "{names:?}");
    // The large one is brought to the model's 8x8 as an image folder's images are for training.
    let ens = Ensemble::load(model, DeviceSpec::Cpu).unwrap();
    let shape = ens.image_shape();
    let files = [dir.join("more/big.png"), dir.join("more/small.png")];
    let read = loren_nn::data::folder::read_images(&files, shape).unwrap();
    let lib = ens.predict_pixels(&read.to_f32(), files.len()).unwrap();
    for (b, row) in rows[..2].iter().enumerate() {
        assert_eq!(bits(&floats(&row["mean"])), bits(lib.mean(b)), "{b}");
    }
    // Not the small image's pixels, but near them: the same digit.
    assert_eq!(rows[0]["class"], rows[1]["class"]);
}

/// MC Dropout's masks follow each image: `loren predict` in batches of 7 gives what the library
/// gives for each batch's images predicted backwards, on their own. Masks drawn by row or by
/// place in the input would differ (by far more than the last bits, which move with a row's
/// place in the CPU's matrix kernels).
#[test]
fn mc_dropout_masks_follow_the_image_not_its_row_or_place() {
    let (model, _) = train("mc-dropout", "1");
    let dir = temp_dir("mcd");
    let (_, _, pixels) = image_folder(&dir.join("images"), 30);
    let json = dir.join("p.json");
    predict_into(&model, &[dir.join("images")], &json, &["--batch-size", "7"]);
    let rows = json_file(&json)["images"].as_array().unwrap().clone();
    let ens = Ensemble::load(&model, DeviceSpec::Cpu).unwrap();
    let mut worst = 0.0f32;
    for (c, chunk) in pixels.chunks(7).enumerate() {
        let backwards: Vec<Vec<u8>> = chunk.iter().rev().cloned().collect();
        let lib = ens
            .predict_pixels(&unit(&backwards), backwards.len())
            .unwrap();
        for (i, row) in rows[c * 7..][..chunk.len()].iter().enumerate() {
            let b = chunk.len() - 1 - i;
            for (m, p) in row["members"].as_array().unwrap().iter().enumerate() {
                let off = floats(p)
                    .iter()
                    .zip(lib.member(m, b))
                    .map(|(x, y)| (x - y).abs())
                    .max_by(f32::total_cmp)
                    .unwrap_or(0.0);
                assert!(off < 1e-5, "image {} member {m}: off by {off}", c * 7 + i);
                worst = worst.max(off);
            }
        }
    }
    println!("largest difference {worst:e}");
}

/// Images that cannot be read, among many that can, lose none of the others' predictions:
/// every readable image has its row, as it would alone, and the bad ones are named together,
/// the command failing for them.
#[test]
fn an_unreadable_image_loses_none_of_the_others() {
    let (model, _) = lora();
    let dir = temp_dir("unreadable");
    let images = dir.join("images");
    let (paths, _, _) = image_folder(&images, 12);
    let whole = dir.join("whole.csv");
    predict_into(
        model,
        std::slice::from_ref(&images),
        &whole,
        &["--batch-size", "5"],
    );
    // Two files cut short, in separate batches of 5.
    let good = std::fs::read(&paths[0]).unwrap();
    for bad in ["a/001x.png", "b/009x.png"] {
        std::fs::write(images.join(bad), &good[..good.len() / 2]).unwrap();
    }
    let out = dir.join("some.csv");
    let (m, imgs, o) = (
        model.to_str().unwrap(),
        images.to_str().unwrap(),
        out.to_str().unwrap(),
    );
    let args = [
        "predict",
        "--model",
        m,
        imgs,
        "--out",
        o,
        "-q",
        "--batch-size",
        "5",
    ];
    let (ok, printed, err) = loren(&args);
    assert!(!ok, "it succeeded");
    assert!(printed.contains(", on 12 images\n"), "{printed}");
    let said = [
        "only 12 of the 14 images have a row: 2 image files cannot be read:",
        "001x.png: cannot decode the image",
        "009x.png: cannot decode the image",
    ];
    for s in said {
        assert!(err.contains(s), "{s}: {err}");
    }
    // The same rows, but for the last bits a row's place in its batch moves.
    let rows = |f: &Path| -> Vec<Vec<String>> {
        let text = std::fs::read_to_string(f).unwrap();
        text.lines()
            .map(|l| l.split(',').map(String::from).collect())
            .collect()
    };
    let (some, all) = (rows(&out), rows(&whole));
    assert_eq!(some.len(), all.len());
    for (got, want) in some.iter().zip(&all).skip(1) {
        assert_eq!(got[..3], want[..3], "path, class and name");
        for (g, w) in got.iter().zip(want).skip(3) {
            let (g, w): (f64, f64) = (g.parse().unwrap(), w.parse().unwrap());
            assert!((g - w).abs() < 1e-5, "{}: {g} against {w}", got[0]);
        }
    }
    // None readable: no file is written over the earlier one.
    let bad = images.join("a/001x.png");
    let args = [
        "predict",
        "--model",
        m,
        bad.to_str().unwrap(),
        "--out",
        o,
        "-q",
    ];
    // One image alone fails with its own error, with nothing said of rows.
    let (ok, _, err) = loren(&args);
    let said = format!("error: {}: cannot decode", bad.display());
    assert!(
        !ok && err.starts_with(&said) && err.lines().count() == 1,
        "{err}"
    );
    assert_eq!(rows(&out), some);
}

/// A line break in a file's name is shown escaped in the table, rows and most uncertain alike
/// (printed as it is, it broke the row in two), and the columns stay aligned around it.
#[test]
fn a_line_break_in_a_name_is_shown_escaped_in_the_table() {
    let (model, _) = lora();
    let dir = temp_dir("line-break");
    let (pixels, _) = test_images(3);
    for (name, px) in ["two\nlines.png", "a.png", "b.png"].iter().zip(&pixels) {
        write_png(&dir.join(name), px, 8);
    }
    let (m, d) = (model.to_str().unwrap(), dir.to_str().unwrap());
    let printed = run_ok(&["predict", "--model", m, d, "-q"]);
    assert_eq!(printed.matches("two\\nlines.png").count(), 2, "{printed}");
    assert!(!printed.contains("\nlines.png"), "{printed}");
    // The header and a row per image, each as wide as the others.
    let lines: Vec<&str> = printed.lines().collect();
    let table = &lines[1..5];
    assert!(table[0].trim_start().starts_with("image"), "{printed}");
    let widths: Vec<usize> = table.iter().map(|l| l.chars().count()).collect();
    assert!(
        widths.iter().all(|&w| w == widths[0]),
        "{widths:?}\n{printed}"
    );
    // The most uncertain three, their entropies in one column.
    assert!(lines[5].contains("most uncertain"), "{printed}");
    let at: Vec<Option<usize>> = (lines[6..9].iter())
        .map(|l| l.split("  entropy ").next().map(|p| p.chars().count()))
        .collect();
    assert!(at.iter().all(|&a| a == at[0]), "{at:?}\n{printed}");
}

/// What a folder held that predict does not read is said, and so is a path that names an image
/// given already, whose row is not repeated.
#[test]
fn predict_says_what_it_passed_over_and_what_repeats() {
    let (model, _) = lora();
    let dir = temp_dir("passed-over");
    let images = dir.join("images");
    let (paths, _, _) = image_folder(&images, 4);
    let again = paths[1].to_str().unwrap();
    let (m, imgs) = (model.to_str().unwrap(), images.to_str().unwrap());
    let b = images.join("b");
    let (ok, printed, err) = loren(&["predict", "--model", m, imgs, again, b.to_str().unwrap()]);
    assert!(ok, "{err}");
    let notes = images.join("a").join("notes.txt");
    let said = [
        format!(
            "passed over 1 file that it does not read: {} (not an image)",
            notes.display()
        ),
        "note: predict: 2 paths named images given already; each image has one row".into(),
    ];
    for s in said {
        assert!(err.contains(&s), "{s}: {err}");
    }
    assert!(printed.contains("on 4 images"), "{printed}");
}

#[test]
fn predict_refuses_bad_input_with_one_line_and_writes_nothing() {
    let (model, exported) = lora();
    let dir = temp_dir("refusals");
    let (_, _, pixels) = image_folder(&dir.join("images"), 4);
    let m = model.to_str().unwrap();
    let images = dir.join("images");
    let imgs = images.to_str().unwrap();
    let text = images.join("a/notes.txt");
    fails_with(
        &["predict", "--model", m, text.to_str().unwrap(), "-q"],
        &["notes.txt", "not a PNG or JPEG image"],
    );
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    fails_with(
        &["predict", "--model", m, empty.to_str().unwrap(), "-q"],
        &["empty", "holds no PNG or JPEG images"],
    );
    fails_with(
        &["predict", "--model", m, imgs, "--out", "p.txt", "-q"],
        &["--out p.txt", ".csv or a .json"],
    );
    fails_with(
        &["predict", "--model", m, imgs, "--batch-size", "0", "-q"],
        &["--batch-size"],
    );
    fails_with(
        &["predict", "--model", "absent.safetensors", imgs, "-q"],
        &["absent.safetensors"],
    );
    let backbone = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/backbone-tiny.safetensors");
    let b = backbone.to_str().unwrap();
    fails_with(
        &["predict", "--model", b, imgs, "-q"],
        &["neither an ensemble written by loren export nor a training checkpoint"],
    );
    fails_with(
        &[
            "predict",
            "--model",
            exported.to_str().unwrap(),
            "--backbone",
            b,
            imgs,
            "-q",
        ],
        &["exported ensemble", "holds its own backbone", "give none"],
    );
    // An image named like an output is an image still: predict will not write over it.
    let disguised = images.join("b/disguised.csv");
    write_png(&disguised, &pixels[0], 8);
    let before = std::fs::read(&disguised).unwrap();
    fails_with(
        &[
            "predict",
            "--model",
            m,
            imgs,
            "--out",
            disguised.to_str().unwrap(),
            "-q",
        ],
        &["is one of the images"],
    );
    assert_eq!(std::fs::read(&disguised).unwrap(), before);
    // A file predict did not write is not replaced (a run's report here); its own, CSV or
    // JSON, are.
    let report = dir.join("report.json");
    std::fs::write(&report, b"{\"report\": {}}").unwrap();
    let args = [
        "predict",
        "--model",
        m,
        imgs,
        "--out",
        report.to_str().unwrap(),
        "-q",
    ];
    fails_with(&args, &["is a file loren predict did not write"]);
    assert_eq!(std::fs::read(&report).unwrap(), b"{\"report\": {}}");
    for name in ["p.csv", "p.json"] {
        let out = dir.join(name);
        predict_into(model, std::slice::from_ref(&images), &out, &[]);
        predict_into(model, std::slice::from_ref(&images), &out, &[]);
    }
    // No images at all is clap's usage error, which names what is missing.
    let (ok, _, err) = loren(&["predict", "--model", m]);
    assert!(!ok && err.contains("<IMAGES>"), "{err}");
}
