//! The `loren` command line: train, evaluate and compare LoRA-Ensembles.

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
