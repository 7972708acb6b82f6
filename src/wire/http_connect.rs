//! HTTP/1.1 CONNECT and absolute-form request heads. (Stub: being built.)
