//! SOCKS5 (RFC 1928) and username/password auth (RFC 1929). (Stub: being built.)
