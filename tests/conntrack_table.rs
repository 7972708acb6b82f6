//! The connection-tracking table through its public API: both directions, capacity and
//! eviction order, refusal, incremental expiry per protocol and state, a flood at capacity,
//! and two threads at once. Time is passed in (`now`), so expiry is tested without sleeping.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use flowgate::conntrack::{
    Conntrack, ConntrackConfig, CutSignal, EntryInit, EntryRef, FlowState, InsertError, Side,
    TcpConn, TcpFlags, TcpState,
};
use flowgate::flow::{FlowKey, Proto};
use flowgate::policy::{Generation, WorkloadId};

fn addr(host: u32, port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from_bits(0xC612_0000 | host), port))
}

/// Flow number `i`: distinct client address/port towards one of a few servers.
fn key(proto: Proto, i: u32) -> FlowKey {
    FlowKey::new(proto, addr(1 + (i >> 16), (i & 0xffff) as u16), addr(0xff00 + (i % 4), 443))
}

fn init(state: FlowState) -> EntryInit {
    EntryInit {
        src_workload: Some(WorkloadId(1)),
        dst_workload: Some(WorkloadId(2)),
        ..EntryInit::plain(state, Generation(1))
    }
}

fn cfg(capacity: usize, shards: usize) -> ConntrackConfig {
    ConntrackConfig { capacity, shards, ..ConntrackConfig::default() }
}

/// A TCP packet flow taken through the handshake: established, hence assured.
fn insert_established(ct: &Conntrack, k: FlowKey, now: Instant) {
    let (init, conn) =
        EntryInit::tcp_packet(TcpFlags::SYN, Generation(1), None, None, 0).expect("SYN opens");
    let e = ct.insert_tcp(k, init, conn, now).expect("room for established flows");
    e.on_tcp_segment(Side::Reply, TcpFlags::SYN_ACK).expect("SYN+ACK");
    assert_eq!(e.on_tcp_segment(Side::Orig, TcpFlags::ACK), Ok(TcpState::Established));
}

#[test]
fn both_directions_find_one_entry() {
    let ct = Conntrack::new(&cfg(1024, 0));
    let now = Instant::now();
    for proto in [Proto::Tcp, Proto::Udp, Proto::Icmp] {
        let k = key(proto, 7);
        let e = ct.insert(k, init(FlowState::Unreplied), now).expect("room");
        let fwd = ct.lookup(&k).expect("forward direction");
        let rev = ct.lookup(&k.reversed()).expect("reverse direction");
        assert!(EntryRef::ptr_eq(&e, &fwd) && EntryRef::ptr_eq(&e, &rev));
        assert_eq!(e.key(), k, "the entry keeps the originator's direction");
        assert_eq!(ct.lookup_with(&k, |_, side| side), Some(Side::Orig));
        assert_eq!(ct.lookup_with(&k.reversed(), |_, side| side), Some(Side::Reply));
        assert_eq!(
            ct.insert(k.reversed(), init(FlowState::Unreplied), now).unwrap_err(),
            InsertError::Exists
        );
    }
    // Same addresses, other protocol or port: not the same flow.
    let k = key(Proto::Sctp, 7);
    assert!(ct.lookup(&k).is_none());
    let mut other_port = key(Proto::Tcp, 7);
    other_port.dst.set_port(444);
    assert!(ct.lookup(&other_port).is_none());
    assert_eq!(ct.len(), 3);
    assert!(ct.remove(&key(Proto::Udp, 7).reversed()), "removable from the reply side");
    assert!(ct.lookup(&key(Proto::Udp, 7)).is_none());
    assert!(!ct.remove(&key(Proto::Udp, 7)));
    assert_eq!(ct.len(), 2);
    assert_eq!(ct.stats().removed.load(Ordering::Relaxed), 1);
}

#[test]
fn ipv6_flows_are_tracked_too() {
    let ct = Conntrack::new(&cfg(16, 0));
    let k = FlowKey::new(
        Proto::Udp,
        "[2001:db8::1]:5353".parse().unwrap(),
        "[2001:db8::2]:53".parse().unwrap(),
    );
    let e = ct.insert(k, init(FlowState::Unreplied), Instant::now()).expect("room");
    assert!(EntryRef::ptr_eq(&e, &ct.lookup(&k.reversed()).expect("reverse")));
    assert_eq!(e.key(), k);
}

#[test]
fn at_capacity_oldest_unassured_is_evicted_then_refused() {
    let ct = Conntrack::new(&cfg(4, 1));
    let now = Instant::now();
    let cut = Arc::new(CutSignal::default());
    let k: Vec<FlowKey> = (0..8).map(|i| key(Proto::Udp, i)).collect();
    let mut proxied = init(FlowState::Closing);
    proxied.cut = Some(cut.clone());
    ct.insert(k[0], proxied, now).expect("room"); // closing proxied flow: evictable
    ct.insert(k[1], init(FlowState::Unreplied), now).expect("room");
    ct.insert(k[2], init(FlowState::Unreplied), now).expect("room");
    ct.insert(k[3], init(FlowState::Unreplied), now).expect("room");
    // k[1] gets a reply: assured, so it must survive the evictions below.
    assert_eq!(ct.lookup(&k[1]).unwrap().mark_reply(), FlowState::Assured);

    ct.insert(k[4], init(FlowState::Unreplied), now).expect("evicts k0");
    assert!(ct.lookup(&k[0]).is_none(), "oldest unassured goes first");
    assert!(cut.is_cut(), "an evicted proxied flow is cut, not silently untracked");
    ct.insert(k[5], init(FlowState::Unreplied), now).expect("evicts k2 (k1 is assured)");
    assert!(ct.lookup(&k[1]).is_some());
    assert!(ct.lookup(&k[2]).is_none());
    assert_eq!(ct.len(), 4);

    // Make everything assured: nothing left to evict, so new flows are refused.
    ct.for_each(|e| {
        e.mark_reply();
    });
    assert_eq!(
        ct.insert(k[6], init(FlowState::Unreplied), now).unwrap_err(),
        InsertError::Full { capacity: 4 }
    );
    assert_eq!(
        ct.insert(k[7], init(FlowState::Open), now).unwrap_err(),
        InsertError::Full { capacity: 4 }
    );
    let s = ct.stats();
    assert_eq!(s.evicted.load(Ordering::Relaxed), 2);
    assert_eq!(s.refused.load(Ordering::Relaxed), 2);
    assert_eq!(s.inserted.load(Ordering::Relaxed), 6);
    assert_eq!(ct.len(), 4);
    for i in [1, 3, 4, 5] {
        assert!(ct.lookup(&k[i]).is_some(), "flow {i} kept");
    }
}

#[test]
fn closing_flows_become_evictable_once_the_sweep_has_seen_them() {
    let ct = Conntrack::new(&cfg(2, 1));
    let now = Instant::now();
    let a = key(Proto::Tcp, 1);
    let b = key(Proto::Tcp, 2);
    ct.insert(a, init(FlowState::Open), now).expect("room");
    ct.insert(b, init(FlowState::Open), now).expect("room");
    assert!(ct.insert(key(Proto::Tcp, 3), init(FlowState::Open), now).is_err());
    ct.lookup(&b).unwrap().set_state(FlowState::Closing);
    assert_eq!(ct.expire_step(now, 100), 0, "nothing is idle yet");
    ct.insert(key(Proto::Tcp, 3), init(FlowState::Open), now).expect("evicts the closing flow");
    assert!(ct.lookup(&b).is_none());
    assert!(ct.lookup(&a).is_some());
}

#[test]
fn expiry_is_incremental_and_per_protocol_and_state() {
    let c = ConntrackConfig {
        capacity: 10_000,
        udp_unreplied: Duration::from_secs(30),
        udp_assured: Duration::from_secs(180),
        icmp: Duration::from_secs(20),
        tcp_syn_sent: Duration::from_secs(120),
        tcp_established: Duration::from_secs(3600),
        tcp_transitory: Duration::from_secs(120),
        tcp_time_wait: Duration::from_secs(120),
        tcp_close: Duration::from_secs(10),
        ..ConntrackConfig::default()
    };
    let ct = Conntrack::new(&c);
    let t0 = Instant::now();
    let n = 1000;
    // n of each kind.
    for i in 0..n {
        ct.insert(key(Proto::Udp, i), init(FlowState::Unreplied), t0).unwrap();
        ct.insert(key(Proto::Udp, n + i), init(FlowState::Unreplied), t0).unwrap().mark_reply();
        ct.insert(key(Proto::Icmp, i), init(FlowState::Unreplied), t0).unwrap();
        insert_established(&ct, key(Proto::Tcp, i), t0);
        let (ti, conn) =
            EntryInit::tcp_packet(TcpFlags::SYN, Generation(1), None, None, 0).unwrap();
        let e = ct.insert_tcp(key(Proto::Tcp, n + i), ti, conn, t0).unwrap();
        e.on_tcp_segment(Side::Reply, TcpFlags(0x14)).unwrap(); // refused: RST+ACK → CLOSE
    }
    assert_eq!(ct.len(), 5 * n as usize);
    let timeout = |k: FlowKey| ct.timeout(&ct.lookup(&k).unwrap());
    assert_eq!(timeout(key(Proto::Udp, 0)), Duration::from_secs(30));
    assert_eq!(timeout(key(Proto::Udp, n)), Duration::from_secs(180));
    assert_eq!(timeout(key(Proto::Icmp, 0)), Duration::from_secs(20));
    assert_eq!(timeout(key(Proto::Tcp, 0)), Duration::from_secs(3600));
    assert_eq!(timeout(key(Proto::Tcp, n)), Duration::from_secs(10));

    // Sweep at a time after each deadline with a small budget: every call does bounded
    // work, and repeated calls eventually remove exactly the idle kinds.
    let sweep = |at: Duration| {
        let mut removed = 0;
        for _ in 0..200 {
            removed += ct.expire_step(t0 + at, 500);
        }
        removed
    };
    let first = ct.expire_step(t0 + Duration::from_secs(11), 100);
    assert!(first <= 100, "a step examines at most its budget");
    assert_eq!(first as u64, ct.stats().expired.load(Ordering::Relaxed));
    let _ = sweep(Duration::from_secs(11));
    assert!(ct.lookup(&key(Proto::Tcp, n + 5)).is_none(), "CLOSE after 10 s");
    assert!(ct.lookup(&key(Proto::Icmp, 5)).is_some());
    assert_eq!(ct.len(), 4 * n as usize);
    sweep(Duration::from_secs(31));
    assert!(ct.lookup(&key(Proto::Icmp, 5)).is_none(), "ICMP after 20 s");
    assert!(ct.lookup(&key(Proto::Udp, 5)).is_none(), "unreplied UDP after 30 s");
    assert!(ct.lookup(&key(Proto::Udp, n + 5)).is_some(), "assured UDP lives on");
    assert_eq!(ct.len(), 2 * n as usize);
    // Activity keeps a flow: touch half the assured UDP flows at 170 s.
    for i in 0..n / 2 {
        let e = ct.lookup(&key(Proto::Udp, n + i)).unwrap();
        ct.touch(&e, t0 + Duration::from_secs(170));
    }
    sweep(Duration::from_secs(181));
    assert_eq!(ct.len(), (n + n / 2) as usize);
    assert!(ct.lookup(&key(Proto::Udp, n)).is_some());
    assert!(ct.lookup(&key(Proto::Udp, n + n / 2)).is_none());
    sweep(Duration::from_secs(3601));
    assert_eq!(ct.len(), 0, "established TCP after its own, longest timeout");
    assert_eq!(ct.stats().expired.load(Ordering::Relaxed), 5 * u64::from(n));
    let mut seen = 0;
    ct.for_each(|_| seen += 1);
    assert_eq!(seen, 0);
}

#[test]
fn expiry_cuts_proxied_flows() {
    let ct = Conntrack::new(&cfg(16, 0));
    let t0 = Instant::now();
    let cut = Arc::new(CutSignal::default());
    let mut i = init(FlowState::Closing);
    i.cut = Some(cut.clone());
    ct.insert(key(Proto::Tcp, 1), i, t0).unwrap();
    ct.expire_step(t0 + Duration::from_secs(60), 100);
    assert!(!cut.is_cut());
    let mut removed = 0;
    for _ in 0..8 {
        removed += ct.expire_step(t0 + Duration::from_secs(121), 100);
    }
    assert_eq!(removed, 1);
    assert!(cut.is_cut());
}

#[test]
fn flood_at_capacity_leaves_assured_flows_alone() {
    let capacity = 20_000;
    let ct = Conntrack::new(&cfg(capacity, 0));
    let now = Instant::now();
    let established = 5_000u32;
    for i in 0..established {
        insert_established(&ct, key(Proto::Tcp, i), now);
    }
    // 200,000 new UDP flows (a scan or a spoofed flood): bounded, counted, and the
    // established flows keep their entries.
    let flood = 200_000u32;
    let mut refused = 0u64;
    for i in 0..flood {
        if ct.insert(key(Proto::Udp, i), init(FlowState::Unreplied), now).is_err() {
            refused += 1;
        }
        assert!(ct.len() <= capacity);
    }
    assert_eq!(ct.len(), capacity);
    for i in 0..established {
        let e = ct.lookup(&key(Proto::Tcp, i)).expect("established flow survives the flood");
        assert_eq!(e.tcp_state(), Some(TcpState::Established));
    }
    let s = ct.stats();
    let evicted = s.evicted.load(Ordering::Relaxed);
    assert_eq!(s.refused.load(Ordering::Relaxed), refused);
    let inserted = s.inserted.load(Ordering::Relaxed);
    assert_eq!(inserted, u64::from(established + flood) - refused);
    assert_eq!(inserted - evicted, capacity as u64, "every insert beyond capacity evicted one");
    assert!(evicted >= u64::from(flood) - capacity as u64 - refused);
    // Refusals only happen where a shard and its neighbours were all busy or assured.
    assert!(refused < u64::from(flood) / 100, "refused {refused}");
}

#[test]
fn two_threads_insert_lookup_remove_and_expire() {
    let capacity = 50_000;
    let ct = Arc::new(Conntrack::new(&cfg(capacity, 0)));
    let t0 = Instant::now();
    let per_thread = 40_000u32;
    let handles: Vec<_> = (0..2u32)
        .map(|t| {
            let ct = ct.clone();
            std::thread::spawn(move || {
                let mut hits = 0u32;
                for round in 0..2u32 {
                    for i in 0..per_thread {
                        // Disjoint ranges per thread, plus a shared range both fight over.
                        let id = if i % 8 == 0 { i } else { (t + 1) * 1_000_000 + i };
                        let k = key(Proto::Udp, id + round * 4_000_000);
                        let _ = ct.insert(k, init(FlowState::Unreplied), t0);
                        if let Some(e) = ct.lookup(&k.reversed()) {
                            e.mark_reply();
                            e.count(Side::Reply, 100);
                            hits += 1;
                        }
                        if i % 5 == 0 {
                            ct.remove(&k);
                        }
                        if i % 1000 == 0 {
                            ct.expire_step(t0 + Duration::from_secs(1), 256);
                        }
                    }
                }
                hits
            })
        })
        .collect();
    let hits: u32 = handles.into_iter().map(|h| h.join().expect("no panic")).sum();
    assert!(hits > 0);
    let mut seen = 0usize;
    ct.for_each(|e| {
        seen += 1;
        assert!(e.packets_reply().load(Ordering::Relaxed) >= 1);
    });
    assert_eq!(seen, ct.len(), "shadow count matches the map");
    assert!(ct.len() <= capacity);
    let s = ct.stats();
    let live = s.inserted.load(Ordering::Relaxed)
        - s.evicted.load(Ordering::Relaxed)
        - s.expired.load(Ordering::Relaxed)
        - s.removed.load(Ordering::Relaxed);
    assert_eq!(live, ct.len() as u64);
}

#[test]
fn tcp_packet_flow_lifecycle_through_the_table() {
    let ct = Conntrack::new(&cfg(16, 0));
    let now = Instant::now();
    let k = key(Proto::Tcp, 9);
    assert!(EntryInit::tcp_packet(TcpFlags::ACK, Generation(1), None, None, 0).is_err());
    let (init, conn) = EntryInit::tcp_packet(TcpFlags::SYN, Generation(1), None, None, 0).unwrap();
    assert_eq!(conn, TcpConn::open(TcpFlags::SYN).unwrap());
    ct.insert_tcp(k, init, conn, now).unwrap();
    let step = |side: Side, flags: TcpFlags| {
        ct.lookup_with(&k, |e, _| e.on_tcp_segment(side, flags)).expect("tracked")
    };
    assert!(step(Side::Orig, TcpFlags(0x18)).is_err(), "data before the handshake");
    assert_eq!(ct.lookup(&k).unwrap().state(), FlowState::Unreplied);
    let side = ct.lookup_with(&k.reversed(), |_, s| s).unwrap();
    assert_eq!(step(side, TcpFlags::SYN_ACK), Ok(TcpState::SynRecv));
    assert_eq!(step(Side::Orig, TcpFlags::ACK), Ok(TcpState::Established));
    let e = ct.lookup(&k).unwrap();
    assert_eq!(e.state(), FlowState::Open);
    assert!(!e.is_evictable());
    assert_eq!(step(Side::Orig, TcpFlags::FIN_ACK), Ok(TcpState::FinWait));
    assert_eq!(e.state(), FlowState::Closing);
    assert!(e.is_evictable());
    assert_eq!(ct.timeout(&e), ConntrackConfig::default().tcp_fin_wait);
}

#[test]
fn icmp_echo_and_udp_become_assured_on_reply() {
    let ct = Conntrack::new(&cfg(16, 1));
    let now = Instant::now();
    // ICMP echo: the identifier rides in the originator's source port, 0 in the other, so
    // the echo reply (server → client, same identifier) is the reverse key.
    let client: SocketAddr = "198.18.0.1:4660".parse().unwrap();
    let server: SocketAddr = "198.18.0.2:0".parse().unwrap();
    let echo = FlowKey::new(Proto::Icmp, client, server);
    let reply = FlowKey::new(Proto::Icmp, server, client);
    let udp = key(Proto::Udp, 3);
    for k in [echo, udp] {
        ct.insert(k, init(FlowState::Unreplied), now).unwrap();
        assert!(ct.lookup(&k).unwrap().is_evictable());
    }
    let state = ct.lookup_with(&reply, |e, side| {
        assert_eq!(side, Side::Reply);
        e.count(side, 84);
        e.mark_reply()
    });
    assert_eq!(state, Some(FlowState::Assured));
    let e = ct.lookup(&echo).unwrap();
    assert!(!e.is_evictable());
    assert_eq!(e.packets_reply().load(Ordering::Relaxed), 1);
    assert_eq!(e.bytes_reply().load(Ordering::Relaxed), 84);
    // A second identifier is another flow.
    let other = FlowKey::new(Proto::Icmp, "198.18.0.1:4661".parse().unwrap(), server);
    assert!(ct.lookup(&other).is_none());
    // The originator's own packets never assure a flow; a reply does.
    let u = ct.lookup(&udp).unwrap();
    assert_eq!(ct.lookup_with(&udp, |_, side| side), Some(Side::Orig));
    assert_eq!(u.state(), FlowState::Unreplied);
    assert_eq!(u.mark_reply(), FlowState::Assured);
    assert_eq!(ct.timeout(&u), ConntrackConfig::default().udp_assured);
}

/// Slots are re-used as flows come and go; a reader racing with that must only ever see
/// the flow it asked for (its key and the identity it was inserted with), never the next
/// occupant of a slot it was about to read.
#[test]
fn readers_never_see_another_flows_entry_while_slots_are_reused() {
    // A tiny table (one shard, 64 places) churned through 4,096 flows: every slot is
    // re-used thousands of times while two readers look flows up.
    let ct = Arc::new(Conntrack::new(&cfg(64, 1)));
    let t0 = Instant::now();
    let flows = 4096u32;
    let with_id =
        |i: u32| EntryInit { src_workload: Some(WorkloadId(i)), ..init(FlowState::Unreplied) };
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readers: Vec<_> = (0..2u32)
        .map(|t| {
            let (ct, stop) = (ct.clone(), stop.clone());
            std::thread::spawn(move || {
                let (mut hits, mut i) = (0u64, t);
                // Bounded in count; stops early once the writer is done.
                for _ in 0..2_000_000u32 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    i = (i.wrapping_mul(1_103_515_245).wrapping_add(12_345)) % flows;
                    if t == 0 {
                        let k = key(Proto::Udp, i);
                        let seen = ct.lookup_with(&k.reversed(), |e, side| {
                            (e.src_workload(), e.key(), side)
                        });
                        if let Some((wl, ek, side)) = seen {
                            assert_eq!(wl, Some(WorkloadId(i)), "flow {i} read another's entry");
                            assert_eq!(ek, k);
                            assert_eq!(side, Side::Reply);
                            hits += 1;
                        }
                        continue;
                    }
                    // The batch lookup pins nothing: an entry it hands to `f` must stay
                    // that flow's for the whole call, while the writer re-uses slots.
                    let ks: Vec<FlowKey> =
                        (0..16).map(|j| key(Proto::Udp, (i + j * 61) % flows).reversed()).collect();
                    let mut found = Vec::new();
                    ct.lookup_many(&ks, |j, hit| {
                        if let Some((e, side)) = hit {
                            assert_eq!(side, Side::Reply);
                            let wl = e.src_workload();
                            for _ in 0..64 {
                                std::hint::spin_loop();
                            }
                            found.push((j, wl, e.key()));
                        }
                    });
                    for (j, wl, ek) in &found {
                        let want = (i + *j as u32 * 61) % flows;
                        assert_eq!(*wl, Some(WorkloadId(want)), "batch read another's entry");
                        assert_eq!(*ek, ks[*j].reversed());
                    }
                    hits += found.len() as u64;
                }
                hits
            })
        })
        .collect();
    let mut handles = Vec::new();
    for round in 0..60u32 {
        for i in 0..flows {
            let k = key(Proto::Udp, i);
            if (i + round) % 3 == 0 {
                ct.remove(&k);
            } else if let Ok(e) = ct.insert(k, with_id(i), t0) {
                // A few handles held across the churn: their slots must stay theirs.
                if i % 997 == 0 && handles.len() < 8 {
                    handles.push((i, e));
                }
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let hits: u64 = readers.into_iter().map(|h| h.join().expect("reader")).sum();
    assert!(hits > 0, "the readers found flows");
    for (i, e) in &handles {
        assert_eq!(e.src_workload(), Some(WorkloadId(*i)), "a held handle kept its flow");
        assert_eq!(e.key(), key(Proto::Udp, *i));
    }
    assert!(ct.len() <= 64);
}

/// A batch lookup pins nothing: the call is a grace period. A flow removed while the call
/// is inside `f` keeps its slot, and the entry `f` was given stays that flow's, however
/// many flows come and go meanwhile; once the call returns the slot is handed out again.
/// With `batch_readers = 0` the call pins each entry instead, with the same guarantee.
#[test]
fn a_batch_lookup_keeps_removed_slots_from_reuse_until_it_returns() {
    for batch_readers in [64, 0] {
        let ct = Conntrack::new(&ConntrackConfig { batch_readers, pin_slack: 0, ..cfg(8, 1) });
        let now = Instant::now();
        let a = key(Proto::Udp, 1);
        ct.insert(a, init(FlowState::Unreplied), now).expect("room");
        let (mut churned, mut slot_of_a) = (0, 0);
        ct.lookup_many(&[a], |_, hit| {
            let (e, _) = hit.expect("a is tracked");
            slot_of_a = e.slot_id();
            e.count(Side::Orig, 7);
            assert!(ct.remove(&a));
            for i in 100..400 {
                let k = key(Proto::Udp, i);
                if let Ok(other) = ct.insert(k, init(FlowState::Unreplied), now) {
                    assert_ne!(other.slot_id(), e.slot_id(), "a new flow took a slot being read");
                    churned += 1;
                    assert!(ct.remove(&k));
                }
            }
            assert_eq!(e.key(), a);
            assert_eq!(e.bytes_orig().load(Ordering::Relaxed), 7);
        });
        assert!(churned > 0, "batch_readers {batch_readers}: flows came and went meanwhile");
        assert_eq!(ct.batch_fallbacks(), u64::from(batch_readers == 0));
        let reused = (400..500).any(|i| {
            let k = key(Proto::Udp, i);
            let e = ct.insert(k, init(FlowState::Unreplied), now).expect("room after the call");
            let same = e.slot_id() == slot_of_a;
            drop(e);
            assert!(ct.remove(&k));
            same
        });
        assert!(reused, "batch_readers {batch_readers}: a's slot is handed out again");
    }
}

/// More threads inside batch lookups than `batch_readers`: the extra call pins entries
/// instead, answers the same, and is counted.
#[test]
fn a_batch_lookup_without_a_reader_slot_pins_and_is_counted() {
    let ct = Conntrack::new(&ConntrackConfig { batch_readers: 1, ..cfg(64, 1) });
    let now = Instant::now();
    let keys: Vec<FlowKey> = (0..8).map(|i| key(Proto::Udp, i)).collect();
    for k in &keys[..4] {
        ct.insert(*k, init(FlowState::Unreplied), now).expect("room");
    }
    let mut inner = Vec::new();
    ct.lookup_many(&keys[..1], |_, _| {
        // The one reader slot is this call's: the nested call falls back to pins.
        ct.lookup_many(&keys, |i, hit| inner.push((i, hit.map(|(e, _)| e.key()))));
    });
    let want: Vec<_> = (0..8).map(|i| (i, (i < 4).then_some(keys[i]))).collect();
    assert_eq!(inner, want);
    assert_eq!(ct.batch_fallbacks(), 1);
    ct.lookup_many(&keys, |_, _| ());
    assert_eq!(ct.batch_fallbacks(), 1, "the slot is free again");
}

/// A handle outlives its flow's removal (a proxied flow's task finishing up); the table
/// keeps working around the pinned slot and gives it out again once the handle is gone.
#[test]
fn a_held_handle_survives_removal_and_its_slot_is_reused_after() {
    let ct = Conntrack::new(&cfg(4, 1));
    let now = Instant::now();
    let k = key(Proto::Tcp, 1);
    let held = ct.insert(k, init(FlowState::Open), now).expect("room");
    held.count(Side::Orig, 10);
    assert!(ct.remove(&k));
    assert!(ct.lookup(&k).is_none());
    for i in 100..400 {
        let other = key(Proto::Udp, i);
        ct.insert(other, init(FlowState::Unreplied), now).expect("room next to a pinned slot");
        assert!(ct.remove(&other));
    }
    assert_eq!(held.key(), k);
    assert_eq!(held.bytes_orig().load(Ordering::Relaxed), 10);
    let again = held.clone();
    drop(held);
    assert_eq!(again.key(), k, "a clone pins too");
    drop(again);
    assert!(ct.is_empty());
}

/// `pin_slack` bounds the entries a shard carries that were removed while a handle still
/// pins them: with no slack, a shard whose every slot is pinned refuses a new flow (and
/// counts it) though the table is empty; with the default slack the same shard takes it.
#[test]
fn pin_slack_bounds_removed_entries_still_pinned() {
    // Capacity 1 in one shard: the shard's share plus its imbalance slack is 17 slots.
    for (slack, takes_it) in [(0, false), (64, true)] {
        let ct = Conntrack::new(&ConntrackConfig { pin_slack: slack, ..cfg(1, 1) });
        let now = Instant::now();
        let held: Vec<EntryRef> = (0..17)
            .map(|i| {
                let k = key(Proto::Tcp, i);
                let e = ct.insert(k, init(FlowState::Open), now).expect("room");
                assert!(ct.remove(&k));
                e
            })
            .collect();
        assert!(ct.is_empty());
        let r = ct.insert(key(Proto::Tcp, 1000), init(FlowState::Open), now);
        assert_eq!(r.is_ok(), takes_it, "pin_slack {slack}: {r:?}");
        let refused = ct.stats().refused.load(Ordering::Relaxed);
        assert_eq!(refused, u64::from(!takes_it), "pin_slack {slack}");
        drop(held);
        if !takes_it {
            // The handles are gone: their slots are free again.
            ct.insert(key(Proto::Tcp, 1000), init(FlowState::Open), now).expect("room again");
        }
    }
}

/// The batch lookup answers each key exactly as a single lookup would, in order, across
/// more keys than one prefetch group.
#[test]
fn lookup_many_matches_single_lookups() {
    let ct = Conntrack::new(&cfg(4096, 0));
    let now = Instant::now();
    // UDP and TCP over IPv4, and UDP over IPv6 (which the batch compares from the key
    // again rather than from the probe it carries between stages).
    let flow = |i: u32| match i % 3 {
        0 => {
            let v6 = |host: u32, port| {
                SocketAddr::new(
                    std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, host as u16).into(),
                    port,
                )
            };
            FlowKey::new(Proto::Udp, v6(1 + i, 4000 + i as u16), v6(0xff00, 53))
        }
        1 => key(Proto::Tcp, i),
        _ => key(Proto::Udp, i),
    };
    for i in (0..100).step_by(2) {
        ct.insert(flow(i), init(FlowState::Unreplied), now).expect("room");
    }
    // Hits (even), misses (odd), reversed keys, in a shuffled order.
    let keys: Vec<FlowKey> = (0..100u32)
        .map(|j| (j * 37) % 100)
        .map(|i| if i % 4 == 0 { flow(i).reversed() } else { flow(i) })
        .collect();
    // Shorter than the prefetch distances, around them, and well past them.
    for len in [0, 1, 5, 8, 9, 32, 33, 34, 100] {
        let mut seen = Vec::new();
        ct.lookup_many(&keys[..len], |idx, hit| {
            seen.push((idx, hit.map(|(e, side)| (e.key(), side))));
        });
        assert_eq!(seen.iter().map(|s| s.0).collect::<Vec<_>>(), (0..len).collect::<Vec<_>>());
        for (idx, got) in seen {
            let want = ct.lookup_with(&keys[idx], |e, side| (e.key(), side));
            assert_eq!(got, want, "key {idx} of {len}");
        }
    }
    assert_eq!(ct.lookup_with(&keys[0], |_, s| s), Some(Side::Reply));
    // Every inserted flow is found, each kind in both directions.
    let hits = keys.iter().filter(|k| ct.lookup_with(k, |_, _| ()).is_some()).count();
    assert_eq!(hits, 50);
}
