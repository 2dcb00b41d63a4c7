//! The job controller's worker program: `atelier-worker __trampoline ...` and
//! `atelier-worker __worker ...`, the same hidden modes as the `atelier` binary, in a binary
//! small enough (and, built as in the README, statically linked) that starting one per job is
//! cheap. The server uses it when it sits next to the `atelier` binary and runs its own
//! hidden modes otherwise (workers/README.md, "The worker program").

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let code = atelier_workers::run_hidden_mode(&args).unwrap_or_else(|| {
        eprintln!("atelier-worker: the job controller's worker program; it is started by `atelier serve`, not by hand");
        2
    });
    std::process::exit(code);
}
