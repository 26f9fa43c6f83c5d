//! [`HotAddSource`]: a snapshot disk hot-added to this proxy VM, read as a local
//! device; [`HotAddTarget`]: a restore's new virtual disk hot-added to this proxy
//! VM, written as a local device. Attaching and detaching is the job's business
//! (through vCenter); this module only waits for the device to appear under the
//! proxy's device directory (`/dev/disk/by-id` on a real proxy, the mock's
//! `device_dir` in tests) and reads or writes it.
//!
//! Must not talk to vCenter.

use super::file::{FileSource, FileTarget};
use super::{DiskSource, DiskTarget, Extent, SourceError};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A hot-added disk.
pub struct HotAddSource {
    inner: FileSource,
    device: PathBuf,
}

/// Wait up to `wait` for `device_dir/name` to appear with `expected_size` bytes
/// (the guest kernel needs a moment after the SCSI hot-add); returns its path and
/// an open read-only handle on it.
fn wait_for_device(
    device_dir: &Path,
    name: &str,
    expected_size: u64,
    wait: Duration,
) -> Result<(PathBuf, FileSource), SourceError> {
    let device = device_dir.join(name);
    let started = Instant::now();
    loop {
        match FileSource::open(&device) {
            Ok(inner) if inner.size() == expected_size => {
                tracing::info!(device = %device.display(), size = expected_size, waited_ms = started.elapsed().as_millis() as u64, "hot-added disk visible");
                return Ok((device, inner));
            }
            Ok(inner) if started.elapsed() >= wait => {
                return Err(SourceError::Open {
                    path: device.display().to_string(),
                    err: std::io::Error::other(format!(
                        "hot-added disk has {} bytes, vCenter reports {expected_size}: not the disk ferry attached",
                        inner.size()
                    )),
                })
            }
            Err(e) if started.elapsed() >= wait => {
                return Err(SourceError::Open {
                    path: device.display().to_string(),
                    err: std::io::Error::other(format!(
                        "the hot-added disk did not appear within {}s ({e}); check that the proxy VM rescans its SCSI bus and that the device directory is right",
                        wait.as_secs()
                    )),
                })
            }
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

impl HotAddSource {
    /// Wait up to `wait` for `device_dir/name` to appear with `expected_size` bytes
    /// (the guest kernel needs a moment after the SCSI hot-add), then open it
    /// read-only.
    pub fn open(
        device_dir: &Path,
        name: &str,
        expected_size: u64,
        wait: Duration,
    ) -> Result<Self, SourceError> {
        let (device, inner) = wait_for_device(device_dir, name, expected_size, wait)?;
        Ok(HotAddSource { inner, device })
    }
}

/// A new virtual disk hot-added to this proxy VM for a restore, written through
/// its device.
pub struct HotAddTarget {
    inner: FileTarget,
}

impl HotAddTarget {
    /// Wait as [`HotAddSource::open`] does, then open the device for writing.
    /// `zero_filled`: the disk was just created (zero chunks need no write).
    pub fn open(
        device_dir: &Path,
        name: &str,
        expected_size: u64,
        wait: Duration,
        zero_filled: bool,
    ) -> Result<Self, SourceError> {
        let (device, _) = wait_for_device(device_dir, name, expected_size, wait)?;
        let inner = FileTarget::open_existing(&device, expected_size, zero_filled)
            .map_err(|err| SourceError::Open {
                path: device.display().to_string(),
                err,
            })?
            .with_transport("hotadd");
        Ok(HotAddTarget { inner })
    }
}

impl DiskTarget for HotAddTarget {
    fn label(&self) -> String {
        format!("hotadd:{}", self.inner.path().display())
    }
    fn transport(&self) -> &'static str {
        "hotadd"
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn zero_filled(&self) -> bool {
        self.inner.zero_filled()
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.inner.write_at(offset, data)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl DiskSource for HotAddSource {
    fn label(&self) -> String {
        format!("hotadd:{}", self.device.display())
    }
    fn transport(&self) -> &'static str {
        "hotadd"
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn next_allocated(&self, from: u64) -> Result<Option<Extent>, SourceError> {
        self.inner.next_allocated(from)
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        self.inner.read_at(offset, buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_for_the_device_then_reads_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("6000c29abc");
        let p2 = path.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            std::fs::write(&p2, vec![7u8; 8192]).unwrap();
        });
        let s =
            HotAddSource::open(dir.path(), "6000c29abc", 8192, Duration::from_secs(10)).unwrap();
        t.join().unwrap();
        let mut b = [0u8; 16];
        s.read_at(4096, &mut b).unwrap();
        assert_eq!(b, [7u8; 16]);
        assert_eq!(s.transport(), "hotadd");
    }

    #[test]
    fn a_hot_added_restore_target_is_written_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("6000c29def");
        std::fs::File::create(&path)
            .unwrap()
            .set_len(64 << 10)
            .unwrap();
        let t = HotAddTarget::open(
            dir.path(),
            "6000c29def",
            64 << 10,
            Duration::from_secs(5),
            true,
        )
        .unwrap();
        assert!(t.zero_filled() && t.transport() == "hotadd");
        assert!(t.label().contains("6000c29def"));
        t.write_at(4096, &[9u8; 4096]).unwrap();
        t.flush().unwrap();
        let all = std::fs::read(&path).unwrap();
        assert_eq!(all.len(), 64 << 10, "written in place, not extended");
        assert!(all[4096..8192].iter().all(|&b| b == 9) && all[..4096].iter().all(|&b| b == 0));
    }

    #[test]
    fn a_missing_or_wrong_sized_device_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let e = HotAddSource::open(dir.path(), "nope", 1, Duration::from_millis(50))
            .err()
            .unwrap();
        assert!(e.to_string().contains("did not appear"), "{e}");
        std::fs::write(dir.path().join("small"), [0u8; 10]).unwrap();
        let e = HotAddSource::open(dir.path(), "small", 4096, Duration::from_millis(50))
            .err()
            .unwrap();
        assert!(e.to_string().contains("not the disk ferry attached"), "{e}");
    }
}
