//! Durations in configuration files, written the human way (`30s`, `5m`, `250ms`): the one
//! serde helper every section uses, as `#[serde(with = "crate::human_duration")]`.
//!
//! A leaf: it imports nothing from the crate, so any module, however low, may use it
//! without an import pointing back up.
#![forbid(unsafe_code)]

use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// Reads a duration such as `30s`, `5m` or `1h 30m`.
///
/// # Errors
/// The text is not a duration humantime understands (the message says why).
pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s).map_err(serde::de::Error::custom)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[derive(serde::Deserialize)]
    struct T {
        #[serde(with = "super")]
        d: Duration,
    }

    #[test]
    fn reads_human_durations_and_names_bad_ones() {
        let t: T = toml::from_str("d = \"1m 30s\"").unwrap();
        assert_eq!(t.d, Duration::from_secs(90));
        let t: T = toml::from_str("d = \"250ms\"").unwrap();
        assert_eq!(t.d, Duration::from_millis(250));
        assert!(toml::from_str::<T>("d = \"soon\"").is_err());
        assert!(toml::from_str::<T>("d = 5").is_err());
    }
}
