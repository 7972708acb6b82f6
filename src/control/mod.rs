//! Control plane: everything that changes what the data path does, done off the data path.
//! Loading and compiling policy, swapping it in (arc-swap), watching the sources, expiring
//! emergency policies, re-checking established flows after a change, and the audit trail.
//! (Stub: being built.)
