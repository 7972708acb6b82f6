//! Peeking the TLS ClientHello SNI and the HTTP Host header. (Stub: being built.)
