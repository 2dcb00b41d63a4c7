//! The worker protocol: newline-delimited JSON from a worker to the controller on fd 3.
//!
//! A worker is untrusted code, so every line is checked before anything reaches the log:
//! its size, its encoding, its shape, and its place in the sequence (stages run forward,
//! progress and artifacts belong to the running stage, nothing follows the result). The first
//! bad line fails the attempt with an error that names it.

use atelier_engine::limits;
use atelier_engine::Stage;
use serde::{Deserialize, Serialize};

/// A protocol line's longest allowed length (without the newline): room for the largest
/// result the engine accepts plus its envelope.
pub const PROTOCOL_LINE_BYTES_MAX: usize = limits::RESULT_BYTES_MAX + 1024;
/// How much of a bad line an error message quotes.
const QUOTE_BYTES_MAX: usize = 80;

/// One line of the protocol.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Message {
    Stage {
        stage: Stage,
    },
    Progress {
        stage: Stage,
        percent: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        message: Option<String>,
    },
    Artifact {
        stage: Stage,
        kind: String,
        uri: String,
    },
    Heartbeat {},
    Result {
        result: serde_json::Value,
    },
    Error {
        error: String,
        #[serde(default)]
        retryable: bool,
    },
}

impl Message {
    /// The line a worker writes, newline included.
    pub fn to_line(&self) -> String {
        let mut s = serde_json::to_string(self).expect("invariant: protocol messages always serialize");
        s.push('\n');
        s
    }
}

/// Parses one line (without its newline).
pub fn parse_line(line: &[u8]) -> Result<Message, String> {
    if line.len() > PROTOCOL_LINE_BYTES_MAX {
        return Err(format!("line of {} bytes is over the {PROTOCOL_LINE_BYTES_MAX}-byte limit", line.len()));
    }
    let text = std::str::from_utf8(line).map_err(|_| format!("line is not UTF-8: {}", quote(line)))?;
    serde_json::from_str::<Message>(text).map_err(|e| format!("malformed line {}: {e}", quote(line)))
}

fn quote(line: &[u8]) -> String {
    let shown = &line[..line.len().min(QUOTE_BYTES_MAX)];
    let mut s = format!("{:?}", String::from_utf8_lossy(shown));
    if line.len() > QUOTE_BYTES_MAX {
        s.push('…');
    }
    s
}

/// Where a worker is in the protocol sequence.
#[derive(Clone, Debug, Default)]
pub struct Checker {
    stage: Option<Stage>,
    percent: [u32; 4],
    finished: bool,
}

impl Checker {
    /// Checks `msg` against what came before and records it. The error text says which rule
    /// the line broke.
    pub fn check(&mut self, msg: &Message) -> Result<(), String> {
        if self.finished {
            return Err(format!("out of order: '{}' line after the result or error", kind(msg)));
        }
        match msg {
            Message::Stage { stage } => {
                let expected = match self.stage {
                    None => Some(Stage::FIRST),
                    Some(cur) => cur.next(),
                };
                if expected != Some(*stage) {
                    return Err(match (self.stage, expected) {
                        (Some(cur), Some(exp)) => {
                            format!("out of order: stage {stage} after {cur} (expected {exp})")
                        }
                        (Some(cur), None) => {
                            format!("out of order: stage {stage} after the last stage {cur}")
                        }
                        (None, _) => format!("out of order: stage {stage} first (expected {})", Stage::FIRST),
                    });
                }
                self.stage = Some(*stage);
            }
            Message::Progress { stage, percent, message } => {
                self.in_stage(*stage, "progress")?;
                if *percent > u32::from(limits::PERCENT_MAX) {
                    return Err(format!("progress {percent}% is outside 0..=100"));
                }
                let cur = self.percent[stage.index()];
                if *percent < cur {
                    return Err(format!("progress of {stage} went down from {cur}% to {percent}%"));
                }
                if message.as_ref().is_some_and(|m| m.len() > limits::MESSAGE_BYTES_MAX * 4) {
                    return Err(format!("progress message over {} bytes", limits::MESSAGE_BYTES_MAX * 4));
                }
                self.percent[stage.index()] = *percent;
            }
            Message::Artifact { stage, kind, uri } => {
                self.in_stage(*stage, "artifact")?;
                if kind.is_empty() || kind.len() > limits::ARTIFACT_KIND_BYTES_MAX {
                    return Err(format!(
                        "artifact kind must be 1..={} bytes",
                        limits::ARTIFACT_KIND_BYTES_MAX
                    ));
                }
                if uri.is_empty() || uri.len() > limits::ARTIFACT_URI_BYTES_MAX {
                    return Err(format!("artifact uri must be 1..={} bytes", limits::ARTIFACT_URI_BYTES_MAX));
                }
            }
            Message::Heartbeat {} => {}
            Message::Result { .. } => {
                if self.stage != Some(Stage::LAST) {
                    return Err(match self.stage {
                        Some(cur) => format!(
                            "out of order: result in stage {cur}, before the last stage {}",
                            Stage::LAST
                        ),
                        None => format!(
                            "out of order: result before any stage (the last stage is {})",
                            Stage::LAST
                        ),
                    });
                }
                self.finished = true;
            }
            Message::Error { .. } => self.finished = true,
        }
        Ok(())
    }

    fn in_stage(&self, stage: Stage, what: &str) -> Result<(), String> {
        if self.stage != Some(stage) {
            return Err(match self.stage {
                Some(cur) => format!("out of order: {what} for stage {stage} while {cur} is running"),
                None => format!("out of order: {what} for stage {stage} before any stage was entered"),
            });
        }
        Ok(())
    }
}

fn kind(msg: &Message) -> &'static str {
    match msg {
        Message::Stage { .. } => "stage",
        Message::Progress { .. } => "progress",
        Message::Artifact { .. } => "artifact",
        Message::Heartbeat {} => "heartbeat",
        Message::Result { .. } => "result",
        Message::Error { .. } => "error",
    }
}

/// Splits a byte stream into lines, refusing any line longer than the limit as soon as it is
/// known to be too long (a worker that never sends a newline cannot make us buffer forever).
#[derive(Default)]
pub struct LineBuffer {
    buf: Vec<u8>,
}

impl LineBuffer {
    /// Adds `data` and returns the complete lines in it, or an error for an oversized line.
    pub fn push(&mut self, data: &[u8]) -> Result<Vec<Vec<u8>>, String> {
        self.buf.extend_from_slice(data);
        let mut lines = Vec::new();
        let mut start = 0;
        while let Some(pos) = self.buf[start..].iter().position(|&b| b == b'\n') {
            let line = &self.buf[start..start + pos];
            if line.len() > PROTOCOL_LINE_BYTES_MAX {
                return Err(format!(
                    "line of {} bytes is over the {PROTOCOL_LINE_BYTES_MAX}-byte limit",
                    line.len()
                ));
            }
            lines.push(line.to_vec());
            start += pos + 1;
        }
        self.buf.drain(..start);
        if self.buf.len() > PROTOCOL_LINE_BYTES_MAX {
            return Err(format!(
                "line of over {} bytes without a newline is over the {PROTOCOL_LINE_BYTES_MAX}-byte limit",
                self.buf.len()
            ));
        }
        Ok(lines)
    }

    /// Bytes after the last newline (a worker that exits mid-line).
    pub fn leftover(&self) -> &[u8] {
        &self.buf
    }
}

/// The protocol fuzz target's body (also run over the stored corpus by `cargo test`): any byte
/// stream from a worker goes through line splitting, parsing and the sequence checker without
/// a panic, and every accepted line re-encodes to a line that parses to the same message.
#[doc(hidden)]
pub fn fuzz_stream(data: &[u8]) {
    let mut buffer = LineBuffer::default();
    let mut checker = Checker::default();
    // Feed in two pieces, so line splitting across reads is exercised too.
    let split = data.first().map_or(0, |b| usize::from(*b) % (data.len() + 1));
    for piece in [&data[..split], &data[split..]] {
        let Ok(lines) = buffer.push(piece) else { return };
        for line in lines {
            let Ok(msg) = parse_line(&line) else { return };
            let again =
                parse_line(msg.to_line().trim_end().as_bytes()).expect("an accepted message re-parses");
            assert_eq!(again, msg);
            if checker.check(&msg).is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_seq(lines: &[&str]) -> Result<(), String> {
        let mut c = Checker::default();
        for l in lines {
            let m = parse_line(l.as_bytes())?;
            c.check(&m)?;
        }
        Ok(())
    }

    #[test]
    fn good_sequence() {
        let lines = [
            r#"{"type":"stage","stage":"generating_ideas"}"#,
            r#"{"type":"progress","stage":"generating_ideas","percent":50,"message":"half"}"#,
            r#"{"type":"heartbeat"}"#,
            r#"{"type":"stage","stage":"creating_images"}"#,
            r#"{"type":"artifact","stage":"creating_images","kind":"image","uri":"/a.png"}"#,
            r#"{"type":"stage","stage":"uploading"}"#,
            r#"{"type":"stage","stage":"creating_products"}"#,
            r#"{"type":"result","result":{"ok":true}}"#,
        ];
        check_seq(&lines).expect("valid");
    }

    #[test]
    fn bad_lines_are_named() {
        let cases: &[(&[&str], &str)] = &[
            (&["not json"], "malformed line \"not json\""),
            (&[r#"{"type":"launch"}"#], "unknown variant `launch`"),
            (&[r#"{"type":"heartbeat","extra":1}"#], "unknown field `extra`"),
            (&[r#"{"type":"stage","stage":"uploading"}"#], "out of order: stage uploading first"),
            (&[r#"{"type":"progress","stage":"uploading","percent":1}"#], "before any stage"),
            (
                &[
                    r#"{"type":"stage","stage":"generating_ideas"}"#,
                    r#"{"type":"progress","stage":"generating_ideas","percent":101}"#,
                ],
                "outside 0..=100",
            ),
            (
                &[r#"{"type":"stage","stage":"generating_ideas"}"#, r#"{"type":"result","result":1}"#],
                "before the last stage",
            ),
            (&[r#"{"type":"error","error":"x"}"#, r#"{"type":"heartbeat"}"#], "after the result or error"),
        ];
        for (lines, want) in cases {
            let err = check_seq(lines).expect_err(want);
            assert!(err.contains(want), "{err:?} should contain {want:?}");
        }
    }

    proptest::proptest! {
        /// However the bytes arrive, the same lines come out.
        #[test]
        fn line_buffer_ignores_chunking(text in "[a-z\\n]{0,200}", cuts in proptest::collection::vec(0usize..200, 0..10)) {
            let bytes = text.as_bytes();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(bytes.len())).collect();
            cuts.sort_unstable();
            let mut b = LineBuffer::default();
            let mut got = Vec::new();
            let mut at = 0;
            for c in cuts.into_iter().chain([bytes.len()]) {
                got.extend(b.push(&bytes[at..c]).expect("short lines"));
                at = c;
            }
            let mut want: Vec<Vec<u8>> = text.split('\n').map(|l| l.as_bytes().to_vec()).collect();
            let rest = want.pop().unwrap_or_default();
            proptest::prop_assert_eq!(got, want);
            proptest::prop_assert_eq!(b.leftover(), &rest[..]);
        }

        /// The checker never panics, and once it accepted a result nothing else is accepted.
        #[test]
        fn checker_is_total(kinds in proptest::collection::vec(0u8..6, 0..30), stages in proptest::collection::vec(0usize..4, 30)) {
            let mut c = Checker::default();
            let mut finished = false;
            for (k, s) in kinds.iter().zip(&stages) {
                let stage = Stage::ALL[*s];
                let msg = match k {
                    0 => Message::Stage { stage },
                    1 => Message::Progress { stage, percent: 50, message: None },
                    2 => Message::Artifact { stage, kind: "k".into(), uri: "u".into() },
                    3 => Message::Heartbeat {},
                    4 => Message::Result { result: serde_json::json!({}) },
                    _ => Message::Error { error: "e".into(), retryable: false },
                };
                let ok = c.check(&msg).is_ok();
                proptest::prop_assert!(!(finished && ok));
                if ok && matches!(msg, Message::Result { .. } | Message::Error { .. }) {
                    finished = true;
                }
            }
        }
    }

    #[test]
    fn line_buffer_limits() {
        let mut b = LineBuffer::default();
        assert_eq!(b.push(b"ab\ncd").expect("ok"), vec![b"ab".to_vec()]);
        assert_eq!(b.push(b"e\n").expect("ok"), vec![b"cde".to_vec()]);
        let big = vec![b'x'; PROTOCOL_LINE_BYTES_MAX + 1];
        assert!(b.push(&big).expect_err("too long").contains("limit"));
    }
}
