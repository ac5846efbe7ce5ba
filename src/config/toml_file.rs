//! Reader for the native TOML configuration file.
//!
//! Parses with spans so that every key keeps its line number, and flattens
//! the known sections into dotted keys (`[locks] lock-type` → `locks.lock-type`).
//! Type checking happens later, in `schema.rs`, so that all problems of a
//! file are reported together.

use std::path::Path;

use toml::de::{DeTable, DeValue};

use super::raw::{RawConfig, RawValue, line_of};
use super::{ConfigProblem, reader::SECTIONS};

/// Parse TOML text read from `file` into raw settings, or the list of syntax
/// errors (each with its line).
pub fn parse(file: &Path, src: &str) -> Result<RawConfig, Vec<ConfigProblem>> {
    let (doc, errors) = DeTable::parse_recoverable(src);
    if !errors.is_empty() {
        return Err(errors
            .iter()
            .map(|e| ConfigProblem {
                file: file.to_path_buf(),
                line: e.span().map(|s| line_of(src, s.start)),
                key: None,
                message: format!("TOML syntax error: {}", e.message().trim()),
            })
            .collect());
    }
    let mut raw = RawConfig { files: vec![file.to_path_buf()], ..Default::default() };
    for (key, value) in doc.get_ref().iter() {
        let name = key.get_ref().as_ref();
        let line = line_of(src, key.span().start);
        match value.get_ref() {
            DeValue::Table(table) if SECTIONS.contains(&name) => {
                for (sub_key, sub_value) in table.iter() {
                    let sub_line = line_of(src, sub_key.span().start);
                    raw.set(format!("{name}.{}", sub_key.get_ref()), convert(sub_value.get_ref()), file, sub_line);
                }
            }
            other => raw.set(name, convert(other), file, line),
        }
    }
    Ok(raw)
}

fn convert(value: &DeValue<'_>) -> RawValue {
    match value {
        DeValue::String(s) => RawValue::Str(s.to_string()),
        DeValue::Integer(i) => {
            let digits: String = i.as_str().chars().filter(|c| *c != '_').collect();
            match i64::from_str_radix(&digits, i.radix()) {
                Ok(n) => RawValue::Int(n),
                Err(_) => RawValue::Unsupported("integer out of range"),
            }
        }
        DeValue::Float(x) => match x.as_str().replace('_', "").parse::<f64>() {
            Ok(v) => RawValue::Float(v),
            Err(_) => RawValue::Unsupported("float"),
        },
        DeValue::Boolean(b) => RawValue::Bool(*b),
        DeValue::Datetime(_) => RawValue::Unsupported("date-time"),
        DeValue::Array(items) => RawValue::Array(items.iter().map(|v| convert(v.get_ref())).collect()),
        DeValue::Table(_) => RawValue::Unsupported("table"),
    }
}
