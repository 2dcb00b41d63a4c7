//! The log tree's keys and values: a value is one record or a block of consecutive records,
//! keyed by the seq of its first (see `codec`). This is the only file that turns seqs into
//! sled keys and back, writes log values, or decodes a record into its envelope, so that no
//! caller assumes one sled item per event or knows how a key is spelled.

use std::collections::BTreeMap;
use std::ops::Range;

use atelier_engine::Envelope;

use crate::codec;
use crate::error::StorageError;

/// The sled key of the log value whose first record has this seq: big-endian, so that sled's
/// byte order is seq order.
fn seq_key(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

/// The seq a log key stands for; `None` if it is shorter than 8 bytes.
fn key_seq(key: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(key.get(..8)?.try_into().ok()?))
}

/// Decodes a log record, checking its checksum and, given the previous chain, the chain. A
/// pruned record decodes to `None` (its chain still counts).
pub(crate) fn decode_record(
    seq: u64,
    record: &[u8],
    prev_chain: Option<u32>,
) -> Result<(Option<Envelope>, u32), StorageError> {
    let (header, payload) = codec::split_record(record).map_err(|e| StorageError::undecodable(seq, e))?;
    if let Some(prev) = prev_chain {
        let expected = codec::chain_next(prev, seq, header.crc);
        if expected != header.chain {
            return Err(StorageError::corruption(
                seq,
                "hash chain broken: the record does not follow its predecessor",
            ));
        }
    }
    if header.flags & codec::FLAG_PRUNED != 0 {
        return Ok((None, header.chain));
    }
    let env: Envelope = codec::decode(payload).map_err(|e| StorageError::undecodable(seq, e))?;
    if env.seq != seq {
        return Err(StorageError::corruption(seq, format!("record claims seq {}", env.seq)));
    }
    Ok((Some(env), header.chain))
}

/// The head of the log and the hash chain after it (`(0, 0)` for an empty log), its last
/// record checked.
pub(crate) fn tail(log: &sled::Tree) -> Result<(u64, u32), StorageError> {
    match last_block(log)? {
        None => Ok((0, 0)),
        Some(block) => {
            let seq = block.last();
            let record = block.record(seq).expect("invariant: a block holds its last record");
            let (_, chain) = decode_record(seq, &record, None)?;
            Ok((seq, chain))
        }
    }
}

/// One group commit's records as log values: blocks of consecutive records keyed by the seq
/// of their first, each closed at [`codec::BLOCK_RECORDS_MAX`] records or once it reaches
/// [`codec::BLOCK_BYTES_TARGET`] bytes.
fn blocks(first_seq: u64, records: Vec<Vec<u8>>) -> Vec<([u8; 8], Vec<u8>)> {
    let mut batch = Vec::new();
    let mut first = first_seq;
    let mut chunk: Vec<Vec<u8>> = Vec::new();
    let mut bytes = 0;
    for r in records {
        bytes += r.len();
        chunk.push(r);
        if chunk.len() == codec::BLOCK_RECORDS_MAX || bytes >= codec::BLOCK_BYTES_TARGET {
            batch.push((seq_key(first), codec::frame_block(&chunk)));
            first += chunk.len() as u64;
            chunk.clear();
            bytes = 0;
        }
    }
    if !chunk.is_empty() {
        batch.push((seq_key(first), codec::frame_block(&chunk)));
    }
    batch
}

/// Writes one group commit's framed records, the first of which has seq `first_seq`, whole
/// or not at all. (Not durable yet: the caller flushes and fsyncs.)
pub(crate) fn append(log: &sled::Tree, first_seq: u64, records: Vec<Vec<u8>>) -> Result<(), StorageError> {
    let mut blocks = blocks(first_seq, records);
    match blocks.len() {
        // One value is atomic by itself, and a plain insert spares sled's two IO-buffer
        // writes around a batch manifest.
        1 => {
            let (k, v) = blocks.pop().expect("invariant: one block");
            log.insert(k, v)?;
        }
        // An append that spans blocks must still land whole or not at all.
        _ => {
            let mut batch = sled::Batch::default();
            for (k, v) in blocks {
                batch.insert(&k, v);
            }
            log.apply_batch(batch)?;
        }
    }
    Ok(())
}

/// Replaces the records with these seqs by stubs that keep only checksum and chain
/// (retention), so that the log stays gap-free and verifiable. Each block that holds one of
/// them is rewritten once; a seq not in the log is skipped.
pub(crate) fn prune(log: &sled::Tree, seqs: impl IntoIterator<Item = u64>) -> Result<(), StorageError> {
    let mut rewritten: BTreeMap<u64, Vec<Vec<u8>>> = BTreeMap::new();
    for seq in seqs {
        let Some(block) = block_of(log, seq)? else { continue };
        let records = rewritten.entry(block.first).or_insert_with(|| block.records());
        let i = (seq - block.first) as usize;
        records[i] = codec::prune_record(&records[i]).map_err(|e| StorageError::undecodable(seq, e))?;
    }
    for (first, records) in rewritten {
        log.insert(seq_key(first), codec::frame_block(&records))?;
    }
    Ok(())
}

/// One stored record: a slice of the sled value that holds it (no copy).
pub(crate) struct Record {
    value: sled::IVec,
    range: Range<usize>,
}

impl std::ops::Deref for Record {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.value[self.range.clone()]
    }
}

/// A log value taken apart: the seq of its first record and where each record lies.
struct Block {
    first: u64,
    value: sled::IVec,
    ranges: Vec<Range<usize>>,
}

impl Block {
    fn parse(key: &[u8], value: sled::IVec) -> Result<Block, StorageError> {
        let first = key_seq(key).ok_or_else(|| StorageError::corruption(0, "a log key is not 8 bytes"))?;
        let ranges = codec::split_block(&value).map_err(|e| StorageError::undecodable(first, e))?;
        Ok(Block { first, value, ranges })
    }

    /// The seq of its last record.
    fn last(&self) -> u64 {
        self.first + self.ranges.len() as u64 - 1
    }

    fn record(&self, seq: u64) -> Option<Record> {
        let i = usize::try_from(seq.checked_sub(self.first)?).ok()?;
        self.ranges.get(i).map(|r| Record { value: self.value.clone(), range: r.clone() })
    }

    /// The records themselves, copied (for rewriting the block).
    fn records(&self) -> Vec<Vec<u8>> {
        self.ranges.iter().map(|r| self.value[r.clone()].to_vec()).collect()
    }
}

/// The block that holds `seq`, if any.
fn block_of(log: &sled::Tree, seq: u64) -> Result<Option<Block>, StorageError> {
    match log.range(..=seq_key(seq)).next_back() {
        None => Ok(None),
        Some(item) => {
            let (k, v) = item?;
            let block = Block::parse(&k, v)?;
            Ok((block.last() >= seq).then_some(block))
        }
    }
}

/// The last block of the log.
fn last_block(log: &sled::Tree) -> Result<Option<Block>, StorageError> {
    match log.last()? {
        None => Ok(None),
        Some((k, v)) => Block::parse(&k, v).map(Some),
    }
}

/// Point reads of ascending seqs, keeping the last block so that neighbours cost no lookup.
pub(crate) struct Cursor<'a> {
    log: &'a sled::Tree,
    block: Option<Block>,
}

impl<'a> Cursor<'a> {
    pub(crate) fn new(log: &'a sled::Tree) -> Cursor<'a> {
        Cursor { log, block: None }
    }

    pub(crate) fn get(&mut self, seq: u64) -> Result<Option<Record>, StorageError> {
        if let Some(r) = self.block.as_ref().and_then(|b| b.record(seq)) {
            return Ok(Some(r));
        }
        self.block = block_of(self.log, seq)?;
        Ok(self.block.as_ref().and_then(|b| b.record(seq)))
    }
}

/// The records with seq in `from..=upto`, in order.
pub(crate) fn records(log: &sled::Tree, from: u64, upto: u64) -> Records {
    let start = match log.range(..=seq_key(from)).next_back() {
        Some(Ok((k, _))) => key_seq(&k).unwrap_or(from),
        _ => from,
    };
    Records { blocks: log.range(seq_key(start)..=seq_key(upto)), block: None, next: from, upto }
}

pub(crate) struct Records {
    blocks: sled::Iter,
    block: Option<Block>,
    /// The next seq to yield.
    next: u64,
    upto: u64,
}

impl Iterator for Records {
    type Item = Result<(u64, Record), StorageError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if self.next > self.upto {
                return None;
            }
            if let Some(b) = &self.block {
                if self.next < b.first {
                    // A hole between blocks: the gap-free invariant is broken.
                    let seq = self.next;
                    self.next = self.upto.saturating_add(1);
                    return Some(Err(StorageError::corruption(seq, "the record is missing from the log")));
                }
                if let Some(r) = b.record(self.next) {
                    let seq = self.next;
                    self.next += 1;
                    return Some(Ok((seq, r)));
                }
            }
            match self.blocks.next()? {
                Err(e) => return Some(Err(e.into())),
                Ok((k, v)) => match Block::parse(&k, v) {
                    Ok(b) if b.last() < self.next => {}
                    Ok(b) => {
                        if self.block.is_none() && b.first > self.next {
                            // The range starts before the log does: nothing is missing.
                            self.next = b.first;
                        }
                        self.block = Some(b);
                    }
                    Err(e) => {
                        self.next = self.upto.saturating_add(1);
                        return Some(Err(e));
                    }
                },
            }
        }
    }
}
