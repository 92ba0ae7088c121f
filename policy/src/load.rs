//! Reading the config file and pointing at the offending line of an error.

use std::ops::Range;
use std::path::Path;

use crate::config::Config;
use crate::error::{ConfigError, Location};
use crate::validate::{Issue, KeyPart, KeyPath, check_config};

/// Reads, parses and validates the config file at `path`. Relative paths in
/// it are resolved against the file's directory.
pub fn load_config(path: &Path) -> Result<Config, ConfigError> {
    load_config_checked(path, Some(&online_cpus()))
}

/// Reads a config file as [`load_config`] does, but does not compare lane
/// cores with the CPUs online here, because the file may be meant for
/// another machine. `policy check` reports that comparison as a warning.
pub fn load_config_for_any_machine(path: &Path) -> Result<Config, ConfigError> {
    load_config_checked(path, None)
}

fn load_config_checked(path: &Path, online_cpus: Option<&[usize]>) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mut config = parse_config_checked(&text, &path.display().to_string(), online_cpus)?;
    if let Some(directory) = path.parent() {
        config.resolve_relative_paths(directory);
    }
    Ok(config)
}

/// Parses and validates config text. `origin` names the text in errors,
/// usually the file name. Lane cores are checked against the CPUs online on
/// this machine.
pub fn parse_config(text: &str, origin: &str) -> Result<Config, ConfigError> {
    parse_config_for_cpus(text, origin, &online_cpus())
}

/// Like [`parse_config`], with the machine's sorted CPU ids given.
pub(crate) fn parse_config_for_cpus(
    text: &str,
    origin: &str,
    online_cpus: &[usize],
) -> Result<Config, ConfigError> {
    parse_config_checked(text, origin, Some(online_cpus))
}

/// Parses and validates config text, checking lane cores against
/// `online_cpus` when it is given.
fn parse_config_checked(
    text: &str,
    origin: &str,
    online_cpus: Option<&[usize]>,
) -> Result<Config, ConfigError> {
    let config: Config = toml::from_str(text).map_err(|error| {
        let location = error
            .span()
            .map(|span| Location::of_span(text, span.clone()));
        // A wrong type or value names no key by itself; find the key whose
        // value covers the error's position, when the text parses as TOML.
        let key = error
            .span()
            .and_then(|span| {
                let document = toml_edit::ImDocument::parse(text).ok()?;
                key_at(document.as_item(), &span)
            })
            .unwrap_or_default();
        // The TOML parser's syntax messages span several lines, and one
        // error must stay one log line.
        let mut message = error
            .message()
            .trim_end()
            .lines()
            .map(str::trim)
            .filter(|line| !line.is_empty())
            .collect::<Vec<_>>()
            .join("; ");
        // serde names Rust types, so name what the file should contain.
        // The range is given because a value too large for the type gets
        // the same message as a negative one.
        for (rust, plain) in [
            (
                "expected usize",
                "expected a whole number from 0 to 18446744073709551615",
            ),
            (
                "expected u64",
                "expected a whole number from 0 to 18446744073709551615",
            ),
            (
                "expected u32",
                "expected a whole number from 0 to 4294967295",
            ),
            ("expected u16", "expected a whole number from 0 to 65535"),
            ("expected f64", "expected a number"),
        ] {
            message = message.replace(rust, plain);
        }
        // std's IpAddr parser names neither the value nor the expected form.
        if message == "invalid IP address syntax" {
            let value = error.span().and_then(|span| text.get(span)).unwrap_or("");
            message = format!(
                "{value} is not an IP address; write one such as \"192.0.2.10\" or \"2001:db8::10\""
            );
        }
        if key.is_empty() {
            message.push_str("; correct the TOML syntax at this line and column");
        } else {
            message.push_str("; see this key in docs/policy.md for its type and unit");
        }
        ConfigError::invalid(origin, location, key, message)
    })?;
    if let Err(issues) = check_config(&config, online_cpus) {
        return Err(first_issue_in_file_order(text, origin, issues));
    }
    Ok(config)
}

/// Turns the issue that appears first in the file into an error. Issues
/// about values the file does not set sort last.
fn first_issue_in_file_order(text: &str, origin: &str, issues: Vec<Issue>) -> ConfigError {
    // The text parsed as a `Config` a moment ago, so it parses again here.
    let document = toml_edit::ImDocument::parse(text).ok();
    let located = issues.into_iter().map(|issue| {
        let span = document
            .as_ref()
            .and_then(|document| find_span(document, &issue.path));
        (span, issue)
    });
    let (span, issue) = located
        .min_by_key(|(span, _)| span.as_ref().map_or(usize::MAX, |span| span.start))
        .expect("check_config returns Err only with at least one issue");
    let location = span.map(|span| Location::of_span(text, span));
    let message = if location.is_none() {
        format!(
            "{} (the default value; set the key in the file)",
            issue.message
        )
    } else {
        issue.message
    };
    ConfigError::invalid(origin, location, issue.path.to_string(), message)
}

/// Reads the sorted ids of the CPUs online on this machine from
/// /sys/devices/system/cpu/online. Falls back to `0..available_parallelism`
/// when that file cannot be read.
pub(crate) fn online_cpus() -> Vec<usize> {
    if let Some(cpus) = std::fs::read_to_string("/sys/devices/system/cpu/online")
        .ok()
        .and_then(|text| parse_cpu_list(text.trim()))
    {
        return cpus;
    }
    let count = std::thread::available_parallelism().map_or(1, |count| count.get());
    (0..count).collect()
}

/// Parses a kernel CPU list such as `0-3,6,8-9` into sorted ids.
fn parse_cpu_list(text: &str) -> Option<Vec<usize>> {
    let mut cpus = Vec::new();
    for part in text.split(',') {
        match part.split_once('-') {
            Some((first, last)) => {
                let first: usize = first.parse().ok()?;
                let last: usize = last.parse().ok()?;
                // The kernel lists at most a few thousand CPUs; a larger
                // range means the file is not what it claims to be.
                if last < first || last - first > 65_536 {
                    return None;
                }
                cpus.extend(first..=last);
            }
            None => cpus.push(part.parse().ok()?),
        }
    }
    cpus.sort_unstable();
    cpus.dedup();
    Some(cpus)
}

/// Returns the span of the value at `path` in `document`, or of its nearest
/// ancestor that has one when the value itself is a default or an implicit
/// table such as `lanes` in `[lanes.bulk]`.
/// Returns the dotted key, such as `lanes.bulk.cores[0]` or `rule[2].rate`,
/// of the innermost value whose span contains `span`.
fn key_at(item: &toml_edit::Item, span: &Range<usize>) -> Option<String> {
    let covers = |candidate: Option<Range<usize>>| {
        candidate.is_some_and(|range| range.start <= span.start && span.end <= range.end)
    };
    let child_key = |key: String, child: &toml_edit::Item| -> Option<String> {
        match key_at(child, span) {
            Some(inner) if inner.starts_with('[') => Some(format!("{key}{inner}")),
            Some(inner) => Some(format!("{key}.{inner}")),
            None => covers(child.span()).then_some(key),
        }
    };
    if let Some(table) = item.as_table_like() {
        for (key, child) in table.iter() {
            if let Some(found) = child_key(key.to_string(), child) {
                return Some(found);
            }
        }
    }
    if let Some(array) = item.as_array_of_tables() {
        for (index, table) in array.iter().enumerate() {
            let child = toml_edit::Item::Table(table.clone());
            if let Some(inner) = key_at(&child, span) {
                return Some(format!("[{index}].{inner}"));
            }
        }
    }
    if let Some(array) = item.as_array() {
        for (index, value) in array.iter().enumerate() {
            if covers(value.span()) {
                return Some(format!("[{index}]"));
            }
        }
    }
    None
}

fn find_span(document: &toml_edit::ImDocument<&str>, path: &KeyPath) -> Option<Range<usize>> {
    let mut item = document.as_item();
    let mut found = None;
    for part in &path.0 {
        let child = match part {
            KeyPart::Key(key) => item.get(*key),
            KeyPart::Index(index) => item.get(*index),
        };
        let Some(child) = child else { break };
        if let Some(span) = child.span() {
            found = Some(span);
        }
        item = child;
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_list_ranges_and_singles() {
        assert_eq!(parse_cpu_list("0-3,6,8-9"), Some(vec![0, 1, 2, 3, 6, 8, 9]));
        assert_eq!(parse_cpu_list("0"), Some(vec![0]));
        assert_eq!(parse_cpu_list("3-1"), None);
        assert_eq!(parse_cpu_list("x"), None);
        assert_eq!(parse_cpu_list("0-99999999999"), None);
    }

    #[test]
    fn online_cpus_not_empty() {
        assert!(!online_cpus().is_empty());
    }
}
