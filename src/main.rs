//! The `loren` command line: train, evaluate and compare LoRA-Ensembles.

mod cli;

fn main() -> std::process::ExitCode {
    // The command runs on a worker of rayon's pool rather than beside it: each parallel section
    // it starts then runs there and on the other workers, where from a thread outside the pool
    // each would wake the workers and put this thread to sleep until they finished (about 2,000
    // context switches a training step on the digits). The main thread's stack size, for the
    // command's own thread.
    let _ = rayon::ThreadPoolBuilder::new()
        .stack_size(8 << 20)
        .build_global();
    rayon::scope(|_| cli::main())
}
