//! The gate's hot-path promise, checked with a counting allocator: on deny `admit`
//! allocates nothing (the flow-log event is `Arc` clones in a preallocated channel), on
//! allow only the objects that outlive the call (the conntrack entry, its cut signal, and
//! in the compact table the entry's cold extension). Allocations are counted per thread, so
//! the flow-log writer thread and the gateway's tasks (on its runtime's workers) do not
//! count.

mod support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;
use std::time::Instant;

use flowgate::config::Config;
use flowgate::conntrack::FlowState;
use flowgate::dataplane::{Admission, FlowRequest, ListenerTag, admit, tcp_flow};
use support::l4::*;

struct Counting;

thread_local! {
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: forwards to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocs() -> u64 {
    ALLOCS.with(Cell::get)
}

#[test]
fn admit_allocates_nothing_on_deny_and_only_the_entry_on_allow() {
    let world = World::new();
    let cfg = Config::load(&world.write_config("")).unwrap();
    let standalone = support::gateway::runtime(&cfg);
    let rt = standalone.gateway.rt.clone();
    let tag = ListenerTag {
        index: 0,
        name: Arc::from("gw"),
        counters: rt.registry.listener("gw", "tcp"),
    };
    let web = format!("{WEB}:80").parse().unwrap();
    let key = |src: &str, port: u16| tcp_flow(format!("{src}:{port}").parse().unwrap(), web);

    // Warm up: lazily initialised statics, map shards, thread-locals.
    for port in 1..200 {
        let k = key(OK, port);
        assert!(matches!(
            admit(&rt, &tag, &FlowRequest::to(k, FlowState::Open), Instant::now()),
            Admission::Allow(_)
        ));
        rt.conntrack.remove(&k);
        let _ = admit(&rt, &tag, &FlowRequest::to(key(BAD, port), FlowState::Open), Instant::now());
    }

    let denied: Vec<_> = (1000..1100).map(|port| key(BAD, port)).collect();
    let before = allocs();
    for &k in &denied {
        let r = admit(&rt, &tag, &FlowRequest::to(k, FlowState::Open), Instant::now());
        assert!(matches!(r, Admission::Deny(_)));
    }
    assert_eq!(allocs() - before, 0, "deny path allocated");

    let mut worst = 0;
    let allowed: Vec<_> = (2000..2100).map(|port| key(OK, port)).collect();
    for &k in &allowed {
        let before = allocs();
        let r = admit(&rt, &tag, &FlowRequest::to(k, FlowState::Open), Instant::now());
        worst = worst.max(allocs() - before);
        assert!(matches!(r, Admission::Allow(_)));
        drop(r);
        rt.conntrack.remove(&k);
    }
    // The conntrack entry, its cut signal, and (in the compact table) the entry's cold
    // extension that holds the cut handle: a small constant, never per-byte or per-rule.
    assert!(worst <= 3, "allow path allocated {worst} times (entry, extension, cut signal)");
    drop(standalone);
}
