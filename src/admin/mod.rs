//! The admin HTTP API: health, readiness, metrics, the policy in force, flows, explain,
//! reload and emergency policies. Its own bind, never a data port. (Stub: being built.)
