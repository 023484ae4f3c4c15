//! Prometheus text exposition (format 0.0.4): a writer for counters, gauges and histograms, and
//! a strict parser (what scrapers and the tests read back).

use std::fmt::Write as _;

/// Latency buckets (seconds) of request histograms: 1 ms to 10 s.
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// A histogram with fixed upper bounds (cumulative counts are computed when written).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Histogram {
    /// Per bucket of [`LATENCY_BUCKETS`], the observations that fell in it (not cumulative).
    pub counts: [u64; LATENCY_BUCKETS.len()],
    pub count: u64,
    pub sum: f64,
}

impl Histogram {
    pub fn observe(&mut self, value: f64) {
        if let Some(i) = LATENCY_BUCKETS.iter().position(|&b| value <= b) {
            self.counts[i] += 1;
        }
        self.count += 1;
        self.sum += value;
    }
}

/// Label values escaped as the format asks (backslash, quote, newline).
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn labels(pairs: &[(&str, &str)]) -> String {
    if pairs.is_empty() {
        return String::new();
    }
    let inner: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
        .collect();
    format!("{{{}}}", inner.join(","))
}

/// Floats as Prometheus reads them.
fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 {
            "+Inf".into()
        } else {
            "-Inf".into()
        }
    } else {
        format!("{v}")
    }
}

/// Metric families written one after another; each family's samples follow its HELP and TYPE.
#[derive(Debug, Default)]
pub struct Exposition {
    text: String,
}

impl Exposition {
    fn header(&mut self, name: &str, help: &str, kind: &str) {
        let _ = writeln!(
            self.text,
            "# HELP {name} {}",
            help.replace('\\', "\\\\").replace('\n', "\\n")
        );
        let _ = writeln!(self.text, "# TYPE {name} {kind}");
    }

    /// A family of samples (`kind` "counter" or "gauge"), one per label set.
    pub fn family(
        &mut self,
        name: &str,
        help: &str,
        kind: &str,
        samples: &[(Vec<(&str, &str)>, f64)],
    ) {
        self.header(name, help, kind);
        for (pairs, value) in samples {
            let _ = writeln!(self.text, "{name}{} {}", labels(pairs), number(*value));
        }
    }

    pub fn gauge(&mut self, name: &str, help: &str, value: f64) {
        self.family(name, help, "gauge", &[(Vec::new(), value)]);
    }

    pub fn counter(&mut self, name: &str, help: &str, value: f64) {
        self.family(name, help, "counter", &[(Vec::new(), value)]);
    }

    /// A histogram family over [`LATENCY_BUCKETS`], one per label set.
    pub fn histograms(
        &mut self,
        name: &str,
        help: &str,
        series: &[(Vec<(&str, &str)>, &Histogram)],
    ) {
        self.header(name, help, "histogram");
        for (pairs, h) in series {
            let mut cumulative = 0;
            for (bound, n) in LATENCY_BUCKETS.iter().zip(h.counts) {
                cumulative += n;
                let mut with = pairs.clone();
                let le = number(*bound);
                with.push(("le", &le));
                let _ = writeln!(self.text, "{name}_bucket{} {cumulative}", labels(&with));
            }
            let mut with = pairs.clone();
            with.push(("le", "+Inf"));
            let _ = writeln!(self.text, "{name}_bucket{} {}", labels(&with), h.count);
            let _ = writeln!(self.text, "{name}_sum{} {}", labels(pairs), number(h.sum));
            let _ = writeln!(self.text, "{name}_count{} {}", labels(pairs), h.count);
        }
    }

    pub fn finish(self) -> String {
        self.text
    }
}

type Labels = Vec<(String, String)>;

/// One sample of an exposition: metric name, labels, value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// Parses exposition text strictly (what a scraper and a probe test need): every sample belongs
/// to a family announced by `# HELP` and `# TYPE` before it, names and labels are well formed,
/// values are numbers, and each histogram's buckets rise to its `+Inf` bucket, which equals its
/// count. The error names the line.
pub fn parse(text: &str) -> Result<Vec<Sample>, String> {
    let mut families: Vec<(String, String)> = Vec::new();
    let mut samples = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let bad = |why: &str| format!("line {}: {why}: {line:?}", i + 1);
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some("HELP"), Some(name), Some(_)) if valid_name(name) => {}
                (Some("TYPE"), Some(name), Some(kind))
                    if valid_name(name)
                        && ["counter", "gauge", "histogram", "summary", "untyped"]
                            .contains(&kind) =>
                {
                    families.push((name.to_string(), kind.to_string()))
                }
                _ => return Err(bad("malformed HELP or TYPE")),
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').ok_or_else(|| bad("no value"))?;
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().map_err(|_| bad("value is not a number"))?,
        };
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => {
                let inner = rest
                    .strip_suffix('}')
                    .ok_or_else(|| bad("unclosed labels"))?;
                let mut labels = Vec::new();
                let mut rest = inner;
                while !rest.is_empty() {
                    let (key, after) = rest
                        .split_once("=\"")
                        .ok_or_else(|| bad("label without =\""))?;
                    let mut end = None;
                    let mut escaped = false;
                    for (j, c) in after.char_indices() {
                        match (escaped, c) {
                            (true, _) => escaped = false,
                            (false, '\\') => escaped = true,
                            (false, '"') => {
                                end = Some(j);
                                break;
                            }
                            _ => {}
                        }
                    }
                    let end = end.ok_or_else(|| bad("unterminated label value"))?;
                    if !valid_name(key) {
                        return Err(bad("bad label name"));
                    }
                    labels.push((key.to_string(), after[..end].to_string()));
                    rest = after[end + 1..]
                        .strip_prefix(',')
                        .unwrap_or(&after[end + 1..]);
                }
                (name, labels)
            }
            None => (series, Vec::new()),
        };
        if !valid_name(name) {
            return Err(bad("bad metric name"));
        }
        let family = families.iter().rev().find(|(f, kind)| {
            name == f
                || (kind == "histogram"
                    && [
                        format!("{f}_bucket"),
                        format!("{f}_sum"),
                        format!("{f}_count"),
                    ]
                    .iter()
                    .any(|n| n == name))
        });
        if family.is_none() {
            return Err(bad("sample before its family's # TYPE"));
        }
        samples.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    // Histograms: cumulative buckets ending at +Inf = count, per label set.
    for (family, _) in families.iter().filter(|(_, kind)| kind == "histogram") {
        let bucket = format!("{family}_bucket");
        let mut series: Vec<(Labels, Vec<(f64, f64)>)> = Vec::new();
        for s in samples.iter().filter(|s| s.name == bucket) {
            let le = s
                .labels
                .iter()
                .find(|(k, _)| k == "le")
                .ok_or_else(|| format!("{bucket} without le"))?;
            let bound = if le.1 == "+Inf" {
                f64::INFINITY
            } else {
                le.1.parse()
                    .map_err(|_| format!("{bucket}: le {:?}", le.1))?
            };
            let key: Labels = s
                .labels
                .iter()
                .filter(|(k, _)| k != "le")
                .cloned()
                .collect();
            match series.iter_mut().find(|(k, _)| *k == key) {
                Some((_, points)) => points.push((bound, s.value)),
                None => series.push((key, vec![(bound, s.value)])),
            }
        }
        for (key, points) in &series {
            if points
                .windows(2)
                .any(|w| w[0].0 >= w[1].0 || w[0].1 > w[1].1)
                || points.last().is_none_or(|p| p.0 != f64::INFINITY)
            {
                return Err(format!("{family}{key:?}: buckets must rise to le=\"+Inf\""));
            }
            let count = samples
                .iter()
                .find(|s| s.name == format!("{family}_count") && s.labels == *key)
                .ok_or_else(|| format!("{family}{key:?}: no _count"))?;
            if points.last().map(|p| p.1) != Some(count.value) {
                return Err(format!("{family}{key:?}: +Inf bucket differs from _count"));
            }
        }
    }
    Ok(samples)
}

/// The value of the sample `name` whose labels include all of `labels`.
pub fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.iter().any(|(a, b)| a == k && b == v))
        })
        .map(|s| s.value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_histograms_and_labels_are_written_as_prometheus_reads_them() {
        let mut h = Histogram::default();
        for v in [0.0005, 0.003, 0.003, 20.0] {
            h.observe(v);
        }
        let mut e = Exposition::default();
        e.counter("x_total", "Things.", 3.0);
        e.family(
            "jobs",
            "Jobs by state.",
            "gauge",
            &[
                (vec![("state", "running")], 2.0),
                (vec![("state", "a\"b")], 0.0),
            ],
        );
        e.histograms(
            "lat_seconds",
            "Latency.",
            &[(vec![("method", "Encode")], &h)],
        );
        let text = e.finish();
        assert!(
            text.starts_with("# HELP x_total Things.\n# TYPE x_total counter\nx_total 3\n"),
            "{text}"
        );
        assert!(
            text.contains("jobs{state=\"running\"} 2\n")
                && text.contains("jobs{state=\"a\\\"b\"} 0\n"),
            "{text}"
        );
        assert!(
            text.contains("lat_seconds_bucket{method=\"Encode\",le=\"0.001\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("lat_seconds_bucket{method=\"Encode\",le=\"0.005\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("lat_seconds_bucket{method=\"Encode\",le=\"10\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("lat_seconds_bucket{method=\"Encode\",le=\"+Inf\"} 4\n"),
            "{text}"
        );
        assert!(
            text.contains("lat_seconds_count{method=\"Encode\"} 4\n"),
            "{text}"
        );
        assert_eq!(number(f64::INFINITY), "+Inf");
        let samples = parse(&text).unwrap();
        assert_eq!(value(&samples, "jobs", &[("state", "a\\\"b")]), Some(0.0));
        assert_eq!(
            value(&samples, "lat_seconds_count", &[("method", "Encode")]),
            Some(4.0)
        );
    }

    #[test]
    fn malformed_exposition_is_refused_by_line() {
        for (text, why) in [
            ("x 1\n", "before its family"),
            ("# TYPE x gauge\nx one\n", "not a number"),
            ("# TYPE x gauge\nx{a=\"1} 1\n", "unterminated"),
            ("# TYPE 1x gauge\n", "malformed"),
            (
                "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_count 1\n",
                "rise",
            ),
            (
                "# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_count 1\n",
                "differs",
            ),
        ] {
            let e = parse(text).unwrap_err();
            assert!(e.contains(why), "{text:?}: {e}");
        }
    }
}
