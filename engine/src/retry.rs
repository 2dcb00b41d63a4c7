//! Retry policy: exponential backoff with full jitter. Pure: the jitter comes from a seed.

use serde::{Deserialize, Serialize};

use crate::time::Millis;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryPolicy {
    pub base_ms: u64,
    pub cap_ms: u64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy { base_ms: 2_000, cap_ms: 5 * 60 * 1000 }
    }
}

impl RetryPolicy {
    /// Delay before the retry that follows failed attempt `attempt` (1-based):
    /// uniform in `0..=min(cap, base * 2^(attempt-1))` ("full jitter"), drawn from `seed`.
    pub fn backoff_ms(&self, attempt: u32, seed: u64) -> Millis {
        let exp = attempt.saturating_sub(1).min(32);
        let ceiling = self.base_ms.saturating_mul(1u64 << exp).min(self.cap_ms);
        let r = splitmix64(seed ^ u64::from(attempt).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let delay = ceiling.checked_add(1).map_or(r, |span| r % span);
        i64::try_from(delay).unwrap_or(i64::MAX)
    }
}

/// A well-mixed 64-bit hash of `x` (SplitMix64's finalizer): deterministic pseudo-randomness
/// for jitter and for stable routing of a commission id.
pub fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn backoff_within_exponential_ceiling(attempt in 1u32..50, seed: u64) {
            let p = RetryPolicy::default();
            let d = p.backoff_ms(attempt, seed);
            let ceiling = (2_000u64 << (attempt - 1).min(32)).min(300_000);
            prop_assert!(d >= 0 && d as u64 <= ceiling);
            prop_assert_eq!(d, p.backoff_ms(attempt, seed));
        }
    }

    #[test]
    fn jitter_spreads() {
        let p = RetryPolicy::default();
        let distinct: std::collections::BTreeSet<_> = (0..64).map(|s| p.backoff_ms(5, s)).collect();
        assert!(distinct.len() > 50, "full jitter should rarely repeat: {}", distinct.len());
    }
}
