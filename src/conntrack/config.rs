//! `[conntrack]` in the config file: table size, sharding and the idle timeouts per protocol
//! and state. Defaults follow Linux nf_conntrack where it has an equivalent.
#![forbid(unsafe_code)]

use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;

/// `[conntrack]` in the config file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConntrackConfig {
    /// Maximum number of tracked flows. Default 262,144. At the limit unassured flows are
    /// evicted, otherwise new flows are refused (`flowgate_conntrack_evictions_total`,
    /// the refused counter).
    pub capacity: usize,
    /// Number of shards (a power of two); 0 picks one shard per ~16,384 entries of
    /// capacity (4..=1024).
    /// Each shard holds an equal share of the capacity (plus 25% slack for hash imbalance).
    pub shards: usize,
    /// Slots each shard keeps beyond its share for entries that were removed while a
    /// handle still pins them (a proxied flow's task winding down, a `/flows` reader) or a
    /// batch lookup may still be reading them: such a slot is not re-used until released.
    /// A shard that has used them all refuses new flows until handles are released
    /// (counted with the refused flows). Default 64; costs 88 bytes per slot per shard.
    pub pin_slack: usize,
    /// Threads that can be inside a batch lookup (the packet path's `lookup_many`) at once
    /// without pinning each entry they find. A call that finds them all taken pins entries
    /// instead: correct, slower, and counted (`flowgate_conntrack_batch_fallbacks_total`).
    /// Default 64; 0 always pins. Costs 128 bytes each per table.
    pub batch_readers: usize,
    /// Proxied TCP connections and established packet-dataplane TCP flows. Default 5 days.
    #[serde(with = "crate::human_duration")]
    pub tcp_established: Duration,
    /// Proxied connections that are closing (one side shut down). Default 2 min.
    #[serde(with = "crate::human_duration")]
    pub tcp_transitory: Duration,
    /// Packet TCP: SYN seen, no answer yet. Default 2 min.
    #[serde(with = "crate::human_duration")]
    pub tcp_syn_sent: Duration,
    /// Packet TCP: SYN+ACK seen. Default 60 s.
    #[serde(with = "crate::human_duration")]
    pub tcp_syn_recv: Duration,
    /// Packet TCP: one FIN seen. Default 2 min.
    #[serde(with = "crate::human_duration")]
    pub tcp_fin_wait: Duration,
    /// Packet TCP: the first FIN acknowledged. Default 60 s.
    #[serde(with = "crate::human_duration")]
    pub tcp_close_wait: Duration,
    /// Packet TCP: both FINs seen. Default 30 s.
    #[serde(with = "crate::human_duration")]
    pub tcp_last_ack: Duration,
    /// Packet TCP: the last FIN acknowledged. Default 2 min.
    #[serde(with = "crate::human_duration")]
    pub tcp_time_wait: Duration,
    /// Packet TCP: reset. Default 10 s.
    #[serde(with = "crate::human_duration")]
    pub tcp_close: Duration,
    /// UDP before a reply is seen. Default 30 s.
    #[serde(with = "crate::human_duration")]
    pub udp_unreplied: Duration,
    /// UDP after a reply (and proxied UDP sessions). Default 180 s.
    #[serde(with = "crate::human_duration")]
    pub udp_assured: Duration,
    /// ICMP / ICMPv6 echo. Default 30 s.
    #[serde(with = "crate::human_duration")]
    pub icmp: Duration,
    /// Any other protocol (SCTP, unknown numbers). Default 10 min.
    #[serde(with = "crate::human_duration")]
    pub other: Duration,
}

impl Default for ConntrackConfig {
    /// Linux-like defaults (nf_conntrack): established TCP 5 days, closing states 2 min,
    /// UDP 30 s until a reply is seen and 180 s after, ICMP 30 s.
    fn default() -> Self {
        ConntrackConfig {
            capacity: 262_144,
            shards: 0,
            pin_slack: 64,
            batch_readers: 64,
            tcp_established: Duration::from_secs(5 * 24 * 3600),
            tcp_transitory: Duration::from_secs(120),
            tcp_syn_sent: Duration::from_secs(120),
            tcp_syn_recv: Duration::from_secs(60),
            tcp_fin_wait: Duration::from_secs(120),
            tcp_close_wait: Duration::from_secs(60),
            tcp_last_ack: Duration::from_secs(30),
            tcp_time_wait: Duration::from_secs(120),
            tcp_close: Duration::from_secs(10),
            udp_unreplied: Duration::from_secs(30),
            udp_assured: Duration::from_secs(180),
            icmp: Duration::from_secs(30),
            other: Duration::from_secs(600),
        }
    }
}

/// Largest `capacity` accepted (2^28 entries, ~30 GiB of table).
pub const MAX_CAPACITY: usize = 1 << 28;
/// Largest `pin_slack` accepted.
pub const MAX_PIN_SLACK: usize = 65_536;
/// Largest `batch_readers` accepted (writers scan the slots in use).
pub const MAX_BATCH_READERS: usize = 4096;

/// A `[conntrack]` value that cannot work.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConntrackConfigError {
    #[error("conntrack.capacity must be at least 1 (got 0)")]
    ZeroCapacity,
    #[error("conntrack.capacity must be at most {max} (got {got})")]
    CapacityTooLarge { got: usize, max: usize },
    #[error("conntrack.pin_slack must be at most {max} (got {got})")]
    PinSlackTooLarge { got: usize, max: usize },
    #[error("conntrack.batch_readers must be at most {max} (got {got})")]
    BatchReadersTooLarge { got: usize, max: usize },
    #[error("conntrack.shards must be 0 (auto) or a power of two up to 65536 (got {0})")]
    BadShards(usize),
    #[error("conntrack.{field} must be longer than zero")]
    ZeroTimeout { field: &'static str },
}

impl ConntrackConfig {
    /// Checks the values; `config::validate` calls this.
    ///
    /// # Errors
    /// The first unusable field.
    pub fn validate(&self) -> Result<(), ConntrackConfigError> {
        if self.capacity == 0 {
            return Err(ConntrackConfigError::ZeroCapacity);
        }
        // Slot ids are 32-bit and a shard's index is allocated up front: far beyond any
        // machine's memory (2^28 entries are ~30 GiB), refuse clearly instead of failing an
        // allocation at start-up.
        if self.capacity > MAX_CAPACITY {
            return Err(ConntrackConfigError::CapacityTooLarge {
                got: self.capacity,
                max: MAX_CAPACITY,
            });
        }
        if self.pin_slack > MAX_PIN_SLACK {
            return Err(ConntrackConfigError::PinSlackTooLarge {
                got: self.pin_slack,
                max: MAX_PIN_SLACK,
            });
        }
        if self.batch_readers > MAX_BATCH_READERS {
            return Err(ConntrackConfigError::BatchReadersTooLarge {
                got: self.batch_readers,
                max: MAX_BATCH_READERS,
            });
        }
        if self.shards != 0 && (!self.shards.is_power_of_two() || self.shards > 65_536) {
            return Err(ConntrackConfigError::BadShards(self.shards));
        }
        for (field, d) in self.timeouts() {
            if d.is_zero() {
                return Err(ConntrackConfigError::ZeroTimeout { field });
            }
        }
        Ok(())
    }

    fn timeouts(&self) -> [(&'static str, Duration); 13] {
        [
            ("tcp_established", self.tcp_established),
            ("tcp_transitory", self.tcp_transitory),
            ("tcp_syn_sent", self.tcp_syn_sent),
            ("tcp_syn_recv", self.tcp_syn_recv),
            ("tcp_fin_wait", self.tcp_fin_wait),
            ("tcp_close_wait", self.tcp_close_wait),
            ("tcp_last_ack", self.tcp_last_ack),
            ("tcp_time_wait", self.tcp_time_wait),
            ("tcp_close", self.tcp_close),
            ("udp_unreplied", self.udp_unreplied),
            ("udp_assured", self.udp_assured),
            ("icmp", self.icmp),
            ("other", self.other),
        ]
    }

    /// The shard count actually used: the configured power of two, or one shard per
    /// ~16,384 entries (4..=1024): enough to spread writers and keep one expiry pass over a
    /// shard short, few enough that the shards' own headers stay in cache for lookups
    /// (`conntrack_1M_512shards` in benches/conntrack.rs).
    pub fn effective_shards(&self) -> usize {
        if self.shards != 0 && self.shards.is_power_of_two() {
            return self.shards.min(65_536);
        }
        (self.capacity / 16_384).next_power_of_two().clamp(4, 1024)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_partial_section_with_defaults() {
        let c: ConntrackConfig =
            toml::from_str("capacity = 1000\nudp_unreplied = \"10s\"\nshards = 2\n").unwrap();
        assert_eq!(c.capacity, 1000);
        assert_eq!(c.udp_unreplied, Duration::from_secs(10));
        assert_eq!(c.tcp_time_wait, Duration::from_secs(120));
        assert_eq!(c.effective_shards(), 2);
        assert_eq!(c.validate(), Ok(()));
    }

    #[test]
    fn rejects_bad_values() {
        assert!(toml::from_str::<ConntrackConfig>("udp_unreplied = \"soon\"").is_err());
        assert!(toml::from_str::<ConntrackConfig>("capacityy = 3").is_err());
        let c = ConntrackConfig { capacity: 0, ..Default::default() };
        assert_eq!(c.validate(), Err(ConntrackConfigError::ZeroCapacity));
        let c = ConntrackConfig { shards: 3, ..Default::default() };
        assert_eq!(c.validate(), Err(ConntrackConfigError::BadShards(3)));
        let c = ConntrackConfig { icmp: Duration::ZERO, ..Default::default() };
        assert_eq!(c.validate(), Err(ConntrackConfigError::ZeroTimeout { field: "icmp" }));
        let c = ConntrackConfig { capacity: MAX_CAPACITY + 1, ..Default::default() };
        assert_eq!(
            c.validate(),
            Err(ConntrackConfigError::CapacityTooLarge {
                got: MAX_CAPACITY + 1,
                max: MAX_CAPACITY
            })
        );
        let c = ConntrackConfig { pin_slack: MAX_PIN_SLACK + 1, ..Default::default() };
        assert!(matches!(c.validate(), Err(ConntrackConfigError::PinSlackTooLarge { .. })));
        let c = ConntrackConfig { batch_readers: MAX_BATCH_READERS + 1, ..Default::default() };
        assert!(matches!(c.validate(), Err(ConntrackConfigError::BatchReadersTooLarge { .. })));
        let c = ConntrackConfig { capacity: MAX_CAPACITY, pin_slack: 0, ..Default::default() };
        assert_eq!(c.validate(), Ok(()), "the bounds themselves are accepted");
    }

    #[test]
    fn auto_shards_scale_with_capacity() {
        let c = |capacity| ConntrackConfig { capacity, ..Default::default() }.effective_shards();
        assert_eq!(c(1), 4);
        assert_eq!(c(262_144), 16);
        assert_eq!(c(1 << 20), 64);
        assert_eq!(c(usize::MAX / 2), 1024);
    }
}
