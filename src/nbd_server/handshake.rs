//! The handshake: greeting, client flags, then option haggling until the client
//! picks an export (OPT_GO / OPT_EXPORT_NAME), aborts, or breaks the protocol.
//!
//! [`Session::option`] is the pure state machine (one option in, the reply bytes
//! and what to do next out); [`negotiate`] drives it over a stream and upgrades the
//! stream to TLS on STARTTLS. Options before TLS in TLS-required mode get
//! NBD_REP_ERR_TLS_REQD; unknown options NBD_REP_ERR_UNSUP; malformed ones
//! NBD_REP_ERR_INVALID. Only a broken framing (bad magic, oversize option, unknown
//! client flags, too many options) closes the connection.

use super::{BoxedIo, ExportBackend, ExportProvider, NbdServer, ServeError};
use crate::transport::nbd::proto::{self, ProtoError};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Options one client may send before it must have picked an export.
pub const MAX_OPTIONS: usize = 256;

/// Context id the server hands out for `base:allocation`.
pub const ALLOCATION_CONTEXT_ID: u32 = 1;

/// What transmission needs to know about the chosen export.
#[derive(Clone)]
pub struct Export {
    /// Name the client asked for.
    pub name: String,
    /// The disk.
    pub backend: Arc<dyn ExportBackend>,
    /// Size, fixed for the connection.
    pub size: u64,
    /// Transmission flags sent to the client.
    pub flags: u16,
    /// Structured replies negotiated.
    pub structured: bool,
    /// `base:allocation` selected for this export (its context id).
    pub allocation_ctx: Option<u32>,
    /// Largest read or write payload.
    pub max_payload: u32,
    /// The backend takes writes (`NBD_FLAG_READ_ONLY` was not sent).
    pub writable: bool,
}

/// What the driver does after an option.
pub enum Step {
    /// Send the bytes, read the next option.
    Reply(Vec<u8>),
    /// Send the bytes (an ACK), then run the TLS handshake.
    StartTls(Vec<u8>),
    /// Send the bytes, enter transmission with this export.
    Go(Vec<u8>, Box<Export>),
    /// Send the bytes (possibly none), close the connection.
    Close(Vec<u8>),
}

impl std::fmt::Debug for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Step::Reply(b) => write!(f, "Reply({} bytes)", b.len()),
            Step::StartTls(_) => f.write_str("StartTls"),
            Step::Go(_, e) => write!(f, "Go({:?})", e.name),
            Step::Close(b) => write!(f, "Close({} bytes)", b.len()),
        }
    }
}

/// Negotiation state of one connection.
#[derive(Clone, Debug)]
pub struct Session {
    tls_required: bool,
    tls_active: bool,
    /// The client set NBD_FLAG_C_NO_ZEROES.
    no_zeroes: bool,
    structured: bool,
    /// (export name, base:allocation selected) from the last SET_META_CONTEXT.
    meta: Option<(String, bool)>,
    max_payload: u32,
}

fn err(option: u32, kind: u32, msg: &str) -> Vec<u8> {
    proto::option_reply(option, kind, proto::bounded_str(msg).as_bytes())
}

impl Session {
    /// A session after the greeting; `tls_required` = the server has TLS and
    /// insists on it.
    pub fn new(tls_required: bool, client_flags: u32, max_payload: u32) -> Self {
        Session {
            tls_required,
            tls_active: false,
            no_zeroes: client_flags & proto::CFLAG_NO_ZEROES != 0,
            structured: false,
            meta: None,
            max_payload,
        }
    }

    /// TLS is now up (after a successful STARTTLS handshake): options negotiated
    /// before it are forgotten, as the spec requires.
    pub fn tls_started(&mut self) {
        self.tls_active = true;
        self.structured = false;
        self.meta = None;
    }

    /// Transmission flags: read-only exports say so; writable ones advertise FUA
    /// and WRITE_ZEROES instead. Both take FLUSH and several connections (a
    /// writable backend's flush covers every connection, see
    /// [`ExportBackend::flush`]).
    fn flags(&self, writable: bool) -> u16 {
        let mut f = proto::TFLAG_HAS_FLAGS | proto::TFLAG_SEND_FLUSH | proto::TFLAG_CAN_MULTI_CONN;
        if writable {
            f |= proto::TFLAG_SEND_FUA | proto::TFLAG_SEND_WRITE_ZEROES;
        } else {
            f |= proto::TFLAG_READ_ONLY;
        }
        if self.structured {
            f |= proto::TFLAG_SEND_DF;
        }
        f
    }

    fn export(&self, name: &str, backend: Arc<dyn ExportBackend>) -> Export {
        let allocation_ctx = match &self.meta {
            Some((n, true)) if n == name && self.structured => Some(ALLOCATION_CONTEXT_ID),
            _ => None,
        };
        let writable = backend.writable();
        Export {
            name: name.to_string(),
            size: backend.size(),
            backend,
            flags: self.flags(writable),
            structured: self.structured,
            allocation_ctx,
            max_payload: self.max_payload,
            writable,
        }
    }

    /// Handle one option with its data. May call `provider` (blocking).
    pub fn option(&mut self, opt: u32, data: &[u8], provider: &dyn ExportProvider) -> Step {
        use proto::*;
        let tls_missing = self.tls_required && !self.tls_active;
        match opt {
            OPT_ABORT => return Step::Close(option_reply(opt, REP_ACK, &[])),
            OPT_STARTTLS => {
                return if !data.is_empty() {
                    Step::Reply(err(opt, REP_ERR_INVALID, "STARTTLS takes no data"))
                } else if self.tls_active {
                    Step::Reply(err(opt, REP_ERR_INVALID, "TLS is already active"))
                } else if !self.tls_required {
                    Step::Reply(err(
                        opt,
                        REP_ERR_POLICY,
                        "this server is not configured for TLS",
                    ))
                } else {
                    Step::StartTls(option_reply(opt, REP_ACK, &[]))
                };
            }
            // Cannot be answered with an error: without TLS, or for an unknown export,
            // the only permitted answer is to close.
            OPT_EXPORT_NAME => {
                if tls_missing {
                    return Step::Close(Vec::new());
                }
                let Ok(name) = std::str::from_utf8(data) else {
                    return Step::Close(Vec::new());
                };
                if name.len() > MAX_STRING {
                    return Step::Close(Vec::new());
                }
                return match provider.open(name) {
                    Ok(b) => {
                        let e = self.export(name, b);
                        Step::Go(
                            export_name_reply(e.size, e.flags, self.no_zeroes),
                            Box::new(e),
                        )
                    }
                    Err(refused) => {
                        tracing::info!(export = name, reason = %refused, "NBD export refused");
                        Step::Close(Vec::new())
                    }
                };
            }
            _ => {}
        }
        if tls_missing {
            return Step::Reply(err(
                opt,
                REP_ERR_TLS_REQD,
                "TLS is required: send NBD_OPT_STARTTLS first",
            ));
        }
        match opt {
            OPT_LIST => {
                if !data.is_empty() {
                    return Step::Reply(err(opt, REP_ERR_INVALID, "OPT_LIST takes no data"));
                }
                match provider.list() {
                    None => Step::Reply(err(
                        opt,
                        REP_ERR_POLICY,
                        "export listing is not allowed on this server",
                    )),
                    Some(names) => {
                        let mut out = Vec::new();
                        for n in names.iter().take(1024) {
                            out.extend(option_reply(opt, REP_SERVER, &rep_server(n)));
                        }
                        out.extend(option_reply(opt, REP_ACK, &[]));
                        Step::Reply(out)
                    }
                }
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    return Step::Reply(err(
                        opt,
                        REP_ERR_INVALID,
                        "OPT_STRUCTURED_REPLY takes no data",
                    ));
                }
                self.structured = true;
                Step::Reply(option_reply(opt, REP_ACK, &[]))
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let set = opt == OPT_SET_META_CONTEXT;
                if set {
                    // Replaced even when the option fails.
                    self.meta = None;
                }
                if !self.structured {
                    return Step::Reply(err(
                        opt,
                        REP_ERR_INVALID,
                        "negotiate structured replies first",
                    ));
                }
                let req = match parse_meta_request(data) {
                    Ok(r) => r,
                    Err(e) => return Step::Reply(err(opt, REP_ERR_INVALID, &e.to_string())),
                };
                let selected = if set {
                    req.queries.iter().any(|q| q == BASE_ALLOCATION)
                } else {
                    req.queries.is_empty()
                        || req
                            .queries
                            .iter()
                            .any(|q| q == BASE_ALLOCATION || q == "base:")
                };
                let mut out = Vec::new();
                if selected {
                    let id = if set { ALLOCATION_CONTEXT_ID } else { 0 };
                    out.extend(option_reply(
                        opt,
                        REP_META_CONTEXT,
                        &rep_meta_context(id, BASE_ALLOCATION),
                    ));
                }
                out.extend(option_reply(opt, REP_ACK, &[]));
                if set {
                    self.meta = Some((req.export, selected));
                }
                Step::Reply(out)
            }
            OPT_INFO | OPT_GO => {
                let req = match parse_go(data) {
                    Ok(r) => r,
                    Err(e) => return Step::Reply(err(opt, REP_ERR_INVALID, &e.to_string())),
                };
                let backend = match provider.open(&req.name) {
                    Ok(b) => b,
                    Err(refused) => {
                        tracing::info!(export = %req.name, reason = %refused, "NBD export refused");
                        return Step::Reply(err(
                            opt,
                            REP_ERR_UNKNOWN,
                            &format!("export {:?}: {refused}", req.name),
                        ));
                    }
                };
                let e = self.export(&req.name, backend);
                let mut out = option_reply(opt, REP_INFO, &info_export(e.size, e.flags));
                for (i, kind) in req.infos.iter().enumerate() {
                    if req.infos[..i].contains(kind) {
                        continue;
                    }
                    match *kind {
                        INFO_NAME => {
                            out.extend(option_reply(
                                opt,
                                REP_INFO,
                                &info_string(INFO_NAME, &req.name),
                            ));
                        }
                        INFO_BLOCK_SIZE => {
                            out.extend(option_reply(
                                opt,
                                REP_INFO,
                                &info_block_size(1, 4096, self.max_payload),
                            ));
                        }
                        _ => {}
                    }
                }
                out.extend(option_reply(opt, REP_ACK, &[]));
                if opt == OPT_GO {
                    Step::Go(out, Box::new(e))
                } else {
                    Step::Reply(out)
                }
            }
            _ => Step::Reply(err(
                opt,
                REP_ERR_UNSUP,
                &format!("option {opt} is not supported"),
            )),
        }
    }
}

async fn send(io: &mut BoxedIo, b: &[u8]) -> Result<(), ServeError> {
    io.write_all(b).await?;
    io.flush().await?;
    Ok(())
}

/// Run the handshake on `io`. `Ok(None)`: the client aborted or was refused and the
/// connection is finished; `Ok(Some)`: transmission starts on the returned stream.
pub async fn negotiate(
    server: &Arc<NbdServer>,
    mut io: BoxedIo,
) -> Result<Option<(BoxedIo, Export)>, ServeError> {
    send(
        &mut io,
        &proto::greeting(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES),
    )
    .await?;
    let mut cf = [0u8; 4];
    io.read_exact(&mut cf).await?;
    let cflags = u32::from_be_bytes(cf);
    if cflags & !(proto::CFLAG_FIXED_NEWSTYLE | proto::CFLAG_NO_ZEROES) != 0 {
        return Err(ProtoError::Invalid(format!("unknown client flags {cflags:#x}")).into());
    }
    let tls_required = server.acceptor.is_some();
    if tls_required && cflags & proto::CFLAG_FIXED_NEWSTYLE == 0 {
        // TLS needs fixed newstyle; such a client can only ever be refused.
        return Err(
            ProtoError::Unsupported("fixed newstyle from the client (TLS is required)").into(),
        );
    }
    let mut session = Session::new(tls_required, cflags, server.config.max_payload);
    for _ in 0..MAX_OPTIONS {
        let mut h = [0u8; 16];
        io.read_exact(&mut h).await?;
        let oh = proto::parse_option_header(&h)?;
        if oh.len > proto::MAX_OPTION_DATA {
            return Err(ProtoError::TooLarge {
                what: "option data",
                len: oh.len as u64,
                max: proto::MAX_OPTION_DATA as u64,
            }
            .into());
        }
        let mut data = vec![0u8; oh.len as usize];
        io.read_exact(&mut data).await?;
        let provider = server.provider.clone();
        // The provider may block (ticket lookup, opening a restore point).
        let (s, step) = tokio::task::spawn_blocking(move || {
            let step = session.option(oh.option, &data, provider.as_ref());
            (session, step)
        })
        .await
        .map_err(|e| std::io::Error::other(format!("option handler failed: {e}")))?;
        session = s;
        match step {
            Step::Reply(b) => send(&mut io, &b).await?,
            Step::StartTls(b) => {
                send(&mut io, &b).await?;
                let acceptor = server
                    .acceptor
                    .clone()
                    .ok_or_else(|| std::io::Error::other("STARTTLS without TLS settings"))?;
                io = Box::new(acceptor.accept(io).await?);
                session.tls_started();
            }
            Step::Go(b, e) => {
                send(&mut io, &b).await?;
                return Ok(Some((io, *e)));
            }
            Step::Close(b) => {
                if !b.is_empty() {
                    send(&mut io, &b).await?;
                }
                let _ = io.shutdown().await;
                return Ok(None);
            }
        }
    }
    Err(ProtoError::Invalid(format!(
        "more than {MAX_OPTIONS} options without choosing an export"
    ))
    .into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd_server::ExportRefused;
    use crate::transport::nbd::proto::*;

    struct Mem(Vec<u8>);
    impl ExportBackend for Mem {
        fn size(&self) -> u64 {
            self.0.len() as u64
        }
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
            buf.copy_from_slice(&self.0[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
    }
    struct One;
    impl ExportProvider for One {
        fn open(&self, name: &str) -> Result<Arc<dyn ExportBackend>, ExportRefused> {
            if name == "disk" || name.is_empty() {
                Ok(Arc::new(Mem(vec![7; 4096])))
            } else {
                Err(ExportRefused(format!("no export named {name:?}")))
            }
        }
        fn list(&self) -> Option<Vec<String>> {
            Some(vec!["disk".into()])
        }
    }

    /// Reply types in a reply byte string.
    fn replies(b: &[u8]) -> Vec<(u32, Vec<u8>)> {
        let mut out = Vec::new();
        let mut at = 0;
        while at < b.len() {
            let h = parse_option_reply(b[at..at + 20].try_into().unwrap()).unwrap();
            out.push((h.reply, b[at + 20..at + 20 + h.len as usize].to_vec()));
            at += 20 + h.len as usize;
        }
        out
    }

    fn reply(step: Step) -> Vec<(u32, Vec<u8>)> {
        match step {
            Step::Reply(b) => replies(&b),
            other => panic!("expected a reply, got {other:?}"),
        }
    }

    #[test]
    fn tls_required_refuses_everything_but_starttls_and_abort() {
        let mut s = Session::new(true, CFLAG_FIXED_NEWSTYLE, 1 << 25);
        for opt in [
            OPT_GO,
            OPT_INFO,
            OPT_LIST,
            OPT_STRUCTURED_REPLY,
            OPT_SET_META_CONTEXT,
            99,
        ] {
            let r = reply(s.option(opt, &go_data("disk"), &One));
            assert_eq!(r[0].0, REP_ERR_TLS_REQD, "option {opt}");
        }
        // EXPORT_NAME cannot be refused with an error: the connection closes.
        assert!(matches!(s.option(OPT_EXPORT_NAME, b"disk", &One), Step::Close(b) if b.is_empty()));
        assert!(matches!(
            s.option(OPT_STARTTLS, &[], &One),
            Step::StartTls(_)
        ));
        s.tls_started();
        assert_eq!(
            reply(s.option(OPT_STARTTLS, &[], &One))[0].0,
            REP_ERR_INVALID
        );
        assert!(matches!(
            s.option(OPT_GO, &go_data("disk"), &One),
            Step::Go(..)
        ));
        assert!(matches!(s.option(OPT_ABORT, &[], &One), Step::Close(_)));
    }

    #[test]
    fn starttls_forgets_earlier_negotiation_and_clear_text_mode_refuses_it() {
        let mut s = Session::new(false, CFLAG_FIXED_NEWSTYLE, 1 << 25);
        assert_eq!(
            reply(s.option(OPT_STARTTLS, &[], &One))[0].0,
            REP_ERR_POLICY
        );
        assert_eq!(
            reply(s.option(OPT_STRUCTURED_REPLY, &[], &One))[0].0,
            REP_ACK
        );
        s.tls_started();
        let Step::Go(_, e) = s.option(OPT_GO, &go_data("disk"), &One) else {
            panic!()
        };
        assert!(!e.structured);
    }

    #[test]
    fn go_info_list_and_meta_contexts() {
        let mut s = Session::new(false, CFLAG_FIXED_NEWSTYLE, 1 << 25);
        // Meta contexts need structured replies first.
        let m = meta_context_data("disk", &[BASE_ALLOCATION]);
        assert_eq!(
            reply(s.option(OPT_SET_META_CONTEXT, &m, &One))[0].0,
            REP_ERR_INVALID
        );
        assert_eq!(
            reply(s.option(OPT_STRUCTURED_REPLY, &[], &One))[0].0,
            REP_ACK
        );
        let r = reply(s.option(OPT_LIST_META_CONTEXT, &meta_context_data("disk", &[]), &One));
        assert_eq!(r[0].0, REP_META_CONTEXT);
        assert_eq!(
            parse_meta_context(&r[0].1).unwrap(),
            (0, BASE_ALLOCATION.into())
        );
        let r = reply(s.option(OPT_SET_META_CONTEXT, &m, &One));
        assert_eq!(
            (r[0].0, parse_meta_context(&r[0].1).unwrap().0, r[1].0),
            (REP_META_CONTEXT, ALLOCATION_CONTEXT_ID, REP_ACK)
        );
        // Unknown contexts are ignored, not errors.
        let r = reply(s.option(
            OPT_LIST_META_CONTEXT,
            &meta_context_data("disk", &["qemu:x"]),
            &One,
        ));
        assert_eq!(r.len(), 1);
        let r = reply(s.option(OPT_LIST, &[], &One));
        assert_eq!((r[0].0, r.len()), (REP_SERVER, 2));
        assert_eq!(reply(s.option(OPT_LIST, &[1], &One))[0].0, REP_ERR_INVALID);
        // INFO describes without entering transmission; unknown names are refused cleanly.
        let r = reply(s.option(OPT_INFO, &go_data("disk"), &One));
        assert_eq!(
            parse_info(&r[0].1).unwrap(),
            Info::Export {
                size: 4096,
                flags: 0x187
            }
        );
        assert!(
            matches!(parse_info(&r[1].1).unwrap(), Info::BlockSize { max, .. } if max == 1 << 25)
        );
        let r = reply(s.option(OPT_GO, &go_data("nope"), &One));
        assert_eq!(r[0].0, REP_ERR_UNKNOWN);
        assert!(String::from_utf8_lossy(&r[0].1).contains("no export named"));
        assert_eq!(reply(s.option(OPT_GO, b"junk", &One))[0].0, REP_ERR_INVALID);
        assert_eq!(reply(s.option(77, &[], &One))[0].0, REP_ERR_UNSUP);
        let Step::Go(_, e) = s.option(OPT_GO, &go_data("disk"), &One) else {
            panic!()
        };
        assert_eq!(
            (e.structured, e.allocation_ctx),
            (true, Some(ALLOCATION_CONTEXT_ID))
        );
        // Contexts chosen for another export do not apply.
        let Step::Go(_, e) = s.option(OPT_GO, &go_data(""), &One) else {
            panic!()
        };
        assert_eq!(e.allocation_ctx, None);
    }

    #[test]
    fn export_name_replies_with_or_without_zeroes() {
        let mut s = Session::new(false, CFLAG_FIXED_NEWSTYLE | CFLAG_NO_ZEROES, 1 << 25);
        let Step::Go(b, _) = s.option(OPT_EXPORT_NAME, b"disk", &One) else {
            panic!()
        };
        assert_eq!(b.len(), 10);
        let mut s = Session::new(false, CFLAG_FIXED_NEWSTYLE, 1 << 25);
        let Step::Go(b, _) = s.option(OPT_EXPORT_NAME, b"", &One) else {
            panic!()
        };
        assert_eq!(b.len(), 134);
        assert!(matches!(
            s.option(OPT_EXPORT_NAME, b"nope", &One),
            Step::Close(_)
        ));
    }
}
