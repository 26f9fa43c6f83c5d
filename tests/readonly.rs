//! A repository on read-only media (a replicated copy, a snapshot, WORM storage):
//! listing, verify, restore and export work; backup and prune are refused with an
//! error that says why, and nothing is written.
//! Needs root to bind-mount the repository read-only (CI runs as root); elsewhere
//! it says so and stops without asserting.

mod common;
use common::*;
use std::io::Read;
use std::process::Stdio;

#[test]
fn a_read_only_repository_restores_verifies_and_exports_but_refuses_writes() {
    if !is_root() {
        eprintln!("SKIPPED a_read_only_repository_restores_verifies_and_exports_but_refuses_writes: needs root to bind-mount read-only");
        return;
    }
    let w = World::new();
    let img = w.image("disk.img", 3 << 20, 5);
    let o = w.ferry(&["backup", "--name", "vm", "--image", img.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let before = files_under(&w.repo_dir);

    // The same repository, seen through a read-only bind mount.
    let ro = w.path("ro");
    std::fs::create_dir(&ro).unwrap();
    mount(&["--bind".as_ref(), w.repo_dir.as_os_str(), ro.as_os_str()]);
    let _m = Mount(ro.clone());
    mount(&["-o".as_ref(), "remount,bind,ro".as_ref(), ro.as_os_str()]);
    assert!(
        std::fs::write(ro.join("probe"), b"x").is_err(),
        "the bind mount is writable"
    );
    let ferry = |args: &[&str]| w.command(args).env("FERRY_REPO", &ro).output().unwrap();

    let o = ferry(&["--json", "points", "list"]);
    assert!(o.status.success(), "{}", text(&o));
    let list: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    let o = ferry(&["verify"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        hash(&restore_latest(ferry, "vm", &w.path("restored.img"))),
        hash(&img)
    );

    // Instant access over NBD, read by nbdcopy (libnbd).
    let sock = w.path("export.sock");
    let mut exp = w
        .command(&[
            "export",
            "--point",
            "latest:vm",
            "--socket",
            sock.to_str().unwrap(),
        ])
        .env("FERRY_REPO", &ro)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    for _ in 0..200 {
        if sock.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let via_nbd = w.path("via-nbd.img");
    let copied = std::process::Command::new("nbdcopy")
        .arg(format!("nbd+unix:///?socket={}", sock.display()))
        .arg(&via_nbd)
        .output()
        .unwrap();
    let _ = exp.kill();
    let _ = exp.wait();
    let mut err = String::new();
    exp.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(copied.status.success(), "{}\nexport: {err}", text(&copied));
    assert_eq!(hash(&via_nbd), hash(&img));

    // Writers are refused, saying why; nothing changed.
    let o = ferry(&["backup", "--name", "vm", "--image", img.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("backup needs write access, but the repository is read-only"),
        "{e}"
    );
    let o = ferry(&["prune", "--keep-last", "1"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("prune needs write access"), "{e}");
    assert_eq!(files_under(&w.repo_dir), before);
}
