//! ferry's vSphere client against a scripted vim25 server (HTTPS, in process): the
//! paths a real vCenter rarely shows on demand and vcsim cannot: property-collector
//! paging with tokens, a session expiring in the middle of paging or of a job,
//! refused re-logins, dropped connections, slow answers, 503s, oversize and hostile
//! answers, task failures (locks, crypto), task timeouts, QueryChangedDiskAreas
//! paging and CBT resets, NBD tickets, missing privileges.
//!
//! The server speaks real SOAP 1.1 / vim25 XML (shapes from the WSDL and govmomi);
//! every test scripts only what it needs and lets the defaults (service content,
//! login with a `vmware_soap_session` cookie, container views) do the rest.

use ferry::vsphere::error::{TransportKind, VsphereError};
use ferry::vsphere::xml::{parse, Element, Limits};
use ferry::vsphere::{Client, ClientConfig, MoRef, ServerTrust};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use zeroize::Zeroizing;

/// One request as the server saw it.
#[derive(Clone, Debug)]
struct Req {
    method: String,
    cookie: Option<String>,
    soap_action: Option<String>,
    body: Element,
    raw: String,
}

impl Req {
    fn arg(&self, name: &str) -> Option<String> {
        self.body.child(name).map(|e| e.text.clone())
    }
    fn has(&self, s: &str) -> bool {
        self.raw.contains(s)
    }
}

/// What the server does with a request.
enum Action {
    /// HTTP status + SOAP body.
    Reply(u16, String),
    /// Close the connection without answering.
    Drop,
    /// Wait, then act.
    Delay(Duration, Box<Action>),
    /// Raw bytes (a complete HTTP response written by the test).
    Raw(Vec<u8>),
}

type Script = Box<dyn Fn(&Req, &Server) -> Option<Action> + Send + Sync>;

/// Server state shared with scripts.
struct Server {
    sessions: Mutex<HashSet<String>>,
    logins: AtomicUsize,
    log: Mutex<Vec<Req>>,
    script: Script,
}

impl Server {
    fn calls(&self, method: &str) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.method == method)
            .count()
    }
    fn requests(&self, method: &str) -> Vec<Req> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.method == method)
            .cloned()
            .collect()
    }
    fn expire_sessions(&self) {
        self.sessions.lock().unwrap().clear();
    }
}

const NS: &str = r#"xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:xsd="http://www.w3.org/2001/XMLSchema" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance""#;

fn ok(method: &str, inner: &str) -> Action {
    Action::Reply(
        200,
        format!(
            r#"<?xml version="1.0" encoding="UTF-8"?><soapenv:Envelope {NS}><soapenv:Body><{method}Response xmlns="urn:vim25">{inner}</{method}Response></soapenv:Body></soapenv:Envelope>"#
        ),
    )
}

fn fault(ty: &str, msg: &str, detail: &str) -> Action {
    Action::Reply(
        500,
        format!(
            r#"<?xml version="1.0" encoding="UTF-8"?><soapenv:Envelope {NS}><soapenv:Body><soapenv:Fault><faultcode>ServerFaultCode</faultcode><faultstring>{msg}</faultstring><detail><{ty}Fault xmlns="urn:vim25" xsi:type="{ty}">{detail}</{ty}Fault></detail></soapenv:Fault></soapenv:Body></soapenv:Envelope>"#
        ),
    )
}

fn defaults(r: &Req, s: &Server) -> Action {
    match r.method.as_str() {
        "RetrieveServiceContent" => ok(
            "RetrieveServiceContent",
            r#"<returnval><rootFolder type="Folder">group-d1</rootFolder><propertyCollector type="PropertyCollector">propertyCollector</propertyCollector><viewManager type="ViewManager">ViewManager</viewManager><about><name>VMware vCenter Server</name><fullName>VMware vCenter Server 8.0.2 build-22617221</fullName><vendor>VMware, Inc.</vendor><version>8.0.2</version><build>22617221</build><apiType>VirtualCenter</apiType><apiVersion>8.0.2.0</apiVersion><instanceUuid>11111111-2222-3333-4444-555555555555</instanceUuid></about><sessionManager type="SessionManager">SessionManager</sessionManager></returnval>"#,
        ),
        "Login" => {
            let n = s.logins.fetch_add(1, Ordering::SeqCst) + 1;
            let key = format!("sess-{n}");
            s.sessions
                .lock()
                .unwrap()
                .insert(format!("vmware_soap_session=\"{key}\""));
            let body = match ok("Login", &format!("<returnval><key>{key}</key><userName>VSPHERE.LOCAL\\ferry</userName><fullName>ferry</fullName></returnval>")) {
                Action::Reply(_, b) => b,
                _ => unreachable!(),
            };
            Action::Raw(http_response(
                200,
                &body,
                Some(&format!(
                    "vmware_soap_session=\"{key}\"; Path=/; HttpOnly; Secure;"
                )),
            ))
        }
        "Logout" => ok("Logout", ""),
        "CreateContainerView" => ok(
            "CreateContainerView",
            r#"<returnval type="ContainerView">session[x]view-1</returnval>"#,
        ),
        "DestroyView" => ok("DestroyView", ""),
        m => fault(
            "MethodNotFound",
            &format!("ServiceInstance does not implement: {m}"),
            "",
        ),
    }
}

fn http_response(status: u16, body: &str, set_cookie: Option<&str>) -> Vec<u8> {
    let mut h = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: text/xml; charset=utf-8\r\nContent-Length: {}\r\n",
        if status == 200 { "OK" } else { "Error" },
        body.len()
    );
    if let Some(c) = set_cookie {
        h.push_str(&format!("Set-Cookie: {c}\r\n"));
    }
    h.push_str("\r\n");
    let mut v = h.into_bytes();
    v.extend_from_slice(body.as_bytes());
    v
}

struct Harness {
    server: Arc<Server>,
    port: u16,
    thumbprint: [u8; 32],
    /// Runs the server; dropped with the harness.
    _rt: tokio::runtime::Runtime,
}

async fn read_request<S: tokio::io::AsyncRead + Unpin>(
    s: &mut S,
) -> Option<(Vec<(String, String)>, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte).await.ok()? == 0 {
            return None;
        }
        buf.push(byte[0]);
        if buf.len() > 64 * 1024 {
            return None;
        }
    }
    let head = String::from_utf8_lossy(&buf).to_string();
    let headers: Vec<(String, String)> = head
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let len: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await.ok()?;
    Some((headers, body))
}

fn harness(script: impl Fn(&Req, &Server) -> Option<Action> + Send + Sync + 'static) -> Harness {
    let server = Arc::new(Server {
        sessions: Mutex::new(HashSet::new()),
        logins: AtomicUsize::new(0),
        log: Mutex::new(Vec::new()),
        script: Box::new(script),
    });
    let ca = ferry_mocks::pki::Ca::new("scripted vCenter CA").unwrap();
    let srv = ca.server(&["127.0.0.1"]).unwrap();
    let certs = CertificateDer::pem_slice_iter(srv.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let thumbprint = ferry::tls::sha256_fingerprint(certs[0].as_ref());
    let key = PrivateKeyDer::from_pem_slice(srv.key_pem.as_bytes()).unwrap();
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let srv2 = server.clone();
    rt.spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let server = srv2.clone();
            tokio::spawn(async move {
                let Ok(mut s) = acceptor.accept(tcp).await else { return };
                while let Some((headers, body)) = read_request(&mut s).await {
                    let raw = String::from_utf8_lossy(&body).to_string();
                    let env = parse(&body, &Limits::default()).expect("ferry sends well-formed XML");
                    let call = env.path(&["Body"]).and_then(|b| b.children.first()).cloned().expect("a SOAP call");
                    let h = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
                    let req = Req {
                        method: call.name.clone(),
                        cookie: h("cookie"),
                        soap_action: h("soapaction"),
                        body: call,
                        raw,
                    };
                    server.log.lock().unwrap().push(req.clone());
                    let authed = req.cookie.as_ref().is_some_and(|c| server.sessions.lock().unwrap().contains(c));
                    let mut action = match (server.script)(&req, &server) {
                        Some(a) => a,
                        None if !authed && !matches!(req.method.as_str(), "RetrieveServiceContent" | "Login") => {
                            fault("NotAuthenticated", "", "<object type=\"SessionManager\">SessionManager</object><privilegeId>System.View</privilegeId>")
                        }
                        None => defaults(&req, &server),
                    };
                    loop {
                        match action {
                            Action::Delay(d, next) => {
                                tokio::time::sleep(d).await;
                                action = *next;
                            }
                            Action::Drop => return,
                            Action::Reply(status, body) => {
                                if s.write_all(&http_response(status, &body, None)).await.is_err() {
                                    return;
                                }
                                break;
                            }
                            Action::Raw(bytes) => {
                                if s.write_all(&bytes).await.is_err() {
                                    return;
                                }
                                break;
                            }
                        }
                    }
                    let _ = s.flush().await;
                }
            });
        }
    });
    Harness {
        server,
        port,
        thumbprint,
        _rt: rt,
    }
}

impl Harness {
    fn config(&self) -> ClientConfig {
        let mut c = ClientConfig::new(
            &format!("https://127.0.0.1:{}/sdk", self.port),
            "VSPHERE.LOCAL\\ferry",
            Zeroizing::new("secret & <pw>".into()),
            ServerTrust::Thumbprint(self.thumbprint),
        );
        c.timeout = Duration::from_secs(5);
        c.backoff = Duration::from_millis(20);
        c.task_poll = Duration::from_millis(20);
        c.retries = 2;
        c
    }
    fn run<T>(&self, f: impl std::future::Future<Output = T>) -> T {
        // The client runs on its own runtime, the server on `self.rt`.
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    }
    fn connect(&self) -> Client {
        self.run(Client::connect(self.config())).expect("connect")
    }
}

fn vm_obj(i: usize) -> String {
    format!(
        r#"<objects><obj type="VirtualMachine">vm-{i}</obj><propSet><name>name</name><val xsi:type="xsd:string">vm{i:02}</val></propSet><propSet><name>config.hardware.device</name><val xsi:type="ArrayOfVirtualDevice"><VirtualDevice xsi:type="ParaVirtualSCSIController"><key>1000</key><deviceInfo><label>SCSI controller 0</label><summary>pvscsi</summary></deviceInfo><busNumber>0</busNumber><scsiCtlrUnitNumber>7</scsiCtlrUnitNumber></VirtualDevice><VirtualDevice xsi:type="VirtualDisk"><key>2000</key><deviceInfo><label>Hard disk 1</label><summary>x</summary></deviceInfo><backing xsi:type="VirtualDiskFlatVer2BackingInfo"><fileName>[ds1] vm{i:02}/vm{i:02}.vmdk</fileName><datastore type="Datastore">datastore-1</datastore><diskMode>persistent</diskMode><uuid>6000C29{i}-aaaa-bbbb-cccc-dddddddddddd</uuid><changeId>52 aa/{i}</changeId></backing><controllerKey>1000</controllerKey><unitNumber>0</unitNumber><capacityInKB>1024</capacityInKB><capacityInBytes>1048576</capacityInBytes></VirtualDevice></val></propSet><propSet><name>runtime.host</name><val type="HostSystem" xsi:type="ManagedObjectReference">host-1</val></propSet></objects>"#
    )
}

fn page(objs: std::ops::Range<usize>, token: Option<&str>) -> String {
    let mut s = String::from("<returnval>");
    if let Some(t) = token {
        s.push_str(&format!("<token>{t}</token>"));
    }
    for i in objs {
        s.push_str(&vm_obj(i));
    }
    s.push_str("</returnval>");
    s
}

/// Five VMs in three pages of two. Tokens belong to the session that got them, as
/// on vCenter: a token replayed on another session is refused.
fn paged_vms(r: &Req) -> Option<Action> {
    let sess = r.cookie.clone().unwrap_or_default().replace(['"', '='], "");
    match r.method.as_str() {
        "RetrievePropertiesEx" if r.has("<type>VirtualMachine</type>") => Some(ok(
            "RetrievePropertiesEx",
            &page(1..3, Some(&format!("tok-1.{sess}"))),
        )),
        "ContinueRetrievePropertiesEx" => {
            let t = r.arg("token").unwrap_or_default();
            if t == format!("tok-1.{sess}") {
                Some(ok(
                    "ContinueRetrievePropertiesEx",
                    &page(3..5, Some(&format!("tok-2.{sess}"))),
                ))
            } else if t == format!("tok-2.{sess}") {
                Some(ok("ContinueRetrievePropertiesEx", &page(5..6, None)))
            } else {
                Some(fault(
                    "InvalidArgument",
                    "A specified parameter was not correct: token",
                    "<invalidProperty>token</invalidProperty>",
                ))
            }
        }
        _ => None,
    }
}

fn authed(r: &Req, s: &Server) -> bool {
    r.cookie
        .as_ref()
        .is_some_and(|c| s.sessions.lock().unwrap().contains(c))
}

#[test]
fn paging_follows_tokens_and_sends_the_session_cookie() {
    let h = harness(|r, s| if authed(r, s) { paged_vms(r) } else { None });
    let c = h.connect();
    let vms = h.run(c.vms()).unwrap();
    assert_eq!(
        vms.iter().map(|v| v.name.as_str()).collect::<Vec<_>>(),
        ["vm01", "vm02", "vm03", "vm04", "vm05"]
    );
    assert_eq!(vms[2].disks[0].change_id.as_deref(), Some("52 aa/3"));
    let first = &h.server.requests("RetrievePropertiesEx")[0];
    assert_eq!(
        first.body.path(&["options", "maxObjects"]).unwrap().text,
        "100"
    );
    let tokens: Vec<_> = h
        .server
        .requests("ContinueRetrievePropertiesEx")
        .iter()
        .map(|r| r.arg("token").unwrap())
        .collect();
    assert_eq!(
        tokens,
        [
            "tok-1.vmware_soap_sessionsess-1",
            "tok-2.vmware_soap_sessionsess-1"
        ]
    );
    // Every call after Login carries the cookie and the negotiated SOAPAction.
    for r in h.server.log.lock().unwrap().iter().skip(2) {
        assert_eq!(
            r.cookie.as_deref(),
            Some("vmware_soap_session=\"sess-1\""),
            "{}",
            r.method
        );
        assert_eq!(r.soap_action.as_deref(), Some("\"urn:vim25/8.0.2.0\""));
    }
    // The password went escaped inside the Login body, and the view was destroyed.
    assert!(h.server.requests("Login")[0]
        .raw
        .contains("<password>secret &amp; &lt;pw&gt;</password>"));
    assert_eq!(h.server.calls("DestroyView"), 1);
    h.run(c.logout());
    assert_eq!(h.server.calls("Logout"), 1);
}

#[test]
fn a_session_expiring_mid_paging_is_renewed_and_the_collection_restarted() {
    let expired_once = Arc::new(AtomicUsize::new(0));
    let e2 = expired_once.clone();
    let h = harness(move |r, s| {
        if r.method == "ContinueRetrievePropertiesEx"
            && r.arg("token").is_some_and(|t| t.starts_with("tok-2"))
            && e2.fetch_add(1, Ordering::SeqCst) == 0
        {
            s.expire_sessions();
            return Some(fault("NotAuthenticated", "", ""));
        }
        if authed(r, s) {
            paged_vms(r)
        } else {
            None
        }
    });
    let c = h.connect();
    let vms = h.run(c.vms()).unwrap();
    assert_eq!(vms.len(), 5, "no VM lost or duplicated");
    assert_eq!(c.logins(), 2);
    assert_eq!(h.server.calls("Login"), 2);
    // The old token was replayed once on the new session and refused there, so the
    // whole collection started over with a new view.
    assert_eq!(h.server.calls("CreateContainerView"), 2);
    assert_eq!(h.server.calls("ContinueRetrievePropertiesEx"), 2 + 1 + 2);
}

#[test]
fn a_refused_re_login_and_a_persistent_not_authenticated_are_typed() {
    // Re-login refused: the password changed while ferry was running.
    let h = harness(|r, s| {
        if r.method == "Login" && s.logins.load(Ordering::SeqCst) >= 1 {
            return Some(fault(
                "InvalidLogin",
                "Cannot complete login due to an incorrect user name or password.",
                "",
            ));
        }
        None
    });
    let c = h.connect();
    h.server.expire_sessions();
    match h.run(c.vms()) {
        Err(e @ VsphereError::InvalidLogin { .. }) => {
            let s = e.to_string();
            assert!(
                s.contains("VSPHERE.LOCAL\\\\ferry") && s.contains("incorrect user name"),
                "{s}"
            );
        }
        other => panic!("{other:?}"),
    }
    // NotAuthenticated even on a fresh session (e.g. a role without System.View):
    // one re-login, then a typed error.
    let h = harness(|r, _| {
        (r.method == "CreateContainerView").then(|| fault("NotAuthenticated", "", ""))
    });
    let c = h.connect();
    match h.run(c.vms()) {
        Err(VsphereError::NotAuthenticated { doing, .. }) => {
            assert!(doing.contains("VM"), "{doing}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(h.server.calls("Login"), 2, "exactly one re-login");
}

#[test]
fn dropped_connections_and_503_are_retried_with_backoff() {
    let drops = Arc::new(AtomicUsize::new(0));
    let d2 = drops.clone();
    let busy = Arc::new(AtomicUsize::new(0));
    let b2 = busy.clone();
    let h = harness(move |r, s| match r.method.as_str() {
        "RetrieveServiceContent" if d2.fetch_add(1, Ordering::SeqCst) < 2 => Some(Action::Drop),
        "CreateSnapshot_Task" if authed(r, s) => {
            if b2.fetch_add(1, Ordering::SeqCst) == 0 {
                Some(Action::Reply(503, "<html>vpxd is restarting</html>".into()))
            } else {
                Some(ok(
                    "CreateSnapshot_Task",
                    r#"<returnval type="Task">task-1</returnval>"#,
                ))
            }
        }
        "RetrievePropertiesEx" if r.has("<type>Task</type>") => Some(ok(
            "RetrievePropertiesEx",
            r#"<returnval><objects><obj type="Task">task-1</obj><propSet><name>info</name><val xsi:type="TaskInfo"><key>task-1</key><task type="Task">task-1</task><state>success</state><result type="VirtualMachineSnapshot" xsi:type="ManagedObjectReference">snapshot-9</result></val></propSet></objects></returnval>"#,
        )),
        _ => None,
    });
    let c = h.connect();
    assert_eq!(
        h.server.calls("RetrieveServiceContent"),
        3,
        "two drops, then success"
    );
    let vm = test_vm(1);
    let snap = h
        .run(c.create_snapshot(&vm, "ferry-job-1", "ferry backup job-1", true))
        .unwrap();
    assert_eq!(snap, MoRef::new("VirtualMachineSnapshot", "snapshot-9"));
    assert_eq!(
        h.server.calls("CreateSnapshot_Task"),
        2,
        "503 means not processed: retried"
    );
    let req = &h.server.requests("CreateSnapshot_Task")[1];
    assert_eq!(req.arg("memory").as_deref(), Some("false"));
    assert_eq!(req.arg("quiesce").as_deref(), Some("true"));
    assert_eq!(req.arg("name").as_deref(), Some("ferry-job-1"));
}

fn test_vm(i: usize) -> ferry::vsphere::Vm {
    let e = parse(
        format!(
            "<r xmlns:xsi=\"http://www.w3.org/2001/XMLSchema-instance\">{}</r>",
            vm_obj(i)
        )
        .as_bytes(),
        &Limits::default(),
    )
    .unwrap();
    ferry::vsphere::Vm::decode(
        &ferry::vsphere::types::ObjectContent::decode(e.child("objects").unwrap()).unwrap(),
    )
    .unwrap()
}

#[test]
fn a_state_changing_call_is_not_replayed_after_a_broken_connection() {
    // vCenter may have taken the snapshot before the connection broke: repeating the
    // call could leave a second snapshot behind. ferry reports instead.
    let h = harness(|r, _| (r.method == "CreateSnapshot_Task").then_some(Action::Drop));
    let c = h.connect();
    match h.run(c.create_snapshot(&test_vm(1), "ferry-job-2", "ferry backup", false)) {
        Err(VsphereError::Transport {
            kind,
            attempts,
            detail,
            ..
        }) => {
            assert_eq!((kind, attempts), (TransportKind::Io, 1));
            assert!(detail.contains("not retried"), "{detail}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(h.server.calls("CreateSnapshot_Task"), 1);
}

#[test]
fn slow_and_absent_servers_time_out_with_bounded_retries() {
    let h = harness(|r, _| {
        (r.method == "RetrievePropertiesEx").then(|| {
            Action::Delay(
                Duration::from_secs(3),
                Box::new(ok("RetrievePropertiesEx", "")),
            )
        })
    });
    let mut cfg = h.config();
    cfg.timeout = Duration::from_millis(300);
    cfg.retries = 1;
    let c = h.run(Client::connect(cfg)).unwrap();
    match h.run(c.vms()) {
        Err(VsphereError::Transport {
            kind: TransportKind::Timeout,
            attempts: 2,
            vcenter,
            doing,
            ..
        }) => {
            assert!(
                vcenter.contains("127.0.0.1") && doing.contains("VM inventory"),
                "{doing}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(h.server.calls("RetrievePropertiesEx"), 2);

    // Nothing listening at all.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cfg = h.config();
    cfg.url = format!("https://127.0.0.1:{port}/sdk");
    match h.run(Client::connect(cfg)) {
        Err(
            e @ VsphereError::Transport {
                kind: TransportKind::Connect,
                attempts: 3,
                ..
            },
        ) => {
            assert!(e.to_string().contains("cannot connect"), "{e}")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn oversize_garbage_and_hostile_answers_are_refused() {
    let h = harness(|r, s| {
        if !authed(r, s) {
            return None;
        }
        let kind = if r.has("<type>HostSystem</type>") {
            "huge-length"
        } else if r.has("<type>Datastore</type>") {
            "huge-body"
        } else if r.has("<type>ClusterComputeResource</type>") {
            "laughs"
        } else {
            "html"
        };
        match (r.method.as_str(), kind) {
            ("RetrievePropertiesEx", "huge-length") => Some(Action::Raw(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\nContent-Length: 999999999999\r\n\r\n<".to_vec(),
            )),
            ("RetrievePropertiesEx", "huge-body") => Some(Action::Reply(200, format!("<a>{}</a>", "x".repeat(300_000)))),
            ("RetrievePropertiesEx", "laughs") => Some(Action::Reply(
                200,
                r#"<?xml version="1.0"?><!DOCTYPE l [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;"><!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;">]><soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/"><soapenv:Body><RetrievePropertiesExResponse><returnval>&c;</returnval></RetrievePropertiesExResponse></soapenv:Body></soapenv:Envelope>"#.into(),
            )),
            ("RetrievePropertiesEx", "html") => Some(Action::Reply(200, "<html><body>Welcome to vSphere</body></html>".into())),
            _ => None,
        }
    });
    let mut cfg = h.config();
    cfg.limits.max_bytes = 200_000;
    let c = h.run(Client::connect(cfg)).unwrap();
    assert!(
        matches!(
            h.run(c.hosts()),
            Err(VsphereError::TooLarge { limit: 200_000, .. })
        ),
        "declared length"
    );
    assert!(
        matches!(h.run(c.datastores()), Err(VsphereError::TooLarge { .. })),
        "streamed body"
    );
    match h.run(c.clusters()) {
        Err(VsphereError::Malformed { detail, .. }) => assert!(detail.contains("DTD"), "{detail}"),
        other => panic!("{other:?}"),
    }
    match h.run(c.vms()) {
        Err(VsphereError::Malformed { detail, .. }) => {
            assert!(detail.contains("Envelope"), "{detail}")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_wrong_url_is_explained() {
    let h = harness(|_, _| {
        Some(Action::Raw(http_response(
            404,
            "<html>Not Found</html>",
            None,
        )))
    });
    match h.run(Client::connect(h.config())) {
        Err(
            e @ VsphereError::Transport {
                kind: TransportKind::Http(404),
                ..
            },
        ) => {
            assert!(e.to_string().contains("/sdk"), "{e}")
        }
        other => panic!("{other:?}"),
    }
}

fn task_script(
    method: &'static str,
    info: impl Fn(usize) -> String + Send + Sync + 'static,
) -> impl Fn(&Req, &Server) -> Option<Action> + Send + Sync + 'static {
    let polls = AtomicUsize::new(0);
    move |r, s| {
        if !authed(r, s) {
            return None;
        }
        if r.method == method {
            return Some(ok(method, r#"<returnval type="Task">task-7</returnval>"#));
        }
        if r.method == "RetrievePropertiesEx" && r.has("<type>Task</type>") {
            let n = polls.fetch_add(1, Ordering::SeqCst);
            return Some(ok(
                "RetrievePropertiesEx",
                &format!(
                    r#"<returnval><objects><obj type="Task">task-7</obj><propSet><name>info</name><val xsi:type="TaskInfo"><key>task-7</key><task type="Task">task-7</task>{}</val></propSet></objects></returnval>"#,
                    info(n)
                ),
            ));
        }
        None
    }
}

#[test]
fn task_failures_map_to_typed_errors() {
    // A locked disk.
    let h = harness(task_script("RemoveSnapshot_Task", |n| {
        if n < 2 {
            "<state>running</state><progress>40</progress>".into()
        } else {
            r#"<state>error</state><error><fault xsi:type="FileLocked"><file>[ds1] vm01/vm01-000001.vmdk</file></fault><localizedMessage>Unable to access file [ds1] vm01/vm01-000001.vmdk since it is locked</localizedMessage></error>"#.into()
        }
    }));
    let c = h.connect();
    match h.run(c.remove_snapshot(&MoRef::new("VirtualMachineSnapshot", "snapshot-3"))) {
        Err(e @ VsphereError::FileLocked { .. }) => {
            assert!(
                e.to_string().contains("locked") && e.to_string().contains("snapshot-3"),
                "{e}"
            );
            assert!(e.is_transient());
        }
        other => panic!("{other:?}"),
    }
    assert!(
        h.server.calls("RetrievePropertiesEx") >= 3,
        "polled while running"
    );
    let rm = &h.server.requests("RemoveSnapshot_Task")[0];
    assert_eq!(
        (
            rm.arg("removeChildren").as_deref(),
            rm.arg("consolidate").as_deref()
        ),
        (Some("false"), Some("true"))
    );

    // Hot-add across key providers: the crypto fault of seed 004.
    let h = harness(move |r, s| {
        if authed(r, s)
            && r.method == "RetrievePropertiesEx"
            && r.has("<type>VirtualMachine</type>")
        {
            return Some(ok("RetrievePropertiesEx", &page(9..10, None)));
        }
        task_script("ReconfigVM_Task", |_| {
            r#"<state>error</state><error><fault xsi:type="GenericVmConfigFault"><reason>Cryptographic Error</reason></fault><localizedMessage>The disk is encrypted with key provider kms-a; the virtual machine uses kms-b.</localizedMessage></error>"#.into()
        })(r, s)
    });
    let c = h.connect();
    let disk = test_vm(3).disks.remove(0);
    match h.run(c.attach_disk(&MoRef::new("VirtualMachine", "vm-9"), &disk)) {
        Err(e @ VsphereError::Crypto { .. }) => {
            let s = e.to_string();
            assert!(
                s.contains("kms-a") && s.contains("same key provider") && s.contains("vm-9"),
                "{s}"
            );
        }
        other => panic!("{other:?}"),
    }
    let rc = &h.server.requests("ReconfigVM_Task")[0];
    assert!(!rc.raw.contains("fileOperation"));
    assert!(rc.raw.contains("<fileName>[ds1] vm03/vm03.vmdk</fileName>"));
    assert!(
        rc.raw.contains("<unitNumber>1</unitNumber>"),
        "unit 0 is taken on the proxy"
    );

    // Any other failure keeps its fault type and message.
    let h = harness(task_script("CreateSnapshot_Task", |_| {
        r#"<state>error</state><error><fault xsi:type="SnapshotFault"/><localizedMessage>An error occurred while saving the snapshot: msg.snapshot.error-QUIESCINGERROR</localizedMessage></error>"#.into()
    }));
    let c = h.connect();
    match h.run(c.create_snapshot(&test_vm(1), "ferry-q", "ferry backup", true)) {
        Err(VsphereError::TaskFailed {
            task,
            fault_type,
            message,
            ..
        }) => {
            assert_eq!(
                (task.as_str(), fault_type.as_str()),
                ("task-7", "SnapshotFault")
            );
            assert!(message.contains("QUIESCINGERROR"));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_task_that_never_ends_times_out_and_its_snapshot_is_found_by_the_sweep() {
    let h = harness(move |r, s| {
        if authed(r, s)
            && r.method == "RetrievePropertiesEx"
            && r.has("<pathSet>snapshot</pathSet>")
        {
            // What vCenter shows later: the slow snapshot did get created.
            return Some(ok(
                "RetrievePropertiesEx",
                r#"<returnval><objects><obj type="VirtualMachine">vm-1</obj><propSet><name>name</name><val xsi:type="xsd:string">vm01</val></propSet><propSet><name>snapshot</name><val xsi:type="VirtualMachineSnapshotInfo"><currentSnapshot type="VirtualMachineSnapshot">snapshot-5</currentSnapshot><rootSnapshotList><snapshot type="VirtualMachineSnapshot">snapshot-4</snapshot><vm type="VirtualMachine">vm-1</vm><name>daily</name><description></description><createTime>2026-11-22T00:00:00Z</createTime><state>poweredOn</state><quiesced>false</quiesced><childSnapshotList><snapshot type="VirtualMachineSnapshot">snapshot-5</snapshot><vm type="VirtualMachine">vm-1</vm><name>ferry-job-9</name><description>ferry backup job-9</description><createTime>2026-11-23T02:00:00Z</createTime><state>poweredOn</state><quiesced>false</quiesced></childSnapshotList></rootSnapshotList></val></propSet></objects></returnval>"#,
            ));
        }
        task_script("CreateSnapshot_Task", |_| "<state>running</state>".into())(r, s)
    });
    let mut cfg = h.config();
    cfg.task_timeout = Duration::from_millis(300);
    let c = h.run(Client::connect(cfg)).unwrap();
    match h.run(c.create_snapshot(&test_vm(1), "ferry-job-9", "ferry backup job-9", false)) {
        Err(e @ VsphereError::TaskTimeout { .. }) => assert!(
            e.to_string().contains("task-7") && e.to_string().contains("running"),
            "{e}"
        ),
        other => panic!("{other:?}"),
    }
    let left = h.run(c.ferry_snapshots()).unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(
        (
            left[0].name.as_str(),
            left[0].snapshot.value.as_str(),
            left[0].vm_name.as_str()
        ),
        ("ferry-job-9", "snapshot-5", "vm01")
    );
}

#[test]
fn changed_areas_page_to_the_capacity_and_a_reset_is_typed() {
    const GIB: u64 = 1 << 30;
    let h = harness(|r, s| {
        if !authed(r, s) || r.method != "QueryChangedDiskAreas" {
            return None;
        }
        let start: u64 = r.arg("startOffset").unwrap().parse().unwrap();
        let cid = r.arg("changeId").unwrap();
        if cid == "52 aa/1" {
            return Some(fault(
                "FileFault",
                "Error caused by file /vmfs/volumes/ds1/vm01/vm01-ctk.vmdk",
                "<file>/vmfs/volumes/ds1/vm01/vm01-ctk.vmdk</file>",
            ));
        }
        if cid == "stuck" {
            return Some(ok(
                "QueryChangedDiskAreas",
                &format!(
                    "<returnval><startOffset>{start}</startOffset><length>0</length></returnval>"
                ),
            ));
        }
        // Pages of 1 GiB; an area straddles the page boundary; the last page and its
        // last area run past the capacity (clipped).
        let len = if start >= 2 * GIB { 2 * GIB } else { GIB };
        let areas = match start / GIB {
            0 => format!("<changedArea><start>0</start><length>65536</length></changedArea><changedArea><start>{}</start><length>65536</length></changedArea>", GIB - 65536),
            1 => format!("<changedArea><start>{GIB}</start><length>4096</length></changedArea>"),
            _ => format!("<changedArea><start>{}</start><length>{}</length></changedArea>", 3 * GIB - 4096, 8192),
        };
        Some(ok("QueryChangedDiskAreas", &format!("<returnval><startOffset>{start}</startOffset><length>{len}</length>{areas}</returnval>")))
    });
    let c = h.connect();
    let vm = MoRef::new("VirtualMachine", "vm-1");
    let snap = MoRef::new("VirtualMachineSnapshot", "snapshot-2");
    let areas = h
        .run(c.changed_areas(&vm, &snap, 2000, 3 * GIB, "*"))
        .unwrap();
    let got: Vec<(u64, u64)> = areas.iter().map(|a| (a.start, a.length)).collect();
    assert_eq!(
        got,
        vec![
            (0, 65536),
            (GIB - 65536, 65536 + 4096),
            (3 * GIB - 4096, 4096)
        ]
    );
    let offsets: Vec<_> = h
        .server
        .requests("QueryChangedDiskAreas")
        .iter()
        .map(|r| r.arg("startOffset").unwrap())
        .collect();
    assert_eq!(offsets, ["0", &GIB.to_string(), &(2 * GIB).to_string()]);
    let q = &h.server.requests("QueryChangedDiskAreas")[0];
    assert_eq!(q.body.child("_this").unwrap().text, "vm-1");
    assert_eq!(
        q.body.child("snapshot").unwrap().type_attr.as_deref(),
        Some("VirtualMachineSnapshot")
    );
    assert_eq!(q.arg("deviceKey").as_deref(), Some("2000"));

    match h.run(c.changed_areas(&vm, &snap, 2000, 3 * GIB, "52 aa/1")) {
        Err(e @ VsphereError::CbtReset { .. }) => {
            assert!(e.is_cbt_reset() && e.to_string().contains("52 aa/1"), "{e}")
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        h.run(c.changed_areas(&vm, &snap, 2000, GIB, "stuck")),
        Err(VsphereError::Malformed { .. })
    ));
}

#[test]
fn nbd_tickets_follow_the_contract() {
    let h = harness(|r, s| {
        (authed(r, s) && r.method == "AcquireGenericServiceTicket").then(|| {
            ok("AcquireGenericServiceTicket", "<returnval><id>ticket-abc</id><hostName>esx-1.example</hostName><sslThumbprint>AA:BB</sslThumbprint></returnval>")
        })
    });
    let c = h.connect();
    let t = h
        .run(c.nbd_ticket(
            &MoRef::new("HostSystem", "host-1"),
            &MoRef::new("VirtualMachine", "vm-1"),
            &MoRef::new("VirtualMachineSnapshot", "snapshot-2"),
            2000,
        ))
        .unwrap();
    assert_eq!(t.nbds_url(10809), "nbds://esx-1.example:10809/ticket-abc");
    let r = &h.server.requests("AcquireGenericServiceTicket")[0];
    let spec = r.body.child("spec").unwrap();
    assert_eq!(
        spec.xsi_type.as_deref(),
        Some("SessionManagerHttpServiceRequestSpec")
    );
    assert_eq!(spec.child_text("method"), Some("httpGet"));
    assert_eq!(
        spec.child_text("url"),
        Some("nbd://host-1/vm-1/snapshot-2/2000")
    );
    assert_eq!(r.body.child("_this").unwrap().text, "SessionManager");
}

#[test]
fn a_missing_privilege_is_named() {
    let h = harness(|r, s| {
        (authed(r, s) && r.method == "RetrievePropertiesEx").then(|| {
            ok(
                "RetrievePropertiesEx",
                r#"<returnval><objects><obj type="VirtualMachine">vm-1</obj><propSet><name>name</name><val xsi:type="xsd:string">vm01</val></propSet><missingSet><path>config.hardware.device</path><fault><fault xsi:type="NoPermission"><object type="VirtualMachine">vm-1</object><privilegeId>System.Read</privilegeId></fault><localizedMessage>Permission to perform this operation was denied.</localizedMessage></fault></missingSet></objects></returnval>"#,
            )
        })
    });
    let c = h.connect();
    match h.run(c.vms()) {
        Err(e @ VsphereError::NoPermission { .. }) => {
            let s = e.to_string();
            assert!(
                s.contains("System.Read")
                    && s.contains("config.hardware.device")
                    && s.contains("docs/vsphere.md"),
                "{s}"
            )
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn ca_pinning_and_thumbprint_pinning_work_and_mismatches_are_tls_errors() {
    let h = harness(|_, _| None);
    // The thumbprint as `ferry vsphere thumbprint` reads it is the one pinned.
    let cert = h
        .run(ferry::tls::fetch_server_certificate(
            "127.0.0.1",
            h.port,
            Duration::from_secs(5),
        ))
        .unwrap();
    assert!(cert.handshake_error.is_none());
    assert_eq!(
        ferry::tls::parse_sha256_thumbprint(&cert.sha256).unwrap(),
        h.thumbprint
    );
    let mut cfg = h.config();
    let mut other = h.thumbprint;
    other[0] ^= 1;
    cfg.trust = ServerTrust::Thumbprint(other);
    match h.run(Client::connect(cfg)) {
        Err(e @ VsphereError::Tls { .. }) => assert!(e.to_string().contains(&cert.sha256), "{e}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        h.server.calls("RetrieveServiceContent"),
        0,
        "nothing sent to an unverified server"
    );
}
