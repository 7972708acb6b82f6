//! Short request/response through the TCP gateway where the upstream answers and closes
//! first, the shape of the load test's conn/s phase. The splice sends the last bytes before
//! a FIN with MSG_MORE so the FIN leaves in the same segment; these tests check that
//! nothing is held back by it: every answer size (one byte, one segment, more than one
//! read buffer) arrives whole, followed by EOF, while the client still has its write side
//! open, and the flow ends cleanly (no reset: the close after the FIN finds nothing unread).

mod support;

use std::time::Duration;

use support::l4::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The upstream's answer to a request of `n` bytes: `n * 37` bytes of a known pattern
/// (so one request byte gives an answer larger than one 32 KiB read buffer at n = 1000).
fn answer(n: usize) -> Vec<u8> {
    (0..n * 37).map(|i| (i % 251) as u8).collect()
}

/// Reads the request (its length is the first byte pair), answers, closes at once.
async fn answer_and_close(mut s: tokio::net::TcpStream) {
    let mut len = [0u8; 2];
    if s.read_exact(&mut len).await.is_err() {
        return;
    }
    let n = usize::from(u16::from_be_bytes(len));
    let mut req = vec![0u8; n];
    if s.read_exact(&mut req).await.is_err() {
        return;
    }
    let _ = s.write_all(&answer(n)).await;
    // Dropped here: the FIN follows the answer immediately.
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_answers_and_closes_first_every_byte_then_eof() {
    let up = Upstream::start(answer_and_close).await;
    let gw = Gateway::start(World::new(), &tcp_listener("gw", &[up.addr], ""));
    let sizes = [1usize, 2, 64, 1000, 1500];
    for round in 0..40 {
        let n = sizes[round % sizes.len()];
        let mut s = connect_from(OK, gw.addr("gw")).await.unwrap();
        let mut req = (n as u16).to_be_bytes().to_vec();
        req.extend(std::iter::repeat_n(b'q', n));
        s.write_all(&req).await.unwrap();
        // The client keeps its write side open: the gateway's FIN alone ends the read.
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got))
            .await
            .unwrap_or_else(|_| {
                panic!("round {round}: answer of {} bytes + EOF not within 5 s", n * 37)
            })
            .unwrap();
        assert_eq!(got.len(), n * 37, "round {round}: answer length");
        assert!(got == answer(n), "round {round}: answer bytes differ");
        drop(s);
    }
    gw.wait_conntrack_empty(Duration::from_secs(5)).await;
    let c = gw.counters("gw");
    assert_eq!(get(&c.allowed), 40);
    let expected_down: u64 = (0..40).map(|r| (sizes[r % sizes.len()] * 37) as u64).sum();
    assert_eq!(get(&c.bytes_down), expected_down);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_short_exchanges_all_complete() {
    let up = Upstream::start(answer_and_close).await;
    let gw = Gateway::start(World::new(), &tcp_listener("gw", &[up.addr], ""));
    let addr = gw.addr("gw");
    let mut tasks = Vec::new();
    for _ in 0..64 {
        tasks.push(tokio::spawn(async move {
            for _ in 0..20 {
                let mut s = connect_from(OK, addr).await.unwrap();
                let mut req = 64u16.to_be_bytes().to_vec();
                req.extend([b'q'; 64]);
                s.write_all(&req).await.unwrap();
                let mut got = Vec::new();
                tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got))
                    .await
                    .expect("answer + EOF within 10 s")
                    .unwrap();
                assert!(got == answer(64));
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    gw.wait_conntrack_empty(Duration::from_secs(5)).await;
    assert_eq!(get(&gw.counters("gw").allowed), 64 * 20);
}
