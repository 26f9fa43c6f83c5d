//! A vSphere world for end-to-end tests: the mock vCenter on a scenario, ferry's SOAP
//! client logged in to it (CA pinned), and helpers to build VM job requests.

use ferry::job::vm::{NbdSettings, ThisProxy, VddkSettings, VmBackupRequest};
use ferry::pipeline::PipelineConfig;
use ferry::transport::select::{Mode, Policy};
use ferry::vsphere::{Client, ClientConfig, ServerTrust};
use ferry_mocks::vcenter::{VcenterMock, VcenterOptions};
use std::path::{Path, PathBuf};
use std::time::Duration;
use zeroize::Zeroizing;

/// The mock vCenter on `mocks/scenarios/<name>.toml`.
pub fn vcenter(name: &str) -> VcenterMock {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("mocks/scenarios")
        .join(format!("{name}.toml"));
    let mut o = VcenterOptions::from_file(&path).unwrap();
    o.port = 0;
    VcenterMock::start(o).unwrap()
}

/// ferry's client configuration for `vc`.
pub fn client_config(vc: &VcenterMock) -> ClientConfig {
    let mut c = ClientConfig::new(
        &vc.url(),
        vc.user(),
        Zeroizing::new(vc.password().to_string()),
        ServerTrust::Ca(vc.ca_path().to_path_buf()),
    );
    c.backoff = Duration::from_millis(20);
    c
}

/// A logged-in client.
pub async fn client(vc: &VcenterMock) -> Client {
    Client::connect(client_config(vc)).await.unwrap()
}

/// This proxy: `vm_name` (a proxy VM of the scenario, or none for a physical
/// proxy) with `modes`.
pub fn proxy(vc: &VcenterMock, id: &str, vm_name: Option<&str>, modes: &[Mode]) -> ThisProxy {
    ThisProxy {
        id: id.to_string(),
        vm_name: vm_name.map(str::to_string),
        device_dir: vm_name.and_then(|n| vc.device_dir(n)),
        modes: modes.to_vec(),
        free_slots: 4,
    }
}

/// A backup request for `vm` with job id `job`.
pub fn request(
    job: &str,
    vm: &str,
    policy: Policy,
    nbd_port: u16,
    certs: Option<PathBuf>,
) -> VmBackupRequest {
    VmBackupRequest {
        job_id: job.to_string(),
        vm: vm.to_string(),
        policy,
        nbd: NbdSettings {
            tls_certificates: certs,
            port: nbd_port,
            connections: 2,
        },
        enable_cbt: true,
        full: false,
        quiesce: Default::default(),
        pipeline: PipelineConfig::new(Some(2), super::CS, 16 << 20),
        lock_wait: Duration::from_secs(10),
        hotadd_wait: Duration::from_secs(10),
        placement: Default::default(),
        vddk: None,
    }
}

/// A current-thread runtime for one test.
pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// The mock ESXi NBD service serving `vc`'s tickets over TLS, and the directory (libnbd
/// layout) whose `ca-cert.pem` ferry verifies it with.
pub fn esxi(vc: &VcenterMock, dir: &Path) -> (ferry_mocks::esxi::MockEsxi, PathBuf) {
    let certs = dir.join("esxi-certs");
    ferry_mocks::fixtures::tls_certs(&certs).unwrap();
    let tls = ferry_mocks::esxi::ServerTls::from_dir(&certs, false).unwrap();
    let esx = ferry_mocks::esxi::MockEsxi::start(vc.export_provider(), &tls).unwrap();
    (esx, certs)
}

/// The mock VDDK (`libvixDiskLib.so` of crate `ferry-mock-vddk`, built by
/// `cargo test --workspace` beside the test executables).
pub fn mock_vddk_library() -> PathBuf {
    ferry_mocks::fixtures::mock_vddk_library().expect(
        "the mock VDDK (libvixDiskLib.so) is missing: cargo test --workspace builds it (or cargo build -p ferry-mock-vddk)",
    )
}

/// A VDDK directory under `dir` holding the mock VDDK as
/// `lib64/libvixDiskLib.so.8`, with a VDDK config file naming `proxy_vm` (the VM
/// this "proxy" runs in) and a call log. Returns the settings and the call log.
pub fn mock_vddk(vc: &VcenterMock, dir: &Path, proxy_vm: &str) -> (VddkSettings, PathBuf) {
    let vdir = dir.join(format!("vddk-{proxy_vm}"));
    std::fs::create_dir_all(vdir.join("lib64")).unwrap();
    std::fs::copy(mock_vddk_library(), vdir.join("lib64/libvixDiskLib.so.8")).unwrap();
    let moref = vc.admin().state().vm(proxy_vm).unwrap().moref.clone();
    let calls = vdir.join("calls.jsonl");
    let config = vdir.join("vixDiskLib.config");
    std::fs::write(
        &config,
        format!(
            "tmpDirectory = {vdir:?}\nmock.proxyVmMoref = {moref:?}\nmock.callLog = {calls:?}\n"
        ),
    )
    .unwrap();
    (
        VddkSettings {
            libdir: vdir,
            config_file: Some(config),
            nfc_port: 902,
        },
        calls,
    )
}

/// The mock VDDK's call log: one JSON object per call.
pub fn vddk_calls(log: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Every disk of `out` restores from `w`'s repository to exactly what `vm_name`
/// held at snapshot time (the mock's digest).
pub fn restore_matches(
    w: &super::World,
    vc: &VcenterMock,
    vm_name: &str,
    out: &ferry::job::vm::VmBackupOutcome,
) {
    for d in &out.disks {
        let target = w.path(&format!("restored-{vm_name}-{}", d.disk));
        w.restore(&out.report.point_id, d.disk, &target).unwrap();
        let (want, _) = vc
            .admin()
            .digest(vm_name, &d.device_key.to_string(), None)
            .unwrap();
        assert_eq!(
            super::hash(&target).to_hex().to_string(),
            want,
            "{vm_name} disk {}",
            d.disk
        );
    }
}

/// The scenario of the restore-into-a-VM tests (native and VDDK): tenant A's
/// a-web (two disks) to restore from and a-app to restore into, HotAdd proxies
/// of both key providers and a shared NBD proxy.
pub const RESTORE_SCENARIO: &str = r#"
name = "restore"
[[cluster]]
name = "C1"
[[host]]
name = "esx-01.lab"
cluster = "C1"
datastores = ["ds-a", "ds-b", "ds-shared"]
[[datastore]]
name = "ds-a"
[[datastore]]
name = "ds-b"
[[datastore]]
name = "ds-shared"
[[key_provider]]
id = "KMS-A"
[[key_provider]]
id = "KMS-B"
[[vm]]
name = "a-web"
host = "esx-01.lab"
datastore = "ds-a"
key_provider = "KMS-A"
cbt = true
[[vm.disk]]
size_mib = 12
content = "mixed"
[[vm.disk]]
size_mib = 4
content = "mixed"
[[vm]]
name = "a-app"
host = "esx-01.lab"
datastore = "ds-a"
key_provider = "KMS-A"
[[vm.disk]]
size_mib = 2
content = "mixed"
[[proxy]]
name = "proxy-a"
host = "esx-01.lab"
datastore = "ds-shared"
key_provider = "KMS-A"
[[proxy]]
name = "proxy-b"
host = "esx-01.lab"
datastore = "ds-shared"
key_provider = "KMS-B"
[[proxy]]
name = "proxy-nbd"
host = "esx-01.lab"
datastore = "ds-shared"
"#;

/// Back `req` up as proxy `me` into `w`'s repository (fresh progress).
/// Back up `vm` (the restore tests' source), return the point with the
/// digest of each disk at snapshot time, then let the guest write to every
/// disk so its live content no longer matches the point.
pub fn backup_then_guest_writes(
    rt: &tokio::runtime::Runtime,
    c: &Client,
    me: &ThisProxy,
    w: &super::World,
    vc: &VcenterMock,
    vm: &str,
    req: &VmBackupRequest,
) -> (ferry::job::vm::VmBackupOutcome, Vec<String>) {
    let backup = backup(rt, c, me, w, req).unwrap();
    let digests = backup
        .disks
        .iter()
        .map(|d| {
            let key = d.device_key.to_string();
            let (before, _) = vc.admin().digest(vm, &key, None).unwrap();
            vc.admin().write(vm, &key, 4096, &[0x5A; 8192]).unwrap();
            let (after, _) = vc.admin().digest(vm, &key, None).unwrap();
            assert_ne!(after, before, "the guest's write changed {vm} disk {key}");
            before
        })
        .collect();
    (backup, digests)
}

#[allow(clippy::result_large_err)] // the error type is `backup_vm`'s own
pub fn backup(
    rt: &tokio::runtime::Runtime,
    c: &Client,
    me: &ThisProxy,
    w: &super::World,
    req: &VmBackupRequest,
) -> Result<ferry::job::vm::VmBackupOutcome, ferry::job::vm::VmJobError> {
    rt.block_on(ferry::job::vm::backup_vm(
        c,
        me,
        std::sync::Arc::new(w.repo()),
        std::sync::Arc::new(w.source()),
        req,
        std::sync::Arc::new(Default::default()),
    ))
}

/// A VM backup world over NBD-SSL: a scratch [`super::World`] (repository and
/// keys), the mock vCenter, a mock ESXi serving its disks, ferry's logged-in
/// client and a runtime.
pub struct NbdWorld {
    pub w: super::World,
    pub vc: VcenterMock,
    pub _esx: ferry_mocks::esxi::MockEsxi,
    pub rt: tokio::runtime::Runtime,
    pub c: Client,
    pub port: u16,
    pub certs: PathBuf,
}

impl NbdWorld {
    /// Around `vc`.
    pub fn new(vc: VcenterMock) -> NbdWorld {
        let w = super::World::new();
        let (esx, certs) = esxi(&vc, w.dir.path());
        let rt = rt();
        let c = rt.block_on(client(&vc));
        let port = esx.port();
        NbdWorld {
            w,
            vc,
            _esx: esx,
            rt,
            c,
            port,
            certs,
        }
    }

    /// A request for `vm` over NBD-SSL (network failover allowed).
    pub fn nbd_request(&self, job: &str, vm: &str) -> VmBackupRequest {
        let policy = Policy {
            failover_to_network: true,
            allow_cleartext_nbd: false,
            preferred: None,
        };
        request(job, vm, policy, self.port, Some(self.certs.clone()))
    }

    /// Back up as proxy `px-n` (NBD-SSL only); panics on failure.
    pub fn backup_vm(&self, req: &VmBackupRequest) -> ferry::job::vm::VmBackupOutcome {
        let me = proxy(&self.vc, "px-n", None, &[Mode::NbdSsl]);
        self.rt
            .block_on(ferry::job::vm::backup_vm(
                &self.c,
                &me,
                std::sync::Arc::new(self.w.repo()),
                std::sync::Arc::new(self.w.source()),
                req,
                std::sync::Arc::new(Default::default()),
            ))
            .unwrap()
    }
}
