//! Identifiers and timestamps the mock hands out: UUIDs, vSphere disk UUIDs, opaque
//! tokens, xsd:dateTime strings. No state.

use rand::RngCore;

/// A random RFC 4122 version 4 UUID, lower case.
pub fn uuid() -> String {
    let mut b = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut b);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex(&b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// A virtual disk UUID as vSphere shows it in `backing.uuid`
/// (`6000C29x-xxxx-xxxx-xxxx-xxxxxxxxxxxx`).
pub fn disk_uuid() -> String {
    let u = uuid();
    format!("6000C29{}", &u[7..])
}

/// `n` random bytes as lower-case hex (tokens, ticket ids).
pub fn token(n: usize) -> String {
    let mut b = vec![0u8; n];
    rand::thread_rng().fill_bytes(&mut b);
    hex(&b)
}

/// Lower-case hex.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Now as xsd:dateTime (UTC, microseconds).
pub fn now() -> String {
    datetime(time::OffsetDateTime::now_utc())
}

/// A time as xsd:dateTime (UTC, microseconds), e.g. `2026-05-01T10:00:00.123456Z`.
pub fn datetime(t: time::OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.microsecond()
    )
}

/// The device-directory entry name for a disk UUID: dashes removed, lower case.
pub fn device_entry_name(disk_uuid: &str) -> String {
    disk_uuid.replace('-', "").to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        let u = uuid();
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
        let d = disk_uuid();
        assert!(d.starts_with("6000C29"));
        assert_eq!(device_entry_name(&d).len(), 32);
        assert!(device_entry_name(&d).starts_with("6000c29"));
        let t = time::OffsetDateTime::from_unix_timestamp(0).unwrap();
        assert_eq!(datetime(t), "1970-01-01T00:00:00.000000Z");
        assert_eq!(token(4).len(), 8);
    }
}
