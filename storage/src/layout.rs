//! The on-disk layout: which sled tree holds what, and how projection keys are built.
//!
//! Two trees. `log` holds the truth: seq of a group commit's first record → its records (one
//! framed record, or a block of them; see `codec`). `projections` holds every cache
//! of the log, each under its own one-byte key prefix, so that one batch's projection changes
//! are a single sled `apply_batch`: atomic, also across a crash, and much cheaper than a
//! transaction over one tree per projection. All integers in keys are big-endian so that
//! sled's byte order is numeric order.
//!
//! | prefix | projection           | key after the prefix         | value                |
//! |--------|----------------------|------------------------------|----------------------|
//! | 0x01   | `commissions`        | commission                   | encoded `Commission` |
//! | 0x02   | `by_commission`      | commission ++ first version  | run of seqs          |
//! | 0x03   | `by_user`            | user ++ 0x00 ++ commission   | ()                   |
//! | 0x04   | `idempotency`        | user ++ 0x00 ++ key          | commission           |
//! | 0x05   | `live`               | commission (non-terminal)    | ()                   |
//! | 0x06   | `jobs`               | job                          | encoded `Job`        |
//! | 0x07   | `jobs_by_commission` | commission ++ job            | ()                   |
//! | 0x08   | `meta`               | name ([`META_SCHEMA`], ...)  | see the name         |
//! | 0x09   | `user_seqs`          | user ++ 0x00 ++ seq          | commission           |
//!
//! A by-commission run holds the seqs of `first version` and the versions after it, 8 bytes
//! each, big-endian (a run of one is the plain `commission ++ version → seq` entry). The
//! writer keeps recent entries in memory and writes each commission's new ones as one run,
//! rather than one sled insert per event; runs of one commission tile its versions 1..=n.
//!
//! The user-seqs index lists every event of a user's commissions by its global seq, so a
//! user's history is read by a range scan, in seq order, in proportion to that user's events.
//! It changes with every event and is written back with the by-commission runs.
//!
//! Tools and tests that must touch the raw layout (to doctor a record, say) build keys with
//! [`Projection::key`] rather than spelling bytes.

/// First seq → one framed record or a block of consecutive ones. The truth.
pub const LOG_TREE: &str = "log";
/// Every projection, each under its [`Projection::prefix`].
pub const PROJECTIONS_TREE: &str = "projections";

/// Seqs in one by-commission run at most (bounds the value sled stores and reads whole).
pub const INDEX_RUN_SEQS_MAX: usize = 512;

/// A by-commission run value: the seqs, 8 bytes each, big-endian.
pub fn encode_run(seqs: &[u64]) -> Vec<u8> {
    seqs.iter().flat_map(|s| s.to_be_bytes()).collect()
}

/// The seqs of a run value; `None` if it is not a whole, non-empty number of seqs.
pub fn decode_run(value: &[u8]) -> Option<impl Iterator<Item = u64> + '_> {
    let seqs = value.chunks_exact(8);
    if value.is_empty() || !seqs.remainder().is_empty() {
        return None;
    }
    Some(seqs.map(|c| u64::from_be_bytes(c.try_into().expect("invariant: chunks of 8"))))
}

/// Meta names (under [`Projection::Meta`]).
pub const META_SCHEMA: &[u8] = b"schema_version";
pub const META_PROJECTED: &[u8] = b"projected_seq";
pub const META_NEXT_CID: &[u8] = b"next_commission_id";
pub const META_COUNTS: &[u8] = b"state_counts";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Projection {
    Commissions,
    ByCommission,
    ByUser,
    Idempotency,
    Live,
    Jobs,
    JobsByCommission,
    Meta,
    UserSeqs,
}

impl Projection {
    pub const ALL: [Projection; 9] = [
        Projection::Commissions,
        Projection::ByCommission,
        Projection::ByUser,
        Projection::Idempotency,
        Projection::Live,
        Projection::Jobs,
        Projection::JobsByCommission,
        Projection::Meta,
        Projection::UserSeqs,
    ];

    /// The key prefix. Never reuse a retired value: old data dirs may still hold it.
    pub const fn prefix(self) -> u8 {
        match self {
            Projection::Commissions => 0x01,
            Projection::ByCommission => 0x02,
            Projection::ByUser => 0x03,
            Projection::Idempotency => 0x04,
            Projection::Live => 0x05,
            Projection::Jobs => 0x06,
            Projection::JobsByCommission => 0x07,
            Projection::Meta => 0x08,
            Projection::UserSeqs => 0x09,
        }
    }

    /// The name used in reports and errors.
    pub const fn name(self) -> &'static str {
        match self {
            Projection::Commissions => "commissions",
            Projection::ByCommission => "by_commission",
            Projection::ByUser => "by_user",
            Projection::Idempotency => "idempotency",
            Projection::Live => "live",
            Projection::Jobs => "jobs",
            Projection::JobsByCommission => "jobs_by_commission",
            Projection::Meta => "meta",
            Projection::UserSeqs => "user_seqs",
        }
    }

    /// `prefix ++ tail`.
    pub fn key(self, tail: &[u8]) -> Vec<u8> {
        let mut k = Vec::with_capacity(1 + tail.len());
        k.push(self.prefix());
        k.extend_from_slice(tail);
        k
    }

    /// `prefix ++ a` (big-endian), without allocating.
    pub fn key_u64(self, a: u64) -> [u8; 9] {
        let mut k = [0u8; 9];
        k[0] = self.prefix();
        k[1..].copy_from_slice(&a.to_be_bytes());
        k
    }

    /// `prefix ++ a ++ b` (big-endian), without allocating.
    pub fn key_pair(self, a: u64, b: u64) -> [u8; 17] {
        let mut k = [0u8; 17];
        k[0] = self.prefix();
        k[1..9].copy_from_slice(&a.to_be_bytes());
        k[9..].copy_from_slice(&b.to_be_bytes());
        k
    }

    /// `prefix ++ user ++ 0x00 ++ tail`: the by-user and idempotency keys.
    pub fn key_user(self, user: &str, tail: &[u8]) -> Vec<u8> {
        let mut k = Vec::with_capacity(2 + user.len() + tail.len());
        k.push(self.prefix());
        k.extend_from_slice(user.as_bytes());
        k.push(0);
        k.extend_from_slice(tail);
        k
    }
}

/// A number in a projection key or meta value: big-endian, so that sled's byte order is
/// numeric order.
pub(crate) fn encode_u64(v: u64) -> [u8; 8] {
    v.to_be_bytes()
}

/// The number at the start of `bytes` (from [`encode_u64`]); `None` if fewer than 8 bytes.
pub(crate) fn decode_u64(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.get(..8)?.try_into().ok()?))
}
