//! Which file system a volume holds, by its magic numbers: the ones ferry
//! reads (ext2/3/4, NTFS, FAT) and the ones it names but does not read (XFS,
//! LVM, BitLocker, LUKS, btrfs, swap, exFAT, ReFS), so an operator gets "this
//! is XFS, mount it" instead of an obscure failure.
//!
//! Must not: parse beyond the magic numbers (the readers validate the rest).

use super::source::Window;
use serde::{Deserialize, Serialize};
use std::io;

/// A file system (or volume format) recognised on a volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FsKind {
    /// ext2, ext3 or ext4.
    Ext,
    /// NTFS.
    Ntfs,
    /// FAT12, FAT16 or FAT32.
    Fat,
    /// XFS (not read).
    Xfs,
    /// An LVM physical volume (not read).
    Lvm,
    /// A BitLocker-encrypted volume (not read).
    Bitlocker,
    /// A LUKS-encrypted volume (not read).
    Luks,
    /// btrfs (not read).
    Btrfs,
    /// Linux swap (no files).
    Swap,
    /// exFAT (not read).
    Exfat,
    /// ReFS (not read).
    Refs,
    /// Nothing recognised.
    Unknown,
}

impl FsKind {
    /// Whether ferry reads files from it.
    pub fn is_readable(self) -> bool {
        matches!(self, FsKind::Ext | FsKind::Ntfs | FsKind::Fat)
    }

    /// Human name.
    pub fn describe(self) -> &'static str {
        match self {
            FsKind::Ext => "ext2/3/4",
            FsKind::Ntfs => "NTFS",
            FsKind::Fat => "FAT",
            FsKind::Xfs => "XFS",
            FsKind::Lvm => "an LVM physical volume",
            FsKind::Bitlocker => "a BitLocker-encrypted volume",
            FsKind::Luks => "a LUKS-encrypted volume",
            FsKind::Btrfs => "btrfs",
            FsKind::Swap => "Linux swap",
            FsKind::Exfat => "exFAT",
            FsKind::Refs => "ReFS",
            FsKind::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for FsKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.describe())
    }
}

/// Bytes at `off` of the volume, or `None` when the volume is too small.
fn at<const N: usize>(v: &Window, off: u64) -> io::Result<Option<[u8; N]>> {
    if off + N as u64 > v.len() {
        return Ok(None);
    }
    let mut b = [0u8; N];
    v.read_exact_at(off, &mut b)?;
    Ok(Some(b))
}

/// Recognise the file system on `volume`. Reads a few sectors.
pub fn probe(volume: &Window) -> io::Result<FsKind> {
    if let Some(boot) = at::<512>(volume, 0)? {
        match &boot[3..11] {
            b"NTFS    " => return Ok(FsKind::Ntfs),
            b"-FVE-FS-" => return Ok(FsKind::Bitlocker),
            b"EXFAT   " => return Ok(FsKind::Exfat),
            _ => {}
        }
        if &boot[0..3] == b"\0\0\0" && &boot[3..7] == b"ReFS" {
            return Ok(FsKind::Refs);
        }
        if &boot[0..4] == b"XFSB" {
            return Ok(FsKind::Xfs);
        }
        if &boot[0..6] == b"LUKS\xba\xbe" {
            return Ok(FsKind::Luks);
        }
        let signed = boot[510] == 0x55 && boot[511] == 0xAA;
        let fat_label = &boot[54..59] == b"FAT12"
            || &boot[54..59] == b"FAT16"
            || &boot[54..62] == b"FAT     "
            || &boot[82..87] == b"FAT32";
        if signed && fat_label {
            return Ok(FsKind::Fat);
        }
    }
    // LVM2 puts its label in one of the first four sectors.
    for sector in 0..4u64 {
        if let Some(s) = at::<8>(volume, sector * 512)? {
            if &s == b"LABELONE" {
                return Ok(FsKind::Lvm);
            }
        }
    }
    if let Some(m) = at::<2>(volume, 1024 + 56)? {
        if m == [0x53, 0xEF] {
            return Ok(FsKind::Ext);
        }
    }
    if let Some(m) = at::<10>(volume, 4096 - 10)? {
        if &m == b"SWAPSPACE2" || &m == b"SWAP-SPACE" {
            return Ok(FsKind::Swap);
        }
    }
    if let Some(m) = at::<8>(volume, 0x10040)? {
        if &m == b"_BHRfS_M" {
            return Ok(FsKind::Btrfs);
        }
    }
    Ok(FsKind::Unknown)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::files::source::ReadAt;
    use std::sync::Arc;

    fn with(off: usize, magic: &[u8]) -> Window {
        let mut d = vec![0u8; 128 << 10];
        d[off..off + magic.len()].copy_from_slice(magic);
        let disk: Arc<dyn ReadAt> = Arc::new(d);
        Window::whole(disk)
    }

    #[test]
    fn magic_numbers() {
        assert_eq!(probe(&with(1080, &[0x53, 0xEF])).unwrap(), FsKind::Ext);
        assert_eq!(probe(&with(3, b"NTFS    ")).unwrap(), FsKind::Ntfs);
        assert_eq!(probe(&with(0, b"XFSB")).unwrap(), FsKind::Xfs);
        assert_eq!(probe(&with(512, b"LABELONE")).unwrap(), FsKind::Lvm);
        assert_eq!(probe(&with(3, b"-FVE-FS-")).unwrap(), FsKind::Bitlocker);
        assert_eq!(probe(&with(0, b"LUKS\xba\xbe")).unwrap(), FsKind::Luks);
        assert_eq!(probe(&with(4086, b"SWAPSPACE2")).unwrap(), FsKind::Swap);
        assert_eq!(probe(&with(0x10040, b"_BHRfS_M")).unwrap(), FsKind::Btrfs);
        assert_eq!(probe(&with(3, b"EXFAT   ")).unwrap(), FsKind::Exfat);
        assert_eq!(probe(&with(9000, b"nothing")).unwrap(), FsKind::Unknown);
        let mut fat = vec![0u8; 4096];
        fat[82..90].copy_from_slice(b"FAT32   ");
        fat[510] = 0x55;
        fat[511] = 0xAA;
        let disk: Arc<dyn ReadAt> = Arc::new(fat);
        assert_eq!(probe(&Window::whole(disk)).unwrap(), FsKind::Fat);
    }

    #[test]
    fn a_tiny_volume_is_unknown_not_an_error() {
        let disk: Arc<dyn ReadAt> = Arc::new(vec![0u8; 100]);
        assert_eq!(probe(&Window::whole(disk)).unwrap(), FsKind::Unknown);
    }
}
