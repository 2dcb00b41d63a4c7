//! The backup route's body: the log as `atelier export` writes it (JSON lines, one envelope
//! each), through the head's seq when the request came, whatever is appended while it goes
//! out. Each chunk of the log is read on the handler pool (connection threads never touch
//! the store) beside the writer, so appends never wait for it, and written on the
//! connection's own thread, chunked: a body cut short (the store failed, the server stopped)
//! lacks the last chunk, so a client never takes a partial copy for a whole one.

use std::io::{self, Write};
use std::sync::Arc;

use atelier_storage::check::{self, ExportChunk};
use atelier_storage::StorageError;

use crate::state::Shared;

/// The response header naming the seq the backup runs through.
pub const BACKUP_SEQ_HEADER: &str = "X-Atelier-Backup-Seq";

/// A backup to write: the log through `through`, the head when the request came.
pub(crate) struct Backup {
    pub(crate) through: u64,
}

/// Whether the body goes out (not for HEAD).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sending {
    Body,
    HeadOnly,
}

/// Writes the response (the connection closes after it).
pub(crate) fn serve(
    w: &mut dyn Write,
    shared: &Arc<Shared>,
    backup: &Backup,
    send: Sending,
) -> io::Result<()> {
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\
         Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n{BACKUP_SEQ_HEADER}: {}\r\n\
         Connection: close\r\n\r\n",
        backup.through
    );
    w.write_all(head.as_bytes())?;
    if send == Sending::HeadOnly {
        return w.flush();
    }
    let (mut after, mut events) = (0, 0);
    loop {
        let (bytes, chunk) = match read_on_pool(shared, after, backup.through) {
            Ok(read) => read,
            Err(e) => {
                tracing::warn!(through = backup.through, error = %e, "backup cut short");
                return Err(io::Error::other(e));
            }
        };
        if !bytes.is_empty() {
            write!(w, "{:x}\r\n", bytes.len())?;
            w.write_all(&bytes)?;
            w.write_all(b"\r\n")?;
        }
        events += chunk.events;
        match chunk.next {
            Some(next) => after = next,
            None => break,
        }
    }
    w.write_all(b"0\r\n\r\n")?;
    w.flush()?;
    tracing::info!(through = backup.through, events, "backup sent");
    Ok(())
}

/// One chunk of the export, read and encoded on the handler pool.
fn read_on_pool(
    shared: &Arc<Shared>,
    after: u64,
    through: u64,
) -> Result<(Vec<u8>, ExportChunk), StorageError> {
    let (tx, rx) = crossbeam_channel::bounded(1);
    let store = shared.store.clone();
    let job: crate::pool::Job = Box::new(move || {
        let mut bytes = Vec::new();
        let read = check::export_chunk(&*store, after, through, &mut bytes).map(|chunk| (bytes, chunk));
        let _ = tx.send(read);
    });
    let stopped = || StorageError::Closed;
    shared.jobs.send(job).map_err(|_| stopped())?;
    rx.recv().map_err(|_| stopped())?
}
