//! Memory of the connection-tracking table, measured two ways: a counting global allocator
//! (bytes requested) and glibc's own accounting (`mallinfo2`: chunk headers, rounding and
//! separately mapped blocks included — what the process really holds), each plus the
//! pages the table maps itself for its index and hot entry parts (`mapped_bytes`, all of
//! it counted, although only pages written are resident). At most 128 bytes
//! per entry at 1M entries (the table's own overhead included), and a flood of new flows
//! into the full table holds memory at that figure: the table allocates nothing per flow.
//!
//! One test per binary on purpose: the allocator counts the whole process.

use std::alloc::{GlobalAlloc, Layout, System};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Instant;

use flowgate::conntrack::{Conntrack, ConntrackConfig, EntryInit, FlowState};
use flowgate::flow::{FlowKey, Proto};
use flowgate::policy::Generation;

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        LIVE.fetch_add(n as isize - l.size() as isize, Ordering::Relaxed);
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn flow(i: u32) -> FlowKey {
    FlowKey::new(
        Proto::Udp,
        SocketAddr::V4(SocketAddrV4::new(
            Ipv4Addr::from_bits(0x0a00_0000 | (i >> 8)),
            1024 + (i % 50_000) as u16,
        )),
        SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from_bits(0xc612_0000 | (i & 0xff)), 53)),
    )
}

fn init() -> EntryInit {
    EntryInit::plain(FlowState::Unreplied, Generation(1))
}

fn live() -> isize {
    LIVE.load(Ordering::SeqCst)
}

/// glibc's in-use bytes: heap chunks plus separately mapped blocks.
fn glibc() -> isize {
    // SAFETY: mallinfo2 only reads allocator statistics.
    let m = unsafe { libc::mallinfo2() };
    (m.uordblks + m.hblkhd) as isize
}

#[test]
fn bytes_per_entry_at_1m_and_under_a_flood() {
    const N: usize = 1 << 20;
    let now = Instant::now();
    let base = live();
    let gbase = glibc();
    let ct = Conntrack::new(&ConntrackConfig { capacity: N, ..ConntrackConfig::default() });
    // Half the flows get a reply (assured), half stay unreplied: both kinds of entry.
    for i in 0..N as u32 {
        let e = ct.insert(flow(i), init(), now).expect("room up to capacity");
        if i % 2 == 0 {
            e.mark_reply();
        }
    }
    assert_eq!(ct.len(), N);
    let mapped = ct.mapped_bytes() as isize;
    assert!(mapped > 0, "the index and hot parts are mapped");
    let per_entry = (live() - base + mapped) as f64 / N as f64;
    let g_entry = (glibc() - gbase + mapped) as f64 / N as f64;
    println!("steady: {per_entry:.1} B/entry requested, {g_entry:.1} B/entry glibc, at {N}");
    assert!(per_entry <= 128.0, "{per_entry:.1} bytes per entry > 128");
    assert!(g_entry <= 128.0, "{g_entry:.1} bytes per entry > 128 in glibc's accounting");

    // Flood: 2M new flows into the full table. Every one evicts an unreplied flow; the
    // assured half stays, and memory stays where it was: evicted slots are re-used.
    let mut after_first = 0;
    for i in 0..2 * N as u32 {
        let _ = ct.insert(flow(N as u32 + i), init(), now);
        if i == N as u32 - 1 {
            after_first = live() - base + ct.mapped_bytes() as isize;
        }
    }
    let after_second = live() - base + ct.mapped_bytes() as isize;
    let g_flood = (glibc() - gbase + ct.mapped_bytes() as isize) as f64 / N as f64;
    assert_eq!(ct.len(), N);
    for i in (0..N as u32).step_by(2 * 997) {
        assert!(ct.lookup(&flow(i)).is_some(), "assured flow {i} survives the flood");
    }
    let flood_per_entry = after_second as f64 / N as f64;
    println!(
        "flood: {:.1} after 1M new flows, {flood_per_entry:.1} after 2M (B/entry requested), \
         {g_flood:.1} B/entry glibc",
        after_first as f64 / N as f64
    );
    assert!(flood_per_entry <= 128.0, "{flood_per_entry:.1} bytes per entry under a flood");
    assert!(g_flood <= 128.0, "{g_flood:.1} bytes per entry (glibc) under a flood");
    assert!(
        after_second <= after_first + after_first / 50,
        "memory keeps growing under a flood: {after_first} then {after_second}"
    );
    drop(ct);
    assert!(live() - base < 1 << 16, "dropping the table frees it");
}
