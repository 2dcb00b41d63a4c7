//! Named bounds on everything a user or a worker controls. Units go last in names.

/// A commission's `context` (a JSON object), encoded.
pub const CONTEXT_BYTES_MAX: usize = 64 * 1024;
/// A commission's `result` (a JSON value), encoded.
pub const RESULT_BYTES_MAX: usize = 64 * 1024;
pub const USER_ID_BYTES_MAX: usize = 128;
pub const PIPELINE_NAME_BYTES_MAX: usize = 64;
pub const IDEMPOTENCY_KEY_BYTES_MAX: usize = 128;
/// Progress messages are truncated to this, on a char boundary.
pub const MESSAGE_BYTES_MAX: usize = 1024;
/// Error texts are truncated to this, on a char boundary.
pub const ERROR_BYTES_MAX: usize = 4096;
pub const ARTIFACT_KIND_BYTES_MAX: usize = 64;
pub const ARTIFACT_URI_BYTES_MAX: usize = 2048;
/// Artifacts remembered per commission; more are refused.
pub const ARTIFACTS_MAX: usize = 64;
/// Upper bound for `max_attempts` on create.
pub const ATTEMPTS_MAX: u32 = 100;
pub const ATTEMPTS_DEFAULT: u32 = 3;
pub const PERCENT_MAX: u8 = 100;
/// The `progress_steps` context switch of the built-in `noop` step (progress reports per
/// stage). Refused above this on create: four stages of it must stay well under the workers'
/// flood guard (protocol lines per second), which a larger value would trip on purpose.
pub const PROGRESS_STEPS_MAX: u64 = 1_000;

/// Cuts `s` to at most `max` bytes without splitting a character.
pub fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}
