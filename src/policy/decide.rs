//! The hot path: `CompiledPolicy::decide`. (Stub: being built.)
