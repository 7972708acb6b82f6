#![no_main]
//! Invariants: never panics; every parsed message re-encodes to exactly the bytes it was
//! parsed from (nothing invented, nothing dropped), and a prefix of it is "need more".
use flowgate::wire::socks5::{Greeting, Request, UdpHeader, UserPass};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut out = [0u8; 600];
    if let Ok(Some((g, n))) = Greeting::parse(data) {
        assert_eq!(g.methods.len() + 2, n);
        assert_eq!(Greeting::parse(&data[..n - 1]), Ok(None));
    }
    if let Ok(Some((up, n))) = UserPass::parse(data) {
        let m = up.encode(&mut out).expect("a parsed request re-encodes");
        assert_eq!(&out[..m], &data[..n]);
        assert_eq!(UserPass::parse(&data[..n - 1]), Ok(None));
    }
    if let Ok(Some((r, n))) = Request::parse(data) {
        let m = r.encode(&mut out).expect("a parsed request re-encodes");
        assert_eq!(&out[..m], &data[..n]);
        assert_eq!(Request::parse(&data[..n - 1]), Ok(None));
    }
    if let Ok(h) = UdpHeader::parse(data) {
        let m = UdpHeader::encode(h.addr, h.port, &mut out).expect("a parsed header re-encodes");
        assert_eq!(m + h.payload.len(), data.len());
        assert_eq!(&out[3..m], &data[3..m]);
    }
});
