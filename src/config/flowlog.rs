//! `[flowlog]`: where flow-log lines go and how events are folded.

use std::time::Duration;

use serde::Deserialize;

/// `[flowlog]` in the config file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FlowLogConfig {
    /// Where lines go: `"-"` (default) for stdout, otherwise a file path (appended to;
    /// relative to the config file).
    pub output: String,
    /// Events buffered between the data path and the writer. Default 16,384. When full,
    /// new events are dropped and counted (`flowgate_flowlog_dropped_total`).
    pub channel_capacity: usize,
    /// Identical events within this window become one line with `count`. Default 1s;
    /// `0s` writes every event as it comes.
    #[serde(with = "crate::human_duration")]
    pub dedupe_window: Duration,
    /// Distinct events held for folding at once; beyond it they are written at once.
    /// Default 65,536.
    pub dedupe_max: usize,
    /// Log one in N allowed flows as an `allow` event. Default 0 (off).
    pub allow_sample: u64,
}

impl Default for FlowLogConfig {
    fn default() -> Self {
        FlowLogConfig {
            output: "-".to_owned(),
            channel_capacity: 16_384,
            dedupe_window: Duration::from_secs(1),
            dedupe_max: 65_536,
            allow_sample: 0,
        }
    }
}
