//! Warnings about policies that are legal but probably wrong. (Stub: being built.)
