//! Percentiles of latency samples, and how they are printed.

use serde_json::{Value, json};

/// Latency samples in milliseconds.
#[derive(Debug, Default, Clone)]
pub struct Samples {
    ms: Vec<f64>,
}

impl Samples {
    pub fn push(&mut self, ms: f64) {
        self.ms.push(ms);
    }

    pub fn extend(&mut self, other: &Samples) {
        self.ms.extend_from_slice(&other.ms);
    }

    pub fn len(&self) -> usize {
        self.ms.len()
    }

    /// The `q`-quantile (0..=1) by the nearest-rank method; NaN when empty.
    pub fn quantile(&self, q: f64) -> f64 {
        if self.ms.is_empty() {
            return f64::NAN;
        }
        let mut sorted = self.ms.clone();
        sorted.sort_by(f64::total_cmp);
        let rank = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len());
        sorted[rank - 1]
    }

    pub fn max(&self) -> f64 {
        self.ms.iter().copied().fold(f64::NAN, f64::max)
    }

    /// `p50 … ms, p99 … ms, max … ms (n)`.
    pub fn summary(&self) -> String {
        if self.ms.is_empty() {
            return "no samples".into();
        }
        format!(
            "p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} samples)",
            self.quantile(0.5),
            self.quantile(0.99),
            self.max(),
            self.len()
        )
    }

    pub fn json(&self) -> Value {
        json!({
            "n": self.len(),
            "p50_ms": finite(self.quantile(0.5)),
            "p90_ms": finite(self.quantile(0.9)),
            "p99_ms": finite(self.quantile(0.99)),
            "max_ms": finite(self.max()),
        })
    }
}

/// NaN and infinities as JSON null.
pub fn finite(x: f64) -> Value {
    if x.is_finite() { json!((x * 1000.0).round() / 1000.0) } else { Value::Null }
}

/// min / median / max of some values, for per-node columns.
pub fn spread(values: &[f64]) -> (f64, f64, f64) {
    if values.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    (v[0], v[v.len() / 2], v[v.len() - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let mut s = Samples::default();
        for i in 1..=100 {
            s.push(i as f64);
        }
        assert_eq!(s.quantile(0.5), 50.0);
        assert_eq!(s.quantile(0.99), 99.0);
        assert_eq!(s.quantile(1.0), 100.0);
        assert!(Samples::default().quantile(0.5).is_nan());
    }
}
