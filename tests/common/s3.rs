//! Real S3-compatible servers for end-to-end tests: moto's S3 server (Python,
//! `.venv/bin/moto_server`) and s3s-fs (Rust, an S3 server over a directory,
//! `.peers/s3s-fs/bin/s3s-fs`), both installed by `.ci/run`. Each server runs on
//! 127.0.0.1 on a free port with fixed credentials ([`ACCESS_KEY`], [`SECRET_KEY`],
//! [`REGION`]) and is killed on drop.
//!
//! How they differ: moto keeps everything in memory, checks no signatures (any
//! key, even unsigned requests, is accepted) and enforces Object Lock; s3s-fs
//! keeps objects as files under a directory per bucket, checks SigV4 signatures
//! and has no versioning or Object Lock. Both refuse a second `PUT` of a key with
//! `If-None-Match: *` (412 PreconditionFailed).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The access key both servers are started with (moto accepts any).
pub const ACCESS_KEY: &str = "ferrytest";
/// The secret key both servers are started with (moto checks no signatures).
pub const SECRET_KEY: &str = "ferrytestsecret";
/// The region both servers answer for.
pub const REGION: &str = "us-east-1";

/// A real S3-compatible server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum S3Peer {
    /// moto's S3 server (moto[server] in `.venv`): in memory, no signature
    /// checks, versioning and Object Lock.
    Moto,
    /// s3s-fs (`cargo install s3s-fs --features binary` into `.peers/s3s-fs`):
    /// a directory per bucket, SigV4 checked, no versioning or Object Lock.
    S3sFs,
}

impl S3Peer {
    pub fn all() -> [S3Peer; 2] {
        [S3Peer::Moto, S3Peer::S3sFs]
    }

    pub fn name(self) -> &'static str {
        match self {
            S3Peer::Moto => "moto",
            S3Peer::S3sFs => "s3s-fs",
        }
    }

    /// Whether buckets can be created with Object Lock (and versions are kept).
    pub fn object_lock(self) -> bool {
        self == S3Peer::Moto
    }

    /// Whether a request signed with the wrong secret is refused.
    pub fn checks_signatures(self) -> bool {
        self == S3Peer::S3sFs
    }

    /// The server's executable; panics, naming what installs it, when missing.
    fn binary(self) -> PathBuf {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let (bin, how) = match self {
            S3Peer::Moto => (
                root.join(".venv/bin/moto_server"),
                ".ci/run installs it (python3 -m venv .venv && .venv/bin/pip install 'moto[server]')",
            ),
            S3Peer::S3sFs => (
                root.join(".peers/s3s-fs/bin/s3s-fs"),
                ".ci/run builds it (cargo install s3s-fs --version 0.14.1 --features binary --locked --root .peers/s3s-fs)",
            ),
        };
        assert!(bin.exists(), "{} missing: {how}", bin.display());
        bin
    }
}

impl std::fmt::Display for S3Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A running server; killed (and its directory removed) on drop.
pub struct S3Server {
    peer: S3Peer,
    child: Child,
    port: u16,
    /// The server's log, and for s3s-fs its data (`root/`, one directory per
    /// bucket).
    dir: tempfile::TempDir,
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTP response: status, headers (names lower-cased) and body.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

impl S3Server {
    /// Start `peer` on a free port and wait until it answers HTTP.
    pub fn start(peer: S3Peer) -> S3Server {
        let bin = peer.binary();
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = std::fs::File::create(dir.path().join("server.log")).unwrap();
        let mut cmd = Command::new(&bin);
        match peer {
            S3Peer::Moto => {
                cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()]);
            }
            S3Peer::S3sFs => {
                let root = dir.path().join("root");
                std::fs::create_dir(&root).unwrap();
                cmd.args(["--host", "127.0.0.1", "--port", &port.to_string()])
                    .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
                    .arg(&root);
            }
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", bin.display()));
        let mut s = S3Server {
            peer,
            child,
            port,
            dir,
        };
        let t = Instant::now();
        // Any HTTP answer (s3s-fs refuses an unsigned request) means it is up.
        while s.try_request("GET", "/", &[], b"").is_err() {
            if let Ok(Some(st)) = s.child.try_wait() {
                panic!("{peer} exited ({st}) before answering:\n{}", s.log());
            }
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "{peer} did not answer on port {port} within 60 s:\n{}",
                s.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        s
    }

    pub fn peer(&self) -> S3Peer {
        self.peer
    }

    /// `http://127.0.0.1:PORT`
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn region(&self) -> &'static str {
        REGION
    }

    /// ferry's S3 settings for this server.
    pub fn settings(&self) -> ferry::repo::backend::s3::S3Settings {
        ferry::repo::backend::s3::S3Settings::for_endpoint(
            &self.endpoint(),
            REGION,
            ACCESS_KEY,
            SECRET_KEY,
        )
    }

    /// The same settings as the environment of a `ferry` process.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("FERRY_S3_ENDPOINT".into(), self.endpoint()),
            ("AWS_REGION".into(), REGION.into()),
            ("AWS_ACCESS_KEY_ID".into(), ACCESS_KEY.into()),
            ("AWS_SECRET_ACCESS_KEY".into(), SECRET_KEY.into()),
        ]
    }

    /// The server's output so far (for assertion messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// Create bucket `name` (a valid S3 bucket name), with Object Lock (and so
    /// versioning) when `object_lock`. moto: an unsigned `PUT /name` (moto checks
    /// no signatures); s3s-fs: a directory under its root. Panics when the peer
    /// has no Object Lock ([`S3Peer::object_lock`]) or the bucket cannot be made.
    pub fn create_bucket(&self, name: &str, object_lock: bool) {
        assert!(
            !object_lock || self.peer.object_lock(),
            "{} has no Object Lock",
            self.peer
        );
        match self.peer {
            S3Peer::Moto => {
                let lock = [("x-amz-bucket-object-lock-enabled", "true")];
                let headers: &[(&str, &str)] = if object_lock { &lock } else { &[] };
                let r = self.request("PUT", &format!("/{name}"), headers, b"");
                assert_eq!(r.status, 200, "moto: create bucket {name}: {r:?}");
            }
            S3Peer::S3sFs => {
                std::fs::create_dir(self.dir.path().join("root").join(name)).unwrap();
            }
        }
    }

    /// An unsigned request (`path_and_query` starts with `/`; path-style bucket
    /// addressing). Panics on a network error. s3s-fs refuses every unsigned
    /// request (403 AccessDenied); moto takes unsigned bucket requests. Object
    /// requests go through ferry's own S3 client (`S3Store`), which signs.
    pub fn request(
        &self,
        method: &str,
        path_and_query: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Response {
        self.try_request(method, path_and_query, headers, body)
            .unwrap_or_else(|e| {
                panic!(
                    "{}: {method} {path_and_query}: {e}\n{}",
                    self.peer,
                    self.log()
                )
            })
    }

    fn try_request(
        &self,
        method: &str,
        path_and_query: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> std::io::Result<Response> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut req = format!(
            "{method} {path_and_query} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: {}\r\nConnection: close\r\n",
            self.port,
            body.len()
        );
        for (n, v) in headers {
            req.push_str(&format!("{n}: {v}\r\n"));
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes())?;
        s.write_all(body)?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw)?;
        parse_response(&raw)
            .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {raw:?}")))
    }
}

/// Status, headers and body of a `Connection: close` HTTP/1.1 response (plain or
/// chunked body).
fn parse_response(raw: &[u8]) -> Option<Response> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = raw[end + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    if chunked {
        let (mut out, mut rest) = (Vec::new(), &body[..]);
        loop {
            let eol = rest.windows(2).position(|w| w == b"\r\n")?;
            let size_field = std::str::from_utf8(&rest[..eol]).ok()?;
            let size_hex = size_field.split(';').next()?.trim();
            let size = usize::from_str_radix(size_hex, 16).ok()?;
            rest = &rest[eol + 2..];
            if size == 0 {
                break;
            }
            out.extend_from_slice(rest.get(..size)?);
            rest = rest.get(size + 2..)?;
        }
        body = out;
    }
    Some(Response {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}
