//! What ferry's VDDK layer costs: the backup pipeline reading one snapshot disk
//! through VDDK (the mock `libvixDiskLib`, HotAdd: the library reads the
//! hot-added device locally, as real VDDK does on a HotAdd proxy) side by side
//! with the same device read by ferry's file source, in one run, alternating
//! pairs. Prints each pair and the medians; the goal is VDDK ≥ 0.9× the file
//! source (issue 17).
//!
//! Run: `cargo build --release -p ferry-mock-vddk && cargo bench --bench vddk`
//! (env: `VDDK_BENCH_MIB`, default 1024; `VDDK_BENCH_PAIRS`, default 5).

use ferry::job::incremental::ReadRequest;
use ferry::job::{self, BackupRequest, DiskInput};
use ferry::keys::PemKeySource;
use ferry::pipeline::PipelineConfig;
use ferry::progress::Progress;
use ferry::repo::format::DEFAULT_CHUNK_SIZE;
use ferry::repo::Repository;
use ferry::transport::file::FileSource;
use ferry::transport::select::Mode;
use ferry::transport::vddk::{session, ConnectSpec, Connection, Vddk, VddkSource};
use ferry::transport::DiskSource;
use ferry::vsphere::{Client, ClientConfig, ServerTrust};
use ferry_mocks::vcenter::{Scenario, VcenterMock, VcenterOptions};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use zeroize::Zeroizing;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The mock VDDK built for this profile (release).
fn mock_library() -> PathBuf {
    ferry_mocks::fixtures::mock_vddk_library()
        .expect("libvixDiskLib.so is missing: cargo build --release -p ferry-mock-vddk")
}

fn scenario(mib: u64) -> Scenario {
    let text = format!(
        "name = \"vddk-bench\"\n[datacenter]\nname = \"DC\"\n[[cluster]]\nname = \"C\"\n\
         [[host]]\nname = \"esx-01\"\ncluster = \"C\"\ndatastores = [\"ds\"]\n\
         [[datastore]]\nname = \"ds\"\n[[key_provider]]\nid = \"KMS-A\"\n\
         [[vm]]\nname = \"big\"\nhost = \"esx-01\"\ndatastore = \"ds\"\nkey_provider = \"KMS-A\"\n\
         [[vm.disk]]\nsize_mib = {mib}\ncontent = \"mixed\"\n\
         [[proxy]]\nname = \"proxy-a\"\nhost = \"esx-01\"\ndatastore = \"ds\"\nkey_provider = \"KMS-A\"\n"
    );
    Scenario::parse(&text, Path::new("vddk-bench.toml")).expect("bench scenario")
}

fn backup(dir: &Path, n: usize, keys: &PemKeySource, source: Box<dyn DiskSource>) -> f64 {
    let rd = dir.join(format!("repo{n}"));
    let repo = Repository::init(&rd, DEFAULT_CHUNK_SIZE, "bench", keys).unwrap();
    let size = source.size();
    let t = Instant::now();
    job::backup(
        &repo,
        keys,
        BackupRequest {
            source_name: "big".into(),
            identity: None,
            disks: vec![DiskInput {
                source,
                label: "disk".into(),
                transport_reason: "bench".into(),
                change_id: None,
                read: ReadRequest::full("bench"),
            }],
            pipeline: PipelineConfig::new(None, DEFAULT_CHUNK_SIZE, 128 << 20),
            lock_wait: Duration::from_secs(5),
            snapshot: None,
        },
        &Progress::default(),
    )
    .unwrap();
    let secs = t.elapsed().as_secs_f64();
    std::fs::remove_dir_all(&rd).ok();
    size as f64 / 1048576.0 / secs
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    // `cargo bench` passes --bench; nothing else to parse.
    let mib = env_u64("VDDK_BENCH_MIB", 1024);
    let pairs = env_u64("VDDK_BENCH_PAIRS", 5).max(1) as usize;
    let dir = tempfile::tempdir().unwrap();
    let mut o = VcenterOptions::new(scenario(mib));
    o.port = 0;
    o.state_dir = Some(dir.path().join("vcenter"));
    let vc = VcenterMock::start(o).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let client = rt
        .block_on(Client::connect(ClientConfig::new(
            &vc.url(),
            vc.user(),
            Zeroizing::new(vc.password().to_string()),
            ServerTrust::Ca(vc.ca_path().to_path_buf()),
        )))
        .unwrap();
    let vm = rt.block_on(client.vm_by_name("big")).unwrap();
    let snap = rt
        .block_on(client.create_snapshot(&vm, "ferry-bench", "vddk bench", false))
        .unwrap();
    let disk = rt.block_on(client.snapshot_disks(&snap)).unwrap()[0].clone();

    // The proxy's VDDK: its own copy of the mock library and config.
    let vdir = dir.path().join("vddk");
    std::fs::create_dir_all(vdir.join("lib64")).unwrap();
    std::fs::copy(mock_library(), vdir.join("lib64/libvixDiskLib.so.8")).unwrap();
    let proxy_moref = vc.admin().state().vm("proxy-a").unwrap().moref.clone();
    let config = vdir.join("vixDiskLib.config");
    std::fs::write(&config, format!("mock.proxyVmMoref = {proxy_moref:?}\n")).unwrap();
    let vddk = Vddk::init(&vdir, Some(&config)).unwrap();
    let (host, port) = client.host_port();
    let mut spec = ConnectSpec::new(
        host,
        session::thumbprint_from_der(&client.server_certificate().unwrap()),
        client.session_cookie().unwrap().to_string(),
        vm.moref.value.clone(),
        Some(snap.value.clone()),
        Mode::HotAdd,
    );
    spec.port = port;
    let conn = Connection::connect(&vddk, &spec).unwrap();

    let pair = ferry_mocks::fixtures::pem_pair(dir.path(), "k", 2048).unwrap();
    let keys = PemKeySource::open(Some(&pair.public), Some(&pair.private)).unwrap();
    let device_dir = vc.device_dir("proxy-a").unwrap();
    println!(
        "backup of a {mib} MiB mixed snapshot disk, release build, {} core(s): HotAdd through the mock VDDK vs ferry's file source on the same hot-added device",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    let (mut through_vddk, mut file) = (Vec::new(), Vec::new());
    // Pair 0 warms the page cache, the allocator and the file system; not counted.
    for i in 0..=pairs {
        // VDDK first on even pairs, the file source first on odd ones.
        let mut run = |vddk_turn: bool| {
            if vddk_turn {
                let src = VddkSource::open(&conn, &disk.file_name).unwrap();
                assert_eq!(src.transport(), "hotadd");
                let r = backup(dir.path(), 2 * i, &keys, Box::new(src));
                through_vddk.push(r);
                r
            } else {
                // Open through VDDK only to have the disk hot-added, then read
                // the very same device with the file source.
                let held = VddkSource::open(&conn, &disk.file_name).unwrap();
                let entry = std::fs::read_dir(&device_dir)
                    .unwrap()
                    .next()
                    .expect("the hot-added device")
                    .unwrap()
                    .path();
                let r = backup(
                    dir.path(),
                    2 * i + 1,
                    &keys,
                    Box::new(FileSource::open(&entry).unwrap()),
                );
                drop(held);
                file.push(r);
                r
            }
        };
        let (a, b) = if i % 2 == 0 {
            let a = run(true);
            (a, run(false))
        } else {
            let b = run(false);
            (run(true), b)
        };
        if i == 0 {
            through_vddk.clear();
            file.clear();
            println!("warm-up: VDDK {a:.1} MiB/s, file {b:.1} MiB/s (not counted)");
            continue;
        }
        println!(
            "pair {i}: VDDK {a:.1} MiB/s, file {b:.1} MiB/s, ratio {:.2}x",
            a / b
        );
    }
    let (v, f) = (median(through_vddk), median(file));
    println!(
        "median: VDDK {v:.1} MiB/s, file {f:.1} MiB/s, ratio {:.2}x (goal >= 0.9x)",
        v / f
    );
    drop(conn);
    rt.block_on(client.remove_snapshot(&snap)).ok();
    rt.block_on(client.logout());
}
