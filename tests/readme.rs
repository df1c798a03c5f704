//! The commands the README and `loren --help` show still parse: each is run with `--help`
//! appended, which clap answers only when every flag and value before it is one loren takes, so a
//! renamed or removed flag fails here rather than in a reader's shell.

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
