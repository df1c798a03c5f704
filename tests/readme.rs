//! The commands the README, `loren --help` and the GPU run's script show still parse: each runnable one is run with
//! `--help` appended, which clap answers only when every flag and value before it is one loren
//! takes (it does not check flags that conflict or are missing), so a renamed or removed flag
//! fails here rather than in a reader's shell; and every flag of the README's synopses
//! (`loren train [--members M] ...`) is one its command's help lists.

use std::path::Path;

mod common;
use common::loren;

/// Whether `cmd` is a command to run rather than a synopsis (`[--members M]`, `<command>`) or a
/// shell pipeline.
fn runnable(cmd: &str) -> bool {
    !["[", "<", "|", "...", "2>"].iter().any(|s| cmd.contains(s))
}

/// The `loren ...` commands in `text`: lines of fenced blocks (a `$ ` prompt and a `# comment`
/// dropped, lines ending in `\` joined to the next) and inline code spans, which may wrap.
fn commands_in_markdown(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut fenced = false;
    let mut joined = String::new();
    for line in text.lines() {
        if line.starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if !fenced {
            continue;
        }
        let line = line.split(" #").next().unwrap_or("").trim();
        let line = line.strip_prefix("$ ").unwrap_or(line);
        match line.strip_suffix('\\') {
            Some(part) => joined += part,
            None => {
                joined += line;
                if joined.starts_with("loren ") {
                    found.push(joined.clone());
                }
                joined.clear();
            }
        }
    }
    let prose: Vec<&str> = text.split("```").step_by(2).collect();
    for part in prose {
        for span in part.split('`').skip(1).step_by(2) {
            let span = span.split_whitespace().collect::<Vec<_>>().join(" ");
            if span.starts_with("loren ") {
                found.push(span);
            }
        }
    }
    found.retain(|c| runnable(c));
    found.sort();
    found.dedup();
    found
}

/// The synopses of the fenced blocks (`loren train [--method ...]` and the indented lines under
/// it): each command with the flags it names.
fn synopses(text: &str) -> Vec<(String, Vec<String>)> {
    let flags = |l: &str| -> Vec<String> {
        l.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
            .filter(|w| w.starts_with("--") && w.len() > 2)
            .map(String::from)
            .collect()
    };
    let mut found: Vec<(String, Vec<String>)> = Vec::new();
    let (mut fenced, mut open) = (false, false);
    for line in text.lines() {
        if line.starts_with("```") {
            (fenced, open) = (!fenced, false);
        } else if let Some(rest) = line.strip_prefix("loren ").filter(|_| fenced) {
            open = !runnable(line);
            if open {
                let command = rest.split_whitespace().next().unwrap_or("").to_string();
                found.push((command, flags(rest)));
            }
        } else if let (true, Some(last)) = (open && line.starts_with(' '), found.last_mut()) {
            last.1.extend(flags(line));
        } else {
            open = false;
        }
    }
    found
}

/// The examples of `loren --help`: each a command, then its explanation after a wide gap.
fn commands_in_help(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|l| !l.starts_with("Examples:"))
        .filter_map(|l| l.trim_start().split("  ").next())
        .filter(|c| c.starts_with("loren ") && runnable(c))
        .map(str::to_string)
        .collect()
}

fn parses(cmd: &str) -> Result<(), String> {
    let mut args: Vec<&str> = cmd.split_whitespace().skip(1).collect();
    args.push("--help");
    let (ok, out, err) = loren(&args);
    match ok && out.contains("Usage: loren") {
        true => Ok(()),
        false => Err(format!("{cmd}\n  {}", err.trim())),
    }
}

#[test]
fn every_command_the_readme_shows_parses() {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README.md");
    let commands = commands_in_markdown(&readme);
    // The paper's command (a fenced block over several lines) and an inline one that wraps.
    for needle in [
        "loren train --config vit-b-32 --backbone vit_b_32.safetensors --data cifar100:",
        "loren bench --device cpu --members 16 --methods lora,explicit --breakdown",
    ] {
        assert!(
            commands.iter().any(|c| c.starts_with(needle)),
            "'{needle}' not found among {commands:#?}"
        );
    }
    let failed: Vec<String> = commands.iter().filter_map(|c| parses(c).err()).collect();
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

#[test]
fn every_flag_of_the_readmes_synopses_is_one_loren_takes() {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README.md");
    let found = synopses(&readme);
    let train = found.iter().find(|(c, _)| c == "train");
    assert!(
        train.is_some_and(|(_, f)| f.iter().any(|f| f == "--train-on-val")),
        "{found:?}"
    );
    assert!(found.len() >= 6, "{found:?}");
    let mut missing = Vec::new();
    for (command, flags) in &found {
        let (ok, help, err) = loren(&[command, "--help"]);
        assert!(ok, "loren {command} --help: {err}");
        for flag in flags {
            let listed = [' ', '\n', ',']
                .iter()
                .any(|end| help.contains(&format!("{flag}{end}")));
            if !listed {
                missing.push(format!("loren {command} {flag}"));
            }
        }
    }
    assert!(missing.is_empty(), "not in the help: {missing:?}");
}

#[test]
fn every_example_in_the_help_parses() {
    let (ok, help, err) = loren(&["--help"]);
    assert!(ok, "{err}");
    let commands = commands_in_help(&help);
    assert!(commands.len() >= 10, "{commands:#?}");
    let failed: Vec<String> = commands.iter().filter_map(|c| parses(c).err()).collect();
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

#[test]
fn a_flag_loren_does_not_take_is_caught() {
    let e = parses("loren train --warmup-from-nowhere").unwrap_err();
    assert!(e.contains("unexpected argument"), "{e}");
    let e = parses("loren bench --members lots").unwrap_err();
    assert!(e.contains("invalid"), "{e}");
}

/// The `loren` commands of the GPU run (`scripts/gpu-run.sh`, run where there is no cargo to
/// catch a renamed flag), each a `$bin/loren ...` line, with its `"$work/..."` paths.
fn commands_in_gpu_run(script: &str) -> Vec<String> {
    script
        .lines()
        .filter_map(|l| l.split_once("$bin/loren "))
        .map(|(_, rest)| {
            let args: Vec<&str> = rest
                .split_whitespace()
                .map(|w| if w.starts_with("\"$") { "DIR" } else { w })
                .collect();
            format!("loren {}", args.join(" "))
        })
        .collect()
}

#[test]
fn every_command_of_the_gpu_run_parses() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/gpu-run.sh");
    let commands = commands_in_gpu_run(&std::fs::read_to_string(script).expect("gpu-run.sh"));
    for needle in [
        "loren train --device cuda",
        "loren compare",
        "loren memprofile",
    ] {
        assert!(
            commands.iter().any(|c| c.starts_with(needle)),
            "'{needle}' not found among {commands:#?}"
        );
    }
    let failed: Vec<String> = commands.iter().filter_map(|c| parses(c).err()).collect();
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}
