//! The server's counters and histograms, in Prometheus' text exposition format.
use std::fmt::Write;
use std::sync::Mutex;

/// A metric's `# HELP` and `# TYPE` lines.
fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

struct Histogram {
    name: &'static str,
    help: &'static str,
    bounds: &'static [f64],
    /// per bound, then +Inf
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(name: &'static str, help: &'static str, bounds: &'static [f64]) -> Self {
        Histogram {
            name,
            help,
            bounds,
            counts: vec![0; bounds.len() + 1],
            sum: 0.0,
            count: 0,
        }
    }

    fn observe(&mut self, v: f64) {
        let i = self
            .bounds
            .iter()
            .position(|&b| v <= b)
            .unwrap_or(self.bounds.len());
        self.counts[i] += 1;
        self.sum += v;
        self.count += 1;
    }

    fn render(&self, out: &mut String) {
        header(out, self.name, "histogram", self.help);
        let mut cumulative = 0;
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            cumulative += c;
            let _ = writeln!(out, "{}_bucket{{le=\"{b}\"}} {cumulative}", self.name);
        }
        let _ = writeln!(out, "{}_bucket{{le=\"+Inf\"}} {}", self.name, self.count);
        let _ = writeln!(out, "{}_sum {}", self.name, self.sum);
        let _ = writeln!(out, "{}_count {}", self.name, self.count);
    }
}

const SECONDS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
const SIZES: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

struct Inner {
    requests: u64,
    /// by status class: 2xx, 4xx, 5xx
    responses: [u64; 3],
    inputs: u64,
    batch_size: Histogram,
    batch_tokens: Histogram,
    queue: Histogram,
    latency: Histogram,
}

pub struct Metrics(Mutex<Inner>);

impl Default for Metrics {
    fn default() -> Self {
        Metrics(Mutex::new(Inner {
            requests: 0,
            responses: [0; 3],
            inputs: 0,
            batch_size: Histogram::new("qlora_cls_batch_size", "Inputs per model forward.", SIZES),
            batch_tokens: Histogram::new(
                "qlora_cls_batch_tokens",
                "Padded tokens per model forward.",
                &[64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0],
            ),
            queue: Histogram::new(
                "qlora_cls_queue_seconds",
                "Time an input waited before its forward started.",
                SECONDS,
            ),
            latency: Histogram::new(
                "qlora_cls_request_duration_seconds",
                "Time from a /predict request's arrival to its answer.",
                SECONDS,
            ),
        }))
    }
}

impl Metrics {
    fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        f(&mut self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }

    pub fn request(&self, status: u16, seconds: f64, inputs: usize) {
        self.with(|m| {
            m.requests += 1;
            m.inputs += inputs as u64;
            let class = match status {
                200..=399 => 0,
                400..=499 => 1,
                _ => 2,
            };
            m.responses[class] += 1;
            if class == 0 {
                m.latency.observe(seconds);
            }
        })
    }

    pub fn batch(&self, size: usize, padded_tokens: usize, queue_seconds: &[f64]) {
        self.with(|m| {
            m.batch_size.observe(size as f64);
            m.batch_tokens.observe(padded_tokens as f64);
            for &q in queue_seconds {
                m.queue.observe(q);
            }
        })
    }

    /// The exposition text; `queued` is the current queue depth (inputs).
    pub fn render(&self, queued: usize) -> String {
        self.with(|m| {
            let mut out = String::new();
            let scalars: [(&str, &str, &str, u64); 3] = [
                (
                    "qlora_cls_requests_total",
                    "counter",
                    "/predict requests received.",
                    m.requests,
                ),
                (
                    "qlora_cls_inputs_total",
                    "counter",
                    "Texts and pairs received.",
                    m.inputs,
                ),
                (
                    "qlora_cls_queue_depth",
                    "gauge",
                    "Inputs queued or in a forward now.",
                    queued as u64,
                ),
            ];
            for (name, kind, help, v) in scalars {
                header(&mut out, name, kind, help);
                let _ = writeln!(out, "{name} {v}");
            }
            header(
                &mut out,
                "qlora_cls_responses_total",
                "counter",
                "/predict responses by status class.",
            );
            for (class, n) in ["2xx", "4xx", "5xx"].iter().zip(m.responses) {
                let _ = writeln!(out, "qlora_cls_responses_total{{status=\"{class}\"}} {n}");
            }
            m.batch_size.render(&mut out);
            m.batch_tokens.render(&mut out);
            m.queue.render(&mut out);
            m.latency.render(&mut out);
            out
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative() {
        let m = Metrics::default();
        m.batch(3, 30, &[0.002, 0.02, 20.0]);
        m.request(200, 0.003, 3);
        m.request(422, 0.0, 0);
        let t = m.render(5);
        assert!(t.contains("qlora_cls_batch_size_bucket{le=\"4\"} 1"), "{t}");
        assert!(
            t.contains("qlora_cls_queue_seconds_bucket{le=\"0.0025\"} 1"),
            "{t}"
        );
        assert!(
            t.contains("qlora_cls_queue_seconds_bucket{le=\"0.025\"} 2"),
            "{t}"
        );
        assert!(
            t.contains("qlora_cls_queue_seconds_bucket{le=\"+Inf\"} 3"),
            "{t}"
        );
        assert!(
            t.contains("qlora_cls_responses_total{status=\"4xx\"} 1"),
            "{t}"
        );
        assert!(t.contains("qlora_cls_queue_depth 5"), "{t}");
        assert!(
            t.contains("qlora_cls_request_duration_seconds_count 1"),
            "{t}"
        );
    }
}
