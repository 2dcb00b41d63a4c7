//! Stamps the worker interface: a hash of every source file that runs inside a worker
//! process or shapes what the server and a worker program say to each other (trampoline
//! arguments, job input, pipeline file, line protocol, engine types). A server and a worker
//! program built from different sources of these carry different stamps, and the server
//! refuses the worker program (src/program.rs). The server's own side (scheduler, executors,
//! facade) is left out, so changing it does not make every built worker program stale.

use std::path::{Path, PathBuf};

fn main() {
    // `src/inside/`: the trampoline, the worker, the pipeline and the protocol (and the
    // hidden-mode dispatch); `config.rs`: the pipeline spec a worker reads; `contain.rs`: how
    // a worker spawns a stage's command; the engine: the types on the wire.
    let dirs = ["src/inside", "src/config.rs", "src/contain.rs", "../engine/src"];
    let mut files = Vec::new();
    for dir in dirs {
        println!("cargo:rerun-if-changed={dir}");
        let path = Path::new(dir);
        if path.is_dir() {
            collect(path, &mut files);
        } else {
            files.push(path.to_path_buf());
        }
    }
    files.sort();
    // FNV-1a, 64 bits: stable across Rust versions (std's hashers are not).
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for file in &files {
        let name = file.to_string_lossy();
        let contents = std::fs::read(file).unwrap_or_else(|e| panic!("cannot read {name}: {e}"));
        for byte in name.as_bytes().iter().chain([0u8].iter()).chain(contents.iter()) {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    let version = std::env::var("CARGO_PKG_VERSION").unwrap_or_default();
    println!("cargo:rustc-env=ATELIER_WORKER_INTERFACE={version}+{hash:016x}");
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()));
    for entry in entries {
        let path = entry.unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display())).path();
        if path.is_dir() {
            collect(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}
