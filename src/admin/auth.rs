//! The bearer-token check for mutating admin calls.

use hyper::header::AUTHORIZATION;

/// Whether `headers` carry `Authorization: Bearer <expected>`. `None` expected (no token
/// configured) refuses everything. The comparison does not stop at the first differing
/// byte, so response timing does not reveal how much of a guess was right.
pub fn authorized(headers: &hyper::HeaderMap, expected: Option<&str>) -> bool {
    let Some(expected) = expected else { return false };
    let Some(value) = headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let Some(given) = value.strip_prefix("Bearer ").map(str::trim) else { return false };
    constant_time_eq(given.as_bytes(), expected.as_bytes())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(v: &str) -> hyper::HeaderMap {
        let mut h = hyper::HeaderMap::new();
        h.insert(AUTHORIZATION, v.parse().unwrap());
        h
    }

    #[test]
    fn bearer_must_match_exactly() {
        assert!(authorized(&headers("Bearer s3cret"), Some("s3cret")));
        assert!(!authorized(&headers("Bearer s3cre"), Some("s3cret")));
        assert!(!authorized(&headers("Bearer s3cretX"), Some("s3cret")));
        assert!(!authorized(&headers("Basic s3cret"), Some("s3cret")));
        assert!(!authorized(&hyper::HeaderMap::new(), Some("s3cret")));
        assert!(!authorized(&headers("Bearer s3cret"), None));
    }
}
