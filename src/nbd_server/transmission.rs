//! The transmission phase: NBD_CMD_READ (structured replies with data and hole
//! chunks, or simple replies), NBD_CMD_BLOCK_STATUS (`base:allocation`),
//! NBD_CMD_CACHE (no-op), NBD_CMD_DISC, and for writable exports NBD_CMD_WRITE,
//! NBD_CMD_WRITE_ZEROES and NBD_CMD_FLUSH (with FUA); read-only exports refuse
//! writes, trims and write zeroes with EPERM and answer FLUSH with success.
//!
//! [`execute`] and [`write`] turn one request into its reply bytes using the
//! backend (blocking, pure otherwise). [`run`] is the async loop: a reader that
//! parses and bounds requests (a write's payload is read only after its buffer is
//! budgeted, and never beyond the maximum payload) and hands each to a blocking
//! thread, and one writer that sends replies as they complete (out of order, as the
//! protocol allows). Requests in flight and reply/payload bytes are bounded per
//! connection and per server; a client that sends a bad request header or a write
//! payload larger than [`MAX_DISCARD`] (it cannot be resynchronised cheaply) is
//! disconnected.

use super::handshake::Export;
use super::{BoxedIo, NbdServer, ServeError, BUDGET_UNIT};
use crate::transport::nbd::proto::{self, Descriptor, ProtoError, Request};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};

/// Most extents a read looks up before treating the rest as data (bounds the
/// number of chunks in one reply).
const MAX_READ_SEGMENTS: usize = 1024;
/// Holes smaller than this inside a read are sent as zero data, not as hole chunks.
const MIN_HOLE_CHUNK: u64 = 4096;
/// Most descriptors in one block status reply.
const MAX_DESCRIPTORS: usize = 1 << 16;
/// Backend calls one block status request may make.
const MAX_STATUS_CALLS: usize = 1024;
/// A write payload above the maximum payload but at most this long is read and
/// discarded so the client gets an error reply; a longer one closes the connection.
pub const MAX_DISCARD: u32 = 64 << 20;

/// One reply: byte strings sent back to back.
pub type Reply = Vec<Vec<u8>>;

fn error_reply(e: &Export, req: &Request, errno: u32, msg: &str) -> Reply {
    if e.structured {
        vec![proto::chunk(
            proto::REPLY_FLAG_DONE,
            proto::REPLY_TYPE_ERROR,
            req.cookie,
            &proto::error_payload(errno, msg),
        )]
    } else {
        vec![proto::simple_reply(errno, req.cookie).to_vec()]
    }
}

fn ok_reply(req: &Request) -> Reply {
    // A simple reply is valid for any request without payload, structured or not.
    vec![proto::simple_reply(0, req.cookie).to_vec()]
}

/// Whether `offset + len` lies inside the export.
fn in_bounds(e: &Export, offset: u64, len: u64) -> bool {
    offset.checked_add(len).is_some_and(|end| end <= e.size)
}

/// The reply to one request (not NBD_CMD_DISC or NBD_CMD_WRITE, which the loop
/// handles). Calls the backend; run it on a blocking thread.
pub fn execute(e: &Export, req: &Request) -> Reply {
    use proto::*;
    let allowed_flags = match req.cmd {
        CMD_READ if e.structured => CMD_FLAG_FUA | CMD_FLAG_DF,
        CMD_BLOCK_STATUS => CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
        _ => CMD_FLAG_FUA,
    };
    if req.flags & !allowed_flags != 0 {
        return error_reply(
            e,
            req,
            EINVAL,
            &format!("command flags {:#x} are not valid here", req.flags),
        );
    }
    match req.cmd {
        CMD_READ => read(e, req),
        CMD_BLOCK_STATUS => block_status(e, req),
        CMD_FLUSH if e.writable => match e.backend.flush() {
            Ok(()) => ok_reply(req),
            Err(err) => backend_error(e, req, "flush", err),
        },
        CMD_FLUSH => ok_reply(req),
        CMD_CACHE => {
            if in_bounds(e, req.offset, req.len as u64) {
                ok_reply(req)
            } else {
                error_reply(e, req, EINVAL, "cache request beyond the end of the export")
            }
        }
        CMD_WRITE => write(e, req, &[]),
        CMD_WRITE_ZEROES => write_zeroes(e, req),
        CMD_TRIM if e.writable => error_reply(
            e,
            req,
            EINVAL,
            "NBD_CMD_TRIM is not supported by this export (it was not advertised)",
        ),
        CMD_TRIM => error_reply(e, req, EPERM, "this export is read-only"),
        c => error_reply(e, req, EINVAL, &format!("unknown command {c}")),
    }
}

/// The reply to a failed backend call: ENOSPC and EPERM are passed on, anything
/// else is EIO (with the error text, which names no data).
fn backend_error(e: &Export, req: &Request, what: &str, err: std::io::Error) -> Reply {
    tracing::warn!(export = %e.name, offset = req.offset, len = req.len, error = %err, "NBD {what} failed");
    let errno = if err.raw_os_error() == Some(libc::ENOSPC) {
        proto::ENOSPC
    } else if err.kind() == std::io::ErrorKind::PermissionDenied {
        proto::EPERM
    } else {
        proto::EIO
    };
    error_reply(e, req, errno, &format!("{what} at {}: {err}", req.offset))
}

/// The reply to NBD_CMD_WRITE with its payload `data` (empty when the payload was
/// too large and discarded). Checks, in order: flags, read-only, payload size,
/// payload length, bounds (ENOSPC beyond the end, as the spec asks); then writes
/// through the backend and flushes for FUA. Calls the backend; run it on a
/// blocking thread.
pub fn write(e: &Export, req: &Request, data: &[u8]) -> Reply {
    use proto::*;
    if req.flags & !CMD_FLAG_FUA != 0 {
        return error_reply(
            e,
            req,
            EINVAL,
            &format!("command flags {:#x} are not valid for a write", req.flags),
        );
    }
    if !e.writable {
        return error_reply(e, req, EPERM, "this export is read-only");
    }
    if req.len > e.max_payload {
        let errno = if e.structured { EOVERFLOW } else { EINVAL };
        return error_reply(
            e,
            req,
            errno,
            &format!(
                "write of {} bytes exceeds the maximum payload {}",
                req.len, e.max_payload
            ),
        );
    }
    if data.len() != req.len as usize {
        return error_reply(
            e,
            req,
            EINVAL,
            &format!(
                "write announces {} bytes but carries {}",
                req.len,
                data.len()
            ),
        );
    }
    if !in_bounds(e, req.offset, req.len as u64) {
        return error_reply(
            e,
            req,
            ENOSPC,
            &format!(
                "write of {} bytes at {} is beyond the export size {}",
                req.len, req.offset, e.size
            ),
        );
    }
    if !data.is_empty() {
        if let Err(err) = e.backend.write_at(req.offset, data) {
            return backend_error(e, req, "write", err);
        }
    }
    if req.flags & CMD_FLAG_FUA != 0 {
        if let Err(err) = e.backend.flush() {
            return backend_error(e, req, "flush (FUA)", err);
        }
    }
    ok_reply(req)
}

fn write_zeroes(e: &Export, req: &Request) -> Reply {
    use proto::*;
    if !e.writable {
        return error_reply(e, req, EPERM, "this export is read-only");
    }
    if !in_bounds(e, req.offset, req.len as u64) {
        return error_reply(
            e,
            req,
            ENOSPC,
            &format!(
                "write zeroes of {} bytes at {} is beyond the export size {}",
                req.len, req.offset, e.size
            ),
        );
    }
    if req.len > 0 {
        if let Err(err) = e.backend.write_zeroes(req.offset, req.len as u64) {
            return backend_error(e, req, "write zeroes", err);
        }
    }
    if req.flags & CMD_FLAG_FUA != 0 {
        if let Err(err) = e.backend.flush() {
            return backend_error(e, req, "flush (FUA)", err);
        }
    }
    ok_reply(req)
}

/// Allocation of `[offset, offset+len)` as (offset, len, zero) segments, adjacent
/// segments of the same kind merged; holes shorter than [`MIN_HOLE_CHUNK`] count
/// as data (they are read as zeroes anyway).
fn segments(e: &Export, offset: u64, len: u64) -> std::io::Result<Vec<(u64, u64, bool)>> {
    let end = offset + len;
    let mut out: Vec<(u64, u64, bool)> = Vec::new();
    let push = |o: u64, l: u64, zero: bool, out: &mut Vec<(u64, u64, bool)>| match out.last_mut() {
        Some(last) if last.2 == zero && last.0 + last.1 == o => last.1 += l,
        _ => out.push((o, l, zero)),
    };
    let mut at = offset;
    let mut calls = 0;
    while at < end {
        calls += 1;
        if calls > MAX_READ_SEGMENTS {
            push(at, end - at, false, &mut out);
            break;
        }
        let runs = e.backend.block_status(at, end - at)?;
        let before = at;
        for (l, flags) in runs {
            if l == 0 || at >= end {
                break;
            }
            let l = l.min(end - at);
            push(at, l, flags & proto::STATE_ZERO != 0, &mut out);
            at += l;
        }
        if at == before {
            // A backend that describes nothing: read the rest as data.
            push(at, end - at, false, &mut out);
            break;
        }
    }
    // Small holes become data; merge again.
    let mut merged: Vec<(u64, u64, bool)> = Vec::with_capacity(out.len());
    for (o, l, z) in out {
        let z = z && l >= MIN_HOLE_CHUNK;
        push(o, l, z, &mut merged);
    }
    Ok(merged)
}

fn read(e: &Export, req: &Request) -> Reply {
    let (offset, len) = (req.offset, req.len as u64);
    if !in_bounds(e, offset, len) {
        return error_reply(
            e,
            req,
            proto::EINVAL,
            &format!(
                "read of {len} bytes at {offset} is beyond the export size {}",
                e.size
            ),
        );
    }
    if req.len > e.max_payload {
        let errno = if e.structured {
            proto::EOVERFLOW
        } else {
            proto::EINVAL
        };
        return error_reply(
            e,
            req,
            errno,
            &format!(
                "read of {len} bytes exceeds the maximum payload {}",
                e.max_payload
            ),
        );
    }
    if len == 0 {
        return if e.structured {
            vec![proto::chunk(
                proto::REPLY_FLAG_DONE,
                proto::REPLY_TYPE_NONE,
                req.cookie,
                &[],
            )]
        } else {
            ok_reply(req)
        };
    }
    let io_err = |err: std::io::Error| {
        tracing::warn!(export = %e.name, offset, len, error = %err, "NBD read failed");
        error_reply(e, req, proto::EIO, &format!("read at {offset}: {err}"))
    };
    let segs = match segments(e, offset, len) {
        Ok(s) => s,
        Err(err) => return io_err(err),
    };
    let df = req.flags & proto::CMD_FLAG_DF != 0;
    if !e.structured || df {
        // One buffer, holes left as zeroes.
        let mut buf = vec![0u8; len as usize];
        for &(o, l, zero) in &segs {
            if !zero {
                let s = (o - offset) as usize;
                if let Err(err) = e.backend.read_at(o, &mut buf[s..s + l as usize]) {
                    return io_err(err);
                }
            }
        }
        return if e.structured {
            let mut h = proto::chunk_header(
                proto::REPLY_FLAG_DONE,
                proto::REPLY_TYPE_OFFSET_DATA,
                req.cookie,
                (8 + len) as u32,
            )
            .to_vec();
            h.extend_from_slice(&offset.to_be_bytes());
            vec![h, buf]
        } else {
            vec![proto::simple_reply(0, req.cookie).to_vec(), buf]
        };
    }
    let mut parts = Vec::with_capacity(segs.len() * 2);
    let n = segs.len();
    for (i, &(o, l, zero)) in segs.iter().enumerate() {
        let flags = if i + 1 == n {
            proto::REPLY_FLAG_DONE
        } else {
            0
        };
        if zero {
            parts.push(proto::chunk(
                flags,
                proto::REPLY_TYPE_OFFSET_HOLE,
                req.cookie,
                &proto::hole_payload(o, l as u32),
            ));
        } else {
            let mut data = vec![0u8; l as usize];
            if let Err(err) = e.backend.read_at(o, &mut data) {
                return io_err(err);
            }
            let mut h = proto::chunk_header(
                flags,
                proto::REPLY_TYPE_OFFSET_DATA,
                req.cookie,
                (8 + l) as u32,
            )
            .to_vec();
            h.extend_from_slice(&o.to_be_bytes());
            parts.push(h);
            parts.push(data);
        }
    }
    parts
}

fn block_status(e: &Export, req: &Request) -> Reply {
    let Some(ctx) = e.allocation_ctx else {
        return error_reply(
            e,
            req,
            proto::EINVAL,
            "no metadata context was negotiated for this export",
        );
    };
    let (offset, len) = (req.offset, req.len as u64);
    if len == 0 || !in_bounds(e, offset, len) {
        return error_reply(
            e,
            req,
            proto::EINVAL,
            &format!(
                "block status of {len} bytes at {offset} is outside the export size {}",
                e.size
            ),
        );
    }
    let one = req.flags & proto::CMD_FLAG_REQ_ONE != 0;
    let max = if one { 1 } else { MAX_DESCRIPTORS };
    let end = offset + len;
    let mut d: Vec<Descriptor> = Vec::new();
    let mut at = offset;
    for _ in 0..MAX_STATUS_CALLS {
        if at >= end || d.len() >= max {
            break;
        }
        let runs = match e.backend.block_status(at, end - at) {
            Ok(r) => r,
            Err(err) => {
                return error_reply(e, req, proto::EIO, &format!("block status at {at}: {err}"))
            }
        };
        let before = at;
        for (l, flags) in runs {
            if l == 0 || at >= end {
                break;
            }
            let l = l.min(end - at);
            let flags = flags & (proto::STATE_HOLE | proto::STATE_ZERO);
            let full = d.len() >= max;
            match d.last_mut() {
                // Same status: extend (the sum stays within the u32 request length).
                Some(last) if last.flags == flags => last.len += l as u32,
                _ if full => {
                    at = end;
                    break;
                }
                _ => d.push(Descriptor {
                    len: l as u32,
                    flags,
                }),
            }
            at += l;
        }
        if at == before {
            break;
        }
    }
    if d.is_empty() {
        return error_reply(e, req, proto::EIO, "the backend described no extent");
    }
    vec![proto::chunk(
        proto::REPLY_FLAG_DONE,
        proto::REPLY_TYPE_BLOCK_STATUS,
        req.cookie,
        &proto::block_status_payload(ctx, &d),
    )]
}

/// Reply buffer units a request may need.
fn units_for(e: &Export, req: &Request) -> u32 {
    let bytes = match req.cmd {
        proto::CMD_READ | proto::CMD_WRITE => req.len.min(e.max_payload) as u64,
        proto::CMD_BLOCK_STATUS => 8 * MAX_DESCRIPTORS as u64,
        _ => 0,
    };
    (bytes.div_ceil(BUDGET_UNIT) + 1) as u32
}

/// Read and drop `len` bytes through a small buffer.
async fn discard<R: tokio::io::AsyncRead + Unpin>(rd: &mut R, len: u64) -> std::io::Result<()> {
    let mut left = len;
    let mut sink = [0u8; 8192];
    while left > 0 {
        let n = left.min(sink.len() as u64) as usize;
        rd.read_exact(&mut sink[..n]).await?;
        left -= n as u64;
    }
    Ok(())
}

struct Permits {
    _count: OwnedSemaphorePermit,
    _conn: OwnedSemaphorePermit,
    _total: OwnedSemaphorePermit,
}

/// Serve requests on `io` for `export` until NBD_CMD_DISC, end of stream, a
/// protocol violation or `shutdown`.
pub async fn run(
    server: &Arc<NbdServer>,
    io: BoxedIo,
    export: Export,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), ServeError> {
    let cfg = &server.config;
    let (rd, wr) = tokio::io::split(io);
    let mut rd = BufReader::with_capacity(64 * 1024, rd);
    let (tx, mut rx) = mpsc::unbounded_channel::<(Reply, Permits)>();
    let write_timeout = cfg.write_timeout;
    let mut writer = tokio::spawn(async move {
        let mut w = BufWriter::with_capacity(256 * 1024, wr);
        while let Some((reply, permits)) = rx.recv().await {
            for part in &reply {
                tokio::time::timeout(write_timeout, w.write_all(part))
                    .await
                    .map_err(|_| ServeError::Timeout("reply write"))??;
            }
            drop(permits);
            if rx.is_empty() {
                tokio::time::timeout(write_timeout, w.flush())
                    .await
                    .map_err(|_| ServeError::Timeout("reply write"))??;
            }
        }
        let _ = w.shutdown().await;
        Ok::<(), ServeError>(())
    });
    let count = Arc::new(Semaphore::new(cfg.max_requests_per_connection));
    let conn_units = (cfg.connection_budget / BUDGET_UNIT).min(u32::MAX as u64) as usize;
    let conn_budget = Arc::new(Semaphore::new(conn_units));
    let export = Arc::new(export);
    let mut tasks = tokio::task::JoinSet::new();
    let result: Result<(), ServeError> = loop {
        let mut h = [0u8; 28];
        let got = tokio::select! {
            r = rd.read_exact(&mut h) => r.map(|_| ()),
            _ = shutdown.changed() => break Ok(()),
            w = &mut writer => {
                // The writer only ends early on a write error.
                break match w {
                    Ok(Err(e)) => Err(e),
                    _ => Err(std::io::Error::other("reply writer stopped").into()),
                };
            }
        };
        if let Err(e) = got {
            // End of stream without NBD_CMD_DISC: the client went away.
            break if e.kind() == std::io::ErrorKind::UnexpectedEof {
                Ok(())
            } else {
                Err(e.into())
            };
        }
        let req = match proto::parse_request(&h) {
            Ok(r) => r,
            Err(e) => break Err(e.into()),
        };
        while tasks.try_join_next().is_some() {}
        if req.cmd == proto::CMD_DISC {
            break Ok(());
        }
        if req.cmd == proto::CMD_WRITE && req.len > MAX_DISCARD.max(export.max_payload) {
            // Not worth reading to stay in sync: a hostile or broken client.
            break Err(ProtoError::TooLarge {
                what: "write payload",
                len: req.len as u64,
                max: export.max_payload as u64,
            }
            .into());
        }
        let units = units_for(&export, &req);
        // Backpressure: stop reading requests while the budgets are spent. A
        // write's payload is budgeted before it is read.
        let permits = async {
            let c = count.clone().acquire_owned().await.ok()?;
            let b = conn_budget.clone().acquire_many_owned(units).await.ok()?;
            let t = server.budget.clone().acquire_many_owned(units).await.ok()?;
            Some(Permits {
                _count: c,
                _conn: b,
                _total: t,
            })
        };
        let permits = tokio::select! {
            p = permits => p,
            _ = shutdown.changed() => break Ok(()),
        };
        let Some(permits) = permits else {
            break Err(std::io::Error::other("request budget closed").into());
        };
        let mut payload = Vec::new();
        if req.cmd == proto::CMD_WRITE {
            // The payload must be consumed to stay in sync. It is kept only when it
            // can be written (writable export, within the maximum payload: the
            // length is bounded before it sizes the buffer).
            let keep = export.writable && req.len <= export.max_payload;
            let r = if keep {
                payload = vec![0u8; req.len as usize];
                rd.read_exact(&mut payload).await.map(|_| ())
            } else {
                discard(&mut rd, req.len as u64).await
            };
            if let Err(e) = r {
                break Err(e.into());
            }
        }
        let (tx, export) = (tx.clone(), export.clone());
        tasks.spawn_blocking(move || {
            let reply = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                if req.cmd == proto::CMD_WRITE {
                    write(&export, &req, &payload)
                } else {
                    execute(&export, &req)
                }
            }))
            .unwrap_or_else(|_| {
                error_reply(
                    &export,
                    &req,
                    proto::EIO,
                    "internal error serving this request",
                )
            });
            drop(payload);
            let _ = tx.send((reply, permits));
        });
    };
    drop(tx);
    match &result {
        Ok(()) if !*shutdown.borrow() => {
            // Finish what is in flight, send it, then close (TLS close_notify).
            while tasks.join_next().await.is_some() {}
            match writer.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e),
                Err(e) => return Err(std::io::Error::other(e.to_string()).into()),
            }
        }
        _ => {
            writer.abort();
            tasks.abort_all();
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd_server::ExportBackend;

    /// 64 KiB: data in [0, 16K), a hole in [16K, 48K), data in [48K, 64K).
    struct Sparse;
    impl ExportBackend for Sparse {
        fn size(&self) -> u64 {
            64 << 10
        }
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
            for (i, b) in buf.iter_mut().enumerate() {
                let at = offset + i as u64;
                *b = if (16 << 10..48 << 10).contains(&at) {
                    0
                } else {
                    (at % 251) as u8 + 1
                };
            }
            Ok(())
        }
        fn block_status(&self, offset: u64, _len: u64) -> std::io::Result<Vec<(u64, u32)>> {
            Ok(match offset {
                o if o < 16 << 10 => vec![((16 << 10) - o, 0), (32 << 10, 3), (16 << 10, 0)],
                o if o < 48 << 10 => vec![((48 << 10) - o, 3), (16 << 10, 0)],
                o => vec![((64 << 10) - o, 0)],
            })
        }
    }

    fn export(structured: bool) -> Export {
        Export {
            name: "t".into(),
            backend: Arc::new(Sparse),
            size: 64 << 10,
            flags: 0,
            structured,
            allocation_ctx: structured.then_some(1),
            max_payload: 48 << 10,
            writable: false,
        }
    }

    /// A writable 64 KiB disk in memory that counts flushes.
    struct Ram {
        data: std::sync::Mutex<Vec<u8>>,
        flushes: std::sync::atomic::AtomicUsize,
    }
    impl ExportBackend for Ram {
        fn size(&self) -> u64 {
            64 << 10
        }
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
            let d = self.data.lock().unwrap();
            buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
        fn writable(&self) -> bool {
            true
        }
        fn write_at(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
            let mut d = self.data.lock().unwrap();
            d[offset as usize..offset as usize + data.len()].copy_from_slice(data);
            Ok(())
        }
        fn flush(&self) -> std::io::Result<()> {
            self.flushes
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(())
        }
    }

    fn writable(structured: bool) -> (Export, Arc<Ram>) {
        let ram = Arc::new(Ram {
            data: std::sync::Mutex::new(vec![0xEE; 64 << 10]),
            flushes: Default::default(),
        });
        let mut e = export(structured);
        e.backend = ram.clone();
        e.writable = true;
        (e, ram)
    }

    fn errno(e: &Export, r: &Reply) -> u32 {
        if e.structured {
            let c = chunks(r);
            assert_eq!((c.len(), c[0].1), (1, proto::REPLY_TYPE_ERROR));
            proto::parse_error_payload(&c[0].2).unwrap().0
        } else {
            let b = r.concat();
            assert_eq!(b.len(), 16);
            u32::from_be_bytes(b[4..8].try_into().unwrap())
        }
    }

    fn req(cmd: u16, flags: u16, offset: u64, len: u32) -> Request {
        Request {
            flags,
            cmd,
            cookie: 42,
            offset,
            len,
        }
    }

    /// Decode a structured reply into (kind, offset, payload-after-offset) chunks.
    fn chunks(r: &Reply) -> Vec<(u16, u16, Vec<u8>)> {
        let b: Vec<u8> = r.concat();
        let mut out = Vec::new();
        let mut at = 0;
        while at < b.len() {
            let h = proto::parse_reply(
                u32::from_be_bytes(b[at..at + 4].try_into().unwrap()),
                &b[at + 4..at + 20],
            )
            .unwrap();
            let proto::ReplyHeader::Structured {
                flags,
                kind,
                cookie,
                len,
            } = h
            else {
                panic!("simple")
            };
            assert_eq!(cookie, 42);
            out.push((flags, kind, b[at + 20..at + 20 + len as usize].to_vec()));
            at += 20 + len as usize;
        }
        out
    }

    #[test]
    fn structured_read_sends_data_and_hole_chunks_covering_the_request() {
        let e = export(true);
        let c = chunks(&execute(&e, &req(proto::CMD_READ, 0, 8 << 10, 48 << 10)));
        let kinds: Vec<u16> = c.iter().map(|x| x.1).collect();
        assert_eq!(
            kinds,
            [
                proto::REPLY_TYPE_OFFSET_DATA,
                proto::REPLY_TYPE_OFFSET_HOLE,
                proto::REPLY_TYPE_OFFSET_DATA
            ]
        );
        assert_eq!(
            c.iter()
                .filter(|x| x.0 & proto::REPLY_FLAG_DONE != 0)
                .count(),
            1
        );
        assert_eq!(c[2].0, proto::REPLY_FLAG_DONE);
        assert_eq!(&c[1].2, &proto::hole_payload(16 << 10, 32 << 10));
        let mut expect = vec![0u8; 8 << 10];
        Sparse.read_at(8 << 10, &mut expect).unwrap();
        assert_eq!(&c[0].2[8..], &expect[..]);
        // DF: one data chunk with the zeroes present.
        let c = chunks(&execute(
            &e,
            &req(proto::CMD_READ, proto::CMD_FLAG_DF, 0, 32 << 10),
        ));
        assert_eq!(c.len(), 1);
        let mut expect = vec![0u8; 32 << 10];
        Sparse.read_at(0, &mut expect).unwrap();
        assert_eq!(&c[0].2[8..], &expect[..]);
    }

    #[test]
    fn simple_read_is_one_header_and_the_bytes() {
        let e = export(false);
        let r = execute(&e, &req(proto::CMD_READ, 0, 0, 20 << 10)).concat();
        assert_eq!(&r[..16], &proto::simple_reply(0, 42));
        let mut expect = vec![0u8; 20 << 10];
        Sparse.read_at(0, &mut expect).unwrap();
        assert_eq!(&r[16..], &expect[..]);
        // Errors carry no payload.
        let r = execute(&e, &req(proto::CMD_READ, 0, 60 << 10, 8 << 10)).concat();
        assert_eq!(r, proto::simple_reply(proto::EINVAL, 42));
        // DF is a structured-only flag.
        let r = execute(&e, &req(proto::CMD_READ, proto::CMD_FLAG_DF, 0, 512)).concat();
        assert_eq!(r, proto::simple_reply(proto::EINVAL, 42));
    }

    #[test]
    fn bounds_flags_and_refusals() {
        let e = export(true);
        let err = |r: Reply| {
            let c = chunks(&r);
            assert_eq!((c.len(), c[0].1), (1, proto::REPLY_TYPE_ERROR));
            proto::parse_error_payload(&c[0].2).unwrap().0
        };
        assert_eq!(
            err(execute(&e, &req(proto::CMD_READ, 0, u64::MAX - 10, 100))),
            proto::EINVAL
        );
        assert_eq!(
            err(execute(&e, &req(proto::CMD_READ, 0, 0, 56 << 10))),
            proto::EOVERFLOW
        );
        assert_eq!(
            err(execute(&e, &req(proto::CMD_READ, 0x40, 0, 512))),
            proto::EINVAL
        );
        assert_eq!(
            err(execute(&e, &req(proto::CMD_TRIM, 0, 0, 512))),
            proto::EPERM
        );
        assert_eq!(
            err(execute(&e, &req(proto::CMD_WRITE_ZEROES, 0, 0, 512))),
            proto::EPERM
        );
        assert_eq!(err(execute(&e, &req(99, 0, 0, 0))), proto::EINVAL);
        assert_eq!(
            err(execute(&e, &req(proto::CMD_BLOCK_STATUS, 0, 0, 0))),
            proto::EINVAL
        );
        assert_eq!(
            err(execute(&e, &req(proto::CMD_CACHE, 0, 60 << 10, 8 << 10))),
            proto::EINVAL
        );
        assert_eq!(
            execute(&e, &req(proto::CMD_FLUSH, 0, 0, 0)).concat(),
            proto::simple_reply(0, 42)
        );
        let c = chunks(&execute(&e, &req(proto::CMD_READ, 0, 100, 0)));
        assert_eq!(
            (c[0].0, c[0].1),
            (proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_NONE)
        );
        // Block status without a negotiated context.
        let mut e2 = export(true);
        e2.allocation_ctx = None;
        assert_eq!(
            err(execute(&e2, &req(proto::CMD_BLOCK_STATUS, 0, 0, 512))),
            proto::EINVAL
        );
    }

    #[test]
    fn block_status_merges_clips_and_honours_req_one() {
        let e = export(true);
        let c = chunks(&execute(
            &e,
            &req(proto::CMD_BLOCK_STATUS, 0, 4 << 10, 56 << 10),
        ));
        let (ctx, d) = proto::parse_block_status(&c[0].2).unwrap();
        assert_eq!(ctx, 1);
        assert_eq!(
            d,
            vec![
                Descriptor {
                    len: 12 << 10,
                    flags: 0
                },
                Descriptor {
                    len: 32 << 10,
                    flags: 3
                },
                Descriptor {
                    len: 12 << 10,
                    flags: 0
                },
            ]
        );
        let c = chunks(&execute(
            &e,
            &req(
                proto::CMD_BLOCK_STATUS,
                proto::CMD_FLAG_REQ_ONE,
                20 << 10,
                8 << 10,
            ),
        ));
        let (_, d) = proto::parse_block_status(&c[0].2).unwrap();
        assert_eq!(
            d,
            vec![Descriptor {
                len: 8 << 10,
                flags: 3
            }]
        );
    }

    #[test]
    fn writes_land_in_the_backend_and_fua_and_flush_flush_it() {
        for structured in [true, false] {
            let (e, ram) = writable(structured);
            let data = vec![7u8; 4096];
            let r = write(&e, &req(proto::CMD_WRITE, 0, 8192, 4096), &data);
            assert_eq!(r.concat(), proto::simple_reply(0, 42));
            assert_eq!(&ram.data.lock().unwrap()[8192..12288], &data[..]);
            assert_eq!(ram.data.lock().unwrap()[8191], 0xEE);
            let fl = std::sync::atomic::Ordering::SeqCst;
            let before = ram.flushes.load(fl);
            let r = write(
                &e,
                &req(proto::CMD_WRITE, proto::CMD_FLAG_FUA, 0, 16),
                &[1u8; 16],
            );
            assert_eq!(r.concat(), proto::simple_reply(0, 42));
            assert_eq!(ram.flushes.load(fl), before + 1, "FUA flushes");
            let r = execute(&e, &req(proto::CMD_FLUSH, 0, 0, 0));
            assert_eq!(r.concat(), proto::simple_reply(0, 42));
            assert_eq!(ram.flushes.load(fl), before + 2);
            // Write zeroes, with NO_HOLE allowed.
            let r = execute(
                &e,
                &req(proto::CMD_WRITE_ZEROES, proto::CMD_FLAG_NO_HOLE, 8192, 1024),
            );
            assert_eq!(r.concat(), proto::simple_reply(0, 42));
            assert!(ram.data.lock().unwrap()[8192..9216].iter().all(|&b| b == 0));
            assert_eq!(ram.data.lock().unwrap()[9216], 7);
        }
    }

    #[test]
    fn hostile_writes_get_clean_errors_and_change_nothing() {
        for structured in [true, false] {
            let (e, ram) = writable(structured);
            let before = ram.data.lock().unwrap().clone();
            // Beyond the end (and overflowing the offset): ENOSPC.
            assert_eq!(
                errno(
                    &e,
                    &write(&e, &req(proto::CMD_WRITE, 0, 62 << 10, 4096), &[1; 4096])
                ),
                proto::ENOSPC
            );
            assert_eq!(
                errno(
                    &e,
                    &write(&e, &req(proto::CMD_WRITE, 0, u64::MAX - 1, 16), &[1; 16])
                ),
                proto::ENOSPC
            );
            assert_eq!(
                errno(
                    &e,
                    &execute(&e, &req(proto::CMD_WRITE_ZEROES, 0, 60 << 10, 8192))
                ),
                proto::ENOSPC
            );
            // Larger than the maximum payload.
            let over = if structured {
                proto::EOVERFLOW
            } else {
                proto::EINVAL
            };
            assert_eq!(
                errno(&e, &write(&e, &req(proto::CMD_WRITE, 0, 0, 56 << 10), &[])),
                over
            );
            // A payload that does not match the header, and unknown flags.
            assert_eq!(
                errno(&e, &write(&e, &req(proto::CMD_WRITE, 0, 0, 16), &[1; 8])),
                proto::EINVAL
            );
            assert_eq!(
                errno(
                    &e,
                    &write(
                        &e,
                        &req(proto::CMD_WRITE, proto::CMD_FLAG_DF, 0, 4),
                        &[1; 4]
                    )
                ),
                proto::EINVAL
            );
            // TRIM is not advertised.
            assert_eq!(
                errno(&e, &execute(&e, &req(proto::CMD_TRIM, 0, 0, 512))),
                proto::EINVAL
            );
            assert!(*ram.data.lock().unwrap() == before);
            // The same write on a read-only export: EPERM.
            let ro = export(structured);
            assert_eq!(
                errno(&ro, &write(&ro, &req(proto::CMD_WRITE, 0, 0, 16), &[1; 16])),
                proto::EPERM
            );
        }
    }
}
