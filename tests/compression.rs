//! Chunk codecs per repository (issue 23): a zstd repository stores a mixed
//! image smaller than an LZ4 one and restores it bit for bit; switching the
//! codec of a repository affects new chunks only, every chunk records its own,
//! and points of both codecs restore and verify; incompressible data is stored
//! raw whatever the codec.

mod common;
use common::*;
use std::path::Path;
use std::process::Command;

fn ferry(w: &World, repo: &Path, args: &[&str]) -> serde_json::Value {
    let o = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .arg("--json")
        .args(args)
        .arg("-r")
        .arg(repo)
        .env("FERRY_PUBLIC_KEY", &w.keys.public)
        .env("FERRY_PRIVATE_KEY", &w.keys.private)
        .output()
        .unwrap();
    assert!(o.status.success(), "{args:?}: {}", text(&o));
    serde_json::from_slice(&o.stdout).unwrap()
}

/// Chunk files by codec flag (byte 10 of the chunk header): [raw, lz4, zstd].
fn codecs(repo: &Path) -> [usize; 3] {
    let mut n = [0; 3];
    for f in files_under(&repo.join("chunks")) {
        let b = std::fs::read(&f).unwrap();
        n[b[10] as usize] += 1;
    }
    n
}

#[test]
fn zstd_stores_less_restores_bit_identically_and_codecs_mix_in_one_repository() {
    let w = World::new();
    let img = w.image("mixed.img", 24 << 20, 23);
    let h = hash(&img);
    let lz4 = w.path("lz4");
    let zstd = w.path("zstd");
    ferry(&w, &lz4, &["repo", "init"]);
    ferry(&w, &zstd, &["repo", "init", "--compression", "zstd:3"]);
    let info = ferry(&w, &zstd, &["repo", "info"]);
    assert_eq!(info["compression"], "zstd:3", "{info}");
    let backup = |repo: &Path| {
        let v = ferry(
            &w,
            repo,
            &["backup", "--name", "vm", "--image", img.to_str().unwrap()],
        );
        v["disks"][0]["bytes_new_stored"].as_u64().unwrap()
    };
    let (s_lz4, s_zstd) = (backup(&lz4), backup(&zstd));
    assert!(
        s_zstd * 100 < s_lz4 * 95,
        "zstd:3 stored {s_zstd}, lz4 {s_lz4}"
    );
    let [raw, l, z] = codecs(&zstd);
    assert_eq!(l, 0);
    assert!(
        z > 0 && raw > 0,
        "the random part is stored raw: {raw} raw, {z} zstd"
    );
    assert_eq!(codecs(&lz4)[2], 0);

    // Switch the zstd repository to LZ4: new chunks only.
    let v = ferry(&w, &zstd, &["repo", "set-compression", "lz4"]);
    assert_eq!(v["was"], "zstd:3");
    ferry_mocks::diskgen::mutate(&img, 4, 0.2, 64 << 10).unwrap();
    let h2 = hash(&img);
    backup(&zstd);
    let [_, l, z2] = codecs(&zstd);
    assert!(l > 0 && z2 == z, "{l} lz4 chunks added, zstd unchanged");

    // Both points restore bit for bit and verify.
    let pts = ferry(&w, &zstd, &["points", "list"]);
    for (p, want) in pts.as_array().unwrap().iter().zip([h, h2]) {
        let t = w.path("restored.img");
        let _ = std::fs::remove_file(&t);
        let id = p["point_id"].as_str().unwrap();
        ferry(
            &w,
            &zstd,
            &["restore", "--point", id, "--target", t.to_str().unwrap()],
        );
        assert_eq!(hash(&t), want, "{id}");
    }
    let v = ferry(&w, &zstd, &["verify"]);
    assert_eq!(v["chunks_damaged"], 0, "{v}");
    assert!(
        v["points"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["ok"] == true),
        "{v}"
    );
}
