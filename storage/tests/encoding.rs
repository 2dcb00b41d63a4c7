//! The on-disk format, pinned: the encoded bytes of one event of every kind, a snapshot's
//! encoding, and a recorded history (tests/fixtures) that must keep replaying to the same
//! snapshot. Any format change shows up here as a snapshot diff. Also replays the fuzz corpus.

mod common;

use atelier_engine::{Envelope, Event, EventKind};
use atelier_storage::{check, codec, EventStore, SledStore, StoreConfig};
use common::{one_of_each, temp_dir};

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn encoded_bytes_of_every_event_kind() {
    let events = one_of_each();
    let kinds: Vec<EventKind> = events.iter().map(Event::kind).collect();
    assert_eq!(kinds, EventKind::ALL.to_vec(), "one event of every kind, in order");
    let mut out = String::new();
    for (i, event) in events.into_iter().enumerate() {
        let env = Envelope {
            seq: i as u64 + 1,
            commission_id: 7,
            version: i as u64 + 1,
            at: 1_795_964_430_123,
            event,
        };
        let bytes = codec::encode(&env);
        let back: Envelope = codec::decode(&bytes).unwrap();
        assert_eq!(back, env);
        out.push_str(&format!("{}: {}\n", env.event.kind().as_str(), hex(&bytes)));
    }
    insta::assert_snapshot!(out);
}

#[test]
fn framed_record_layout() {
    let env = Envelope { seq: 1, commission_id: 1, version: 1, at: 0, event: Event::RetryDue };
    let (record, chain) = codec::frame_record(1, 0, &codec::encode(&env));
    insta::assert_snapshot!(format!("{} chain={chain:08x}", hex(&record)));
}

/// A group commit of two records is one log value: `[2][count][len][record][len][record]`.
#[test]
fn framed_block_layout() {
    let mut chain = 0;
    let records: Vec<Vec<u8>> = [Event::RetryDue, Event::CancelRequested]
        .into_iter()
        .enumerate()
        .map(|(i, event)| {
            let seq = 7 + i as u64;
            let env = Envelope { seq, commission_id: 1, version: 1 + i as u64, at: 0, event };
            let (record, next) = codec::frame_record(seq, chain, &codec::encode(&env));
            chain = next;
            record
        })
        .collect();
    let block = codec::frame_block(&records);
    let ranges = codec::split_block(&block).unwrap();
    assert_eq!(ranges.iter().map(|r| block[r.clone()].to_vec()).collect::<Vec<_>>(), records);
    assert_eq!(codec::frame_block(&records[..1]), records[0], "a single record is stored bare");
    insta::assert_snapshot!(hex(&block));
}

fn fixture_path() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/history-v1.jsonl")
}

/// The fixture was recorded by an earlier build; it must replay to the same snapshots forever.
#[test]
fn recorded_history_replays_to_the_same_snapshots() {
    let text = std::fs::read_to_string(fixture_path()).expect("tests/fixtures/history-v1.jsonl");
    let dir = temp_dir("fixture");
    let store = SledStore::open(StoreConfig::new(dir.path())).unwrap();
    let n = check::import(&*store, &mut text.as_bytes()).unwrap();
    assert!(n >= 20, "the fixture covers a full run, a retry and a cancel");
    let report = check::replay_check(&store).unwrap();
    assert!(report.diff.is_empty(), "{:?}", report.diff);
    let snapshots: Vec<_> =
        (1..=3).map(|id| store.commission(id).unwrap().expect("fixture commission")).collect();
    insta::assert_json_snapshot!(snapshots);
    let snap = &snapshots[0];
    let bytes = codec::encode(snap);
    insta::assert_snapshot!("snapshot_encoding", hex(&bytes));
}

#[test]
fn fuzz_corpus_replays() {
    for target in ["codec"] {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus").join(target);
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).expect("fuzz corpus dir") {
            let data = std::fs::read(entry.unwrap().path()).unwrap();
            codec::fuzz_one(&data);
            n += 1;
        }
        assert!(n > 0, "empty corpus for {target}");
    }
}

/// A string length near 2^62 in a value's bytes made bincode allocate for it before reading
/// a byte of it: the process aborted on the allocation (found by fuzzing the codec). Now the
/// claim is refused against the decode limit and the value is undecodable.
#[test]
fn a_length_that_claims_exabytes_is_an_error_not_an_abort() {
    let data = std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fuzz/corpus/codec/regression-length-claims-exabytes"),
    )
    .expect("the regression input");
    let got = codec::decode::<Envelope>(&data);
    assert!(matches!(got, Err(codec::CodecError::Decode(_))), "{got:?}");
    codec::fuzz_one(&data);
}

/// A block holding one empty record passed the framing check, but a block of one record is
/// stored bare, so it did not read back as one record (found by fuzzing the codec). Each
/// record of a block must now be a whole record of the record format.
#[test]
fn a_block_of_records_that_are_not_records_is_refused() {
    assert_eq!(codec::split_block(&[2, 1, 0, 0, 0, 0, 0, 0, 0]), Err(codec::CodecError::Truncated));
    let mut nested = vec![2, 1, 0, 0, 0, 11, 0, 0, 0];
    nested.extend_from_slice(&[2, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(codec::split_block(&nested), Err(codec::CodecError::UnknownVersion(2)));
}
