//! The HTTP side's Prometheus series: counters, gauges and histograms kept by the `prometheus`
//! crate, rendered in its text format for `/metrics` in a fixed order, followed by the lines
//! of series whose values live elsewhere (the store's, the executors').

use prometheus::core::Collector;
use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, TextEncoder,
};

use crate::config::BuildInfo;

/// Upper bounds (seconds) of the latency histogram buckets.
const BUCKETS_S: [f64; 12] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0];

pub struct Metrics {
    requests: IntCounterVec,
    request_duration: Histogram,
    pub sse_connections: IntGauge,
    pub sse_events_sent: IntCounter,
    pub events_appended: IntCounter,
    /// Time a create, cancel or retry spent appending to the log (decide and fsync included).
    pub append_duration: Histogram,
    /// Always 1: its labels name the running build.
    build_info: IntGaugeVec,
}

fn histogram(name: &str, help: &str) -> Histogram {
    Histogram::with_opts(HistogramOpts::new(name, help).buckets(BUCKETS_S.to_vec()))
        .expect("invariant: a histogram's name, help and increasing buckets are valid")
}

fn counter(name: &str, help: &str) -> IntCounter {
    IntCounter::new(name, help).expect("invariant: a counter's name and help are valid")
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics {
            requests: IntCounterVec::new(
                Opts::new("atelier_http_requests_total", "HTTP requests answered, by route and status"),
                &["route", "status"],
            )
            .expect("invariant: the requests counter's name and labels are valid"),
            request_duration: histogram(
                "atelier_http_request_duration_seconds",
                "Time from a request's parse to its reply",
            ),
            sse_connections: IntGauge::new("atelier_sse_connections", "Open event streams")
                .expect("invariant: a gauge's name and help are valid"),
            sse_events_sent: counter("atelier_sse_events_sent_total", "Events written to streams"),
            events_appended: counter("atelier_events_appended_total", "Commissions created over HTTP"),
            append_duration: histogram(
                "atelier_append_duration_seconds",
                "Time a command from HTTP spent appending to the log",
            ),
            build_info: IntGaugeVec::new(
                Opts::new("atelier_build_info", "The running build: its version and source revision"),
                &["version", "revision"],
            )
            .expect("invariant: the build info gauge's name and labels are valid"),
        }
    }
}

impl Metrics {
    /// Names the running build; the series has this one value.
    pub fn set_build(&self, build: &BuildInfo) {
        self.build_info.reset();
        self.build_info.with_label_values(&[build.version.as_str(), build.revision.as_str()]).set(1);
    }

    pub fn request(&self, route: &'static str, status: u16, seconds: f64) {
        self.requests.with_label_values(&[route, &status.to_string()]).inc();
        self.request_duration.observe(seconds);
    }

    pub fn render(&self, store_lines: &str, store_dropped_slow: u64) -> String {
        let mut out = String::new();
        encode(&mut out, &self.requests);
        encode(&mut out, &self.request_duration);
        encode(&mut out, &self.sse_connections);
        encode(&mut out, &self.sse_events_sent);
        // A stream is cut off by the store when its queue overflows, even while its thread is
        // still blocked writing to a client that stopped reading. The store counts them.
        out.push_str(&format!(
            "# TYPE atelier_sse_dropped_slow_total counter\natelier_sse_dropped_slow_total {store_dropped_slow}\n"
        ));
        encode(&mut out, &self.events_appended);
        encode(&mut out, &self.append_duration);
        encode(&mut out, &self.build_info);
        out.push_str(store_lines);
        out
    }
}

/// Appends one collector's families in the text format. A family with no series yet (no
/// request answered) is left out: the encoder refuses it, and Prometheus needs no such line.
fn encode(out: &mut String, collector: &dyn Collector) {
    let families: Vec<_> = collector.collect().into_iter().filter(|f| !f.get_metric().is_empty()).collect();
    TextEncoder::new()
        .encode_utf8(&families, out)
        .expect("invariant: named families with series encode into a String");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_series_keeps_its_name_labels_and_buckets() {
        let m = Metrics::default();
        m.request("get_commission", 200, 0.003);
        m.request("get_commission", 200, 7.0);
        m.request("unknown", 404, 0.0001);
        m.sse_connections.inc();
        m.sse_events_sent.inc();
        m.events_appended.inc();
        m.append_duration.observe(0.02);
        m.set_build(&BuildInfo { version: "1.2.3".into(), revision: "0123456789ab".into() });
        let text = m.render("atelier_log_head_seq 3\n", 2);
        for line in [
            "# TYPE atelier_http_requests_total counter",
            "atelier_http_requests_total{route=\"get_commission\",status=\"200\"} 2",
            "atelier_http_requests_total{route=\"unknown\",status=\"404\"} 1",
            "# TYPE atelier_http_request_duration_seconds histogram",
            "atelier_http_request_duration_seconds_bucket{le=\"0.0005\"} 1",
            "atelier_http_request_duration_seconds_bucket{le=\"0.001\"} 1",
            "atelier_http_request_duration_seconds_bucket{le=\"0.0025\"} 1",
            "atelier_http_request_duration_seconds_bucket{le=\"0.005\"} 2",
            "atelier_http_request_duration_seconds_bucket{le=\"1\"} 2",
            "atelier_http_request_duration_seconds_bucket{le=\"5\"} 2",
            "atelier_http_request_duration_seconds_bucket{le=\"+Inf\"} 3",
            "atelier_http_request_duration_seconds_count 3",
            "# TYPE atelier_sse_connections gauge",
            "atelier_sse_connections 1",
            "# TYPE atelier_sse_events_sent_total counter",
            "atelier_sse_events_sent_total 1",
            "# TYPE atelier_sse_dropped_slow_total counter",
            "atelier_sse_dropped_slow_total 2",
            "# TYPE atelier_events_appended_total counter",
            "atelier_events_appended_total 1",
            "# TYPE atelier_append_duration_seconds histogram",
            "atelier_append_duration_seconds_bucket{le=\"0.025\"} 1",
            "atelier_append_duration_seconds_sum 0.02",
            "atelier_append_duration_seconds_count 1",
            "# TYPE atelier_build_info gauge",
            "atelier_build_info{revision=\"0123456789ab\",version=\"1.2.3\"} 1",
            "atelier_log_head_seq 3",
        ] {
            assert!(text.lines().any(|l| l == line), "missing '{line}' in:\n{text}");
        }
        let bounds: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("atelier_append_duration_seconds_bucket{le=\""))
            .filter_map(|l| l.split('"').next())
            .collect();
        assert_eq!(
            bounds,
            [
                "0.0005", "0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1",
                "5", "+Inf"
            ]
        );
        // The series come in the order they always had, the store's lines last.
        let order: Vec<usize> = [
            "requests_total",
            "request_duration",
            "sse_connections",
            "dropped_slow",
            "append_duration",
            "log_head_seq",
        ]
        .iter()
        .map(|n| text.find(n).unwrap())
        .collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{text}");
    }
}
