//! Benchmark ballast: `ATELIER_BALLAST_MB` MiB of touched memory held by the server, to show
//! that starting a worker does not get slower as the server grows (BENCHMARKS.md). Test
//! scaffolding, so it is built only with the `test-faults` feature.

/// The environment variable that asks for ballast.
const BALLAST_ENV: &str = "ATELIER_BALLAST_MB";
/// The ballast is cut to this.
const BALLAST_MB_MAX: usize = 64 * 1024;

/// `ATELIER_BALLAST_MB` MiB, every page written so it is resident.
pub(crate) fn from_env() -> Vec<u8> {
    let mb = std::env::var(BALLAST_ENV)
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(0)
        .min(BALLAST_MB_MAX);
    if mb > 0 {
        tracing::warn!(mb, "holding ballast memory ({BALLAST_ENV}); for benchmarks only");
    }
    vec![0xA5u8; mb * 1024 * 1024]
}
