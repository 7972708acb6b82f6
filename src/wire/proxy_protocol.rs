//! PROXY protocol v1 (text) and v2 (binary) headers. (Stub: being built.)
