//! The one place that turns values into bytes and back.
//!
//! Every encoded value starts with a format-version byte so that a future encoding can live
//! beside this one (old logs stay readable forever). Values are bincode 2 (serde, standard
//! config: little-endian varints), pinned at =2.0.1 because 3.0.0 is an empty release.
//!
//! A log record adds integrity: `[version][flags][crc32 of payload][chain][payload]`, where
//! `chain = crc32(previous chain ++ seq ++ crc)`: a hash chain over the whole log, so a record
//! that was altered, dropped or reordered is caught, not only a flipped bit.
//!
//! A log value is either one record (it starts with [`FORMAT_VERSION`], as every value of
//! schema 1 does) or a block of consecutive records from one group commit:
//! `[BLOCK_VERSION][count u32 LE]` then `count` times `[len u32 LE][record]`, keyed by the seq
//! of its first record. One sled value per group commit instead of one per event: sled's
//! per-item cost (node deltas, splits, cache metadata) is paid once per batch.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// The encoding written today.
pub const FORMAT_VERSION: u8 = 1;
/// Bytes before a record's payload.
pub const RECORD_HEADER_BYTES: usize = 1 + 1 + 4 + 4;
/// Record flag: the payload was pruned by retention; crc and chain are kept.
pub const FLAG_PRUNED: u8 = 1;
/// The first byte of a log value that holds a block of records (schema 2 on).
pub const BLOCK_VERSION: u8 = 2;
/// Bytes before a block's first record.
pub const BLOCK_HEADER_BYTES: usize = 1 + 4;
/// Bytes before each record inside a block.
pub const BLOCK_RECORD_PREFIX_BYTES: usize = 4;
/// Records in one block at most. Bounds what a point read decodes around the record it wants.
pub const BLOCK_RECORDS_MAX: usize = 512;
/// A block is closed once its records reach this many bytes (a single larger record still
/// gets a block of its own).
pub const BLOCK_BYTES_TARGET: usize = 32 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CodecError {
    Empty,
    UnknownVersion(u8),
    Truncated,
    Checksum { stored: u32, computed: u32 },
    Decode(String),
}

impl std::fmt::Display for CodecError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CodecError::Empty => write!(f, "empty value"),
            CodecError::UnknownVersion(v) => write!(f, "unknown format version {v}"),
            CodecError::Truncated => write!(f, "truncated record"),
            CodecError::Checksum { stored, computed } => {
                write!(f, "checksum mismatch (stored {stored:08x}, computed {computed:08x})")
            }
            CodecError::Decode(e) => write!(f, "undecodable: {e}"),
        }
    }
}

impl std::error::Error for CodecError {}

/// Bytes a decoded value may claim at most. bincode reads a container's length before its
/// items and, with no limit, allocates for that length at once: a few hostile bytes in a data
/// dir would abort the process on a multi-exabyte allocation. Every value the store writes
/// (an event, a snapshot, a job) is far below this.
pub const DECODED_BYTES_MAX: usize = 16 * 1024 * 1024;

fn config() -> bincode::config::Configuration {
    bincode::config::standard()
}

fn decode_config() -> bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<DECODED_BYTES_MAX>,
> {
    config().with_limit::<DECODED_BYTES_MAX>()
}

/// Encodes a value with its format-version byte.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    out.push(FORMAT_VERSION);
    bincode::serde::encode_into_std_write(value, &mut out, config())
        .expect("invariant: encoding into a Vec cannot fail");
    out
}

/// Decodes a value written by [`encode`]. Trailing bytes are an error, not ignored.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    let (&version, body) = bytes.split_first().ok_or(CodecError::Empty)?;
    if version != FORMAT_VERSION {
        return Err(CodecError::UnknownVersion(version));
    }
    let (value, used) = bincode::serde::decode_from_slice(body, decode_config())
        .map_err(|e| CodecError::Decode(e.to_string()))?;
    if used != body.len() {
        return Err(CodecError::Decode(format!("{} trailing bytes", body.len() - used)));
    }
    Ok(value)
}

/// The integrity fields of one log record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    pub flags: u8,
    pub crc: u32,
    pub chain: u32,
}

pub fn chain_next(prev_chain: u32, seq: u64, crc: u32) -> u32 {
    let mut h = crc32fast::Hasher::new_with_initial(prev_chain);
    h.update(&seq.to_be_bytes());
    h.update(&crc.to_le_bytes());
    h.finalize()
}

/// Frames an encoded payload (from [`encode`]) as a log record following `prev_chain`.
pub fn frame_record(seq: u64, prev_chain: u32, payload: &[u8]) -> (Vec<u8>, u32) {
    let crc = crc32fast::hash(payload);
    let chain = chain_next(prev_chain, seq, crc);
    let mut out = Vec::with_capacity(RECORD_HEADER_BYTES + payload.len());
    out.push(FORMAT_VERSION);
    out.push(0);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(&chain.to_le_bytes());
    out.extend_from_slice(payload);
    (out, chain)
}

/// A pruned record for `seq` whose content is not known (an export skips pruned records; an
/// import puts these in their place, so that the log stays gap-free and chained).
pub fn frame_pruned(seq: u64, prev_chain: u32) -> (Vec<u8>, u32) {
    let (record, chain) = frame_record(seq, prev_chain, &[]);
    let mut out = record;
    out[1] = FLAG_PRUNED;
    (out, chain)
}

/// The same record with its payload dropped (retention).
pub fn prune_record(record: &[u8]) -> Result<Vec<u8>, CodecError> {
    let (header, _) = split_record(record)?;
    let mut out = Vec::with_capacity(RECORD_HEADER_BYTES);
    out.push(FORMAT_VERSION);
    out.push(FLAG_PRUNED);
    out.extend_from_slice(&header.crc.to_le_bytes());
    out.extend_from_slice(&header.chain.to_le_bytes());
    Ok(out)
}

/// Splits a record into its header and payload, checking the payload's crc (unless pruned).
pub fn split_record(record: &[u8]) -> Result<(RecordHeader, &[u8]), CodecError> {
    if record.len() < RECORD_HEADER_BYTES {
        return Err(CodecError::Truncated);
    }
    if record[0] != FORMAT_VERSION {
        return Err(CodecError::UnknownVersion(record[0]));
    }
    let flags = record[1];
    let crc = u32::from_le_bytes(record[2..6].try_into().expect("invariant: 4 bytes"));
    let chain = u32::from_le_bytes(record[6..10].try_into().expect("invariant: 4 bytes"));
    let payload = &record[RECORD_HEADER_BYTES..];
    if flags & FLAG_PRUNED == 0 {
        let computed = crc32fast::hash(payload);
        if computed != crc {
            return Err(CodecError::Checksum { stored: crc, computed });
        }
    } else if !payload.is_empty() {
        return Err(CodecError::Decode("pruned record with a payload".into()));
    }
    Ok((RecordHeader { flags, crc, chain }, payload))
}

/// Frames consecutive records (from [`frame_record`]) as one log value. A single record is
/// stored bare, as schema 1 stored every record.
pub fn frame_block(records: &[Vec<u8>]) -> Vec<u8> {
    assert!(
        !records.is_empty() && records.len() <= BLOCK_RECORDS_MAX,
        "invariant: a block holds 1..=BLOCK_RECORDS_MAX records"
    );
    if let [one] = records {
        return one.clone();
    }
    let bytes: usize = records.iter().map(|r| BLOCK_RECORD_PREFIX_BYTES + r.len()).sum();
    let mut out = Vec::with_capacity(BLOCK_HEADER_BYTES + bytes);
    out.push(BLOCK_VERSION);
    out.extend_from_slice(&(records.len() as u32).to_le_bytes());
    for r in records {
        out.extend_from_slice(&(r.len() as u32).to_le_bytes());
        out.extend_from_slice(r);
    }
    out
}

/// Where each record of a log value lies: one range for a bare record, one per record of a
/// block. Checks only the framing; each record's own checks are [`split_record`]'s.
pub fn split_block(value: &[u8]) -> Result<Vec<std::ops::Range<usize>>, CodecError> {
    match value.first() {
        None => Err(CodecError::Empty),
        // One range: the whole value is one record (a list, like a block's).
        #[allow(clippy::single_range_in_vec_init)]
        Some(&FORMAT_VERSION) => Ok(vec![0..value.len()]),
        Some(&BLOCK_VERSION) => {
            let count = value.get(1..BLOCK_HEADER_BYTES).ok_or(CodecError::Truncated)?;
            let count = u32::from_le_bytes(count.try_into().expect("invariant: 4 bytes")) as usize;
            if count == 0 || count > BLOCK_RECORDS_MAX {
                return Err(CodecError::Decode(format!("a block of {count} records")));
            }
            let mut out = Vec::with_capacity(count);
            let mut at = BLOCK_HEADER_BYTES;
            for _ in 0..count {
                let len = value.get(at..at + BLOCK_RECORD_PREFIX_BYTES).ok_or(CodecError::Truncated)?;
                let len = u32::from_le_bytes(len.try_into().expect("invariant: 4 bytes")) as usize;
                at += BLOCK_RECORD_PREFIX_BYTES;
                let end = at.checked_add(len).filter(|&e| e <= value.len()).ok_or(CodecError::Truncated)?;
                // Each record is a whole one (a block of one record is stored bare, so a
                // shorter or nested one would not read back as what it claims to be).
                if len < RECORD_HEADER_BYTES {
                    return Err(CodecError::Truncated);
                }
                if value[at] != FORMAT_VERSION {
                    return Err(CodecError::UnknownVersion(value[at]));
                }
                out.push(at..end);
                at = end;
            }
            if at != value.len() {
                return Err(CodecError::Decode(format!(
                    "{} bytes after the block's last record",
                    value.len() - at
                )));
            }
            Ok(out)
        }
        Some(&v) => Err(CodecError::UnknownVersion(v)),
    }
}

/// The codec fuzz target's body (also run over the stored corpus by `cargo test`): decoding
/// arbitrary bytes never panics, and whatever decodes encodes back to the same value.
#[doc(hidden)]
pub fn fuzz_one(data: &[u8]) {
    use atelier_engine::{Commission, Envelope};
    if let Ok(env) = decode::<Envelope>(data) {
        let again: Envelope = decode(&encode(&env)).expect("a decoded envelope re-decodes");
        assert_eq!(again, env);
    }
    if let Ok(c) = decode::<Commission>(data) {
        let again: Commission = decode(&encode(&c)).expect("a decoded snapshot re-decodes");
        assert_eq!(again, c);
    }
    if let Ok((header, payload)) = split_record(data) {
        let (framed, chain) = frame_record(1, 0, payload);
        assert_eq!(split_record(&framed).map(|(h, p)| (h.chain, p.to_vec())), Ok((chain, payload.to_vec())));
        let _ = header;
    }
    if let Ok(ranges) = split_block(data) {
        let records: Vec<Vec<u8>> = ranges.iter().map(|r| data[r.clone()].to_vec()).collect();
        let again = frame_block(&records);
        assert_eq!(split_block(&again).map(|r| r.len()), Ok(records.len()));
        if records.len() > 1 {
            assert_eq!(again, data, "a block re-frames to the same bytes");
        }
    }
}
