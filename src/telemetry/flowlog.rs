//! The flow log: deny / would-deny / revoked / allow events as JSON lines. (Stub: being built.)
