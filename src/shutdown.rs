//! Graceful shutdown: one signal that accept loops and connections watch. (Stub: being built.)
