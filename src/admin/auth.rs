//! The bearer-token check for mutating admin calls, and the 401 answer that says why.
//!
//! Every refusal is a 401 with `WWW-Authenticate: Bearer` and an [`Unauthorized`] body.
//! The body tells a gateway with no token at all (`token_configured: false`: every
//! mutating call is refused and no token a client sends can help) from one whose token
//! was missing or wrong, so `flowgate reload`/`quarantine` can say exactly what to fix.
//! Saying that no token is configured gives nothing away: such a gateway only ever
//! listens on loopback and refuses every mutating call.

use hyper::header::AUTHORIZATION;
use serde::{Deserialize, Serialize};

/// Why a mutating call is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The gateway started without a token (`admin.token` unset, and `admin.token_env`
    /// unset or naming a variable that was unset).
    NoTokenConfigured,
    /// No `Authorization: Bearer <token>` (absent, another scheme, or an empty token).
    Missing,
    /// A bearer token that is not the gateway's.
    Wrong,
}

/// The body of every 401 from the admin API. The server writes it and the CLI reads it,
/// so the field names are defined here once.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unauthorized {
    /// What is wrong and what to do, for a human (what curl shows).
    pub error: String,
    /// Whether the gateway has a token at all. `false`: every mutating call is refused
    /// until the gateway is restarted with one.
    pub token_configured: bool,
    /// With no token configured: the variable `admin.token_env` names, which was unset
    /// when the gateway started (absent when `token_env` is not set either).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_env: Option<String>,
}

impl Refusal {
    /// The 401 body; `token_env` is the gateway's `admin.token_env`.
    pub fn body(self, token_env: Option<&str>) -> Unauthorized {
        let (error, token_configured) = match (self, token_env) {
            (Refusal::NoTokenConfigured, Some(var)) => (
                format!(
                    "this gateway has no admin token, so it refuses every POST /reload and \
                     /emergency: admin.token_env names {var}, which was unset when it started; \
                     set {var} and restart the gateway"
                ),
                false,
            ),
            (Refusal::NoTokenConfigured, None) => (
                "this gateway has no admin token, so it refuses every POST /reload and \
                 /emergency: set admin.token_env (or admin.token) in its config and restart it"
                    .to_owned(),
                false,
            ),
            (Refusal::Missing, _) => {
                ("missing bearer token (Authorization: Bearer <admin token>)".to_owned(), true)
            }
            (Refusal::Wrong, _) => {
                ("wrong bearer token: not the one this gateway started with".to_owned(), true)
            }
        };
        let token_env = if token_configured { None } else { token_env.map(str::to_owned) };
        Unauthorized { error, token_configured, token_env }
    }
}

/// Whether `headers` carry `Authorization: Bearer <expected>`; why not otherwise. `None`
/// expected (no token configured) refuses everything. The comparison does not stop at the
/// first differing byte, so response timing does not reveal how much of a guess was right.
///
/// # Errors
/// The [`Refusal`], when the call must not go ahead.
pub fn check(headers: &hyper::HeaderMap, expected: Option<&str>) -> Result<(), Refusal> {
    let Some(expected) = expected else { return Err(Refusal::NoTokenConfigured) };
    let given = headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or(Refusal::Missing)?;
    if constant_time_eq(given.as_bytes(), expected.as_bytes()) {
        Ok(())
    } else {
        Err(Refusal::Wrong)
    }
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
        assert_eq!(check(&headers("Bearer s3cret"), Some("s3cret")), Ok(()));
        assert_eq!(check(&headers("Bearer s3cre"), Some("s3cret")), Err(Refusal::Wrong));
        assert_eq!(check(&headers("Bearer s3cretX"), Some("s3cret")), Err(Refusal::Wrong));
        assert_eq!(check(&headers("Basic s3cret"), Some("s3cret")), Err(Refusal::Missing));
        assert_eq!(check(&headers("Bearer "), Some("s3cret")), Err(Refusal::Missing));
        assert_eq!(check(&hyper::HeaderMap::new(), Some("s3cret")), Err(Refusal::Missing));
    }

    #[test]
    fn without_a_configured_token_everything_is_refused_and_the_body_says_so() {
        assert_eq!(check(&headers("Bearer s3cret"), None), Err(Refusal::NoTokenConfigured));
        assert_eq!(check(&hyper::HeaderMap::new(), None), Err(Refusal::NoTokenConfigured));
        let b = Refusal::NoTokenConfigured.body(Some("FLOWGATE_ADMIN_TOKEN"));
        assert!(!b.token_configured);
        assert_eq!(b.token_env.as_deref(), Some("FLOWGATE_ADMIN_TOKEN"));
        assert!(b.error.contains("set FLOWGATE_ADMIN_TOKEN and restart"), "{}", b.error);
        let b = Refusal::NoTokenConfigured.body(None);
        assert!(b.error.contains("admin.token_env"), "{}", b.error);
        let b = Refusal::Wrong.body(Some("FLOWGATE_ADMIN_TOKEN"));
        assert!(b.token_configured);
        assert_eq!(b.token_env, None, "the variable is only named when no token is set");
    }
}
