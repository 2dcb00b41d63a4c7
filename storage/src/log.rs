//! Reading records out of the log tree, where a value is one record or a block of consecutive
//! records keyed by the seq of its first (see `codec`). Everything that reads the log by seq
//! goes through here, so that no caller assumes one sled item per event.

use std::ops::Range;

use crate::codec;
use crate::sled_store::{read_u64, u64_key};
use crate::StorageError;

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
pub(crate) struct Block {
    pub(crate) first: u64,
    pub(crate) value: sled::IVec,
    pub(crate) ranges: Vec<Range<usize>>,
}

impl Block {
    pub(crate) fn parse(key: &[u8], value: sled::IVec) -> Result<Block, StorageError> {
        let first = read_u64(key)
            .ok_or(StorageError::Corruption { seq: 0, detail: "a log key is not 8 bytes".into() })?;
        let ranges = codec::split_block(&value)
            .map_err(|e| StorageError::Corruption { seq: first, detail: e.to_string() })?;
        Ok(Block { first, value, ranges })
    }

    /// The seq of its last record.
    pub(crate) fn last(&self) -> u64 {
        self.first + self.ranges.len() as u64 - 1
    }

    pub(crate) fn record(&self, seq: u64) -> Option<Record> {
        let i = usize::try_from(seq.checked_sub(self.first)?).ok()?;
        self.ranges.get(i).map(|r| Record { value: self.value.clone(), range: r.clone() })
    }

    /// The records themselves, copied (for rewriting the block).
    pub(crate) fn records(&self) -> Vec<Vec<u8>> {
        self.ranges.iter().map(|r| self.value[r.clone()].to_vec()).collect()
    }
}

/// The block that holds `seq`, if any.
pub(crate) fn block_of(log: &sled::Tree, seq: u64) -> Result<Option<Block>, StorageError> {
    match log.range(..=u64_key(seq)).next_back() {
        None => Ok(None),
        Some(item) => {
            let (k, v) = item?;
            let block = Block::parse(&k, v)?;
            Ok((block.last() >= seq).then_some(block))
        }
    }
}

/// The last block of the log.
pub(crate) fn last_block(log: &sled::Tree) -> Result<Option<Block>, StorageError> {
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
    let start = match log.range(..=u64_key(from)).next_back() {
        Some(Ok((k, _))) => read_u64(&k).unwrap_or(from),
        _ => from,
    };
    Records { blocks: log.range(u64_key(start)..=u64_key(upto)), block: None, next: from, upto }
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
                    return Some(Err(StorageError::Corruption {
                        seq,
                        detail: "the record is missing from the log".into(),
                    }));
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
