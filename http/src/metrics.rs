//! Prometheus counters, gauges and histograms for the HTTP side, rendered as text.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Upper bounds (seconds) of the latency histogram buckets.
const BUCKETS_S: [f64; 12] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0];

pub struct Histogram {
    counts: [AtomicU64; 12],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Histogram {
    pub const fn new() -> Histogram {
        // The array-repeat idiom for atomics in a const fn: each element is a fresh copy.
        #[allow(clippy::declare_interior_mutable_const)]
        const Z: AtomicU64 = AtomicU64::new(0);
        Histogram { counts: [Z; 12], count: Z, sum_us: Z }
    }

    pub fn observe(&self, seconds: f64) {
        if let Some(i) = BUCKETS_S.iter().position(|b| seconds <= *b) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str) {
        let _ = writeln!(out, "# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, b) in BUCKETS_S.iter().enumerate() {
            cumulative += self.counts[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cumulative}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum {}", self.sum_us.load(Ordering::Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count {count}");
    }
}

#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    pub sse_connections: AtomicU64,
    pub sse_events_sent: AtomicU64,
    pub events_appended: AtomicU64,
}

pub static REQUEST_DURATION: Histogram = Histogram::new();
pub static APPEND_DURATION: Histogram = Histogram::new();

impl Metrics {
    pub fn request(&self, route: &'static str, status: u16, seconds: f64) {
        if let Ok(mut m) = self.requests.lock() {
            *m.entry((route, status)).or_default() += 1;
        }
        REQUEST_DURATION.observe(seconds);
    }

    pub fn render(&self, store_lines: &str, store_dropped_slow: u64) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "# TYPE atelier_http_requests_total counter");
        if let Ok(m) = self.requests.lock() {
            for ((route, status), n) in m.iter() {
                let _ =
                    writeln!(out, "atelier_http_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}");
            }
        }
        REQUEST_DURATION.render(&mut out, "atelier_http_request_duration_seconds");
        let g = |out: &mut String, kind: &str, name: &str, v: u64| {
            let _ = writeln!(out, "# TYPE {name} {kind}\n{name} {v}");
        };
        g(&mut out, "gauge", "atelier_sse_connections", self.sse_connections.load(Ordering::Relaxed));
        g(&mut out, "counter", "atelier_sse_events_sent_total", self.sse_events_sent.load(Ordering::Relaxed));
        // A stream is cut off by the store when its queue overflows, even while its thread is
        // still blocked writing to a client that stopped reading.
        g(&mut out, "counter", "atelier_sse_dropped_slow_total", store_dropped_slow);
        g(&mut out, "counter", "atelier_events_appended_total", self.events_appended.load(Ordering::Relaxed));
        APPEND_DURATION.render(&mut out, "atelier_append_duration_seconds");
        out.push_str(store_lines);
        out
    }
}
