//! `ferry mount` through the kernel's FUSE: a point's disks appear as
//! read-only files, read bit-identically, loop-mount with the system's own
//! driver (as root, as CI runs), refuse writes, and unmount on SIGTERM.

mod common;

use common::fsimage::{self, MIB};
use common::{is_root, World};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

struct Running(Child);
impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_point_mounts_reads_identically_loop_mounts_and_unmounts_on_sigterm() {
    let w = World::new();
    let (tree, ext) = fsimage::ext4_with_tree(w.dir.path(), 2 << 20, 32 * MIB);
    let data = w.image("data.img", 8 * MIB, 3);
    w.backup("vm", &[&ext, &data]);

    let dir = w.path("mnt");
    std::fs::create_dir(&dir).unwrap();
    let child = w
        .command(&["mount", "latest:vm", dir.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = Running(child);
    let disk0 = dir.join("disk0.img");
    wait_for("the mount", || disk0.exists());
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, vec!["disk0.img", "disk1.img"]);
    assert_eq!(std::fs::read(&disk0).unwrap(), std::fs::read(&ext).unwrap());
    assert_eq!(common::hash(&dir.join("disk1.img")), common::hash(&data));
    // Read-only: writes are refused.
    let err = std::fs::OpenOptions::new()
        .write(true)
        .open(&disk0)
        .unwrap_err();
    assert!(
        matches!(err.raw_os_error(), Some(libc::EROFS) | Some(libc::EACCES)),
        "{err}"
    );

    if is_root() {
        // The operating system's own ext4 driver over the mounted file.
        let m = w.path("loop");
        std::fs::create_dir(&m).unwrap();
        common::mount(&[
            "-o".as_ref(),
            "loop,ro".as_ref(),
            disk0.as_os_str(),
            m.as_os_str(),
        ]);
        let _guard = common::Mount(m.clone());
        assert_eq!(
            std::fs::read(m.join("docs/Übersicht.md")).unwrap(),
            b"# summary\n"
        );
        assert_eq!(
            std::fs::read(m.join("large.bin")).unwrap(),
            std::fs::read(tree.join("large.bin")).unwrap()
        );
        drop(_guard);
        wait_for("the loop mount to go", || !m.join("docs").exists());
    } else {
        eprintln!("not root: the loop mount part of this test needs root (CI runs as root)");
    }

    // SIGTERM unmounts and exits 0.
    // SAFETY: kill with a valid pid and signal.
    unsafe { libc::kill(child.0.id() as i32, libc::SIGTERM) };
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "ferry mount did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let out = drain(&mut child.0);
    assert_eq!(status.code(), Some(0), "{out}");
    assert!(!disk0.exists(), "still mounted after exit");
}

/// What the child printed (it has exited).
fn drain(child: &mut Child) -> String {
    use std::io::Read;
    let mut s = String::new();
    if let Some(o) = child.stdout.as_mut() {
        let _ = o.read_to_string(&mut s);
    }
    if let Some(e) = child.stderr.as_mut() {
        let _ = e.read_to_string(&mut s);
    }
    s
}
