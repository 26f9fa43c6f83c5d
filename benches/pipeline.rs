//! Criterion benchmarks of the data plane: each stage on one 1 MiB chunk
//! (compressible and incompressible), and the whole backup and restore pipeline of
//! a 64 MiB generated image into a scratch repository.
//!
//! Run: `cargo bench --bench pipeline` (HTML report in target/criterion).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ferry::job::{self, BackupRequest, DiskInput};
use ferry::keys::{PemKeySource, SecretKey};
use ferry::pipeline::PipelineConfig;
use ferry::progress::Progress;
use ferry::repo::format::{
    cipher_for, is_all_zero, open_chunk, ChunkId, ChunkSealer, DEFAULT_CHUNK_SIZE,
};
use ferry::repo::Repository;
use ferry::transport::file::FileSource;
use ferry_mocks::diskgen::{self, DiskSpec, Region};
use std::time::Duration;

fn chunk_of(kind: Region) -> Vec<u8> {
    // Find a region of the wanted kind in a generated layout and materialise it.
    let spec = DiskSpec::mixed(256 << 20, 3);
    let i = (0..spec.regions())
        .find(|&i| spec.region_kind(i) == kind)
        .expect("profile has every kind");
    let mut buf = vec![0u8; DEFAULT_CHUNK_SIZE as usize];
    spec.fill_region(i, &mut buf);
    buf
}

fn stages(c: &mut Criterion) {
    let dk = SecretKey::generate();
    let idk = SecretKey::generate();
    let sealer = ChunkSealer::new(&dk);
    let cipher = cipher_for(&dk);
    let mut g = c.benchmark_group("stage");
    g.throughput(Throughput::Bytes(DEFAULT_CHUNK_SIZE as u64));
    let zeros = vec![0u8; DEFAULT_CHUNK_SIZE as usize];
    g.bench_function("zero-check", |b| {
        b.iter(|| is_all_zero(std::hint::black_box(&zeros)))
    });
    for (name, kind) in [
        ("compressible", Region::Compressible),
        ("incompressible", Region::Incompressible),
    ] {
        let data = chunk_of(kind);
        let id = ChunkId::compute(&idk, &data);
        let mut out = Vec::new();
        g.bench_with_input(BenchmarkId::new("chunk-id", name), &data, |b, d| {
            b.iter(|| ChunkId::compute(&idk, d))
        });
        g.bench_with_input(BenchmarkId::new("seal (lz4+gcm)", name), &data, |b, d| {
            b.iter(|| sealer.seal(&id, d, &mut out))
        });
        sealer.seal(&id, &data, &mut out);
        let sealed = out.clone();
        let (mut buf, mut plain) = (Vec::new(), Vec::new());
        g.bench_with_input(
            BenchmarkId::new("open (gcm+lz4+id)", name),
            &sealed,
            |b, s| {
                b.iter(|| {
                    buf.clear();
                    buf.extend_from_slice(s);
                    open_chunk(&mut buf, &id, |_| Some(&cipher), &idk, &mut plain).expect("opens")
                })
            },
        );
    }
    g.finish();
}

fn pipeline(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    let size = 64u64 << 20;
    diskgen::generate(&img, &DiskSpec::mixed(size, 5)).unwrap();
    let pair = ferry_mocks::fixtures::pem_pair(dir.path(), "k", 2048).unwrap();
    let keys = PemKeySource::open(Some(&pair.public), Some(&pair.private)).unwrap();
    let mut g = c.benchmark_group("pipeline");
    g.throughput(Throughput::Bytes(size));
    g.sample_size(10).measurement_time(Duration::from_secs(10));
    let mut n = 0;
    let mut last = None;
    g.bench_function("backup 64 MiB mixed (fresh repo)", |b| {
        b.iter(|| {
            n += 1;
            let rd = dir.path().join(format!("repo{n}"));
            let repo = Repository::init(&rd, DEFAULT_CHUNK_SIZE, "bench", &keys).unwrap();
            let rep = job::backup(
                &repo,
                &keys,
                BackupRequest {
                    source_name: "b".into(),
                    identity: None,
                    disks: vec![DiskInput {
                        source: Box::new(FileSource::open(&img).unwrap()),
                        label: "d".into(),
                        transport_reason: "bench".into(),
                        change_id: None,
                        read: Default::default(),
                    }],
                    pipeline: PipelineConfig::new(None, DEFAULT_CHUNK_SIZE, 64 << 20),
                    lock_wait: Duration::from_secs(5),
                    snapshot: None,
                },
                &Progress::default(),
            )
            .unwrap();
            if let Some((old, _)) = last.replace((rd, rep.point_id)) {
                std::fs::remove_dir_all::<std::path::PathBuf>(old).ok();
            }
        })
    });
    let (rd, point) = last.clone().unwrap();
    let repo = Repository::open(&rd).unwrap();
    let target = dir.path().join("restored.img");
    g.bench_function("restore 64 MiB mixed", |b| {
        b.iter(|| {
            let _ = std::fs::remove_file(&target);
            job::restore(
                &repo,
                &keys,
                &point,
                0,
                &target,
                PipelineConfig::new(None, DEFAULT_CHUNK_SIZE, 64 << 20),
                &Progress::default(),
            )
            .unwrap();
        })
    });
    g.finish();
}

criterion_group!(benches, stages, pipeline);
criterion_main!(benches);
