//! Dataplanes: turning connections and packets into flows, admitting them through one
//! gate (`admit`), and forwarding what is allowed. (Stub: being built.)

pub mod proxy;
