//! Whole-server tests in process: ferry's own NBD client against the server over
//! TCP and a Unix socket, pipelined requests on one connection, refused writes on a
//! read-only export, writes through ferry's client to a writable one, and property
//! tests feeding arbitrary client byte streams (raw, and after a valid handshake,
//! with read and write commands) that must end in a reply or a closed connection,
//! never a panic or a hang; and writes that must land exactly as a model says.

use super::*;
use crate::transport::nbd::proto::{self, *};
use crate::transport::nbd::NbdSource;
use crate::transport::DiskSource;
use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// 4 MiB: data everywhere except a hole in [1 MiB, 3 MiB).
struct Mem(Vec<u8>);
impl Mem {
    fn new() -> Self {
        let mut v: Vec<u8> = (0..4u32 << 20).map(|i| (i % 253) as u8 + 1).collect();
        v[1 << 20..3 << 20].fill(0);
        Mem(v)
    }
}
impl ExportBackend for Mem {
    fn size(&self) -> u64 {
        self.0.len() as u64
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        buf.copy_from_slice(&self.0[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn block_status(&self, offset: u64, len: u64) -> std::io::Result<Vec<(u64, u32)>> {
        let (h0, h1) = (1u64 << 20, 3u64 << 20);
        let end = offset + len;
        Ok(if offset < h0 {
            vec![((h0 - offset).min(len), 0)]
        } else if offset < h1 {
            vec![((h1 - offset).min(len), 3)]
        } else {
            vec![(end - offset, 0)]
        })
    }
}

/// A writable disk in memory (4 MiB, zeroes at first).
struct Ram(std::sync::RwLock<Vec<u8>>);
impl Ram {
    fn new(size: usize) -> Arc<Ram> {
        Arc::new(Ram(std::sync::RwLock::new(vec![0u8; size])))
    }
    fn bytes(&self) -> Vec<u8> {
        self.0.read().unwrap().clone()
    }
}
impl ExportBackend for Ram {
    fn size(&self) -> u64 {
        self.0.read().unwrap().len() as u64
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let d = self.0.read().unwrap();
        buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn writable(&self) -> bool {
        true
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let mut d = self.0.write().unwrap();
        d[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        Ok(())
    }
}

/// `disk` (read-only [`Mem`]) and `rw` (a writable [`Ram`]).
struct RwProvider(Arc<Ram>);
impl ExportProvider for RwProvider {
    fn open(&self, name: &str) -> Result<Arc<dyn ExportBackend>, ExportRefused> {
        match name {
            "rw" => Ok(self.0.clone()),
            "disk" => Ok(mem()),
            _ => Err(ExportRefused(format!("no export named {name:?}"))),
        }
    }
}

struct Provider(Arc<Mem>);
impl ExportProvider for Provider {
    fn open(&self, name: &str) -> Result<Arc<dyn ExportBackend>, ExportRefused> {
        match name {
            "disk" | "" => Ok(self.0.clone()),
            _ => Err(ExportRefused(format!("no export named {name:?}"))),
        }
    }
    fn list(&self) -> Option<Vec<String>> {
        Some(vec!["disk".into()])
    }
}

fn mem() -> Arc<Mem> {
    static MEM: std::sync::OnceLock<Arc<Mem>> = std::sync::OnceLock::new();
    MEM.get_or_init(|| Arc::new(Mem::new())).clone()
}

fn server(cfg: ServerConfig) -> Arc<NbdServer> {
    NbdServer::new(Arc::new(Provider(mem())), cfg)
}

#[test]
fn ferry_client_reads_through_tcp_and_unix_sockets() {
    let mem = mem();
    let dir = tempfile::tempdir().unwrap();
    for bind in [
        Bind::Tcp("127.0.0.1:0".into()),
        Bind::Unix(dir.path().join("s")),
    ] {
        let t = ServerThread::start(server(ServerConfig::default()), &bind, 2, 8).unwrap();
        let uri = t.local_addr().uri("disk", None);
        let src = NbdSource::connect(&uri, 4).unwrap();
        assert_eq!(src.size(), 4 << 20);
        // Block status: the hole is not data.
        let e = src.next_allocated(0).unwrap().unwrap();
        assert_eq!((e.offset, e.len), (0, 1 << 20));
        let e = src.next_allocated(1 << 20).unwrap().unwrap();
        assert_eq!((e.offset, e.len), (3 << 20, 1 << 20));
        let mut all = vec![0u8; 4 << 20];
        src.read_at(0, &mut all).unwrap();
        assert!(all == mem.0);
        drop(src);
        let err = NbdSource::connect(&t.local_addr().uri("nope", None), 1)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("ERR_UNKNOWN") && err.contains("no export named"),
            "{err}"
        );
        t.stop().unwrap();
    }
    // The stale socket was removed on stop; a new server can bind the same path.
    assert!(!dir.path().join("s").exists());
}

/// Drive `serve_connection` on an in-memory pipe with `input` from the client;
/// returns what the server sent. Panics if the server neither ends nor answers.
async fn converse(srv: &Arc<NbdServer>, input: Vec<u8>) -> (Result<(), ServeError>, Vec<u8>) {
    let (mut client, server_io) = tokio::io::duplex(1 << 16);
    let (_stop, rx) = tokio::sync::watch::channel(false);
    let srv = srv.clone();
    let task = tokio::spawn(async move { srv.serve_connection(Box::new(server_io), rx).await });
    let (mut cr, mut cw) = tokio::io::split(&mut client);
    let writer = async {
        let _ = cw.write_all(&input).await;
        let _ = cw.shutdown().await;
    };
    let mut out = Vec::new();
    let reader = async {
        let mut buf = [0u8; 8192];
        loop {
            match cr.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(20), async {
        tokio::join!(writer, reader);
    })
    .await
    .expect("the server neither finished nor closed the connection");
    let r = task.await.expect("the server task panicked");
    (r, out)
}

fn rt() -> &'static tokio::runtime::Runtime {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .max_blocking_threads(8)
            .enable_all()
            .build()
            .unwrap()
    })
}

/// A valid handshake: fixed newstyle, structured replies, base:allocation, GO.
fn handshake_bytes(export: &str) -> Vec<u8> {
    let mut v = (CFLAG_FIXED_NEWSTYLE | CFLAG_NO_ZEROES)
        .to_be_bytes()
        .to_vec();
    v.extend(option(OPT_STRUCTURED_REPLY, &[]));
    v.extend(option(
        OPT_SET_META_CONTEXT,
        &meta_context_data(export, &[BASE_ALLOCATION]),
    ));
    v.extend(option(OPT_GO, &go_data(export)));
    v
}

/// Skip the greeting and option replies up to the final ACK of OPT_GO.
fn after_handshake(out: &[u8]) -> &[u8] {
    let mut at = 18;
    loop {
        let h = parse_option_reply(out[at..at + 20].try_into().unwrap()).unwrap();
        at += 20 + h.len as usize;
        if h.option == OPT_GO && h.reply == REP_ACK {
            return &out[at..];
        }
        assert_eq!(h.reply & REP_FLAG_ERROR, 0, "option {} refused", h.option);
    }
}

/// Split a structured reply stream into (cookie, kind, flags, payload).
fn structured(mut b: &[u8]) -> Vec<(u64, u16, u16, Vec<u8>)> {
    let mut out = Vec::new();
    while !b.is_empty() {
        let magic = u32::from_be_bytes(b[..4].try_into().unwrap());
        match parse_reply(magic, &b[4..reply_rest_len(magic).unwrap() + 4]).unwrap() {
            ReplyHeader::Structured {
                flags,
                kind,
                cookie,
                len,
            } => {
                out.push((cookie, kind, flags, b[20..20 + len as usize].to_vec()));
                b = &b[20 + len as usize..];
            }
            ReplyHeader::Simple { error, cookie } => {
                out.push((cookie, u16::MAX, 0, error.to_be_bytes().to_vec()));
                b = &b[16..];
            }
        }
    }
    out
}

#[test]
fn pipelined_requests_are_all_answered_and_writes_refused() {
    let rt = rt();
    let srv = server(ServerConfig::default());
    let mut input = handshake_bytes("disk");
    // 32 reads of 256 KiB in flight at once, a write with its payload, block status.
    for i in 0..32u64 {
        input.extend(request(0, CMD_READ, 100 + i, i * (120 << 10), 256 << 10));
    }
    input.extend(request(0, CMD_WRITE, 7, 0, 4096));
    input.extend(vec![0xAB; 4096]);
    input.extend(request(0, CMD_BLOCK_STATUS, 8, 0, 4 << 20));
    input.extend(request(0, CMD_FLUSH, 9, 0, 0));
    input.extend(request(0, CMD_DISC, 10, 0, 0));
    let (r, out) = rt.block_on(converse(&srv, input));
    r.unwrap();
    let chunks = structured(after_handshake(&out));
    let mem = mem();
    for i in 0..32u64 {
        let base = i * (120 << 10);
        let mut got = vec![0xEEu8; 256 << 10];
        let mine: Vec<_> = chunks.iter().filter(|c| c.0 == 100 + i).collect();
        assert_eq!(
            mine.iter().filter(|c| c.2 & REPLY_FLAG_DONE != 0).count(),
            1
        );
        for c in mine {
            let off = u64::from_be_bytes(c.3[..8].try_into().unwrap()) - base;
            match c.1 {
                REPLY_TYPE_OFFSET_DATA => {
                    got[off as usize..off as usize + c.3.len() - 8].copy_from_slice(&c.3[8..])
                }
                REPLY_TYPE_OFFSET_HOLE => {
                    let l = u32::from_be_bytes(c.3[8..12].try_into().unwrap()) as usize;
                    got[off as usize..off as usize + l].fill(0)
                }
                k => panic!("unexpected chunk {k}"),
            }
        }
        assert!(
            got[..] == mem.0[base as usize..base as usize + (256 << 10)],
            "read {i}"
        );
    }
    let w = chunks.iter().find(|c| c.0 == 7).unwrap();
    assert_eq!(
        (w.1, parse_error_payload(&w.3).unwrap().0),
        (REPLY_TYPE_ERROR, EPERM)
    );
    let bs = chunks.iter().find(|c| c.0 == 8).unwrap();
    let (_, d) = parse_block_status(&bs.3).unwrap();
    assert_eq!(
        d,
        vec![
            Descriptor {
                len: 1 << 20,
                flags: 0
            },
            Descriptor {
                len: 2 << 20,
                flags: 3
            },
            Descriptor {
                len: 1 << 20,
                flags: 0
            },
        ]
    );
    let f = chunks.iter().find(|c| c.0 == 9).unwrap();
    assert_eq!((f.1, &f.3[..]), (u16::MAX, &0u32.to_be_bytes()[..]));
    assert!(chunks.iter().all(|c| c.0 != 10), "DISC has no reply");
}

#[test]
fn broken_framing_closes_the_connection() {
    let rt = rt();
    let srv = server(ServerConfig::default());
    // Unknown client flags.
    let (r, _) = rt.block_on(converse(&srv, 0x80u32.to_be_bytes().to_vec()));
    assert!(matches!(r, Err(ServeError::Protocol(_))), "{r:?}");
    // An option of 1 GiB is refused before any allocation.
    let mut v = 1u32.to_be_bytes().to_vec();
    v.extend_from_slice(&IHAVEOPT.to_be_bytes());
    v.extend_from_slice(&OPT_GO.to_be_bytes());
    v.extend_from_slice(&(1u32 << 30).to_be_bytes());
    let (r, _) = rt.block_on(converse(&srv, v));
    assert!(r.unwrap_err().to_string().contains("exceeds the limit"));
    // A write larger than the maximum payload cannot be skipped safely.
    let mut v = handshake_bytes("disk");
    v.extend(request(0, CMD_WRITE, 1, 0, u32::MAX));
    let (r, _) = rt.block_on(converse(&srv, v));
    assert!(r.unwrap_err().to_string().contains("write payload"));
    // A request with a bad magic.
    let mut v = handshake_bytes("disk");
    v.extend_from_slice(&[0u8; 28]);
    let (r, _) = rt.block_on(converse(&srv, v));
    assert!(matches!(
        r,
        Err(ServeError::Protocol(ProtoError::BadMagic { .. }))
    ));
}

#[test]
fn ferry_client_writes_a_writable_export_and_reads_it_back() {
    use crate::transport::nbd::NbdTarget;
    use crate::transport::DiskTarget;
    let ram = Ram::new(4 << 20);
    let srv = NbdServer::new(
        Arc::new(RwProvider(ram.clone())),
        ServerConfig {
            max_payload: 1 << 20,
            ..ServerConfig::default()
        },
    );
    let t = ServerThread::start(srv, &Bind::Tcp("127.0.0.1:0".into()), 2, 8).unwrap();
    let uri = t.local_addr().uri("rw", None);
    let target = NbdTarget::connect(&uri, "test rw", 3, true).unwrap();
    assert_eq!((target.size(), target.transport()), (4 << 20, "nbd"));
    assert_eq!(target.parallel_writes(), 3, "multi-conn allows several");
    // A 3 MiB write is split into requests of the advertised maximum payload.
    let data: Vec<u8> = (0..3u32 << 20).map(|i| (i % 251) as u8).collect();
    target.write_at(512 << 10, &data).unwrap();
    std::thread::scope(|s| {
        for k in 0..4u64 {
            let target = &target;
            s.spawn(move || target.write_at(k * 4096, &[k as u8 + 1; 4096]).unwrap());
        }
    });
    target.flush().unwrap();
    let mut want = vec![0u8; 4 << 20];
    want[512 << 10..(512 << 10) + data.len()].copy_from_slice(&data);
    for k in 0..4usize {
        want[k * 4096..(k + 1) * 4096].fill(k as u8 + 1);
    }
    assert!(ram.bytes() == want);
    // Read back through the protocol too.
    let src = NbdSource::connect(&uri, 1).unwrap();
    let mut got = vec![0u8; 4 << 20];
    src.read_at(0, &mut got).unwrap();
    assert!(got == want);
    // Beyond the end: refused before anything is sent.
    let e = target.write_at((4 << 20) - 10, &[1; 20]).unwrap_err();
    assert!(e.to_string().contains("beyond the export size"), "{e}");
    drop(target);
    // The read-only export is refused as a restore target.
    let e = NbdTarget::connect(&t.local_addr().uri("disk", None), "test ro", 1, true)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("read-only"), "{e}");
    t.stop().unwrap();
}

#[test]
fn writes_on_the_wire_get_clean_errors_and_oversize_payloads_are_skipped() {
    let rt = rt();
    let ram = Ram::new(4 << 20);
    let srv = NbdServer::new(
        Arc::new(RwProvider(ram.clone())),
        ServerConfig {
            max_payload: 64 << 10,
            ..ServerConfig::default()
        },
    );
    let mut input = handshake_bytes("rw");
    // A good write with FUA.
    input.extend(request(CMD_FLAG_FUA, CMD_WRITE, 1, 4096, 8));
    input.extend([5u8; 8]);
    // Beyond the end: the payload is consumed, ENOSPC.
    input.extend(request(0, CMD_WRITE, 2, (4 << 20) - 4, 8));
    input.extend([6u8; 8]);
    // Larger than the maximum payload (but small enough to skip): EOVERFLOW, and
    // the stream stays in sync.
    input.extend(request(0, CMD_WRITE, 3, 0, 128 << 10));
    input.extend(vec![7u8; 128 << 10]);
    // Write zeroes over part of the first write, then a flush.
    input.extend(request(0, CMD_WRITE_ZEROES, 4, 4100, 2));
    input.extend(request(0, CMD_FLUSH, 5, 0, 0));
    input.extend(request(0, CMD_DISC, 6, 0, 0));
    let (r, out) = rt.block_on(converse(&srv, input));
    r.unwrap();
    let flags = {
        // The GO reply's NBD_INFO_EXPORT: not read-only, writes advertised.
        let mut at = 18;
        let mut f = None;
        while f.is_none() {
            let h = parse_option_reply(out[at..at + 20].try_into().unwrap()).unwrap();
            if h.option == OPT_GO && h.reply == REP_INFO {
                if let Ok(Info::Export { flags, .. }) =
                    parse_info(&out[at + 20..at + 20 + h.len as usize])
                {
                    f = Some(flags);
                }
            }
            at += 20 + h.len as usize;
        }
        f.unwrap()
    };
    assert_eq!(flags & TFLAG_READ_ONLY, 0);
    assert_ne!(flags & TFLAG_SEND_FLUSH, 0);
    assert_ne!(flags & TFLAG_SEND_WRITE_ZEROES, 0);
    assert_ne!(flags & TFLAG_SEND_FUA, 0);
    let chunks = structured(after_handshake(&out));
    let errno = |cookie: u64| -> u32 {
        let c = chunks.iter().find(|c| c.0 == cookie).unwrap();
        if c.1 == u16::MAX {
            u32::from_be_bytes(c.3[..4].try_into().unwrap())
        } else {
            assert_eq!(c.1, REPLY_TYPE_ERROR);
            parse_error_payload(&c.3).unwrap().0
        }
    };
    assert_eq!(errno(1), 0);
    assert_eq!(errno(2), ENOSPC);
    assert_eq!(errno(3), EOVERFLOW);
    assert_eq!(errno(4), 0);
    assert_eq!(errno(5), 0);
    let b = ram.bytes();
    assert_eq!(&b[4096..4104], &[5, 5, 5, 5, 0, 0, 5, 5]);
    assert!(
        b[(4 << 20) - 4..].iter().all(|&x| x == 0),
        "nothing written past the checks"
    );
    assert!(
        b[..4096].iter().all(|&x| x == 0),
        "the oversize payload was not written"
    );
}

fn arb_request() -> impl Strategy<Value = Vec<u8>> {
    (
        any::<u16>(),
        prop_oneof![0u16..10, any::<u16>()],
        any::<u64>(),
        prop_oneof![0u64..(5 << 20), any::<u64>()],
        prop_oneof![0u32..(1 << 20), any::<u32>()],
    )
        .prop_map(|(f, c, k, o, l)| {
            let mut r = proto::request(f, c, k, o, l).to_vec();
            if c == CMD_WRITE {
                // Some payload, maybe short: the stream then just ends.
                r.extend(vec![1u8; (l as usize).min(300)]);
            }
            r
        })
}

fn arb_option() -> impl Strategy<Value = Vec<u8>> {
    (
        prop_oneof![0u32..12, any::<u32>()],
        proptest::collection::vec(any::<u8>(), 0..64),
    )
        .prop_map(|(o, d)| proto::option(o, &d))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_client_bytes_never_panic(input in proptest::collection::vec(any::<u8>(), 0..512)) {
        let rt = rt();
        let srv = server(ServerConfig::default());
        let _ = rt.block_on(converse(&srv, input));
    }

    #[test]
    fn arbitrary_options_never_panic(
        flags in 0u32..4,
        opts in proptest::collection::vec(arb_option(), 0..12),
        tail in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let rt = rt();
        let srv = server(ServerConfig::default());
        let mut input = flags.to_be_bytes().to_vec();
        for o in opts {
            input.extend(o);
        }
        input.extend(tail);
        let _ = rt.block_on(converse(&srv, input));
    }

    #[test]
    fn arbitrary_requests_to_a_writable_export_never_panic(
        reqs in proptest::collection::vec(arb_request(), 0..24),
        tail in proptest::collection::vec(any::<u8>(), 0..40),
    ) {
        let rt = rt();
        let srv = NbdServer::new(
            Arc::new(RwProvider(Ram::new(4 << 20))),
            ServerConfig { max_payload: 1 << 20, ..ServerConfig::default() },
        );
        let mut input = handshake_bytes("rw");
        for r in reqs {
            input.extend(r);
        }
        input.extend(tail);
        let _ = rt.block_on(converse(&srv, input));
    }

    /// Non-overlapping writes and write-zeroes, pipelined (answered in any order):
    /// every one is acknowledged and the disk ends exactly as the model says.
    #[test]
    fn pipelined_writes_land_exactly_where_they_should(
        ops in proptest::collection::vec((0u64..256, 1u32..16384, any::<u8>(), any::<bool>()), 1..24),
    ) {
        let rt = rt();
        let ram = Ram::new(4 << 20);
        let srv = NbdServer::new(
            Arc::new(RwProvider(ram.clone())),
            ServerConfig { max_payload: 1 << 20, ..ServerConfig::default() },
        );
        let mut model = vec![0u8; 4 << 20];
        let mut used = std::collections::BTreeSet::new();
        let mut input = handshake_bytes("rw");
        let mut cookies = Vec::new();
        for (i, (slot, len, byte, zero)) in ops.into_iter().enumerate() {
            // One 16 KiB slot per operation, each slot used once: no overlaps.
            if !used.insert(slot) {
                continue;
            }
            let off = slot * 16384;
            let cookie = 1000 + i as u64;
            if zero {
                // (Fresh ground: a write and a write-zeroes of one slot would
                // overlap in flight, which the protocol leaves unordered.)
                model[off as usize..off as usize + len as usize].fill(0);
                input.extend(request(0, CMD_WRITE_ZEROES, cookie, off, len));
            } else {
                model[off as usize..off as usize + len as usize].fill(byte);
                input.extend(request(0, CMD_WRITE, cookie, off, len));
                input.extend(vec![byte; len as usize]);
            }
            cookies.push(cookie);
        }
        input.extend(request(0, CMD_FLUSH, 1, 0, 0));
        input.extend(request(0, CMD_DISC, 2, 0, 0));
        let (r, out) = rt.block_on(converse(&srv, input));
        prop_assert!(r.is_ok(), "{r:?}");
        let chunks = structured(after_handshake(&out));
        for c in cookies.iter().chain([&1]) {
            let mine: Vec<_> = chunks.iter().filter(|x| x.0 == *c).collect();
            prop_assert_eq!(mine.len(), 1);
            prop_assert_eq!(mine[0].1, u16::MAX, "a simple reply");
            prop_assert_eq!(&mine[0].3[..], &0u32.to_be_bytes()[..]);
        }
        prop_assert!(ram.bytes() == model);
    }

    #[test]
    fn arbitrary_requests_after_a_valid_handshake_never_panic(
        structured in any::<bool>(),
        reqs in proptest::collection::vec(arb_request(), 0..24),
        tail in proptest::collection::vec(any::<u8>(), 0..40),
    ) {
        let rt = rt();
        let srv = server(ServerConfig { max_payload: 1 << 20, ..ServerConfig::default() });
        let mut input = if structured {
            handshake_bytes("disk")
        } else {
            let mut v = CFLAG_FIXED_NEWSTYLE.to_be_bytes().to_vec();
            v.extend(option(OPT_GO, &go_data("")));
            v
        };
        for r in reqs {
            input.extend(r);
        }
        input.extend(tail);
        let _ = rt.block_on(converse(&srv, input));
    }
}
