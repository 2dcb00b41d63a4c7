//! Replays the worker-protocol fuzz corpus, so fuzz findings stay fixed under `cargo test`.

#[test]
fn protocol_corpus_replays_without_panic() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/worker_protocol");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("fuzz corpus dir") {
        atelier_workers::protocol::fuzz_stream(&std::fs::read(entry.unwrap().path()).unwrap());
        n += 1;
    }
    assert!(n >= 4, "the corpus has its seeds");
}
