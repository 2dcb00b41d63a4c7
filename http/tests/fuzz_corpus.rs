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
    // The target reaches the routes behind auth and the store: a seed creates a commission.
    let create = std::fs::read(dir.join("raw-create")).expect("the raw-create seed");
    let answer = atelier_http::fuzz_exchange(&create);
    assert!(answer.starts_with(b"HTTP/1.1 201 "), "{:?}", String::from_utf8_lossy(&answer));
    if let Some(dir) = atelier_http::fuzz_scratch_dir() {
        let _ = std::fs::remove_dir_all(dir);
    }
}
