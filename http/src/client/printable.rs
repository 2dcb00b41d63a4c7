//! Text a worker wrote (stage messages, errors, titles) reaches the client commands through
//! the server unchanged; printed raw, an escape sequence in it could retitle, recolour or
//! rewrite the user's terminal, or hide lines. Everything the client commands print from the
//! server passes through [`printable`] first: C0 controls (except newline and tab), DEL, C1
//! controls and whole escape sequences are dropped.

use serde_json::Value;

const ESC: char = '\u{1b}';
const BEL: char = '\u{7}';
/// C1 String Terminator, which ends the string sequences below.
const ST: char = '\u{9c}';

/// What an introducer starts: how far the sequence runs.
enum Sequence {
    /// CSI: parameters and intermediates, then one final byte.
    Control,
    /// OSC, DCS, SOS, PM, APC: anything, up to ST (or BEL, which xterm takes for OSC).
    String,
}

/// `text` without control characters or escape sequences; newlines and tabs are kept.
pub fn printable(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        let sequence = match c {
            ESC => match chars.next() {
                Some('[') => Sequence::Control,
                Some(']' | 'P' | 'X' | '^' | '_') => Sequence::String,
                // A two-character sequence (maybe with intermediates): all of it goes.
                Some(' '..='/') => {
                    while chars.next_if(|c| matches!(c, ' '..='/')).is_some() {}
                    chars.next();
                    continue;
                }
                _ => continue,
            },
            '\u{9b}' => Sequence::Control,
            '\u{9d}' | '\u{90}' | '\u{98}' | '\u{9e}' | '\u{9f}' => Sequence::String,
            '\n' | '\t' => {
                out.push(c);
                continue;
            }
            c if c.is_control() => continue,
            c => {
                out.push(c);
                continue;
            }
        };
        match sequence {
            Sequence::Control => {
                while chars.next_if(|c| matches!(c, '0'..='?' | ' '..='/')).is_some() {}
                // The final byte, if it is one; anything else is judged on its own.
                chars.next_if(|c| matches!(c, '@'..='~'));
            }
            Sequence::String => {
                while let Some(c) = chars.next() {
                    if c == ST || c == BEL || (c == ESC && chars.next_if_eq(&'\\').is_some()) {
                        break;
                    }
                }
            }
        }
    }
    out
}

/// `value` with every string in it (object keys too) made [`printable`].
pub fn printable_json(value: &Value) -> Value {
    match value {
        Value::String(s) => Value::String(printable(s)),
        Value::Array(items) => Value::Array(items.iter().map(printable_json).collect()),
        Value::Object(map) => map.iter().map(|(k, v)| (printable(k), printable_json(v))).collect(),
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn check(input: &str, expected: &str) {
        assert_eq!(printable(input), expected, "{input:?}");
    }

    #[test]
    fn plain_text_newlines_and_tabs_pass() {
        check("drawing cats: 3/4 done", "drawing cats: 3/4 done");
        check("line one\n\tline two", "line one\n\tline two");
        check("über ☕ 猫", "über ☕ 猫");
    }

    #[test]
    fn controls_and_escape_sequences_are_dropped() {
        check("\u{1b}[31mred\u{1b}[0m", "red");
        check("a\u{1b}[2J\u{1b}[1;1Hb", "ab");
        check("\u{1b}]0;pwned\u{7}title", "title");
        check("\u{1b}]8;;http://evil\u{1b}\\link\u{1b}]8;;\u{1b}\\", "link");
        check("\u{1b}P1$qm\u{1b}\\ok", "ok");
        check("\u{1b}(Bx\u{1b}7y\u{1b}", "xy");
        check("\u{9b}31mC1\u{9b}0m", "C1");
        check("\u{9d}0;t\u{9c}osc", "osc");
        check("over\rwrite\u{8}\u{7f}\u{0}\u{85}", "overwrite");
        check("\u{1b}]never ends", "");
        check("\u{1b}[", "");
    }

    #[test]
    fn every_string_in_json_is_made_printable() {
        let v = serde_json::json!({"message": "\u{1b}[1mhi", "n": 3, "list": ["\u{9b}2Jx"], "k\u{7}": null});
        assert_eq!(
            printable_json(&v),
            serde_json::json!({"message": "hi", "n": 3, "list": ["x"], "k": null})
        );
    }
}
