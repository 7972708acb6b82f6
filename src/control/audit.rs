//! The audit trail: one JSON line per reload attempt, whatever its result.
//!
//! A line is a serialised [`ReloadReport`](super::reload::ReloadReport): `time` (RFC 3339,
//! ms), `trigger`, `result` (`ok` | `unchanged` | `error`), `generation` in force after the
//! attempt, content `hash`, `duration` (seconds), `changes` (policies added / removed /
//! modified, workloads added / removed / relabelled, with names), `errors` (file, object,
//! field, message) and the revalidation counts. Emergency entries added through the API
//! are written as `{"event":"emergency",…}` lines.
//!
//! Written synchronously from the reload thread (never the data path); a write error is
//! counted, never fatal.

use std::io::Write;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use serde::{Serialize, Serializer};

/// Where audit lines go.
pub struct AuditLog {
    sink: Mutex<Box<dyn Write + Send>>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuditLog")
    }
}

impl AuditLog {
    /// Appends to `path`, or writes to stderr when there is none.
    ///
    /// # Errors
    /// The file cannot be opened for appending.
    pub fn open(path: Option<&Path>) -> std::io::Result<AuditLog> {
        let sink: Box<dyn Write + Send> = match path {
            Some(p) => Box::new(std::fs::OpenOptions::new().create(true).append(true).open(p)?),
            None => Box::new(std::io::stderr()),
        };
        Ok(AuditLog { sink: Mutex::new(sink) })
    }

    /// Writes one event as one line.
    ///
    /// # Errors
    /// The write failed (the caller counts it).
    pub fn write<T: Serialize>(&self, event: &T) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(event).map_err(std::io::Error::other)?;
        line.push(b'\n');
        let mut sink = self.sink.lock().unwrap_or_else(|e| e.into_inner());
        sink.write_all(&line)?;
        sink.flush()
    }
}

/// RFC 3339 with milliseconds, UTC.
pub fn format_time(t: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

pub(crate) fn rfc3339<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_time(*t))
}

pub(crate) fn seconds<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}
