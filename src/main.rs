//! The `flowgate` binary: parse the command line and hand over to `cli`. The only place
//! where `anyhow` errors meet the user.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;

mod cli;

/// mimalloc instead of glibc's malloc, for the binary only (the library, its tests and
/// benches keep the system allocator). Every proxied connection makes three allocations
/// that tokio aligns to 128 bytes (its task and the two sockets' I/O registrations); glibc
/// serves aligned requests on a slow path that bypasses its thread cache (posix_memalign:
/// ~830 instructions each, then splitting and coalescing on free). Callgrind over 2,000
/// sequential proxied connections: 29.6k → 26.9k user-space instructions per connection
/// (BENCHMARKS.md, "Fourth pass", has the end-to-end effect). Built with `no_thp`: with
/// huge pages allowed on its arenas, touching one byte backs 2 MiB, and an idle tunnel
/// cost 82 KB of RSS instead of 24 KB.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    match cli::dispatch(args) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("flowgate: error: {err:#}");
            ExitCode::from(2)
        }
    }
}
