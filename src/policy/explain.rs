//! The cold twin of `decide`: the same answer with its trace. (Stub: being built.)
