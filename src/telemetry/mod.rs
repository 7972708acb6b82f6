//! Telemetry: the flow log and the metrics. (Stub: being built.)
