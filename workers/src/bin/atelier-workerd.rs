//! A stand-in for the `atelier` binary's hidden subcommands, so the workers crate can test
//! real worker processes without the server: `atelier-workerd __trampoline ...` and
//! `atelier-workerd __worker ...`.

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let code = match args.first().map(String::as_str) {
        Some("__trampoline") => atelier_workers::trampoline_main(&args[1..]),
        Some("__worker") => atelier_workers::worker_main(&args[1..]),
        _ => {
            eprintln!("usage: atelier-workerd __trampoline ... | __worker ...");
            2
        }
    };
    std::process::exit(code);
}
