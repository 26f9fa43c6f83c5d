//! A fault-injecting HTTP/1.1 proxy for S3 tests (std threads only).
//!
//! [`FaultProxy::start`] listens on 127.0.0.1 (a free port) and forwards every
//! request to an upstream S3 server (a fixture's `endpoint()`); point ferry's
//! `S3Settings` (or `FERRY_S3_ENDPOINT`) at [`FaultProxy::endpoint`]. Requests
//! keep their bytes (so SigV4 signatures stay valid); client connections may be
//! kept alive for many requests. Each request is read whole (request line,
//! headers, a `Content-Length` or chunked body) and sent upstream on a fresh
//! connection; the response is read whole (`Content-Length`, chunked, or up to
//! the upstream's close) and relayed.
//!
//! A shared, changeable plan ([`FaultProxy::set`]) of [`Rule`]s decides each
//! request's [`Fault`]: the first rule that matches the request (method, a path
//! substring) and fires on its schedule ([`When`]: always, every Nth, the next
//! K, bursts) wins; otherwise the request passes. Each rule counts every request
//! it matches, whether or not an earlier rule fired. Every request is recorded
//! ([`Seen`]: method, path, fault, what the client got) as soon as it is read,
//! so tests can count what was injected and how far a client got.

use std::io::{self, BufRead, BufReader, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the proxy does to one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Forward it and relay the answer.
    Pass,
    /// Answer this status with an S3 XML error body (503: `SlowDown`,
    /// otherwise `InternalError`); the request is not forwarded.
    Status(u16),
    /// Close the connection (RST) once the request is read; not forwarded.
    DropRequest,
    /// Forward it (the server does the work), then close (RST) without
    /// answering: a lost acknowledgement.
    ResetBeforeResponse,
    /// Forward it, send the answer's head and half its body, then close. An
    /// answer without a body is closed before its head, like
    /// [`Fault::ResetBeforeResponse`].
    ResetMidBody,
    /// Hold the request this long before forwarding it; dropped (never
    /// forwarded) if the client hangs up meanwhile (a client timeout).
    Delay(Duration),
    /// Forward it with its `x-amz-date` moved by this many seconds, as a
    /// client whose clock is that far off would sign it: the server judges
    /// the skew itself (s3s-fs checks it before the signature).
    ShiftDate(i64),
}

/// When a rule fires, counting the requests it matches (1, 2, 3...).
#[derive(Clone, Copy, Debug)]
pub enum When {
    Always,
    /// The Nth, 2Nth, 3Nth... match.
    EveryNth(u64),
    /// The next K matches, then never.
    Next(u64),
    /// The first `len` of every `every` matches (bursts in a row).
    Bursts {
        every: u64,
        len: u64,
    },
}

/// A fault for the requests that match `method` and `path`, on a schedule.
#[derive(Clone, Debug)]
pub struct Rule {
    method: Option<String>,
    path: Option<String>,
    when: When,
    fault: Fault,
    matched: u64,
}

impl Rule {
    pub fn new(when: When, fault: Fault) -> Rule {
        let (method, path, matched) = (None, None, 0);
        Rule {
            method,
            path,
            when,
            fault,
            matched,
        }
    }
    /// Only requests with this method (`PUT`, `GET`...).
    pub fn method(mut self, m: &str) -> Rule {
        self.method = Some(m.to_string());
        self
    }
    /// Only requests whose path (and query) contains `s` (`/chunks/`).
    pub fn path(mut self, s: &str) -> Rule {
        self.path = Some(s.to_string());
        self
    }
    fn fires(&mut self, method: &str, path: &str) -> bool {
        if self.method.as_ref().is_some_and(|m| m != method)
            || self
                .path
                .as_ref()
                .is_some_and(|p| !path.contains(p.as_str()))
        {
            return false;
        }
        self.matched += 1;
        let n = self.matched;
        match self.when {
            When::Always => true,
            When::EveryNth(k) => n.is_multiple_of(k),
            When::Next(k) => n <= k,
            When::Bursts { every, len } => (n - 1) % every < len,
        }
    }
}

/// One request as the proxy saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub fault: Fault,
    /// Whether it reached the upstream server.
    pub forwarded: bool,
    /// The status the client was sent (whole or in part), `None` when it got
    /// no answer (yet).
    pub status: Option<u16>,
}

#[derive(Default)]
struct Shared {
    rules: Mutex<Vec<Rule>>,
    seen: Mutex<Vec<Seen>>,
}

/// A running proxy. Its threads end with their connections (the listener
/// lives as long as the test process).
pub struct FaultProxy {
    port: u16,
    shared: Arc<Shared>,
}

impl FaultProxy {
    /// Listen on a free port of 127.0.0.1, forwarding to `upstream`
    /// (`http://HOST:PORT`).
    pub fn start(upstream: &str) -> FaultProxy {
        let up = upstream.trim_start_matches("http://").trim_end_matches('/');
        let (up, shared) = (up.to_string(), Arc::new(Shared::default()));
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let s = shared.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let (s, up) = (s.clone(), up.clone());
                std::thread::spawn(move || serve(conn, &up, &s));
            }
        });
        FaultProxy { port, shared }
    }

    /// `http://127.0.0.1:PORT`
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Replace the plan (an empty one passes everything).
    pub fn set(&self, rules: Vec<Rule>) {
        *self.shared.rules.lock().unwrap() = rules;
    }

    /// Pass everything from now on.
    pub fn clear(&self) {
        self.set(Vec::new());
    }

    /// Every request so far, in arrival order.
    pub fn seen(&self) -> Vec<Seen> {
        self.shared.seen.lock().unwrap().clone()
    }

    /// How many requests so far satisfy `f`.
    pub fn count(&self, f: impl Fn(&Seen) -> bool) -> usize {
        self.shared
            .seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| f(s))
            .count()
    }

    /// How many requests got a fault other than [`Fault::Pass`].
    pub fn injected(&self) -> usize {
        self.count(|s| s.fault != Fault::Pass)
    }

    /// Forget the requests seen so far.
    pub fn reset_counts(&self) {
        self.shared.seen.lock().unwrap().clear();
    }
}

/// One HTTP message read whole: its first line's first two words (method
/// and path, or version and status), its headers, all its bytes as sent, and
/// where its body starts.
struct Message {
    first: [String; 2],
    headers: Vec<(String, String)>,
    raw: Vec<u8>,
    body_at: usize,
    /// Its body lasted until the sender closed.
    until_close: bool,
}

impl Message {
    fn has(&self, name: &str, value: &str) -> bool {
        let mut h = self.headers.iter();
        h.any(|(n, v)| n.eq_ignore_ascii_case(name) && v.eq_ignore_ascii_case(value))
    }
    fn header(&self, name: &str) -> Option<&str> {
        let mut h = self.headers.iter();
        h.find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Read a line (with its CRLF) onto `raw`; returns it.
fn line(r: &mut impl BufRead, raw: &mut Vec<u8>) -> io::Result<String> {
    let mut l = String::new();
    r.read_line(&mut l)?;
    raw.extend_from_slice(l.as_bytes());
    Ok(l)
}

/// Read `n` bytes onto `raw`.
fn bytes(r: &mut impl BufRead, raw: &mut Vec<u8>, n: usize) -> io::Result<()> {
    let at = raw.len();
    raw.resize(at + n, 0);
    r.read_exact(&mut raw[at..])
}

/// Read a request (`response` `None`) or a response (`Some(false)` when it
/// has no body: the answer to a HEAD); `None` at a clean end of stream.
fn read_message(r: &mut impl BufRead, response: Option<bool>) -> io::Result<Option<Message>> {
    let mut raw = Vec::new();
    let mut lines = Vec::new();
    loop {
        let l = line(r, &mut raw)?;
        match l.as_str() {
            "" if raw.is_empty() => return Ok(None),
            "" => return Err(io::ErrorKind::UnexpectedEof.into()),
            "\r\n" => break,
            _ => lines.push(l.trim_end().to_string()),
        }
    }
    let start = lines.remove(0);
    let mut words = start.split(' ');
    let first = [(); 2].map(|_| words.next().unwrap_or_default().to_string());
    let headers = (lines.iter().filter_map(|l| l.split_once(':')))
        .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
        .collect();
    let body_at = raw.len();
    let (until_close, status) = (false, first[1].parse().unwrap_or(0u16));
    let mut m = Message {
        first,
        headers,
        raw,
        body_at,
        until_close,
    };
    if response.is_some_and(|body| !body || status < 200 || status == 204 || status == 304) {
        return Ok(Some(m));
    }
    if m.has("transfer-encoding", "chunked") {
        loop {
            let size = line(r, &mut m.raw)?;
            let hex = size.split(';').next().unwrap().trim();
            match usize::from_str_radix(hex, 16).map_err(io::Error::other)? {
                0 => break,
                n => bytes(r, &mut m.raw, n + 2)?,
            }
        }
        while !matches!(line(r, &mut m.raw)?.as_str(), "\r\n" | "") {} // trailers
    } else if let Some(n) = m.header("content-length") {
        let n = n.parse().map_err(io::Error::other)?;
        bytes(r, &mut m.raw, n)?;
    } else if response.is_some() {
        r.read_to_end(&mut m.raw)?;
        m.until_close = true;
    }
    Ok(Some(m))
}

/// Close with a reset (SO_LINGER 0) rather than an orderly FIN.
fn reset(s: TcpStream) {
    use std::os::fd::AsRawFd;
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    let (p, len) = (&l as *const libc::linger, std::mem::size_of_val(&l));
    // SAFETY: a valid socket, and a linger struct of the size given.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            p.cast(),
            len as _,
        )
    };
}

/// Whether the client closed its side (nothing pending, end of stream).
fn client_gone(s: &TcpStream) -> bool {
    let _ = s.set_nonblocking(true);
    let gone = match s.peek(&mut [0u8; 1]) {
        Ok(n) => n == 0,
        Err(e) => e.kind() != io::ErrorKind::WouldBlock,
    };
    let _ = s.set_nonblocking(false);
    gone
}

/// Move the `x-amz-date: YYYYMMDDTHHMMSSZ` value in a request head by `secs`,
/// and the date of its credential scope with it (same lengths: nothing else
/// moves).
fn shift_date(head: &mut [u8], secs: i64) {
    let name = b"\r\nx-amz-date:";
    let Some(at) = head
        .windows(name.len())
        .position(|w| w.eq_ignore_ascii_case(name))
    else {
        return;
    };
    let mut v = at + name.len();
    while head.get(v) == Some(&b' ') {
        v += 1;
    }
    let Some(old) = head
        .get(v..v + 16)
        .and_then(|b| std::str::from_utf8(b).ok())
    else {
        return;
    };
    let n = |r: std::ops::Range<usize>| old[r].parse::<i64>().unwrap_or(0);
    let month = time::Month::try_from(n(4..6) as u8).unwrap_or(time::Month::January);
    let date = time::Date::from_calendar_date(n(0..4) as i32, month, n(6..8) as u8).unwrap();
    let t = date
        .with_hms(n(9..11) as u8, n(11..13) as u8, n(13..15) as u8)
        .unwrap()
        .assume_utc()
        + time::Duration::seconds(secs);
    let new = format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    );
    head[v..v + 16].copy_from_slice(new.as_bytes());
    // The credential scope's date (`Credential=KEY/YYYYMMDD/...`) follows,
    // as a client with that clock would write it (a scope of another day
    // than x-amz-date is refused before the skew is looked at).
    let cred = b"Credential=";
    if let Some(c) = head.windows(cred.len()).position(|w| w == cred) {
        if let Some(slash) = head[c..].iter().position(|b| *b == b'/') {
            let d = c + slash + 1;
            if d + 8 <= head.len() {
                head[d..d + 8].copy_from_slice(&new.as_bytes()[..8]);
            }
        }
    }
}

/// An S3 error answer.
fn s3_error(status: u16, path: &str) -> Vec<u8> {
    let (code, msg) = match status {
        503 => ("SlowDown", "Please reduce your request rate."),
        _ => (
            "InternalError",
            "We encountered an internal error. Please try again.",
        ),
    };
    let body = format!("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>{msg}</Message><Resource>{path}</Resource><RequestId>faultproxy</RequestId></Error>");
    let head = format!(
        "HTTP/1.1 {status} {code}\r\nContent-Type: application/xml\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    [head, body].concat().into_bytes()
}

/// Serve one client connection, request after request.
fn serve(client: TcpStream, upstream: &str, shared: &Shared) -> io::Result<()> {
    let mut out = client.try_clone()?;
    let mut reader = BufReader::new(client);
    while let Some(mut req) = read_message(&mut reader, None)? {
        let [method, path] = req.first.clone();
        // Every matching rule counts the request; the first that fires wins.
        let mut fault = Fault::Pass;
        for r in shared.rules.lock().unwrap().iter_mut() {
            if r.fires(&method, &path) && fault == Fault::Pass {
                fault = r.fault.clone();
            }
        }
        let at = {
            let mut seen = shared.seen.lock().unwrap();
            let (fault, forwarded, status) = (fault.clone(), false, None);
            seen.push(Seen {
                method: method.clone(),
                path: path.clone(),
                fault,
                forwarded,
                status,
            });
            seen.len() - 1
        };
        let record = |forwarded: bool, status: Option<u16>| {
            let mut seen = shared.seen.lock().unwrap();
            if let Some(s) = seen.get_mut(at) {
                (s.forwarded, s.status) = (forwarded, status);
            }
        };
        match fault {
            Fault::Status(code) => {
                record(false, Some(code));
                out.write_all(&s3_error(code, &path))?;
                continue;
            }
            Fault::DropRequest => {
                reset(out);
                return Ok(());
            }
            Fault::ShiftDate(secs) => shift_date(&mut req.raw[..req.body_at], secs),
            Fault::Delay(d) => {
                let until = Instant::now() + d;
                while let Some(left) = until.checked_duration_since(Instant::now()) {
                    if client_gone(&out) {
                        return Ok(()); // as a timed-out request: never forwarded
                    }
                    std::thread::sleep(left.min(Duration::from_millis(20)));
                }
            }
            _ => {}
        }
        let mut up = TcpStream::connect(upstream)?;
        up.write_all(&req.raw)?;
        let resp = read_message(&mut BufReader::new(up), Some(method != "HEAD"))?
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        let status = resp.first[1].parse().ok();
        let half = resp.body_at + (resp.raw.len() - resp.body_at) / 2;
        match fault {
            Fault::ResetBeforeResponse => {}
            Fault::ResetMidBody if half > resp.body_at => {
                record(true, status);
                out.write_all(&resp.raw[..half])?;
                return out.shutdown(Shutdown::Both);
            }
            Fault::ResetMidBody => {}
            _ => {
                record(true, status);
                out.write_all(&resp.raw)?;
                if req.has("connection", "close")
                    || resp.has("connection", "close")
                    || resp.until_close
                {
                    return out.shutdown(Shutdown::Both);
                }
                continue;
            }
        }
        record(true, None);
        reset(out);
        return Ok(());
    }
    Ok(())
}
