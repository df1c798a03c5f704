//! The `loren` binary on pretrained weights in other libraries' names and on CIFAR and image
//! folders, written here in their formats: runs that work, and errors that name the file.

use std::path::{Path, PathBuf};

mod common;
use common::{
    all_tensors, fails_with, fails_with_in, loren, report_json, run_ok, run_ok_in, strs, temp_dir,
};

use loren_nn::checkpoint::{self, Entry, TensorFile};
use loren_nn::config::VitConfig;

/// A one-epoch train of a 2-member ensemble, writing to `out`, plus `extra`.
fn quick_train(out: &Path, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = [
        "train",
        "--epochs",
        "1",
        "--members",
        "2",
        "--rank",
        "2",
        "--no-shift",
        "--no-ood",
        "-q",
        "--seed",
        "3",
        "--out",
    ]
    .map(String::from)
    .into();
    v.push(out.to_str().unwrap().to_string());
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn bundled_backbone() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/backbone-tiny.safetensors")
}

/// The bundled tiny backbone renamed as `scheme` ("timm", "torchvision" or "hf") names it.
fn renamed_backbone(scheme: &str, dir: &Path) -> PathBuf {
    let f = TensorFile::read(&bundled_backbone()).unwrap();
    let vit = VitConfig::tiny();
    let get = |n: &str| f.get(n).unwrap().data.clone();
    let e = |shape: &[usize], data: Vec<f32>| Entry {
        shape: shape.to_vec(),
        data,
    };
    let d = vit.dim;
    let mut out: Vec<(String, Entry)> = Vec::new();
    let mut put = |name: String, entry: Entry| out.push((name, entry));
    let conv = [d, vit.channels, vit.patch, vit.patch];
    let names = |i: usize| -> [String; 10] {
        match scheme {
            "timm" => [
                format!("blocks.{i}.norm1"),
                format!("blocks.{i}.attn.qkv.weight"),
                format!("blocks.{i}.attn.qkv.bias"),
                format!("blocks.{i}.attn.proj"),
                format!("blocks.{i}.norm2"),
                format!("blocks.{i}.mlp.fc1"),
                format!("blocks.{i}.mlp.fc2"),
                "patch_embed.proj".into(),
                "cls_token|pos_embed".into(),
                "norm".into(),
            ],
            _ => {
                let l = format!("encoder.layers.encoder_layer_{i}");
                [
                    format!("{l}.ln_1"),
                    format!("{l}.self_attention.in_proj_weight"),
                    format!("{l}.self_attention.in_proj_bias"),
                    format!("{l}.self_attention.out_proj"),
                    format!("{l}.ln_2"),
                    format!("{l}.mlp.0"),
                    format!("{l}.mlp.3"),
                    "conv_proj".into(),
                    "class_token|encoder.pos_embedding".into(),
                    "encoder.ln".into(),
                ]
            }
        }
    };
    for i in 0..vit.depth {
        let n = names(i);
        let b = format!("blocks.{i}");
        for (to, from) in [(&n[0], "norm1"), (&n[3], "attn.o"), (&n[4], "norm2")]
            .into_iter()
            .chain([(&n[5], "mlp.fc1"), (&n[6], "mlp.fc2")])
        {
            for wb in ["weight", "bias"] {
                let src = f.get(&format!("{b}.{from}.{wb}")).unwrap();
                put(format!("{to}.{wb}"), e(&src.shape, src.data.clone()));
            }
        }
        let cat = |wb: &str| -> Vec<f32> {
            ["q", "k", "v"]
                .iter()
                .flat_map(|p| get(&format!("{b}.attn.{p}.{wb}")))
                .collect()
        };
        put(n[1].clone(), e(&[3 * d, d], cat("weight")));
        put(n[2].clone(), e(&[3 * d], cat("bias")));
    }
    let n = names(0);
    put(
        format!("{}.weight", n[7]),
        e(&conv, get("patch_embed.weight")),
    );
    put(format!("{}.bias", n[7]), e(&[d], get("patch_embed.bias")));
    let (cls, pos) = n[8].split_once('|').unwrap();
    put(cls.into(), e(&[1, 1, d], get("cls_token")));
    put(pos.into(), e(&[1, vit.tokens(), d], get("pos_embed")));
    put(format!("{}.weight", n[9]), e(&[d], get("norm.weight")));
    put(format!("{}.bias", n[9]), e(&[d], get("norm.bias")));
    let path = dir.join(format!("{scheme}.safetensors"));
    checkpoint::write(&path, &out, Default::default()).unwrap();
    path
}

/// The bundled tiny backbone as Hugging Face's `ViTModel` names it, under `vit.` as its
/// `ViTForImageClassification` keeps it.
fn hugging_face_backbone(dir: &Path) -> PathBuf {
    let f = TensorFile::read(&bundled_backbone()).unwrap();
    let vit = VitConfig::tiny();
    let (d, t) = (vit.dim, vit.tokens());
    let mut out: Vec<(String, Entry)> = Vec::new();
    let mut put = |to: &str, from: &str, shape: &[usize]| {
        let data = f.get(from).unwrap().data.clone();
        let shape = shape.to_vec();
        out.push((format!("vit.{to}"), Entry { shape, data }));
    };
    let patch = "embeddings.patch_embeddings.projection";
    put(
        &format!("{patch}.weight"),
        "patch_embed.weight",
        &[d, vit.channels, vit.patch, vit.patch],
    );
    put(&format!("{patch}.bias"), "patch_embed.bias", &[d]);
    put("embeddings.cls_token", "cls_token", &[1, 1, d]);
    put("embeddings.position_embeddings", "pos_embed", &[1, t, d]);
    let linears = [
        ("layernorm_before", "norm1"),
        ("attention.attention.query", "attn.q"),
        ("attention.attention.key", "attn.k"),
        ("attention.attention.value", "attn.v"),
        ("attention.output.dense", "attn.o"),
        ("layernorm_after", "norm2"),
        ("intermediate.dense", "mlp.fc1"),
        ("output.dense", "mlp.fc2"),
    ];
    for i in 0..vit.depth {
        for (to, from) in linears {
            for wb in ["weight", "bias"] {
                let from = format!("blocks.{i}.{from}.{wb}");
                let shape = f.get(&from).unwrap().shape.clone();
                put(&format!("encoder.layer.{i}.{to}.{wb}"), &from, &shape);
            }
        }
    }
    put("layernorm.weight", "norm.weight", &[d]);
    put("layernorm.bias", "norm.bias", &[d]);
    let path = dir.join("hf.safetensors");
    checkpoint::write(&path, &out, Default::default()).unwrap();
    path
}

/// The LayerNorm epsilon recorded in a run's checkpoint.
fn recorded_ln_eps(run: &Path) -> f64 {
    let f = TensorFile::read(&run.join("checkpoint.safetensors")).unwrap();
    let vit: serde_json::Value = serde_json::from_str(&f.metadata()["vit"]).unwrap();
    vit["ln_eps"].as_f64().unwrap()
}

/// Hugging Face trains its ViTs with a LayerNorm epsilon of 1e-12, where timm and torchvision
/// use the 1e-6 of loren's configs: a run from its weights takes its epsilon, keeps it, and
/// scores with it again.
#[test]
fn hugging_face_weights_train_with_hugging_faces_layer_norm_epsilon() {
    let dir = temp_dir("hf-eps");
    let reference = dir.join("loren");
    run_ok(&strs(&quick_train(&reference, &[])));
    let backbone = hugging_face_backbone(&dir);
    let out = dir.join("hf");
    run_ok(&strs(&quick_train(
        &out,
        &["--backbone", backbone.to_str().unwrap()],
    )));
    assert_eq!(recorded_ln_eps(&reference) as f32, 1e-6);
    assert_eq!(recorded_ln_eps(&out) as f32, 1e-12);
    // The epsilon reaches the model: the same weights train to other bits.
    assert!(trained_bits(&out) != trained_bits(&reference));
    eval_ok(&out.join("checkpoint.safetensors"), &["--no-ood"]);
}

fn trained_bits(dir: &Path) -> Vec<(String, Vec<u32>)> {
    let f = TensorFile::read(&dir.join("checkpoint.safetensors")).unwrap();
    f.names()
        .map(|n| {
            let bits = f.get(n).unwrap().data.iter().map(|v| v.to_bits()).collect();
            (n.to_string(), bits)
        })
        .collect()
}

#[test]
fn timm_and_torchvision_weights_train_exactly_as_the_same_weights_in_loren_names() {
    let dir = temp_dir("schemes");
    let reference = dir.join("loren");
    run_ok(&strs(&quick_train(&reference, &[])));
    for scheme in ["timm", "torchvision"] {
        let backbone = renamed_backbone(scheme, &dir);
        let out = dir.join(scheme);
        run_ok(&strs(&quick_train(
            &out,
            &["--backbone", backbone.to_str().unwrap()],
        )));
        assert!(
            trained_bits(&out) == trained_bits(&reference),
            "{scheme}: training from the renamed weights differs"
        );
        // eval finds and re-imports the backbone the checkpoint names.
        eval_ok(&out.join("checkpoint.safetensors"), &["--no-ood"]);
    }
}

/// `loren eval` of `ckpt` without the shifted sets, plus `extra`; its stdout.
fn eval_ok(ckpt: &Path, extra: &[&str]) -> String {
    let mut args = vec![
        "eval",
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--no-shift",
        "-q",
    ];
    args.extend(extra);
    run_ok(&args)
}

/// Write a CIFAR-10 in the official binary format: 10 images of each class spread over the
/// five training files, 2 of each in the test file.
fn write_cifar10(dir: &Path) {
    let record = |label: usize, seed: usize| -> Vec<u8> {
        let mut r = vec![label as u8];
        r.extend((0..3072).map(|p| ((p * 7 + seed * 131 + label * 40) % 256) as u8));
        r
    };
    for f in 0..5 {
        let bytes: Vec<u8> = (0..20).flat_map(|i| record(i % 10, f * 20 + i)).collect();
        std::fs::write(dir.join(format!("data_batch_{}.bin", f + 1)), bytes).unwrap();
    }
    let test: Vec<u8> = (0..20).flat_map(|i| record(i % 10, 1000 + i)).collect();
    std::fs::write(dir.join("test_batch.bin"), test).unwrap();
}

#[test]
fn cifar10_trains_and_evaluates_through_the_cli() {
    let dir = temp_dir("cifar");
    let data = dir.join("cifar-10-batches-bin");
    std::fs::create_dir_all(&data).unwrap();
    write_cifar10(&data);
    // The parent folder of the unpacked archive works too.
    let arg = format!("cifar10:{}", dir.display());
    let out = dir.join("run");
    let printed = run_ok(&strs(&quick_train(&out, &["--data", &arg])));
    assert!(printed.contains("accuracy"), "{printed}");
    assert!(printed.contains("the cifar10 test split"), "{printed}");
    let ckpt = out.join("checkpoint.safetensors");
    let meta = TensorFile::read(&ckpt).unwrap().metadata().clone();
    let absolute = std::fs::canonicalize(&dir).unwrap();
    assert_eq!(meta["data"], format!("cifar10:{}", absolute.display()));
    eval_ok(&ckpt, &[]);
    assert!(out.join("eval.json").exists());
    // The same records with the class names file, at another path: the names differ only
    // where one side numbered its classes for want of the file, and the labels are the data's.
    let named = temp_dir("cifar-named");
    write_cifar10(&named);
    let names = "airplane\nautomobile\nbird\ncat\ndeer\ndog\nfrog\nhorse\nship\ntruck\n";
    std::fs::write(named.join("batches.meta.txt"), names).unwrap();
    eval_ok(&ckpt, &["--data", &format!("cifar10:{}", named.display())]);
}

/// The paper's data flags: every official training image (100 here, 90 without
/// `--train-on-val`), in the files' order, nearest-pixel flips and rotation, unnormalised; and
/// its warmup, from a first step at rate 0, recorded for a resumed run.
#[test]
fn cifar10_trains_on_every_training_image_with_the_papers_data_flags() {
    let dir = temp_dir("cifar-paper");
    write_cifar10(&dir);
    let arg = format!("cifar10:{}", dir.display());
    let steps = |out: &Path| report_json(out)["train"]["steps"].as_u64().unwrap();
    let paper = [
        "--data",
        &arg,
        "--augment",
        "paper",
        "--normalize",
        "none",
        "--no-shuffle",
        "--warmup-from-zero",
    ];
    let kept = dir.join("kept");
    run_ok(&strs(&quick_train(&kept, &paper)));
    assert_eq!(steps(&kept), 3);
    let all = dir.join("all");
    let mut flags = paper.to_vec();
    flags.push("--train-on-val");
    run_ok(&strs(&quick_train(&all, &flags)));
    assert_eq!(steps(&all), 4);
    let ckpt = all.join("checkpoint.safetensors");
    let train: serde_json::Value =
        serde_json::from_str(TensorFile::read(&ckpt).unwrap().meta("train").unwrap()).unwrap();
    assert_eq!(train["augment"]["sampling"], "nearest");
    assert_eq!(train["warmup_from_zero"], true);
    eval_ok(&ckpt, &[]);
    // Resumed with none of the flags, the run takes them all from the checkpoint.
    let resume = [
        "train",
        "--resume",
        ckpt.to_str().unwrap(),
        "--epochs",
        "2",
        "--no-shift",
        "--no-ood",
        "-q",
    ];
    run_ok(&resume);
    assert_eq!(steps(&all), 8);
}

/// A dataset named by a relative path is recorded absolute, so `eval` from elsewhere finds it.
#[test]
fn a_relative_data_path_is_found_again_from_another_directory() {
    let dir = temp_dir("cifar-relative");
    std::fs::create_dir_all(dir.join("cifar-10-batches-bin")).unwrap();
    write_cifar10(&dir.join("cifar-10-batches-bin"));
    let out = dir.join("run");
    let train = quick_train(&out, &["--data", "cifar10:cifar-10-batches-bin"]);
    run_ok_in(&dir, &strs(&train));
    let ckpt = out.join("checkpoint.safetensors");
    let elsewhere = std::env::temp_dir();
    let printed = run_ok_in(
        &elsewhere,
        &[
            "eval",
            "--checkpoint",
            ckpt.to_str().unwrap(),
            "--no-shift",
            "-q",
        ],
    );
    assert!(printed.contains("accuracy"), "{printed}");
    // The same data named by the relative path it was trained with: nothing to say of it.
    let (ok, _, stderr) = common::loren_in(
        &dir,
        &["eval", "--checkpoint", ckpt.to_str().unwrap(), "--no-shift"]
            .into_iter()
            .chain(["--data", "cifar10:cifar-10-batches-bin"])
            .collect::<Vec<_>>(),
    );
    assert!(ok && !stderr.contains("was trained on"), "{stderr}");
}

fn write_png(path: &Path, w: u32, h: u32, seed: usize) {
    let samples: Vec<u8> = (0..(w * h * 3) as usize)
        .map(|i| ((i * 11 + seed * 53) % 256) as u8)
        .collect();
    let file = std::fs::File::create(path).unwrap();
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), w, h);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    enc.write_header()
        .unwrap()
        .write_image_data(&samples)
        .unwrap();
}

/// An image folder in `dir`: classes cats and dogs, 10 distinct 12×10 PNGs each.
fn write_cats_and_dogs(dir: &Path) {
    write_classes(dir, &["cats", "dogs"], 10, 0);
}

/// An image folder in `dir` of `classes`, `per_class` distinct 12×10 PNGs each, drawn from
/// `seed` on.
fn write_classes(dir: &Path, classes: &[&str], per_class: usize, seed: usize) {
    for (c, class) in classes.iter().enumerate() {
        std::fs::create_dir_all(dir.join(class)).unwrap();
        for i in 0..per_class {
            let file = dir.join(class).join(format!("{i}.png"));
            write_png(&file, 12, 10, seed + c * per_class + i);
        }
    }
}

#[test]
fn an_image_folder_trains_through_the_cli() {
    let dir = temp_dir("folder");
    write_cats_and_dogs(&dir);
    let out = temp_dir("folder-run");
    let arg = format!("folder:{}", dir.display());
    let printed = run_ok(&strs(&quick_train(&out, &["--data", &arg])));
    assert!(printed.contains("accuracy"), "{printed}");
    // A run's folder inside the image folder would read as a class of no images there, from
    // then on; refused before anything is written.
    let said = [
        "an output folder inside --data folder:",
        "would read as a class of images",
    ];
    // Named there, through a folder that is not there and back out, or the default folder of a
    // run started in the image folder: nothing is made.
    for inside in [dir.join("run"), dir.join("missing/../run")] {
        let args = quick_train(&inside, &["--data", &arg]);
        fails_with(&strs(&args), &said);
    }
    // Or through a link to it, met after a folder that is not there and back out too.
    let links = temp_dir("folder-links");
    std::os::unix::fs::symlink(&dir, links.join("data")).unwrap();
    for inside in [links.join("data/run"), links.join("missing/../data/run")] {
        let args = quick_train(&inside, &["--data", &arg]);
        fails_with(&strs(&args), &said);
    }
    let mut args = quick_train(&out, &[]);
    args.truncate(args.len() - 2);
    assert_eq!(args.last().unwrap(), "3", "{args:?}");
    args.extend(["--data".to_string(), "folder:.".to_string()]);
    fails_with_in(&dir, &strs(&args), &said);
    for made in ["run", "missing", "runs"] {
        assert!(!dir.join(made).exists(), "{made} was made");
    }
    // Scored on data of other classes, it is refused by their counts, before any scoring.
    let ckpt = out.join("checkpoint.safetensors");
    let c = ckpt.to_str().unwrap();
    fails_with(
        &[
            "eval",
            "--checkpoint",
            c,
            "--data",
            "digits",
            "--no-shift",
            "--no-ood",
            "-q",
        ],
        &[
            "has 2 classes",
            "(digits/test) has 10",
            "the classes it was trained on",
        ],
    );
    // The same images with a class folder renamed: the count is the same, and `Dogs` sorts
    // before `cats`, so every label would be scored against the other class's output.
    let renamed = temp_dir("folder-renamed");
    write_cats_and_dogs(&renamed);
    std::fs::rename(renamed.join("dogs"), renamed.join("Dogs")).unwrap();
    let arg = format!("folder:{}", renamed.display());
    let args = [
        "eval",
        "--checkpoint",
        c,
        "--data",
        &arg,
        "--no-shift",
        "-q",
    ];
    fails_with(
        &args,
        &[
            "was trained on other classes than",
            "class 0 is `cats` there and `Dogs` here (and 1 more)",
        ],
    );
}

/// A held-out class is named as the run starts: the number counts in the folder's byte order,
/// where `10` comes before `2`; a grey model says colour is lost, and a file the data leaves
/// out is named.
#[test]
fn a_held_out_class_is_named_by_its_folder() {
    let dir = temp_dir("holdout-named");
    write_classes(&dir, &["0", "1", "10", "2"], 10, 0);
    // A class of one image, none of it in the test part: held out all the same.
    std::fs::create_dir_all(dir.join("3")).unwrap();
    write_png(&dir.join("3").join("0.png"), 12, 10, 77);
    std::fs::write(dir.join("1").join("x.gif"), b"GIF89a\x01\x00\x01\x00").unwrap();
    let out = temp_dir("holdout-named-run");
    let arg = format!("folder:{}", dir.display());
    let mut args = quick_train(&out, &["--data", &arg, "--holdout-classes", "4,2"]);
    args.retain(|a| a != "-q");
    let (ok, _, stderr) = loren(&strs(&args));
    assert!(ok, "{stderr}");
    for needle in [
        ": holding out classes 2 (`10`), 4 (`3`) of 5, never trained on and not scored (--no-ood)",
        "images are read in grey and resized to the config's 8x8",
        "passed over 1 file that it does not read: 1/x.gif (a GIF image)",
    ] {
        assert!(stderr.contains(needle), "no `{needle}` in:\n{stderr}");
    }
}

/// `--holdout-classes` takes a class by name too; the checkpoint records it by number, and
/// `eval` holds a name to the same class.
#[test]
fn a_held_out_class_can_be_given_by_name() {
    let dir = temp_dir("holdout-by-name");
    write_classes(&dir, &["cat", "dog", "emu", "fox"], 10, 0);
    let out = temp_dir("holdout-by-name-run");
    let arg = format!("folder:{}", dir.display());
    let mut args = quick_train(&out, &["--data", &arg, "--holdout-classes", "emu,0"]);
    args.retain(|a| a != "-q");
    let (ok, _, stderr) = loren(&strs(&args));
    assert!(ok, "{stderr}");
    let needle = ": holding out classes 0 (`cat`), 2 (`emu`) of 4";
    assert!(stderr.contains(needle), "no `{needle}` in:\n{stderr}");
    let ckpt = out.join("checkpoint.safetensors");
    eval_ok(&ckpt, &["--holdout-classes", "cat,emu"]);
    let c = ckpt.to_str().unwrap();
    let eval = |classes| {
        [
            "eval",
            "--checkpoint",
            c,
            "--holdout-classes",
            classes,
            "-q",
        ]
    };
    fails_with(
        &eval("dog,emu"),
        &[
            "--holdout-classes dog,emu: ",
            "was trained holding out classes 0,2",
        ],
    );
    fails_with(
        &eval("yak"),
        &[
            "--holdout-classes yak: ",
            "has no class of that name; its classes are cat, dog, emu, fox",
        ],
    );
    let (ok, _, stderr) = loren(&eval("cat,,emu"));
    assert!(!ok && stderr.contains("an empty class"), "{stderr}");
}

/// A class too small for the split to put any image in the test or validation part is named:
/// it goes unmeasured there.
#[test]
fn a_class_too_small_to_score_is_named() {
    let dir = temp_dir("thin-class");
    write_cats_and_dogs(&dir);
    for i in 3..10 {
        std::fs::remove_file(dir.join("dogs").join(format!("{i}.png"))).unwrap();
    }
    let out = temp_dir("thin-class-run");
    let arg = format!("folder:{}", dir.display());
    let mut args = quick_train(&out, &["--data", &arg]);
    args.retain(|a| a != "-q");
    let (ok, _, stderr) = loren(&strs(&args));
    assert!(ok, "{stderr}");
    let needle = "too few images to have any in the validation part, so unscored there: class \
        `dogs` (3 images)";
    assert!(stderr.contains(needle), "no `{needle}` in:\n{stderr}");
    assert!(!stderr.contains("class `cats`"), "{stderr}");
}

/// `eval --all-images` scores every image of a folder held apart from training, with the
/// temperature fitted on the training data's validation part; the training folder itself, or
/// data other than a folder, is refused.
#[test]
fn eval_scores_every_image_of_a_held_apart_folder() {
    let dir = temp_dir("all-images");
    let (data, held) = (dir.join("data"), dir.join("held"));
    write_cats_and_dogs(&data);
    write_classes(&held, &["cats", "dogs"], 6, 40);
    let out = dir.join("run");
    let folder = |d: &Path| format!("folder:{}", d.display());
    run_ok(&strs(&quick_train(&out, &["--data", &folder(&data)])));
    let (run, scored) = (out.to_str().unwrap(), dir.join("scored"));
    let eval = |data: &str| {
        let to = scored.to_str().unwrap();
        let args = [
            "eval",
            "--checkpoint",
            run,
            "--data",
            data,
            "--all-images",
            "--out",
            to,
        ];
        loren(&[&args[..], &["--no-shift", "--no-ood"]].concat())
    };
    let (ok, stdout, stderr) = eval(&folder(&held));
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("on every image of held (12 images)"),
        "{stdout}"
    );
    let written = std::fs::read_to_string(scored.join("eval.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&written).unwrap();
    assert_eq!(json["test_set"], "every image of held");
    assert_eq!(json["test"]["samples"], 12);
    assert!(json["tempered"].is_object(), "no temperature: {written}");
    let (ok, _, stderr) = eval(&folder(&data));
    assert!(
        !ok && stderr.contains("every image of it holds those it trained on"),
        "{stderr}"
    );
    let (ok, _, stderr) = eval("digits");
    assert!(
        !ok && stderr.contains("--all-images scores an image folder"),
        "{stderr}"
    );
}

/// `--all-images` feeds the folder's images as the checkpoint's data was fed: the digits' test
/// split written as 8-bit grey PNGs scores as the digits' own test split does (it was scaled by
/// ImageNet's statistics, not the digits' 0.5 and 0.5, and lost a third of its accuracy).
#[test]
fn every_image_of_a_folder_is_scaled_as_the_training_data() {
    use loren_nn::data::{SplitOptions, bundled_digits, split_digits};
    let dir = temp_dir("all-images-scaled");
    let test = split_digits(&bundled_digits().unwrap(), &SplitOptions::default())
        .unwrap()
        .test;
    for (i, &label) in test.labels.iter().enumerate() {
        let class = dir.join("pngs").join(label.to_string());
        std::fs::create_dir_all(&class).unwrap();
        let grey: Vec<u8> = test
            .image(i)
            .iter()
            .map(|v| (v * 255.0).round() as u8)
            .collect();
        let file = std::fs::File::create(class.join(format!("{i}.png"))).unwrap();
        let mut enc = png::Encoder::new(std::io::BufWriter::new(file), 8, 8);
        enc.set_color(png::ColorType::Grayscale);
        enc.set_depth(png::BitDepth::Eight);
        enc.write_header().unwrap().write_image_data(&grey).unwrap();
    }
    let out = dir.join("run");
    run_ok(&strs(&quick_train(&out, &[])));
    let run = out.to_str().unwrap();
    let accuracy = |extra: &[&str], to: &str| {
        let to = dir.join(to);
        let args = [
            "eval",
            "--checkpoint",
            run,
            "--no-shift",
            "--no-ood",
            "-q",
            "--out",
        ];
        run_ok(&[&args[..], &[to.to_str().unwrap()], extra].concat());
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(to.join("eval.json")).unwrap()).unwrap();
        json["test"]["accuracy"].as_f64().unwrap()
    };
    let own = accuracy(&[], "own");
    let pngs = format!("folder:{}", dir.join("pngs").display());
    let folder = accuracy(&["--data", &pngs, "--all-images"], "folder");
    // The bytes round each sixteenth of a level to the nearest 255th: an image may tip.
    assert!(
        (own - folder).abs() <= 2.0 / 359.0,
        "own {own}, folder {folder}"
    );
}

/// A folder changed since training is scored with a warning: its split moved images between
/// the parts, so its test part may hold images the model trained on.
#[test]
fn eval_warns_when_the_data_changed_since_training() {
    let dir = temp_dir("eval-changed");
    let data = dir.join("data");
    write_cats_and_dogs(&data);
    let out = dir.join("run");
    let arg = format!("folder:{}", data.display());
    run_ok(&strs(&quick_train(&out, &["--data", &arg])));
    // An export keeps the record of the images it trained on.
    let export = dir.join("export.safetensors");
    let (run, exported) = (out.to_str().unwrap(), export.to_str().unwrap());
    run_ok(&["export", "--checkpoint", run, "--out", exported]);
    let eval = |model: &str, to: &str| {
        let scored = dir.join(to);
        let args = [
            "eval",
            "--checkpoint",
            model,
            "--out",
            scored.to_str().unwrap(),
            "-q",
        ];
        let (ok, _, stderr) = loren(&args);
        assert!(ok, "{stderr}");
        stderr
    };
    let unchanged = eval(run, "first");
    assert!(!unchanged.contains("warning"), "{unchanged}");
    write_png(&data.join("dogs").join("10.png"), 12, 10, 99);
    for changed in [eval(run, "second"), eval(exported, "third")] {
        for needle in [
            "eval: warning: folder:",
            "has changed since",
            "its split held 20 images and now holds 21",
            "may hold images the model trained on",
        ] {
            assert!(changed.contains(needle), "no `{needle}` in:\n{changed}");
        }
    }
    // As many images, another labelled otherwise: told as such.
    std::fs::remove_file(data.join("dogs").join("10.png")).unwrap();
    std::fs::rename(
        data.join("dogs").join("9.png"),
        data.join("cats").join("10.png"),
    )
    .unwrap();
    let relabelled = eval(run, "fourth");
    let needle = "its split holds as many images (20), in other parts";
    assert!(
        relabelled.contains(needle),
        "no `{needle}` in:\n{relabelled}"
    );
}

/// Class folders named by numbers are names too: a folder of classes 1 and 2 is refused for a
/// checkpoint of classes 0 and 1 (numbered names were once taken for made-up ones, unchecked).
#[test]
fn numbered_class_folders_are_checked_by_name() {
    let dir = temp_dir("numbered-classes");
    let (trained, other) = (dir.join("a"), dir.join("b"));
    write_classes(&trained, &["0", "1"], 10, 0);
    write_classes(&other, &["1", "2"], 10, 0);
    let out = dir.join("run");
    run_ok(&strs(&quick_train(
        &out,
        &["--data", &format!("folder:{}", trained.display())],
    )));
    let scored = dir.join("scored");
    let data = format!("folder:{}", other.display());
    let run = out.to_str().unwrap();
    let args = [
        "eval",
        "--checkpoint",
        run,
        "--data",
        &data,
        "--out",
        scored.to_str().unwrap(),
        "-q",
    ];
    fails_with(&args, &["class 0 is `0` there and `1` here (and 1 more)"]);
}

/// A run resumes on its images at another path (a moved folder), and is refused on other
/// images at that path: the checkpoint records the training split's count and labels.
#[test]
fn a_resumed_run_needs_the_same_training_images_wherever_they_are() {
    let dir = temp_dir("resume-moved");
    let (first, moved, other) = (dir.join("a"), dir.join("b"), dir.join("c"));
    write_cats_and_dogs(&first);
    write_cats_and_dogs(&moved);
    write_cats_and_dogs(&other);
    for i in 10..14 {
        write_png(&other.join("dogs").join(format!("{i}.png")), 12, 10, 50 + i);
    }
    let out = dir.join("run");
    let arg = |d: &Path| format!("folder:{}", d.display());
    run_ok(&strs(&quick_train(&out, &["--data", &arg(&first)])));
    let resume = |data: &Path, to: &str| {
        let (o, d) = (dir.join(to), arg(data));
        let o = o.to_str().unwrap().to_string();
        let r = out.to_str().unwrap().to_string();
        let args = [
            "train", "--resume", &r, "--epochs", "2", "--data", &d, "--out", &o,
        ];
        args.map(String::from).to_vec()
    };
    let (ok, _, err) = loren(&strs(&resume(&moved, "moved")));
    assert!(ok && err.contains("taken to be the same data"), "{err}");
    // Gone from where the checkpoint saw it: the error names the checkpoint the path came from,
    // and the flag that points at the new place, not a flag this command line never gave.
    let gone = dir.join("gone");
    std::fs::rename(&first, &gone).unwrap();
    let ckpt = out.join("checkpoint.safetensors");
    let said = format!(
        "--data {}, as {} saved it (if it moved, give --data with its new place): ",
        arg(&first),
        ckpt.display()
    );
    let (r, to) = (out.to_str().unwrap(), dir.join("gone-run"));
    let to = to.to_str().unwrap();
    let args = ["train", "--resume", r, "--epochs", "2", "--out", to];
    fails_with(&args, &[&said, "cannot read"]);
    let args = ["eval", "--checkpoint", r, "--no-shift", "--no-ood", "-q"];
    fails_with(&args, &[&said, "cannot read"]);
    // Named on the command line, it is the user's --data, not the checkpoint's.
    let given = ["--data", &arg(&first)];
    for args in [
        strs(&resume(&first, "given")),
        [&args[..], &given[..]].concat(),
    ] {
        let (ok, _, err) = loren(&args);
        assert!(!ok && err.contains("cannot read"), "{err}");
        assert!(!err.contains("saved it"), "{err}");
    }
    std::fs::rename(&gone, &first).unwrap();
    // There, with a file in it that cannot be read: that file is the error, with no word of
    // moving the data.
    let cats = first.join("cats");
    let png = std::fs::read_dir(&cats)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let whole = std::fs::read(&png).unwrap();
    std::fs::write(&png, &whole[..whole.len() / 2]).unwrap();
    let (ok, _, err) = loren(&args);
    assert!(!ok && err.contains("cannot decode the image"), "{err}");
    assert!(!err.contains("if it moved"), "{err}");
    std::fs::write(&png, whole).unwrap();
    fails_with(
        &strs(&resume(&other, "other")),
        &[
            "trained on a training split of",
            "resume with the same data",
        ],
    );
    // A checkpoint from before the training images were recorded: the same kind of data at
    // another path is still taken with a note, but another kind is refused by its name.
    let old = dir.join("old");
    std::fs::create_dir_all(&old).unwrap();
    let file = TensorFile::read(&out.join("checkpoint.safetensors")).unwrap();
    let tensors = all_tensors(&file);
    let mut meta = file.metadata().clone();
    assert!(meta.remove("training_images").is_some());
    checkpoint::write(&old.join("checkpoint.safetensors"), &tensors, meta).unwrap();
    let resume_old = |data: &str, to: &str| {
        let (o, r) = (dir.join(to), old.to_str().unwrap().to_string());
        let args = [
            "train",
            "--resume",
            &r,
            "--epochs",
            "2",
            "--data",
            data,
            "--out",
            o.to_str().unwrap(),
        ];
        args.map(String::from).to_vec()
    };
    let (ok, _, err) = loren(&strs(&resume_old(&arg(&moved), "old-moved")));
    assert!(ok && err.contains("taken to be the same data"), "{err}");
    fails_with(
        &strs(&resume_old("digits", "old-digits")),
        &[
            "with data 'folder:",
            "not 'digits'",
            "resume with the same data",
        ],
    );
}

/// `--ood-data` scores OOD detection against other datasets, each brought to the model: CIFAR's
/// 32×32 colour test images for the 8×8 grey digits model, and the digits' own test split,
/// which no score can tell from itself (AUROC 0.5: every image ties with its copy). `eval`
/// takes the flag too.
#[test]
fn ood_data_scores_detection_against_other_datasets() {
    let dir = temp_dir("ood-data");
    write_cifar10(&dir);
    // Only the test file is read: the training files need not be there.
    for f in 1..=5 {
        std::fs::remove_file(dir.join(format!("data_batch_{f}.bin"))).unwrap();
    }
    let cifar = format!("cifar10:{}", dir.display());
    // An image folder's test part: a fifth of each class's 10 images.
    let photos = dir.join("photos");
    write_cats_and_dogs(&photos);
    let folder = format!("folder:{}", photos.display());
    // A folder of images without classes: every one of them.
    let loose = dir.join("loose");
    std::fs::create_dir_all(&loose).unwrap();
    for i in 0..7 {
        write_png(&loose.join(format!("{i}.png")), 12, 10, 60 + i);
    }
    let unlabelled = format!("folder:{}", loose.display());
    let out = dir.join("run");
    let args = [
        "--ood-data",
        &cifar,
        "--ood-data",
        "digits",
        "--ood-data",
        &folder,
        "--ood-data",
        &unlabelled,
    ];
    let mut train = quick_train(&out, &args);
    train.retain(|a| a != "--no-ood");
    let printed = run_ok(&strs(&train));
    assert!(
        printed.contains("OOD detection against the cifar10 test split (359 in, 20 out;"),
        "{printed}"
    );
    let report = report_json(&out);
    let sets = report["report"]["ood_sets"].as_array().unwrap();
    let names: Vec<&str> = sets
        .iter()
        .map(|s| s["dataset"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["cifar10/test", "digits/test", "photos/test", "loose"]
    );
    assert_eq!(sets[2]["ood_samples"], 4);
    assert_eq!(sets[3]["ood_samples"], 7);
    for score in ["max_prob", "entropy", "mutual_information"] {
        assert_eq!(sets[1][score]["auroc"], 0.5, "{score}");
        let auroc = sets[0][score]["auroc"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&auroc), "{score}: {auroc}");
    }
    let printed = eval_ok(&out.join("checkpoint.safetensors"), &["--ood-data", &cifar]);
    assert!(
        printed.contains("against the cifar10 test split"),
        "{printed}"
    );
    // A resume takes the sets from the checkpoint; one gone since is named as saved there.
    std::fs::rename(&loose, dir.join("loose-moved")).unwrap();
    let ckpt = out.join("checkpoint.safetensors");
    let (r, to) = (ckpt.to_str().unwrap(), dir.join("resumed"));
    let args = [
        "train",
        "--resume",
        r,
        "--epochs",
        "2",
        "--out",
        to.to_str().unwrap(),
        "-q",
    ];
    let said = format!(
        "--ood-data {unlabelled}, as {r} saved it (if it moved, give --ood-data with its new place)"
    );
    fails_with(&args, &[&said, "cannot read"]);
}

#[test]
fn bad_datasets_are_named_in_one_line() {
    let dir = temp_dir("bad");
    let out = dir.join("run");
    let missing = format!("cifar10:{}", dir.join("nowhere").display());
    fails_with(
        &strs(&quick_train(&out, &["--data", &missing])),
        &["data_batch_1.bin"],
    );
    let c100 = dir.join("c100");
    std::fs::create_dir_all(&c100).unwrap();
    std::fs::write(c100.join("train.bin"), vec![1u8; 3074 * 2 + 5]).unwrap();
    let arg = format!("cifar100:{}", c100.display());
    fails_with(
        &strs(&quick_train(&out, &["--data", &arg])),
        &["train.bin", "3074-byte", "truncated"],
    );
    std::fs::write(
        c100.join("train.bin"),
        [vec![0u8, 100], vec![0u8; 3072]].concat(),
    )
    .unwrap();
    fails_with(
        &strs(&quick_train(&out, &["--data", &arg])),
        &["train.bin", "label 100"],
    );
    let folder = dir.join("images");
    for class in ["a", "b"] {
        std::fs::create_dir_all(folder.join(class)).unwrap();
        write_png(&folder.join(class).join("ok.png"), 4, 4, 1);
    }
    std::fs::write(
        folder.join("b/broken.jpg"),
        [0xff, 0xd8, 0xff, 0xe0, 1, 2, 3],
    )
    .unwrap();
    let arg = format!("folder:{}", folder.display());
    fails_with(
        &strs(&quick_train(&out, &["--data", &arg])),
        &["broken.jpg", "cannot decode"],
    );
    fails_with(
        &strs(&quick_train(&out, &["--data", "imagenet:/x"])),
        &["unknown dataset", "cifar10:DIR", "folder:DIR"],
    );
}

#[test]
fn real_data_needs_imported_weights() {
    let dir = temp_dir("weights");
    write_cifar10(&dir);
    let arg = format!("cifar10:{}", dir.display());
    let out = dir.join("run");
    fails_with(
        &strs(&quick_train(
            &out,
            &["--data", &arg, "--config", "vit-b-32"],
        )),
        &["no pretrained backbone for 'vit-b-32'", "--backbone"],
    );
    let (ok, _, err) = loren(&["pretrain", "--data", &arg]);
    assert!(!ok && err.contains("--data"), "{err}");
}
