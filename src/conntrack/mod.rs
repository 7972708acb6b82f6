//! Connection tracking: a sharded, bounded table of flows shared by both dataplanes.
//! (Stub: being built.)
