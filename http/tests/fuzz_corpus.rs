//! Replays the request fuzz target's corpus, so fuzz findings stay fixed under `cargo test`.

#[test]
fn request_corpus_replays_without_panic() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/http_request");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("fuzz corpus dir") {
        atelier_http::fuzz_request(&std::fs::read(entry.unwrap().path()).unwrap());
        n += 1;
    }
    assert!(n >= 4, "the corpus has its seeds");
}
