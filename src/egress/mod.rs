//! What the egress (forward-proxy) listeners share: destination names, the SSRF guard,
//! and name resolution. (Stub: being built.)
