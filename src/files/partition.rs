//! Partition tables: MBR (with extended/logical partitions) and GPT (with its
//! CRCs and the backup header when the primary is damaged). Pure parsing over
//! a [`ReadAt`]; every offset and count read from the disk is bounded before
//! it is used.
//!
//! Must not: allocate by an on-disk count without a cap; panic on any input.

use super::source::ReadAt;
use super::FileError;

/// Sector size partition tables are read with (virtual disks use 512).
pub const SECTOR: u64 = 512;
/// Most GPT entries ferry reads (the spec's minimum array holds 128).
pub const MAX_GPT_ENTRIES: u32 = 1024;
/// Most logical partitions followed in an extended partition's chain.
pub const MAX_LOGICAL: u32 = 128;

/// Which kind of partition table a disk has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scheme {
    /// No table: the file system starts at byte 0.
    None,
    /// DOS/MBR.
    Mbr,
    /// GUID partition table.
    Gpt,
}

/// One partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    /// Linux numbering: MBR 1–4 primary, 5+ logical; GPT entry index + 1; 0
    /// for the whole disk.
    pub number: u32,
    /// First byte.
    pub start: u64,
    /// Length in bytes.
    pub size: u64,
    /// Type: "0x83" for MBR, a name or the type GUID for GPT.
    pub type_name: String,
    /// GPT partition name, "" for MBR.
    pub label: String,
}

impl Partition {
    /// The whole disk as one volume.
    pub fn whole(size: u64) -> Self {
        Partition {
            number: 0,
            start: 0,
            size,
            type_name: "whole disk".into(),
            label: String::new(),
        }
    }
}

/// A disk's partition table.
#[derive(Debug, Clone)]
pub struct PartitionTable {
    /// MBR, GPT or none.
    pub scheme: Scheme,
    /// The partitions in number order (empty for [`Scheme::None`]).
    pub partitions: Vec<Partition>,
    /// Notes for the operator (for example: primary GPT damaged, backup used).
    pub warnings: Vec<String>,
}

fn damaged(msg: impl Into<String>) -> FileError {
    FileError::PartitionTable(msg.into())
}

fn read_sector(disk: &dyn ReadAt, lba: u64) -> Result<Option<[u8; 512]>, FileError> {
    let Some(off) = lba.checked_mul(SECTOR) else {
        return Ok(None);
    };
    if off.checked_add(SECTOR).is_none_or(|end| end > disk.size()) {
        return Ok(None);
    }
    let mut b = [0u8; 512];
    disk.read_at(off, &mut b).map_err(FileError::Disk)?;
    Ok(Some(b))
}

fn u32le(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64le(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

/// Whether a boot sector is a file system's own (FAT, NTFS, exFAT): those carry
/// the 0x55AA signature too but have no partition table.
fn is_volume_boot_record(s: &[u8; 512]) -> bool {
    let oem = &s[3..11];
    oem == b"NTFS    "
        || oem == b"EXFAT   "
        || oem == b"-FVE-FS-"
        || &s[54..62] == b"FAT12   "
        || &s[54..62] == b"FAT16   "
        || &s[54..59] == b"FAT  "
        || &s[82..90] == b"FAT32   "
}

/// Read the partition table of `disk`.
pub fn read(disk: &dyn ReadAt) -> Result<PartitionTable, FileError> {
    let none = PartitionTable {
        scheme: Scheme::None,
        partitions: Vec::new(),
        warnings: Vec::new(),
    };
    let Some(mbr) = read_sector(disk, 0)? else {
        return Ok(none);
    };
    let signed = mbr[510] == 0x55 && mbr[511] == 0xAA;
    let protective = signed && (0..4).any(|i| mbr[446 + i * 16 + 4] == 0xEE);
    // A GPT header without a valid protective MBR still counts (some tools
    // write hybrid or no MBR); a damaged GPT behind a protective MBR is an error.
    let gpt_sig = read_sector(disk, 1)?.is_some_and(|s| &s[0..8] == b"EFI PART");
    if protective || gpt_sig {
        return read_gpt(disk);
    }
    if !signed || is_volume_boot_record(&mbr) {
        return Ok(none);
    }
    read_mbr(disk, &mbr)
}

fn mbr_entry(s: &[u8; 512], i: usize) -> (u8, u64, u64) {
    let e = &s[446 + i * 16..446 + (i + 1) * 16];
    (e[4], u32le(e, 8) as u64, u32le(e, 12) as u64)
}

fn is_extended(t: u8) -> bool {
    matches!(t, 0x05 | 0x0F | 0x85)
}

fn read_mbr(disk: &dyn ReadAt, mbr: &[u8; 512]) -> Result<PartitionTable, FileError> {
    let sectors = disk.size() / SECTOR;
    let mut parts = Vec::new();
    let mut warnings = Vec::new();
    let mut extended: Option<(u64, u64)> = None;
    for i in 0..4 {
        let (t, lba, count) = mbr_entry(mbr, i);
        if t == 0 || count == 0 {
            continue;
        }
        if lba.saturating_add(count) > sectors {
            return Err(damaged(format!(
                "MBR partition {} (sectors {lba}+{count}) runs past the end of the {sectors}-sector disk",
                i + 1
            )));
        }
        if is_extended(t) {
            if extended.is_some() {
                return Err(damaged("MBR holds more than one extended partition"));
            }
            extended = Some((lba, count));
            continue;
        }
        parts.push(Partition {
            number: i as u32 + 1,
            start: lba * SECTOR,
            size: count * SECTOR,
            type_name: format!("{t:#04x}"),
            label: String::new(),
        });
    }
    if let Some((ext_lba, ext_count)) = extended {
        read_logical(disk, ext_lba, ext_count, &mut parts, &mut warnings)?;
    }
    Ok(PartitionTable {
        scheme: Scheme::Mbr,
        partitions: parts,
        warnings,
    })
}

/// Follow the chain of extended boot records inside the extended partition.
fn read_logical(
    disk: &dyn ReadAt,
    ext_lba: u64,
    ext_count: u64,
    parts: &mut Vec<Partition>,
    warnings: &mut Vec<String>,
) -> Result<(), FileError> {
    let mut ebr_lba = ext_lba;
    let mut seen = std::collections::HashSet::new();
    for n in 0..MAX_LOGICAL {
        if !seen.insert(ebr_lba) {
            return Err(damaged(format!(
                "the extended partition's chain loops back to sector {ebr_lba}"
            )));
        }
        let Some(ebr) = read_sector(disk, ebr_lba)? else {
            return Err(damaged(format!(
                "extended boot record at sector {ebr_lba} is past the end of the disk"
            )));
        };
        if ebr[510] != 0x55 || ebr[511] != 0xAA {
            return Err(damaged(format!(
                "extended boot record at sector {ebr_lba} has no 0x55AA signature"
            )));
        }
        let (t, rel, count) = mbr_entry(&ebr, 0);
        if t != 0 && count != 0 {
            let start = ebr_lba.saturating_add(rel);
            if start.saturating_add(count) > ext_lba.saturating_add(ext_count) {
                return Err(damaged(format!(
                    "logical partition {} runs past the end of its extended partition",
                    n + 5
                )));
            }
            parts.push(Partition {
                number: n + 5,
                start: start * SECTOR,
                size: count * SECTOR,
                type_name: format!("{t:#04x}"),
                label: String::new(),
            });
        }
        let (next_t, next_rel, _) = mbr_entry(&ebr, 1);
        if next_t == 0 || !is_extended(next_t) || next_rel == 0 {
            return Ok(());
        }
        ebr_lba = ext_lba.saturating_add(next_rel);
    }
    warnings.push(format!(
        "more than {MAX_LOGICAL} logical partitions; the rest are not shown"
    ));
    Ok(())
}

fn crc32(data: &[u8]) -> u32 {
    crc::Crc::<u32>::new(&crc::CRC_32_ISO_HDLC).checksum(data)
}

/// A GPT header that passed its checks.
struct GptHeader {
    entries_lba: u64,
    count: u32,
    entry_size: u32,
    entries_crc: u32,
    first_usable: u64,
    last_usable: u64,
}

fn parse_gpt_header(s: &[u8; 512], lba: u64) -> Result<GptHeader, String> {
    if &s[0..8] != b"EFI PART" {
        return Err(format!("no GPT signature at sector {lba}"));
    }
    let size = u32le(s, 12) as usize;
    if !(92..=512).contains(&size) {
        return Err(format!("GPT header at sector {lba} claims {size} bytes"));
    }
    let mut h = s[..size].to_vec();
    h[16..20].fill(0);
    if crc32(&h) != u32le(s, 16) {
        return Err(format!("GPT header at sector {lba} fails its CRC"));
    }
    if u64le(s, 24) != lba {
        return Err(format!(
            "GPT header at sector {lba} says it lives elsewhere"
        ));
    }
    let count = u32le(s, 80);
    let entry_size = u32le(s, 84);
    if count > MAX_GPT_ENTRIES {
        return Err(format!(
            "GPT header at sector {lba} claims {count} entries (ferry reads at most {MAX_GPT_ENTRIES})"
        ));
    }
    if !(128..=4096).contains(&entry_size) || !entry_size.is_multiple_of(8) {
        return Err(format!("GPT entries of {entry_size} bytes"));
    }
    Ok(GptHeader {
        entries_lba: u64le(s, 72),
        count,
        entry_size,
        entries_crc: u32le(s, 88),
        first_usable: u64le(s, 40),
        last_usable: u64le(s, 48),
    })
}

fn read_gpt_at(disk: &dyn ReadAt, lba: u64) -> Result<Vec<Partition>, String> {
    let s = read_sector(disk, lba)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("sector {lba} is past the end of the disk"))?;
    let h = parse_gpt_header(&s, lba)?;
    // Bounded: count ≤ 1024 and entry size ≤ 4096, so at most 4 MiB.
    let len = h.count as u64 * h.entry_size as u64;
    let off = h
        .entries_lba
        .checked_mul(SECTOR)
        .filter(|o| o.checked_add(len).is_some_and(|end| end <= disk.size()))
        .ok_or_else(|| {
            format!(
                "GPT entry array at sector {} is outside the disk",
                h.entries_lba
            )
        })?;
    let mut arr = vec![0u8; len as usize];
    disk.read_at(off, &mut arr).map_err(|e| e.to_string())?;
    if crc32(&arr) != h.entries_crc {
        return Err(format!(
            "GPT entry array at sector {} fails its CRC",
            h.entries_lba
        ));
    }
    let mut parts = Vec::new();
    for (i, e) in arr.chunks_exact(h.entry_size as usize).enumerate() {
        let ty = &e[0..16];
        if ty.iter().all(|b| *b == 0) {
            continue;
        }
        let (first, last) = (u64le(e, 32), u64le(e, 40));
        if last < first || first < h.first_usable || last > h.last_usable {
            return Err(format!(
                "GPT partition {} (sectors {first}..={last}) lies outside the usable area",
                i + 1
            ));
        }
        let start = first * SECTOR;
        let size = (last - first + 1) * SECTOR;
        if start.checked_add(size).is_none_or(|end| end > disk.size()) {
            return Err(format!(
                "GPT partition {} runs past the end of the disk",
                i + 1
            ));
        }
        let name: Vec<u16> = e[56..128]
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .take_while(|c| *c != 0)
            .collect();
        parts.push(Partition {
            number: i as u32 + 1,
            start,
            size,
            type_name: gpt_type_name(ty),
            label: String::from_utf16_lossy(&name),
        });
    }
    Ok(parts)
}

fn read_gpt(disk: &dyn ReadAt) -> Result<PartitionTable, FileError> {
    let last_lba = (disk.size() / SECTOR).saturating_sub(1);
    match read_gpt_at(disk, 1) {
        Ok(partitions) => Ok(PartitionTable {
            scheme: Scheme::Gpt,
            partitions,
            warnings: Vec::new(),
        }),
        Err(primary) => {
            match read_gpt_at(disk, last_lba) {
                Ok(partitions) => {
                    let w = format!("primary GPT damaged ({primary}); read the backup GPT at the end of the disk");
                    tracing::warn!("{w}");
                    Ok(PartitionTable {
                        scheme: Scheme::Gpt,
                        partitions,
                        warnings: vec![w],
                    })
                }
                Err(backup) => Err(damaged(format!(
                    "primary GPT: {primary}; backup GPT: {backup}"
                ))),
            }
        }
    }
}

/// A GPT type GUID (mixed-endian on disk) as text.
fn guid_text(g: &[u8]) -> String {
    format!(
        "{:08X}-{:04X}-{:04X}-{:02X}{:02X}-{}",
        u32le(g, 0),
        u16::from_le_bytes([g[4], g[5]]),
        u16::from_le_bytes([g[6], g[7]]),
        g[8],
        g[9],
        g[10..16]
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect::<String>()
    )
}

fn gpt_type_name(g: &[u8]) -> String {
    let t = guid_text(g);
    let name = match t.as_str() {
        "0FC63DAF-8483-4772-8E79-3D69D8477DE4" => "Linux filesystem",
        "C12A7328-F81F-11D2-BA4B-00A0C93EC93B" => "EFI System",
        "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7" => "Microsoft basic data",
        "E3C9E316-0B5C-4DB8-817D-F92DF00215AE" => "Microsoft reserved",
        "DE94BBA4-06D1-4D40-A16A-BFD50179D6AC" => "Windows recovery",
        "E6D6D379-F507-44C2-A23C-238F2A3DF928" => "Linux LVM",
        "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F" => "Linux swap",
        "21686148-6449-6E6F-744E-656564454649" => "BIOS boot",
        "A19D880F-05FC-4D3B-A006-743F0F84911E" => "Linux RAID",
        "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709" => "Linux root (x86-64)",
        "BC13C2FF-59E6-4262-A352-B275FD6F7172" => "Linux extended boot",
        _ => return t,
    };
    name.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mbr_with(entries: &[(u8, u32, u32)], size: usize) -> Vec<u8> {
        let mut d = vec![0u8; size];
        for (i, (t, lba, n)) in entries.iter().enumerate() {
            let e = 446 + i * 16;
            d[e + 4] = *t;
            d[e + 8..e + 12].copy_from_slice(&lba.to_le_bytes());
            d[e + 12..e + 16].copy_from_slice(&n.to_le_bytes());
        }
        d[510] = 0x55;
        d[511] = 0xAA;
        d
    }

    #[test]
    fn mbr_primary_and_logical_partitions() {
        let mut d = mbr_with(&[(0x83, 2048, 2048), (0x05, 4096, 4096)], 8192 * 512);
        // EBR 1 at 4096: logical at +2048 (len 1024), next EBR at ext+3072.
        let ebr1 = 4096 * 512;
        d[ebr1 + 446 + 4] = 0x83;
        d[ebr1 + 446 + 8..ebr1 + 446 + 12].copy_from_slice(&2048u32.to_le_bytes());
        d[ebr1 + 446 + 12..ebr1 + 446 + 16].copy_from_slice(&512u32.to_le_bytes());
        d[ebr1 + 462 + 4] = 0x05;
        d[ebr1 + 462 + 8..ebr1 + 462 + 12].copy_from_slice(&3072u32.to_le_bytes());
        d[ebr1 + 462 + 12..ebr1 + 462 + 16].copy_from_slice(&1024u32.to_le_bytes());
        d[ebr1 + 510] = 0x55;
        d[ebr1 + 511] = 0xAA;
        let ebr2 = (4096 + 3072) * 512;
        d[ebr2 + 446 + 4] = 0x07;
        d[ebr2 + 446 + 8..ebr2 + 446 + 12].copy_from_slice(&16u32.to_le_bytes());
        d[ebr2 + 446 + 12..ebr2 + 446 + 16].copy_from_slice(&100u32.to_le_bytes());
        d[ebr2 + 510] = 0x55;
        d[ebr2 + 511] = 0xAA;
        let t = read(&d).unwrap();
        assert_eq!(t.scheme, Scheme::Mbr);
        let nums: Vec<(u32, u64, u64)> = t
            .partitions
            .iter()
            .map(|p| (p.number, p.start / 512, p.size / 512))
            .collect();
        assert_eq!(nums, vec![(1, 2048, 2048), (5, 6144, 512), (6, 7184, 100)]);
        assert_eq!(t.partitions[2].type_name, "0x07");
    }

    #[test]
    fn an_ebr_chain_that_loops_is_damage() {
        let mut d = mbr_with(&[(0x05, 64, 64)], 256 * 512);
        let ebr = 64 * 512;
        d[ebr + 462 + 4] = 0x05;
        d[ebr + 462 + 8..ebr + 462 + 12].copy_from_slice(&0u32.to_le_bytes());
        d[ebr + 510] = 0x55;
        d[ebr + 511] = 0xAA;
        // next_rel == 0 ends the chain; point it at itself via a non-zero rel.
        let t = read(&d).unwrap();
        assert!(t.partitions.is_empty());
        d[ebr + 462 + 8..ebr + 462 + 12].copy_from_slice(&1u32.to_le_bytes());
        let ebr2 = 65 * 512;
        d[ebr2 + 462 + 4] = 0x05;
        d[ebr2 + 462 + 8..ebr2 + 462 + 12].copy_from_slice(&1u32.to_le_bytes());
        d[ebr2 + 510] = 0x55;
        d[ebr2 + 511] = 0xAA;
        let err = read(&d).unwrap_err();
        assert!(err.to_string().contains("loops"), "{err}");
    }

    #[test]
    fn an_mbr_partition_past_the_end_is_damage() {
        let d = mbr_with(&[(0x83, 2048, 1 << 30)], 4096 * 512);
        let err = read(&d).unwrap_err();
        assert!(err.to_string().contains("past the end"), "{err}");
    }

    #[test]
    fn no_signature_means_no_table() {
        let d = vec![0u8; 4096];
        assert_eq!(read(&d).unwrap().scheme, Scheme::None);
        let mut fat = mbr_with(&[(0x83, 1, 1)], 4096);
        fat[82..90].copy_from_slice(b"FAT32   ");
        assert_eq!(read(&fat).unwrap().scheme, Scheme::None);
    }

    /// A GPT disk of `sectors` with one partition, primary and backup headers.
    pub(crate) fn gpt_disk(sectors: u64, first: u64, last: u64) -> Vec<u8> {
        let mut d = vec![0u8; (sectors * 512) as usize];
        d[446 + 4] = 0xEE;
        d[446 + 8..446 + 12].copy_from_slice(&1u32.to_le_bytes());
        d[446 + 12..446 + 16].copy_from_slice(&((sectors - 1) as u32).to_le_bytes());
        d[510] = 0x55;
        d[511] = 0xAA;
        let mut entries = vec![0u8; 128 * 128];
        let linux = [
            0xAF, 0x3D, 0xC6, 0x0F, 0x83, 0x84, 0x72, 0x47, 0x8E, 0x79, 0x3D, 0x69, 0xD8, 0x47,
            0x7D, 0xE4,
        ];
        entries[0..16].copy_from_slice(&linux);
        entries[32..40].copy_from_slice(&first.to_le_bytes());
        entries[40..48].copy_from_slice(&last.to_le_bytes());
        for (i, c) in "root é".encode_utf16().enumerate() {
            entries[56 + 2 * i..58 + 2 * i].copy_from_slice(&c.to_le_bytes());
        }
        let ecrc = crc32(&entries);
        let mut put = |hdr_lba: u64, alt: u64, arr_lba: u64| {
            let mut h = [0u8; 92];
            h[0..8].copy_from_slice(b"EFI PART");
            h[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
            h[12..16].copy_from_slice(&92u32.to_le_bytes());
            h[24..32].copy_from_slice(&hdr_lba.to_le_bytes());
            h[32..40].copy_from_slice(&alt.to_le_bytes());
            h[40..48].copy_from_slice(&34u64.to_le_bytes());
            h[48..56].copy_from_slice(&(sectors - 34).to_le_bytes());
            h[72..80].copy_from_slice(&arr_lba.to_le_bytes());
            h[80..84].copy_from_slice(&128u32.to_le_bytes());
            h[84..88].copy_from_slice(&128u32.to_le_bytes());
            h[88..92].copy_from_slice(&ecrc.to_le_bytes());
            let c = crc32(&h);
            h[16..20].copy_from_slice(&c.to_le_bytes());
            let o = (hdr_lba * 512) as usize;
            d[o..o + 92].copy_from_slice(&h);
            let a = (arr_lba * 512) as usize;
            d[a..a + entries.len()].copy_from_slice(&entries);
        };
        put(1, sectors - 1, 2);
        put(sectors - 1, 1, sectors - 33);
        d
    }

    #[test]
    fn gpt_with_backup_when_the_primary_is_damaged() {
        let mut d = gpt_disk(4096, 2048, 4000);
        let t = read(&d).unwrap();
        assert_eq!(t.scheme, Scheme::Gpt);
        assert_eq!(t.partitions.len(), 1);
        let p = &t.partitions[0];
        assert_eq!((p.number, p.start, p.size), (1, 2048 * 512, 1953 * 512));
        assert_eq!(p.type_name, "Linux filesystem");
        assert_eq!(p.label, "root é");
        assert!(t.warnings.is_empty());
        // Damage the primary entry array: the backup is used, with a warning.
        d[2 * 512 + 40] ^= 0xFF;
        let t = read(&d).unwrap();
        assert_eq!(t.partitions.len(), 1);
        assert!(t.warnings[0].contains("backup"), "{:?}", t.warnings);
        // Damage the backup too: a clear error naming both.
        d[4095 * 512 + 20] ^= 0xFF;
        let err = read(&d).unwrap_err();
        assert!(err.to_string().contains("primary GPT"), "{err}");
        assert!(err.to_string().contains("backup GPT"), "{err}");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]
        /// Whatever the first sectors hold, reading the table returns (never
        /// panics, never allocates by a hostile count).
        #[test]
        fn hostile_tables_never_panic(
            head in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2048),
            flips in proptest::collection::vec((0usize..(1 << 16), proptest::prelude::any::<u8>()), 0..16),
            gpt in proptest::prelude::any::<bool>(),
        ) {
            let mut d = if gpt { gpt_disk(128, 34, 90) } else { mbr_with(&[(0x83, 1, 10), (0x05, 20, 50)], 128 * 512) };
            let n = head.len().min(d.len());
            if !gpt { d[..n].copy_from_slice(&head[..n]); d[510] = 0x55; d[511] = 0xAA; }
            let len = d.len();
            for (at, v) in flips { d[at % len] = v; }
            let _ = read(&d);
        }
    }
}
