//! Telemetry: what flowgate tells its operators. The flow log (`flowlog`: JSON lines, one
//! event per denial, written off the hot path), the metrics (`metrics`: counters the data
//! path bumps with relaxed atomics) and their Prometheus rendering (`exposition`, only when
//! scraped; every metric name defined once there).
//!
//! Telemetry sits below the control plane: it imports no control-plane type (a reload is
//! counted from a [`metrics::ReloadSample`], a scrape renders a [`exposition::Scrape`]).
//!
//! Not here: deciding what to log (the dataplanes do), serving HTTP (`admin`).
#![forbid(unsafe_code)]

pub mod exposition;
pub mod flowlog;
pub mod metrics;
