//! A parsed Prometheus text exposition (what `GET /metrics` returns).

use std::collections::BTreeMap;
use std::fmt;

/// One sample: metric name, labels and value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Every sample of one scrape.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Scrape {
    samples: Vec<Sample>,
}

impl Scrape {
    /// Parses the text format; comment lines and lines that do not parse are skipped.
    pub fn parse(text: &str) -> Self {
        let samples = text
            .lines()
            .map(str::trim)
            .filter(|line| !line.is_empty() && !line.starts_with('#'))
            .filter_map(parse_line)
            .collect();
        Self { samples }
    }

    pub fn samples(&self) -> &[Sample] {
        &self.samples
    }

    /// The value of `name` with exactly these labels (order does not matter); 0 if absent (a
    /// counter that was never incremented is not rendered).
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .find(|s| {
                s.name == name
                    && s.labels.len() == labels.len()
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map_or(0.0, |s| s.value)
    }

    /// Sum of every sample of `name`, whatever its labels.
    pub fn sum(&self, name: &str) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.name == name)
            .map(|s| s.value)
            .sum()
    }

    /// `{reason}` → value of every sample of a family labelled by `reason`.
    pub fn by_label(&self, name: &str, label: &str) -> BTreeMap<String, f64> {
        self.samples
            .iter()
            .filter(|s| s.name == name)
            .filter_map(|s| s.labels.get(label).map(|l| (l.clone(), s.value)))
            .collect()
    }
}

impl fmt::Display for Scrape {
    /// Only the posfleet samples, one per line (for failure messages).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for s in self
            .samples
            .iter()
            .filter(|s| s.name.starts_with("posfleet_") && !s.name.contains("_bucket"))
        {
            let labels: Vec<String> = s.labels.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
            writeln!(f, "{}{{{}}} {}", s.name, labels.join(","), s.value)?;
        }
        Ok(())
    }
}

fn parse_line(line: &str) -> Option<Sample> {
    let (series, rest) = match line.find('{') {
        Some(_) => {
            let close = line.rfind('}')?;
            (&line[..close + 1], &line[close + 1..])
        }
        None => line.split_at(line.find(char::is_whitespace)?),
    };
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    let (name, labels) = match series.find('{') {
        None => (series.to_owned(), BTreeMap::new()),
        Some(open) => (
            series[..open].to_owned(),
            parse_labels(&series[open + 1..series.len() - 1])?,
        ),
    };
    Some(Sample {
        name,
        labels,
        value,
    })
}

/// `a="x",b="y\"z"` → map (escapes `\"`, `\\`, `\n` understood).
fn parse_labels(text: &str) -> Option<BTreeMap<String, String>> {
    let mut labels = BTreeMap::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.peek() == Some(&',') || chars.peek() == Some(&' ') {
            chars.next();
        }
        if chars.peek().is_none() {
            return Some(labels);
        }
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if chars.next()? != '"' {
            return None;
        }
        let mut value = String::new();
        loop {
            match chars.next()? {
                '"' => break,
                '\\' => match chars.next()? {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                c => value.push(c),
            }
        }
        labels.insert(key.trim().to_owned(), value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP posfleet_edge_refusals Connections refused, by reason.
# TYPE posfleet_edge_refusals counter
posfleet_edge_refusals_total{reason="bad_client_certificate"} 2
posfleet_edge_refusals_total{reason="no_client_certificate"} 1
posfleet_edge_connections 7
posfleet_ingest_latency_seconds_bucket{le="+Inf"} 3
weird{a="x\"y",b="z"} 1.5
# EOF
"#;

    #[test]
    fn reads_values_by_name_and_labels() {
        let scrape = Scrape::parse(TEXT);
        assert_eq!(
            scrape.value(
                "posfleet_edge_refusals_total",
                &[("reason", "bad_client_certificate")]
            ),
            2.0
        );
        assert_eq!(scrape.value("posfleet_edge_connections", &[]), 7.0);
        assert_eq!(
            scrape.value("posfleet_edge_refusals_total", &[("reason", "x")]),
            0.0
        );
        assert_eq!(scrape.sum("posfleet_edge_refusals_total"), 3.0);
        assert_eq!(scrape.value("weird", &[("b", "z"), ("a", "x\"y")]), 1.5);
        assert_eq!(
            scrape.value("posfleet_ingest_latency_seconds_bucket", &[("le", "+Inf")]),
            3.0
        );
        assert_eq!(
            scrape
                .by_label("posfleet_edge_refusals_total", "reason")
                .len(),
            2
        );
    }
}
