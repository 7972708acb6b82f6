//! Telemetry: what flowgate tells its operators. The flow log (`flowlog`: JSON lines, one
//! event per denial, written off the hot path) and the metrics (`metrics`: counters the data
//! path bumps with relaxed atomics, rendered as Prometheus text only when scraped).
//!
//! Not here: deciding what to log (the dataplanes do), serving HTTP (`admin`).

pub mod flowlog;
pub mod metrics;
