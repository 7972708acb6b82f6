//! What the integration tests share. Each test file includes it once (`mod support;`) and
//! uses the parts it needs:
//!
//! - [`require`]: what a test needs from the machine (root, peer binaries), and the one
//!   skip rule — fail in CI, say `SKIPPED` on the terminal elsewhere.
//! - [`process`]: `flowgate run` as a child process, started on a config with port-0
//!   binds, its printed addresses read back, its exit status and stderr shown when it dies
//!   early; a copy of the bundled config with no fixed port.
//! - [`gateway`]: flowgate built in-process with `flowgate::gateway::Gateway::start`, the
//!   one library entry `flowgate run` uses, its runtime and control plane at hand.
//! - [`topology`], [`bump`]: the packet dataplane's namespaces (client — gateway — server
//!   routed, or client — bump — server at L2) and trivial forwarders over the TUN and
//!   AF_PACKET device layers.
//! - [`l4`], [`egress`], [`control`], [`netns`]: each area's world (inventory, policy,
//!   config text, peers) and bounded waits.
#![allow(dead_code)] // each test binary uses a different part

pub mod bump;
pub mod control;
pub mod egress;
pub mod etcd;
pub mod gateway;
pub mod l4;
pub mod netns;
pub mod process;
pub mod require;
pub mod topology;
