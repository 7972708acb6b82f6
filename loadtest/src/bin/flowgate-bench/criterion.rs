//! Criterion's own record of a run: `target/criterion/<id>/new/benchmark.json` names the
//! benchmark (`full_id`), `estimates.json` beside it holds the median, in nanoseconds.

use std::collections::HashMap;
use std::path::Path;
use std::time::SystemTime;

/// Median (ns) by full benchmark id, for the estimates written at or after `since`.
pub fn medians(criterion_dir: &Path, since: SystemTime) -> HashMap<String, f64> {
    let mut out = HashMap::new();
    let mut stack = vec![criterion_dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for e in entries.flatten() {
            let path = e.path();
            if !path.is_dir() {
                continue;
            }
            if path.file_name().is_some_and(|n| n == "new") {
                if let Some((id, ns)) = read_one(&path, since) {
                    out.insert(id, ns);
                }
            } else if path.file_name().is_none_or(|n| n != "base" && n != "report") {
                stack.push(path);
            }
        }
    }
    out
}

fn read_one(new: &Path, since: SystemTime) -> Option<(String, f64)> {
    let est = new.join("estimates.json");
    let fresh = std::fs::metadata(&est).ok()?.modified().ok()? >= since;
    if !fresh {
        return None;
    }
    let bench: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(new.join("benchmark.json")).ok()?).ok()?;
    let est: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(est).ok()?).ok()?;
    let id = bench["full_id"].as_str()?.to_string();
    let ns = est["median"]["point_estimate"].as_f64()?;
    Some((id, ns))
}

/// The median of the benchmark `pattern` names: an exact id, or a prefix ending in `*`.
pub fn find(medians: &HashMap<String, f64>, pattern: &str) -> Option<f64> {
    match pattern.strip_suffix('*') {
        Some(prefix) => {
            let mut hits: Vec<_> = medians.iter().filter(|(k, _)| k.starts_with(prefix)).collect();
            hits.sort_by(|a, b| a.0.cmp(b.0));
            hits.first().map(|(_, v)| **v)
        }
        None => medians.get(pattern).copied(),
    }
}

/// 49.8 ns, 1.23 µs, 119 ms, 5.58 s.
pub fn fmt_ns(ns: f64) -> String {
    let (v, unit) = if ns < 1e3 {
        (ns, "ns")
    } else if ns < 1e6 {
        (ns / 1e3, "µs")
    } else if ns < 1e9 {
        (ns / 1e6, "ms")
    } else {
        (ns / 1e9, "s")
    };
    format!("{} {unit}", sig3(v))
}

/// Three significant figures, no trailing exponent: 49.8, 119, 1.23.
pub fn sig3(v: f64) -> String {
    let a = v.abs();
    if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(fmt_ns(49.83), "49.8 ns");
        assert_eq!(fmt_ns(1234.0), "1.23 µs");
        assert_eq!(fmt_ns(119.4e6), "119 ms");
        assert_eq!(fmt_ns(5.58e9), "5.58 s");
    }

    #[test]
    fn finds_by_prefix() {
        let m: HashMap<String, f64> =
            [("reload/watch_to_enforce_1000".to_string(), 5.0)].into_iter().collect();
        assert_eq!(find(&m, "reload/watch_to_enforce_*"), Some(5.0));
        assert_eq!(find(&m, "reload/direct_*"), None);
    }
}
