//! Connection-tracking benchmarks at 1M entries: the candidate maps side by side (same key,
//! same value, same hasher), then flowgate's table through its public API, each at 1 and 2
//! threads; a memory floor for the batch lookup (its access pattern without the table's
//! work, `memory_floor_1M`); plus memory per entry from a counting global allocator (and
//! glibc's own view).
//!
//! Run: `cargo bench --bench conntrack -- --warm-up-time 1 --measurement-time 3`
//! Memory only: `CT_MEMORY_ONLY=1 cargo bench --bench conntrack` (prints bytes per entry);
//! `CT_SKIP_MEMORY=1` skips that part.
//! Results and the choice: BENCHMARKS.md, "Connection tracking".

use std::alloc::{GlobalAlloc, Layout, System};
use std::hash::{BuildHasher, Hasher};
use std::hint::black_box;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group};
use flowgate::conntrack::{Conntrack, ConntrackConfig, EntryInit, FlowState};
use flowgate::flow::{FlowKey, Proto};
use flowgate::policy::Generation;

/// Counts live heap bytes (requested sizes) so memory per entry includes every map's own
/// overhead, not just the entries.
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

/// glibc's in-use bytes, chunk headers and rounding included: heap chunks plus the large
/// blocks it maps separately (a big table's bucket array).
fn malloc_in_use() -> usize {
    // SAFETY: mallinfo2 only reads allocator statistics.
    let m = unsafe { libc::mallinfo2() };
    m.uordblks + m.hblkhd
}

const N: usize = 1 << 20;

fn flow(i: u32) -> FlowKey {
    let c = Ipv4Addr::from_bits(0x0a00_0000 | (i >> 8));
    let s = Ipv4Addr::from_bits(0xc612_0000 | (i & 0xff));
    FlowKey::new(
        Proto::Udp,
        SocketAddr::V4(SocketAddrV4::new(c, 1024 + (i % 50_000) as u16)),
        SocketAddr::V4(SocketAddrV4::new(s, 53)),
    )
}

/// The compact IPv4 key the candidate maps share: canonical 5-tuple packed in a u128.
fn packed(k: &FlowKey) -> u128 {
    let end = |a: SocketAddr| match a {
        SocketAddr::V4(v) => (u128::from(v.ip().to_bits()) << 16) | u128::from(v.port()),
        SocketAddr::V6(_) => unreachable!("the benchmark uses IPv4"),
    };
    let (a, b) = (end(k.src), end(k.dst));
    let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
    (lo << 56) | (hi << 8) | u128::from(k.proto.number())
}

/// The same keyed fold hash for every candidate (flowgate's own table uses its equivalent).
#[derive(Clone, Copy, Default)]
struct Fold;
struct FoldHasher(u64);

impl Hasher for FoldHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for c in bytes.chunks(8) {
            let mut w = [0u8; 8];
            w[..c.len()].copy_from_slice(c);
            self.write_u64(u64::from_le_bytes(w));
        }
    }
    fn write_u64(&mut self, v: u64) {
        let r = u128::from(self.0 ^ v) * u128::from(0x9e37_79b9_7f4a_7c15u64);
        self.0 = (r as u64) ^ ((r >> 64) as u64);
    }
    fn write_u128(&mut self, v: u128) {
        self.write_u64(v as u64);
        self.write_u64((v >> 64) as u64);
    }
}

impl BuildHasher for Fold {
    type Hasher = FoldHasher;
    fn build_hasher(&self) -> FoldHasher {
        FoldHasher(0x243f_6a88_85a3_08d3)
    }
}

/// Stand-in for the 80-byte entry the candidates would hold.
type Val = Arc<[u64; 10]>;

fn val() -> Val {
    Arc::new([1; 10])
}

/// A candidate concurrent map, reduced to what the benchmark needs.
trait Candidate: Sync + Send {
    fn name(&self) -> &'static str;
    fn insert(&self, k: u128) -> bool;
    fn remove(&self, k: u128) -> bool;
    fn hit(&self, k: u128) -> bool;
}

struct Dash(dashmap::DashMap<u128, Val, Fold>);
struct Papaya(papaya::HashMap<u128, Val, Fold>);
struct SccMap(scc::HashMap<u128, Val, Fold>);
struct SccIndex(scc::HashIndex<u128, Val, Fold>);

impl Candidate for Dash {
    fn name(&self) -> &'static str {
        "dashmap"
    }
    fn insert(&self, k: u128) -> bool {
        self.0.insert(k, val()).is_none()
    }
    fn remove(&self, k: u128) -> bool {
        self.0.remove(&k).is_some()
    }
    fn hit(&self, k: u128) -> bool {
        self.0.get(&k).is_some_and(|v| v[0] == 1)
    }
}

impl Candidate for Papaya {
    fn name(&self) -> &'static str {
        "papaya"
    }
    fn insert(&self, k: u128) -> bool {
        self.0.pin().insert(k, val()).is_none()
    }
    fn remove(&self, k: u128) -> bool {
        self.0.pin().remove(&k).is_some()
    }
    fn hit(&self, k: u128) -> bool {
        self.0.pin().get(&k).is_some_and(|v| v[0] == 1)
    }
}

impl Candidate for SccMap {
    fn name(&self) -> &'static str {
        "scc_hashmap"
    }
    fn insert(&self, k: u128) -> bool {
        self.0.insert_sync(k, val()).is_ok()
    }
    fn remove(&self, k: u128) -> bool {
        self.0.remove_sync(&k).is_some()
    }
    fn hit(&self, k: u128) -> bool {
        self.0.read_sync(&k, |_, v| v[0] == 1).unwrap_or(false)
    }
}

impl Candidate for SccIndex {
    fn name(&self) -> &'static str {
        "scc_hashindex"
    }
    fn insert(&self, k: u128) -> bool {
        self.0.insert_sync(k, val()).is_ok()
    }
    fn remove(&self, k: u128) -> bool {
        self.0.remove_sync(&k)
    }
    fn hit(&self, k: u128) -> bool {
        self.0.peek_with(&k, |_, v| v[0] == 1).unwrap_or(false)
    }
}

/// flowgate's table through its public API (what the dataplanes call).
struct Table(Conntrack);

fn init() -> EntryInit {
    EntryInit::plain(FlowState::Unreplied, Generation(1))
}

fn table(capacity: usize) -> Table {
    Table(Conntrack::new(&ConntrackConfig { capacity, ..ConntrackConfig::default() }))
}

/// Keys for hits (inserted) and misses (never inserted). `hits`/`misses` list them in a
/// shuffled order so lookups land all over the table (and miss the CPU caches) the way
/// real traffic does, while the benchmark reads its own key list sequentially: a packet's
/// key is on the worker's stack, not in a cold array.
struct Keys {
    flows: Vec<FlowKey>,
    packed: Vec<u128>,
    hits: Vec<FlowKey>,
    misses: Vec<FlowKey>,
    packed_hits: Vec<u128>,
    packed_misses: Vec<u128>,
}

fn keys() -> Keys {
    let flows: Vec<FlowKey> = (0..2 * N as u32).map(flow).collect();
    let packed: Vec<u128> = flows.iter().map(packed).collect();
    let mut order: Vec<u32> = (0..N as u32).collect();
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for i in (1..order.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        order.swap(i, (x % (i as u64 + 1)) as usize);
    }
    let hits = order.iter().map(|&j| flows[j as usize]).collect();
    let misses = order.iter().map(|&j| flows[N + j as usize]).collect();
    let packed_hits = order.iter().map(|&j| packed[j as usize]).collect();
    let packed_misses = order.iter().map(|&j| packed[N + j as usize]).collect();
    Keys { flows, packed, hits, misses, packed_hits, packed_misses }
}

/// Index of the `i`-th operation of thread `t` into a visiting list (threads interleave).
fn at(t: usize, i: u64) -> usize {
    (i as usize * 2 + t) % N
}

/// Start of the `i`-th batch of 32 keys of thread `t` in a visiting list: threads take
/// alternate batches, so two threads never look up the same flows at once (RSS gives each
/// packet worker its own flows). `at(t, i * 32)` had thread 1's batch start one key after
/// thread 0's, so 31 of its 32 keys were the ones thread 0 was looking up, and both
/// threads' counter updates fought over the same entries' lines (BENCHMARKS.md, "Seventh
/// look").
fn batch_at(t: usize, i: u64) -> usize {
    at(t, i) * 32 % (N - 32)
}

/// CPU time of the calling thread. The benchmark machine is shared (2 cores, several
/// builds running), so wall time mostly measures the scheduler; a thread's own CPU time
/// still includes its cache misses and any cache-line contention between the threads.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Runs `op(t, i)` `iters` times on each of `threads` threads at once (started together by
/// a barrier); returns the mean per-thread CPU time, i.e. the cost of one operation as one
/// thread pays it while `threads` run concurrently.
fn timed(threads: usize, iters: u64, op: &(dyn Fn(usize, u64) + Sync)) -> Duration {
    let barrier = Barrier::new(threads);
    let total: Duration = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|t| {
                let barrier = &barrier;
                s.spawn(move || {
                    barrier.wait();
                    let start = thread_cpu();
                    for i in 0..iters {
                        op(t, i);
                    }
                    thread_cpu() - start
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("benchmark thread")).sum()
    });
    total / threads as u32
}

fn bench_candidates(c: &mut Criterion, k: &Keys) {
    let cands: Vec<Box<dyn Fn() -> Box<dyn Candidate>>> = vec![
        Box::new(|| Box::new(Dash(dashmap::DashMap::with_capacity_and_hasher(N, Fold)))),
        Box::new(|| Box::new(Papaya(papaya::HashMap::with_capacity_and_hasher(N, Fold)))),
        Box::new(|| Box::new(SccMap(scc::HashMap::with_capacity_and_hasher(N, Fold)))),
        Box::new(|| Box::new(SccIndex(scc::HashIndex::with_capacity_and_hasher(N, Fold)))),
    ];
    let mut g = c.benchmark_group("map_1M");
    for make in &cands {
        let m = make();
        for &key in &k.packed[..N] {
            m.insert(key);
        }
        let name = m.name();
        for threads in [1, 2] {
            g.bench_function(BenchmarkId::new(format!("{name}/lookup_hit"), threads), |b| {
                b.iter_custom(|iters| {
                    timed(threads, iters, &|t, i| {
                        assert!(m.hit(black_box(k.packed_hits[at(t, i)])));
                    })
                })
            });
            g.bench_function(BenchmarkId::new(format!("{name}/lookup_hit_hot64"), threads), |b| {
                b.iter_custom(|iters| {
                    timed(threads, iters, &|t, i| {
                        assert!(m.hit(black_box(k.packed_hits[at(t, i) % 64])));
                    })
                })
            });
            g.bench_function(BenchmarkId::new(format!("{name}/lookup_miss"), threads), |b| {
                b.iter_custom(|iters| {
                    timed(threads, iters, &|t, i| {
                        assert!(!m.hit(black_box(k.packed_misses[at(t, i)])));
                    })
                })
            });
            // Insert a new flow and remove it again: the table stays at 1M entries.
            g.bench_function(BenchmarkId::new(format!("{name}/insert_remove"), threads), |b| {
                b.iter_custom(|iters| {
                    timed(threads, iters, &|t, i| {
                        let key = k.packed_misses[at(t, i)];
                        m.insert(key);
                        m.remove(key);
                    })
                })
            });
        }
    }
    // Per-worker shards: each thread owns a plain map with no synchronisation at all (what
    // a run-to-completion packet worker with RSS could do). The floor for a lookup.
    let owned: Vec<std::collections::HashMap<u128, Val, Fold>> = (0..2)
        .map(|w| {
            let mut m = std::collections::HashMap::with_capacity_and_hasher(N / 2, Fold);
            for (i, &key) in k.packed[..N].iter().enumerate() {
                let _ = i;
                if (key >> 56) as usize % 2 == w {
                    m.insert(key, val());
                }
            }
            m
        })
        .collect();
    for threads in [1, 2] {
        g.bench_function(BenchmarkId::new("per_worker_std/lookup_hit", threads), |b| {
            b.iter_custom(|iters| {
                timed(threads, iters, &|t, i| {
                    let key = k.packed_hits[at(t, i)];
                    let m = &owned[(key >> 56) as usize % 2];
                    assert!(m.get(black_box(&key)).is_some_and(|v| v[0] == 1));
                })
            })
        });
    }
    g.finish();
}

fn bench_table(c: &mut Criterion, k: &Keys) {
    let t = table(2 * N);
    let now = Instant::now();
    for f in &k.flows[..N] {
        t.0.insert(*f, init(), now).expect("room");
    }
    let mut g = c.benchmark_group("conntrack_1M");
    for threads in [1, 2] {
        g.bench_function(BenchmarkId::new("lookup_hit", threads), |b| {
            b.iter_custom(|iters| {
                timed(threads, iters, &|th, i| {
                    assert!(t.0.lookup(black_box(&k.hits[at(th, i)])).is_some());
                })
            })
        });
        g.bench_function(BenchmarkId::new("lookup_with_hit", threads), |b| {
            b.iter_custom(|iters| {
                timed(threads, iters, &|th, i| {
                    let hit = t.0.lookup_with(black_box(&k.hits[at(th, i)]), |e, _| {
                        e.packets_orig().fetch_add(1, Ordering::Relaxed);
                    });
                    assert!(hit.is_some());
                })
            })
        });
        // The same with a warm working set: 4,096 active flows in the 1M table (a burst of
        // packets mostly belongs to few flows). This is the CPU cost of the lookup itself.
        g.bench_function(BenchmarkId::new("lookup_with_hit_hot4k", threads), |b| {
            b.iter_custom(|iters| {
                timed(threads, iters, &|th, i| {
                    let key = &k.hits[at(th, i) % 4096];
                    let hit = t.0.lookup_with(black_box(key), |e, _| {
                        e.packets_orig().fetch_add(1, Ordering::Relaxed);
                    });
                    assert!(hit.is_some());
                })
            })
        });
        // 64 active flows: everything in L1/L2, so this is the instruction cost of a lookup.
        g.bench_function(BenchmarkId::new("lookup_with_hit_hot64", threads), |b| {
            b.iter_custom(|iters| {
                timed(threads, iters, &|th, i| {
                    let key = &k.hits[at(th, i) % 64];
                    assert!(t.0.lookup_with(black_box(key), |e, _| e.listener()).is_some());
                })
            })
        });
        // The same, 64 lookups per iteration (a packet batch): divide the reported time by 64.
        g.bench_function(BenchmarkId::new("lookup_with_hit_hot64_batch64", threads), |b| {
            b.iter_custom(|iters| {
                timed(threads, iters, &|th, _| {
                    for key in &k.hits[th * 64..th * 64 + 64] {
                        assert!(t.0.lookup_with(black_box(key), |e, _| e.listener()).is_some());
                    }
                })
            })
        });
        // The batch lookup a packet worker makes for a received batch: uniformly random
        // flows over the whole table, 32 per call; the time reported is per lookup.
        for (name, list) in [("lookup_many_hit", &k.hits), ("lookup_many_miss", &k.misses)] {
            let want_hit = name.ends_with("hit");
            g.bench_function(BenchmarkId::new(name, threads), |b| {
                b.iter_custom(|iters| {
                    let batches = iters.div_ceil(32);
                    let per_batch = timed(threads, batches, &|th, i| {
                        let start = batch_at(th, i);
                        let mut found = 0;
                        t.0.lookup_many(black_box(&list[start..start + 32]), |_, hit| {
                            if let Some((e, _)) = hit {
                                e.packets_orig().fetch_add(1, Ordering::Relaxed);
                                found += 1;
                            }
                        });
                        assert_eq!(found, if want_hit { 32 } else { 0 });
                    });
                    per_batch * u32::try_from(iters).unwrap_or(u32::MAX)
                        / (batches as u32 * 32).max(1)
                })
            });
        }
        g.bench_function(BenchmarkId::new("lookup_miss", threads), |b| {
            b.iter_custom(|iters| {
                timed(threads, iters, &|th, i| {
                    assert!(t.0.lookup_with(black_box(&k.misses[at(th, i)]), |_, _| ()).is_none());
                })
            })
        });
        g.bench_function(BenchmarkId::new("insert_remove", threads), |b| {
            b.iter_custom(|iters| {
                timed(threads, iters, &|th, i| {
                    let key = k.misses[at(th, i)];
                    let _ = t.0.insert(key, init(), now);
                    t.0.remove(&key);
                })
            })
        });
    }
    g.finish();
    drop(t);

    // The shard count's effect on lookups: 512 shards (the old auto value at 1M) vs auto.
    let t512 = Table(Conntrack::new(&ConntrackConfig {
        capacity: 2 * N,
        shards: 512,
        ..ConntrackConfig::default()
    }));
    for f in &k.flows[..N] {
        t512.0.insert(*f, init(), now).expect("room");
    }
    let mut g = c.benchmark_group("conntrack_1M_512shards");
    g.bench_function(BenchmarkId::new("lookup_with_hit", 1), |b| {
        b.iter_custom(|iters| {
            timed(1, iters, &|th, i| {
                let hit = t512.0.lookup_with(black_box(&k.hits[at(th, i)]), |e, _| e.listener());
                assert!(hit.is_some());
            })
        })
    });
    g.bench_function(BenchmarkId::new("lookup_miss", 1), |b| {
        b.iter_custom(|iters| {
            timed(1, iters, &|th, i| {
                assert!(t512.0.lookup_with(black_box(&k.misses[at(th, i)]), |_, _| ()).is_none());
            })
        })
    });
    g.finish();
    drop(t512);

    // At capacity: every insert evicts the oldest unassured flow (the flood path).
    let full = table(N);
    for f in &k.flows[..N] {
        full.0.insert(*f, init(), now).expect("room");
    }
    let next = std::sync::atomic::AtomicUsize::new(N);
    let mut g = c.benchmark_group("conntrack_1M_full");
    for threads in [1, 2] {
        g.bench_function(BenchmarkId::new("insert_evict", threads), |b| {
            b.iter_custom(|iters| {
                timed(threads, iters, &|_, _| {
                    let j = next.fetch_add(1, Ordering::Relaxed) % (2 * N);
                    let _ = full.0.insert(black_box(k.flows[j]), init(), now);
                })
            })
        });
    }
    g.finish();
}

/// Heap bytes per entry at 1M entries, every candidate and the real table.
fn memory(k: &Keys) {
    /// The table's own mappings (its index and hot entry parts, outside the allocator)
    /// are added to both figures.
    fn measure<T: 'static>(name: &str, build: impl FnOnce() -> T) {
        let (live0, glibc0) = (LIVE.load(Ordering::SeqCst), malloc_in_use());
        let m = build();
        let own = (&m as &dyn std::any::Any)
            .downcast_ref::<Table>()
            .map_or(0, |t| t.0.mapped_bytes() as isize);
        let live = LIVE.load(Ordering::SeqCst) - live0 + own;
        let glibc = malloc_in_use() as isize - glibc0 as isize + own;
        println!(
            "memory {name:<28} {:>7.1} B/entry requested  {:>7.1} B/entry glibc in-use",
            live as f64 / N as f64,
            glibc as f64 / N as f64
        );
        drop(black_box(m));
    }
    let now = Instant::now();
    measure("conntrack (cap 1M, auto)", || {
        let t = table(N);
        for f in &k.flows[..N] {
            t.0.insert(*f, init(), now).expect("room");
        }
        t
    });
    measure("conntrack (cap 1M, assured)", || {
        let t = table(N);
        for f in &k.flows[..N] {
            t.0.insert(*f, init(), now).expect("room").mark_reply();
        }
        t
    });
    measure("conntrack flood 3M into 1M", || {
        let t = table(N);
        for i in 0..3 * N as u32 {
            let _ = t.0.insert(flow(i), init(), now);
        }
        assert_eq!(t.0.len(), N);
        t
    });
    measure("dashmap<u128,Arc>", || {
        let m = dashmap::DashMap::with_capacity_and_hasher(N, Fold);
        for &key in &k.packed[..N] {
            m.insert(key, val());
        }
        m
    });
    measure("papaya<u128,Arc>", || {
        let m = papaya::HashMap::with_capacity_and_hasher(N, Fold);
        for &key in &k.packed[..N] {
            m.pin().insert(key, val());
        }
        m
    });
    measure("scc::HashMap<u128,Arc>", || {
        let m = scc::HashMap::with_capacity_and_hasher(N, Fold);
        for &key in &k.packed[..N] {
            let _ = m.insert_sync(key, val());
        }
        m
    });
    measure("scc::HashIndex<u128,Arc>", || {
        let m = scc::HashIndex::with_capacity_and_hasher(N, Fold);
        for &key in &k.packed[..N] {
            let _ = m.insert_sync(key, val());
        }
        m
    });
    // The table's shape (the map key is the entry pointer itself), papaya vs HashIndex.
    let entry = |i: usize| Arc::new([i as u64, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    measure("papaya set<Arc> (table shape)", || {
        let m = papaya::HashSet::with_capacity_and_hasher(N, Fold);
        for i in 0..N {
            m.pin().insert(entry(i));
        }
        m
    });
    measure("scc HashIndex<Arc,()> (shape)", || {
        let m = scc::HashIndex::with_capacity_and_hasher(N, Fold);
        for i in 0..N {
            let _ = m.insert_sync(entry(i), ());
        }
        m
    });
    // The alternative index for a slab: scc's HashIndex keyed by 8-byte slot words (what
    // the table's own bucketed index replaces). Index overhead alone, no entries.
    measure("scc HashIndex<u64,()> (ids)", || {
        let m = scc::HashIndex::with_capacity_and_hasher(N, Fold);
        for i in 0..N as u64 {
            let _ = m.insert_sync(i, ());
        }
        m
    });
    measure("dashmap<FlowKey,Arc> (old)", || {
        let m = dashmap::DashMap::new();
        for f in &k.flows[..N] {
            m.insert(f.canonical(), val());
        }
        m
    });
}

fn benches(c: &mut Criterion) {
    let k = keys();
    if std::env::var_os("CT_SKIP_MEMORY").is_none() {
        memory(&k);
    }
    if std::env::var_os("CT_MEMORY_ONLY").is_some() {
        return;
    }
    bench_table(c, &k);
    bench_floor(c);
    bench_candidates(c, &k);
}

/// The memory floor under `lookup_many`, for the same run: the table's access pattern with
/// nothing else. A 64-byte bucket array sized as the table's index, a slab of 64-byte
/// aligned entries (the entries' hot parts), and per key one random bucket whose first word
/// names a random entry (so the entry's address depends on the bucket's load, as in the
/// table). The same software pipeline as `lookup_many` (buckets prefetched 32 keys ahead,
/// entries 16 ahead, one line each) and the callback's counter, in batches of 32.
/// Both arrays on huge pages, as the table's are.
/// `floor_hit` adds a pin and unpin per hit, as `lookup_many` did until the "Fourth look"
/// (BENCHMARKS.md); `floor_hit_unpinned` is today's comparison, since batch lookups no
/// longer pin. What `lookup_many_hit` costs above the floor is the table's own work per key
/// ("Fifth look").
fn bench_floor(c: &mut Criterion) {
    use std::sync::atomic::AtomicU64;
    const AHEAD: usize = 16;
    const WORDS: usize = 8; // 64 bytes, aligned: one line
    #[repr(align(64))]
    struct Bucket([AtomicU64; 8]);
    // The bench table's index: capacity 2M plus a quarter for imbalance, a bucket of
    // fifteen 4-byte words per 12 slots (14 MB).
    let buckets = (2 * N + 2 * N / 4).div_ceil(12);
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut rnd = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    // On huge pages where the machine has them, as the table's index and hot parts are
    // (`conntrack/pages.rs`): the advice goes before the first write, which is when the
    // kernel picks a page's size.
    fn huge<T>(n: usize, f: impl FnMut() -> T) -> Vec<T> {
        let mut v = Vec::with_capacity(n);
        let (start, bytes) = (v.as_ptr() as usize, n * std::mem::size_of::<T>());
        let first = start.next_multiple_of(2 << 20);
        let len = (start + bytes).saturating_sub(first) / (2 << 20) * (2 << 20);
        if len > 0 {
            // SAFETY: whole huge pages inside the vector's own, not yet written, buffer.
            unsafe { libc::madvise(first as *mut libc::c_void, len, libc::MADV_HUGEPAGE) };
        }
        v.extend(std::iter::repeat_with(f).take(n));
        v
    }
    let index: Vec<Bucket> =
        huge(buckets, || Bucket(std::array::from_fn(|_| AtomicU64::new(rnd() % N as u64))));
    let slab: Vec<Bucket> = huge(N, || Bucket(std::array::from_fn(|_| AtomicU64::new(1))));
    let order: Vec<u32> = (0..N).map(|_| (rnd() % buckets as u64) as u32).collect();
    let entry = |b: u32| &slab[index[b as usize].0[0].load(Ordering::Relaxed) as usize].0;
    let prefetch = |p: *const AtomicU64| {
        // SAFETY: a prefetch never faults; SSE is part of the x86_64 baseline.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast());
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = p;
    };
    // `pins`: whether a hit pins its entry (two of the three atomics), as the table does.
    let batch = |keys: &[u32], hit: bool, pins: bool| {
        let n = keys.len();
        for i in 0..n {
            if i + 2 * AHEAD < n {
                prefetch(&index[keys[i + 2 * AHEAD] as usize].0[0]);
            }
            if hit && i + AHEAD < n {
                prefetch(&entry(keys[i + AHEAD])[0]);
            }
            if hit {
                let e = entry(keys[i]);
                if pins {
                    e[WORDS - 1].fetch_add(1, Ordering::SeqCst);
                }
                e[2].fetch_add(black_box(e[0].load(Ordering::Relaxed)), Ordering::Relaxed);
                if pins {
                    e[WORDS - 1].fetch_sub(1, Ordering::Release);
                }
            } else {
                black_box(index[keys[i] as usize].0[0].load(Ordering::Relaxed));
            }
        }
    };
    let mut g = c.benchmark_group("memory_floor_1M");
    for threads in [1, 2] {
        let cases = [
            ("floor_hit", true, true),
            ("floor_hit_unpinned", true, false),
            ("floor_bucket", false, false),
        ];
        for (name, hit, pins) in cases {
            g.bench_function(BenchmarkId::new(name, threads), |b| {
                b.iter_custom(|iters| {
                    let batches = iters.div_ceil(32);
                    let per_batch = timed(threads, batches, &|th, i| {
                        let start = batch_at(th, i);
                        batch(black_box(&order[start..start + 32]), hit, pins);
                    });
                    per_batch * u32::try_from(iters).unwrap_or(u32::MAX)
                        / (batches as u32 * 32).max(1)
                })
            });
        }
    }
    g.finish();
}

criterion_group!(group, benches);

fn main() {
    group();
    Criterion::default().configure_from_args().final_summary();
}
