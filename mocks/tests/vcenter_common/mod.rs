//! A minimal vim25 SOAP client for the mock vCenter's Rust tests (reqwest over
//! rustls, CA pinned with ferry's own TLS config). Test support only.

#![allow(dead_code)]

use ferry_mocks::vcenter::codec::{parse, Element};
use ferry_mocks::vcenter::VcenterMock;
use std::time::{Duration, Instant};

/// A SOAP fault or transport error as the tests see it.
#[derive(Debug)]
pub struct SoapFault {
    /// HTTP status (0 for a transport error).
    pub status: u16,
    /// Fault type (`FileFault`...), or `transport`.
    pub ty: String,
    /// faultstring.
    pub message: String,
}

/// A session with the mock.
pub struct Soap {
    rt: tokio::runtime::Runtime,
    http: reqwest::Client,
    pub base: String,
    pub cookie: Option<String>,
    user: String,
    password: String,
    token: String,
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// `<name type="T">id</name>`.
pub fn moref(name: &str, ty: &str, id: &str) -> String {
    format!("<{name} type=\"{ty}\">{}</{name}>", escape(id))
}

/// `<name>text</name>`.
pub fn el(name: &str, text: &str) -> String {
    format!("<{name}>{}</{name}>", escape(text))
}

impl Soap {
    /// A client for `mock` (not logged in).
    pub fn new(mock: &VcenterMock) -> Soap {
        Soap::connect(
            &mock.addr().to_string(),
            mock.ca_path(),
            mock.user(),
            mock.password(),
            mock.admin_token(),
        )
    }

    /// A client for a mock at `addr` (`host:port`) whose certificate chains to `ca`.
    pub fn connect(
        addr: &str,
        ca: &std::path::Path,
        user: &str,
        password: &str,
        token: &str,
    ) -> Soap {
        let tls = ferry::tls::client_config(ca, None).unwrap();
        let http = reqwest::Client::builder()
            .use_preconfigured_tls((*tls).clone())
            .build()
            .unwrap();
        Soap {
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
            http,
            base: format!("https://{addr}"),
            cookie: None,
            user: user.to_string(),
            password: password.to_string(),
            token: token.to_string(),
        }
    }

    /// POST raw bytes to `/sdk`: (status, body).
    pub fn raw(&self, body: Vec<u8>) -> Result<(u16, String), reqwest::Error> {
        let mut req = self
            .http
            .post(format!("{}/sdk", self.base))
            .header("Content-Type", "text/xml; charset=utf-8")
            .header("SOAPAction", "urn:vim25/8.0.3.0")
            .body(body);
        if let Some(c) = &self.cookie {
            req = req.header("Cookie", format!("vmware_soap_session=\"{c}\""));
        }
        self.rt.block_on(async {
            let r = req.send().await?;
            let status = r.status().as_u16();
            if let Some(sc) = r.headers().get("set-cookie") {
                let v = sc.to_str().unwrap_or("");
                assert!(v.starts_with("vmware_soap_session=\""), "{v}");
            }
            Ok((status, r.text().await?))
        })
    }

    /// Call `method` on `(type, id)` with argument XML; the `<methodResponse>` element.
    pub fn call(
        &mut self,
        method: &str,
        this: (&str, &str),
        args: &str,
    ) -> Result<Element, SoapFault> {
        let body = format!(
            r#"<?xml version="1.0" encoding="UTF-8"?><soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xmlns:xsd="http://www.w3.org/2001/XMLSchema"><soapenv:Body><{method} xmlns="urn:vim25">{}{args}</{method}></soapenv:Body></soapenv:Envelope>"#,
            moref("_this", this.0, this.1)
        );
        let mut req = self
            .http
            .post(format!("{}/sdk", self.base))
            .header("Content-Type", "text/xml; charset=utf-8")
            .header("SOAPAction", "urn:vim25/8.0.3.0")
            .body(body);
        if let Some(c) = &self.cookie {
            req = req.header("Cookie", format!("vmware_soap_session=\"{c}\""));
        }
        let res = self.rt.block_on(async {
            let r = req.send().await?;
            let status = r.status().as_u16();
            let cookie = r
                .headers()
                .get("set-cookie")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            Ok::<_, reqwest::Error>((status, cookie, r.text().await?))
        });
        let (status, cookie, text) = res.map_err(|e| SoapFault {
            status: 0,
            ty: "transport".into(),
            message: format!("{e:?}"),
        })?;
        if let Some(c) = cookie {
            self.cookie = c
                .split(';')
                .next()
                .and_then(|kv| kv.split_once('='))
                .map(|(_, v)| v.trim_matches('"').to_string());
        }
        let root =
            parse(text.as_bytes()).unwrap_or_else(|e| panic!("response is not XML ({e}): {text}"));
        let body = root.child("Body").expect("soap Body");
        let first = body.children.first().expect("Body content").clone();
        if first.name == "Fault" {
            let detail = first.child("detail").and_then(|d| d.children.first());
            return Err(SoapFault {
                status,
                ty: detail
                    .and_then(|d| d.xsi_type())
                    .unwrap_or("unknown")
                    .to_string(),
                message: first.text_of("faultstring").unwrap_or("").to_string(),
            });
        }
        assert_eq!(status, 200, "{text}");
        assert_eq!(first.name, format!("{method}Response"));
        Ok(first)
    }

    /// Log in with the scenario's credentials.
    pub fn login(&mut self) {
        let (u, p) = (self.user.clone(), self.password.clone());
        self.call(
            "Login",
            ("SessionManager", "SessionManager"),
            &(el("userName", &u) + &el("password", &p)),
        )
        .unwrap();
        assert!(self.cookie.is_some());
    }

    /// `Fetch(prop)` on an object: the returned value element, if set.
    pub fn fetch(&mut self, this: (&str, &str), prop: &str) -> Result<Option<Element>, SoapFault> {
        let r = self.call("Fetch", this, &el("prop", prop))?;
        Ok(r.child("returnval").cloned())
    }

    /// Start a `*_Task` method and wait for it: `Ok(result element)` or the task's fault
    /// `(type, message)`.
    pub fn task(
        &mut self,
        method: &str,
        this: (&str, &str),
        args: &str,
    ) -> Result<Option<Element>, (String, String)> {
        let r = self
            .call(method, this, args)
            .map_err(|f| (f.ty, f.message))?;
        let task = r.child("returnval").unwrap().text.clone();
        self.wait(&task)
    }

    /// Poll `Task.info` until it ends.
    pub fn wait(&mut self, task: &str) -> Result<Option<Element>, (String, String)> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let info = self.fetch(("Task", task), "info").unwrap().unwrap();
            match info.text_of("state") {
                Some("success") => return Ok(info.child("result").cloned()),
                Some("error") => {
                    let e = info.child("error").unwrap();
                    let f = e.child("fault").unwrap();
                    return Err((
                        f.xsi_type().unwrap_or("").to_string(),
                        e.text_of("localizedMessage").unwrap_or("").to_string(),
                    ));
                }
                _ => {
                    assert!(Instant::now() < deadline, "task {task} did not finish");
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }

    /// Create a snapshot of VM `vm_id`; its moref id.
    pub fn snapshot(&mut self, vm_id: &str, name: &str) -> String {
        let args = el("name", name)
            + &el("description", "ferry backup test")
            + &el("memory", "false")
            + &el("quiesce", "false");
        self.task("CreateSnapshot_Task", ("VirtualMachine", vm_id), &args)
            .unwrap()
            .unwrap()
            .text
            .clone()
    }

    /// Remove a snapshot (consolidate).
    pub fn remove(&mut self, snap: &str) -> Result<(), (String, String)> {
        self.task(
            "RemoveSnapshot_Task",
            ("VirtualMachineSnapshot", snap),
            &(el("removeChildren", "false") + &el("consolidate", "true")),
        )
        .map(|_| ())
    }

    /// The disks (`VirtualDisk` elements) of a snapshot's configuration.
    pub fn snapshot_disks(&mut self, snap: &str) -> Vec<Element> {
        let dev = self
            .fetch(("VirtualMachineSnapshot", snap), "config.hardware.device")
            .unwrap()
            .unwrap();
        dev.children
            .into_iter()
            .filter(|d| d.xsi_type() == Some("VirtualDisk"))
            .collect()
    }

    /// QueryChangedDiskAreas paged to the end: `(areas, calls)`.
    pub fn changed_areas(
        &mut self,
        vm_id: &str,
        snap: &str,
        key: i32,
        change_id: &str,
        capacity: u64,
    ) -> Result<(Vec<(u64, u64)>, usize), SoapFault> {
        let mut out = Vec::new();
        let mut start = 0u64;
        let mut calls = 0;
        while start < capacity {
            let args = moref("snapshot", "VirtualMachineSnapshot", snap)
                + &el("deviceKey", &key.to_string())
                + &el("startOffset", &start.to_string())
                + &el("changeId", change_id);
            let r = self.call("QueryChangedDiskAreas", ("VirtualMachine", vm_id), &args)?;
            calls += 1;
            let info = r.child("returnval").unwrap();
            let s: u64 = info.text_of("startOffset").unwrap().parse().unwrap();
            let l: u64 = info.text_of("length").unwrap().parse().unwrap();
            assert_eq!(s, start);
            for a in info.all("changedArea") {
                out.push((
                    a.text_of("start").unwrap().parse().unwrap(),
                    a.text_of("length").unwrap().parse().unwrap(),
                ));
            }
            start = s + l;
        }
        Ok((out, calls))
    }

    /// An NBD ticket for disk `key` of snapshot `snap` of VM `vm_id` on `host_id`.
    pub fn ticket(
        &mut self,
        host_id: &str,
        vm_id: &str,
        snap: &str,
        key: i32,
    ) -> Result<Element, SoapFault> {
        let spec = format!(
            r#"<spec xsi:type="SessionManagerHttpServiceRequestSpec"><method>httpGet</method><url>nbd://{host_id}/{vm_id}/{snap}/{key}</url></spec>"#
        );
        self.call(
            "AcquireGenericServiceTicket",
            ("SessionManager", "SessionManager"),
            &spec,
        )
        .map(|r| r.child("returnval").unwrap().clone())
    }

    /// Hot-add `file` to VM `vm_id` as the contract says.
    pub fn hot_add(&mut self, vm_id: &str, file: &str) -> Result<(), (String, String)> {
        let spec = format!(
            r#"<spec><deviceChange><operation>add</operation><device xsi:type="VirtualDisk"><key>-1</key><backing xsi:type="VirtualDiskFlatVer2BackingInfo"><fileName>{}</fileName><diskMode>independent_nonpersistent</diskMode></backing><controllerKey>1000</controllerKey></device></deviceChange></spec>"#,
            escape(file)
        );
        self.task("ReconfigVM_Task", ("VirtualMachine", vm_id), &spec)
            .map(|_| ())
    }

    /// Detach device `key` from VM `vm_id`.
    pub fn detach(&mut self, vm_id: &str, key: i32) -> Result<(), (String, String)> {
        let spec = format!(
            r#"<spec><deviceChange><operation>remove</operation><device xsi:type="VirtualDisk"><key>{key}</key><controllerKey>1000</controllerKey></device></deviceChange></spec>"#
        );
        self.task("ReconfigVM_Task", ("VirtualMachine", vm_id), &spec)
            .map(|_| ())
    }

    /// GET or POST an admin endpoint with the token: (status, JSON body or Null).
    pub fn admin(
        &self,
        path: &str,
        body: Option<serde_json::Value>,
        token: Option<&str>,
    ) -> (u16, serde_json::Value) {
        let url = format!("{}/admin/{path}", self.base);
        let mut req = match &body {
            Some(b) => self
                .http
                .post(url)
                .header("Content-Type", "application/json")
                .body(b.to_string()),
            None => self.http.get(url),
        };
        req = req.header(
            "Authorization",
            format!("Bearer {}", token.unwrap_or(&self.token)),
        );
        self.rt.block_on(async {
            let r = req.send().await.unwrap();
            let status = r.status().as_u16();
            let text = r.text().await.unwrap();
            (
                status,
                serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
            )
        })
    }
}
