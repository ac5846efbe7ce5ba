//! Typed reading of raw settings: [`Reader`] walks a [`RawConfig`],
//! converts each key it is asked for (string, path, bool, integer, duration,
//! choice, address, list) and records a [`ConfigProblem`] (file, line, key,
//! what is allowed) for every bad value, then reports every key nobody asked
//! for as unknown. Nothing stops at the first error. Which keys exist, with
//! their types and defaults, is `schema.rs`.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::ConfigProblem;
use super::raw::{Origin, RawConfig, RawEntry, RawValue};

/// Sections of the TOML file; any other table is an unknown key.
pub const SECTIONS: &[&str] = &["sessions", "identity", "locks"];

/// Converts raw settings to typed values, collecting problems.
pub struct Reader {
    raw: RawConfig,
    used: BTreeSet<String>,
    problems: Vec<ConfigProblem>,
    /// Every key this schema knows, for "allowed keys" hints.
    known: BTreeSet<String>,
}

impl Reader {
    pub fn new(raw: RawConfig) -> Self {
        Reader { raw, used: BTreeSet::new(), problems: Vec::new(), known: BTreeSet::new() }
    }

    fn entry(&mut self, key: &str) -> Option<RawEntry> {
        self.known.insert(key.to_string());
        self.used.insert(key.to_string());
        self.raw.entries.get(key).cloned()
    }

    /// Whether the key was written at all.
    pub fn is_set(&self, key: &str) -> bool {
        self.raw.entries.contains_key(key)
    }

    /// Where the key was written, if it was.
    pub fn origin(&self, key: &str) -> Option<&Origin> {
        self.raw.entries.get(key).map(|e| &e.origin)
    }

    fn bad(&mut self, key: &str, entry: &RawEntry, expected: &str) {
        let message = format!("`{key}` must be {expected}; found {}", entry.value.redacted(key).describe());
        self.problems.push(ConfigProblem::at(&entry.origin, key, message));
    }

    /// Record a problem about a key's value that only a cross-key check can see.
    pub fn problem_at(&mut self, key: &str, message: String) {
        let problem = match self.raw.entries.get(key) {
            Some(e) => ConfigProblem::at(&e.origin, key, message),
            None => ConfigProblem {
                file: self.raw.files.first().cloned().unwrap_or_default(),
                line: None,
                key: Some(key.to_string()),
                message,
            },
        };
        self.problems.push(problem);
    }

    /// Record a problem that is not about one key's value.
    pub fn problem(&mut self, problem: ConfigProblem) {
        self.problems.push(problem);
    }

    /// Every key asked for so far (the schema's keys, once all are read).
    pub fn known_keys(&self) -> &BTreeSet<String> {
        &self.known
    }

    /// Generic getter: `parse` returns `Err(expected)` to describe what is allowed.
    pub fn get<T>(&mut self, key: &str, default: T, parse: impl FnOnce(&RawValue) -> Result<T, String>) -> T {
        match self.entry(key) {
            None => default,
            Some(entry) => match parse(&entry.value) {
                Ok(v) => v,
                Err(expected) => {
                    self.bad(key, &entry, &expected);
                    default
                }
            },
        }
    }

    pub fn string(&mut self, key: &str, default: &str) -> String {
        self.get(key, default.to_string(), |v| text(v).map(str::to_string).ok_or_else(|| "a string".into()))
    }

    /// A string where the empty string means "not set".
    pub fn opt_string(&mut self, key: &str) -> Option<String> {
        let s = self.string(key, "");
        (!s.is_empty()).then_some(s)
    }

    pub fn path(&mut self, key: &str, default: &str) -> PathBuf {
        PathBuf::from(self.string(key, default))
    }

    pub fn bool(&mut self, key: &str, default: bool) -> bool {
        self.get(key, default, |v| match v {
            RawValue::Bool(b) => Ok(*b),
            RawValue::Text(s) => match s.to_ascii_lowercase().as_str() {
                "1" | "true" | "yes" | "on" => Ok(true),
                "0" | "false" | "no" | "off" => Ok(false),
                _ => Err("a boolean (true/false, 1/0)".into()),
            },
            _ => Err("a boolean (true or false)".into()),
        })
    }

    pub fn int(&mut self, key: &str, default: i64, min: i64, max: i64) -> i64 {
        let expected = format!("an integer from {min} to {max}");
        self.get(key, default, |v| {
            let n = match v {
                RawValue::Int(n) => Some(*n),
                RawValue::Text(s) => s.parse::<i64>().ok(),
                _ => None,
            };
            n.filter(|n| (min..=max).contains(n)).ok_or(expected)
        })
    }

    pub fn float(&mut self, key: &str, default: f64, min: f64, max: f64) -> f64 {
        let expected = format!("a number from {min} to {max}");
        self.get(key, default, |v| {
            let n = match v {
                RawValue::Int(n) => Some(*n as f64),
                RawValue::Float(x) => Some(*x),
                RawValue::Text(s) => s.parse::<f64>().ok(),
                _ => None,
            };
            n.filter(|n| n.is_finite() && *n >= min && *n <= max).ok_or(expected)
        })
    }

    /// A duration: a number of seconds (`30`, `0.5`) or a string with a unit
    /// (`"500ms"`, `"30s"`, `"5m"`, `"2h"`, `"1d"`). `min` is inclusive.
    pub fn duration(&mut self, key: &str, default: Duration, min: Duration) -> Duration {
        let expected = format!(
            "a duration of at least {} and at most {} (seconds as a number, or a string like \"500ms\", \"30s\", \"5m\", \"2h\")",
            humanize(min),
            humanize(MAX_DURATION)
        );
        self.get(key, default, |v| parse_duration(v).filter(|d| *d >= min).ok_or(expected))
    }

    /// A duration that is a whole number of seconds (for settings that
    /// Pingora counts in seconds: a fraction would be silently dropped).
    pub fn whole_seconds(&mut self, key: &str, default: Duration) -> Duration {
        let expected = format!(
            "a whole number of seconds, at most {} (a number, or a string like \"5s\", \"2m\")",
            humanize(MAX_DURATION)
        );
        self.get(key, default, |v| parse_duration(v).filter(|d| d.subsec_nanos() == 0).ok_or(expected))
    }

    /// One of a fixed set of names.
    pub fn choice<T: Copy>(&mut self, key: &str, default: T, choices: &[(&str, T)]) -> T {
        let names: Vec<&str> = choices.iter().map(|(n, _)| *n).collect();
        let expected = format!("one of {}", names.join(", "));
        self.get(key, default, |v| {
            let s = text(v).ok_or_else(|| expected.clone())?;
            choices.iter().find(|(n, _)| n.eq_ignore_ascii_case(s)).map(|(_, t)| *t).ok_or(expected)
        })
    }

    pub fn ip(&mut self, key: &str, default: IpAddr) -> IpAddr {
        self.get(key, default, |v| {
            text(v)
                .and_then(|s| s.parse::<IpAddr>().ok())
                .ok_or_else(|| "an IP address such as 0.0.0.0 or 10.0.0.5".into())
        })
    }

    /// An array of strings, each checked by `item`.
    pub fn list<T>(&mut self, key: &str, item: impl Fn(&str) -> Option<T>, expected: &str) -> Vec<T> {
        let expected = expected.to_string();
        self.get(key, Vec::new(), |v| {
            let items: Vec<&str> = match v {
                RawValue::Array(items) => {
                    items.iter().map(text).collect::<Option<_>>().ok_or_else(|| expected.clone())?
                }
                RawValue::Text(s) => s.split(',').map(str::trim).filter(|s| !s.is_empty()).collect(),
                _ => return Err(expected.clone()),
            };
            items.into_iter().map(|s| item(s).ok_or_else(|| format!("{expected} (bad item {s:?})"))).collect()
        })
    }

    /// Report unknown keys and return everything found.
    pub fn finish(mut self) -> (RawConfig, Vec<ConfigProblem>) {
        let unknown: Vec<(String, RawEntry)> = self
            .raw
            .entries
            .iter()
            .filter(|(k, _)| !self.used.contains(*k))
            .map(|(k, e)| (k.clone(), e.clone()))
            .collect();
        for (key, entry) in unknown {
            let section = key.rsplit_once('.').map(|(s, _)| s);
            let allowed: Vec<String> = self
                .known
                .iter()
                .filter(|k| k.rsplit_once('.').map(|(s, _)| s) == section)
                .map(|k| k.rsplit_once('.').map_or(k.as_str(), |(_, n)| n).to_string())
                .collect();
            let mut message = format!("unknown key `{key}`");
            if let Some(best) = closest(&key, &self.known) {
                message.push_str(&format!(" (did you mean `{best}`?)"));
            }
            if section.is_none() {
                message.push_str(&format!(
                    "; allowed top-level keys: {}; sections: {}",
                    allowed.join(", "),
                    SECTIONS.iter().map(|s| format!("[{s}]")).collect::<Vec<_>>().join(", ")
                ));
            } else {
                message.push_str(&format!("; allowed in this section: {}", allowed.join(", ")));
            }
            self.problems.push(ConfigProblem::at(&entry.origin, &key, message));
        }
        self.problems.sort_by(|a, b| (&a.file, a.line).cmp(&(&b.file, b.line)));
        (self.raw, self.problems)
    }
}

/// The string inside a string-ish value.
pub fn text(v: &RawValue) -> Option<&str> {
    match v {
        RawValue::Str(s) | RawValue::Text(s) => Some(s.as_str()),
        _ => None,
    }
}

/// The longest duration any setting accepts (ten years): longer ones are
/// mistakes, and deadlines computed from them (`Instant + d`) would overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(3650 * 86_400);

/// Parse a duration value (see [`Reader::duration`]); `None` for anything
/// that is not a duration from 0 to [`MAX_DURATION`].
pub fn parse_duration(v: &RawValue) -> Option<Duration> {
    // `try_from_secs_f64` refuses NaN, negative and overflowing values
    // (`from_secs_f64` panics on `1e20`): a huge value is a configuration error.
    let secs = |x: f64| Duration::try_from_secs_f64(x).ok().filter(|d| *d <= MAX_DURATION);
    match v {
        RawValue::Int(n) => secs(*n as f64),
        RawValue::Float(x) => secs(*x),
        RawValue::Str(s) | RawValue::Text(s) => {
            let s = s.trim();
            let split = s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len());
            let (num, unit) = s.split_at(split);
            let n: f64 = num.trim().parse().ok()?;
            let factor = match unit.trim() {
                "" | "s" => 1.0,
                "ms" => 0.001,
                "m" | "min" => 60.0,
                "h" => 3600.0,
                "d" => 86400.0,
                _ => return None,
            };
            secs(n * factor)
        }
        _ => None,
    }
}

/// `1.5s`, `300ms`, `2h` — for messages and `check-config`.
pub fn humanize(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        "0s".into()
    } else if ms.is_multiple_of(86_400_000) {
        format!("{}d", ms / 86_400_000)
    } else if ms.is_multiple_of(3_600_000) {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// The known key nearest to a misspelt one, if any is close.
fn closest<'a>(key: &str, known: &'a BTreeSet<String>) -> Option<&'a str> {
    known
        .iter()
        .map(|k| (edit_distance(key, k), k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 4))
        .min()
        .map(|(_, k)| k.as_str())
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_accept_numbers_and_units() {
        assert_eq!(parse_duration(&RawValue::Int(30)), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration(&RawValue::Float(0.25)), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration(&RawValue::Str("500ms".into())), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration(&RawValue::Text("2h".into())), Some(Duration::from_secs(7200)));
        assert_eq!(parse_duration(&RawValue::Str("5 parsecs".into())), None);
        assert_eq!(parse_duration(&RawValue::Int(-1)), None);
        assert_eq!(humanize(Duration::from_secs(7200)), "2h");
        assert_eq!(humanize(Duration::from_millis(1500)), "1500ms");
    }

    #[test]
    fn misspelt_key_gets_a_suggestion() {
        let known: BTreeSet<String> = ["balancer".to_string(), "www-port".to_string()].into();
        assert_eq!(closest("balncer", &known), Some("balancer"));
        assert_eq!(closest("zzzzzzzz", &known), None);
    }
}
