//! A deliberately simple evaluator over the IR, the oracle for property tests. (Stub.)
