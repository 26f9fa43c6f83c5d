//! KMIP TTLV codec: Tag (3 bytes), Type (1), Length (4, big-endian), Value padded
//! to a multiple of 8 bytes; structures nest. Pure: no I/O.
//!
//! Decoding is strict and bounded: fixed-size types must have their exact length,
//! padding must be zero, a structure's children must fill it exactly, nesting is
//! limited to [`MAX_DEPTH`], messages to [`MAX_MESSAGE`]; every length is checked
//! against the bytes actually present before anything is allocated. Decoding never
//! panics.

use std::fmt;

/// Deepest nesting accepted.
pub const MAX_DEPTH: usize = 32;
/// Largest message accepted (KMIP messages carrying keys are a few KiB).
pub const MAX_MESSAGE: usize = 1 << 20;

/// A KMIP tag (0x42xxxx for standard tags).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tag(pub u32);

impl fmt::Debug for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tag({:06X})", self.0)
    }
}
impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:06X}", self.0)
    }
}

/// An item's value.
#[derive(Clone, PartialEq, Eq)]
pub enum Value {
    /// 0x01.
    Structure(Vec<Ttlv>),
    /// 0x02.
    Integer(i32),
    /// 0x03.
    LongInteger(i64),
    /// 0x04: two's complement, big-endian, length a multiple of 8.
    BigInteger(Vec<u8>),
    /// 0x05.
    Enumeration(u32),
    /// 0x06.
    Boolean(bool),
    /// 0x07.
    TextString(String),
    /// 0x08.
    ByteString(Vec<u8>),
    /// 0x09: seconds since the Unix epoch.
    DateTime(i64),
    /// 0x0A: seconds.
    Interval(u32),
}

impl fmt::Debug for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Structure(v) => f.debug_list().entries(v).finish(),
            Value::Integer(i) => write!(f, "Integer({i})"),
            Value::LongInteger(i) => write!(f, "LongInteger({i})"),
            // Byte strings and big integers can be key material: never print them.
            Value::BigInteger(b) => write!(f, "BigInteger(<{} bytes>)", b.len()),
            Value::Enumeration(e) => write!(f, "Enumeration({e:#010X})"),
            Value::Boolean(b) => write!(f, "Boolean({b})"),
            Value::TextString(s) => write!(f, "TextString({s:?})"),
            Value::ByteString(b) => write!(f, "ByteString(<{} bytes>)", b.len()),
            Value::DateTime(t) => write!(f, "DateTime({t})"),
            Value::Interval(i) => write!(f, "Interval({i})"),
        }
    }
}

impl Value {
    fn type_byte(&self) -> u8 {
        match self {
            Value::Structure(_) => 0x01,
            Value::Integer(_) => 0x02,
            Value::LongInteger(_) => 0x03,
            Value::BigInteger(_) => 0x04,
            Value::Enumeration(_) => 0x05,
            Value::Boolean(_) => 0x06,
            Value::TextString(_) => 0x07,
            Value::ByteString(_) => 0x08,
            Value::DateTime(_) => 0x09,
            Value::Interval(_) => 0x0A,
        }
    }
    /// Name of the type, for errors.
    pub fn type_name(&self) -> &'static str {
        type_name(self.type_byte())
    }
}

fn type_name(t: u8) -> &'static str {
    match t {
        0x01 => "Structure",
        0x02 => "Integer",
        0x03 => "Long Integer",
        0x04 => "Big Integer",
        0x05 => "Enumeration",
        0x06 => "Boolean",
        0x07 => "Text String",
        0x08 => "Byte String",
        0x09 => "Date-Time",
        0x0A => "Interval",
        _ => "unknown type",
    }
}

/// One TTLV item.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ttlv {
    /// Tag.
    pub tag: Tag,
    /// Value.
    pub value: Value,
}

/// Codec and access errors.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TtlvError {
    /// Input ends inside an item.
    #[error("TTLV truncated at offset {offset}: need {need} more bytes")]
    Truncated {
        /// Offset of the item.
        offset: usize,
        /// Bytes missing.
        need: usize,
    },
    /// Unknown item type.
    #[error("unknown TTLV type {kind:#04x} for tag {tag} at offset {offset}")]
    UnknownType {
        /// Tag.
        tag: Tag,
        /// Type byte.
        kind: u8,
        /// Offset.
        offset: usize,
    },
    /// Length does not fit the type.
    #[error("bad length {len} for {kind} tag {tag} at offset {offset}")]
    BadLength {
        /// Tag.
        tag: Tag,
        /// Type name.
        kind: &'static str,
        /// Length.
        len: u32,
        /// Offset.
        offset: usize,
    },
    /// Non-zero padding or value bytes that the type forbids.
    #[error("bad value for {kind} tag {tag} at offset {offset}: {detail}")]
    BadValue {
        /// Tag.
        tag: Tag,
        /// Type name.
        kind: &'static str,
        /// Offset.
        offset: usize,
        /// Detail.
        detail: &'static str,
    },
    /// Nesting deeper than [`MAX_DEPTH`].
    #[error("TTLV nested deeper than {MAX_DEPTH} at offset {offset}")]
    TooDeep {
        /// Offset.
        offset: usize,
    },
    /// Message larger than the bound.
    #[error("TTLV message of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// Declared size.
        len: usize,
        /// Bound.
        max: usize,
    },
    /// Bytes after the top-level item.
    #[error("{0} unexpected bytes after the TTLV message")]
    Trailing(usize),
    /// A required child is absent.
    #[error("missing field {0}")]
    MissingField(Tag),
    /// A field has another type than expected.
    #[error("field {tag} is a {found}, expected {expected}")]
    WrongType {
        /// Tag.
        tag: Tag,
        /// Expected type.
        expected: &'static str,
        /// Found type.
        found: &'static str,
    },
}

fn padded(len: usize) -> usize {
    len.div_ceil(8) * 8
}

impl Ttlv {
    /// Build an item.
    pub fn new(tag: u32, value: Value) -> Self {
        Ttlv {
            tag: Tag(tag),
            value,
        }
    }
    /// Build a structure.
    pub fn structure(tag: u32, children: Vec<Ttlv>) -> Self {
        Ttlv::new(tag, Value::Structure(children))
    }

    /// Encode.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_into(&mut out);
        out
    }

    /// Encode, appending to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.tag.0.to_be_bytes()[1..]);
        out.push(self.value.type_byte());
        let len_at = out.len();
        out.extend_from_slice(&[0; 4]);
        let start = out.len();
        match &self.value {
            Value::Structure(children) => {
                for c in children {
                    c.encode_into(out);
                }
            }
            Value::Integer(i) => out.extend_from_slice(&i.to_be_bytes()),
            Value::LongInteger(i) | Value::DateTime(i) => out.extend_from_slice(&i.to_be_bytes()),
            Value::BigInteger(b) | Value::ByteString(b) => out.extend_from_slice(b),
            Value::Enumeration(e) | Value::Interval(e) => out.extend_from_slice(&e.to_be_bytes()),
            Value::Boolean(b) => out.extend_from_slice(&(*b as u64).to_be_bytes()),
            Value::TextString(s) => out.extend_from_slice(s.as_bytes()),
        }
        let len = out.len() - start;
        out[len_at..len_at + 4].copy_from_slice(&(len as u32).to_be_bytes());
        out.resize(start + padded(len), 0);
    }

    /// Decode exactly one item from `b`.
    pub fn decode(b: &[u8]) -> Result<Ttlv, TtlvError> {
        if b.len() > MAX_MESSAGE {
            return Err(TtlvError::TooLarge {
                len: b.len(),
                max: MAX_MESSAGE,
            });
        }
        let (t, used) = decode_at(b, 0, 0)?;
        if used != b.len() {
            return Err(TtlvError::Trailing(b.len() - used));
        }
        Ok(t)
    }

    /// The child with `tag` (first one).
    pub fn child(&self, tag: u32) -> Option<&Ttlv> {
        match &self.value {
            Value::Structure(c) => c.iter().find(|t| t.tag.0 == tag),
            _ => None,
        }
    }
    /// All children with `tag`.
    pub fn children(&self, tag: u32) -> impl Iterator<Item = &Ttlv> {
        let c: &[Ttlv] = match &self.value {
            Value::Structure(c) => c,
            _ => &[],
        };
        c.iter().filter(move |t| t.tag.0 == tag)
    }
    /// A required child.
    pub fn req(&self, tag: u32) -> Result<&Ttlv, TtlvError> {
        self.child(tag).ok_or(TtlvError::MissingField(Tag(tag)))
    }
    fn wrong(&self, expected: &'static str) -> TtlvError {
        TtlvError::WrongType {
            tag: self.tag,
            expected,
            found: self.value.type_name(),
        }
    }
    /// As an enumeration.
    pub fn as_enum(&self) -> Result<u32, TtlvError> {
        match self.value {
            Value::Enumeration(e) => Ok(e),
            _ => Err(self.wrong("Enumeration")),
        }
    }
    /// As an integer.
    pub fn as_int(&self) -> Result<i32, TtlvError> {
        match self.value {
            Value::Integer(i) => Ok(i),
            _ => Err(self.wrong("Integer")),
        }
    }
    /// As text.
    pub fn as_text(&self) -> Result<&str, TtlvError> {
        match &self.value {
            Value::TextString(s) => Ok(s),
            _ => Err(self.wrong("Text String")),
        }
    }
    /// As bytes.
    pub fn as_bytes(&self) -> Result<&[u8], TtlvError> {
        match &self.value {
            Value::ByteString(b) => Ok(b),
            _ => Err(self.wrong("Byte String")),
        }
    }
}

/// Total size of the message whose first 8 bytes are `header` (a network reader
/// reads the header, then exactly this many bytes in all). Bounded by `max`.
pub fn frame_len(header: &[u8; 8], max: usize) -> Result<usize, TtlvError> {
    let len = u32::from_be_bytes([header[4], header[5], header[6], header[7]]) as usize;
    let total = 8 + padded(len);
    if total > max {
        return Err(TtlvError::TooLarge { len: total, max });
    }
    Ok(total)
}

fn decode_at(b: &[u8], at: usize, depth: usize) -> Result<(Ttlv, usize), TtlvError> {
    if depth > MAX_DEPTH {
        return Err(TtlvError::TooDeep { offset: at });
    }
    let rest = &b[at..];
    if rest.len() < 8 {
        return Err(TtlvError::Truncated {
            offset: at,
            need: 8 - rest.len(),
        });
    }
    let tag = Tag(u32::from_be_bytes([0, rest[0], rest[1], rest[2]]));
    let kind = rest[3];
    let len32 = u32::from_be_bytes([rest[4], rest[5], rest[6], rest[7]]);
    let len = len32 as usize;
    let total = 8usize.checked_add(padded(len)).ok_or(TtlvError::TooLarge {
        len,
        max: MAX_MESSAGE,
    })?;
    if rest.len() < total {
        return Err(TtlvError::Truncated {
            offset: at,
            need: total - rest.len(),
        });
    }
    let v = &rest[8..8 + len];
    if rest[8 + len..total].iter().any(|&x| x != 0) {
        return Err(TtlvError::BadValue {
            tag,
            kind: type_name(kind),
            offset: at,
            detail: "non-zero padding",
        });
    }
    let fixed = |n: usize| -> Result<(), TtlvError> {
        if len != n {
            return Err(TtlvError::BadLength {
                tag,
                kind: type_name(kind),
                len: len32,
                offset: at,
            });
        }
        Ok(())
    };
    let value = match kind {
        0x01 => {
            let mut children = Vec::new();
            let end = at + 8 + len;
            let mut p = at + 8;
            while p < end {
                let (c, used) = decode_at(&b[..end], p, depth + 1)?;
                children.push(c);
                p += used;
            }
            Value::Structure(children)
        }
        0x02 => {
            fixed(4)?;
            Value::Integer(i32::from_be_bytes([v[0], v[1], v[2], v[3]]))
        }
        0x03 | 0x09 => {
            fixed(8)?;
            let mut a = [0u8; 8];
            a.copy_from_slice(v);
            let n = i64::from_be_bytes(a);
            if kind == 0x03 {
                Value::LongInteger(n)
            } else {
                Value::DateTime(n)
            }
        }
        0x04 => {
            if len == 0 || !len.is_multiple_of(8) {
                return Err(TtlvError::BadLength {
                    tag,
                    kind: "Big Integer",
                    len: len32,
                    offset: at,
                });
            }
            Value::BigInteger(v.to_vec())
        }
        0x05 | 0x0A => {
            fixed(4)?;
            let n = u32::from_be_bytes([v[0], v[1], v[2], v[3]]);
            if kind == 0x05 {
                Value::Enumeration(n)
            } else {
                Value::Interval(n)
            }
        }
        0x06 => {
            fixed(8)?;
            match v {
                [0, 0, 0, 0, 0, 0, 0, 0] => Value::Boolean(false),
                [0, 0, 0, 0, 0, 0, 0, 1] => Value::Boolean(true),
                _ => {
                    return Err(TtlvError::BadValue {
                        tag,
                        kind: "Boolean",
                        offset: at,
                        detail: "not 0 or 1",
                    })
                }
            }
        }
        0x07 => Value::TextString(
            std::str::from_utf8(v)
                .map_err(|_| TtlvError::BadValue {
                    tag,
                    kind: "Text String",
                    offset: at,
                    detail: "invalid UTF-8",
                })?
                .to_string(),
        ),
        0x08 => Value::ByteString(v.to_vec()),
        k => {
            return Err(TtlvError::UnknownType {
                tag,
                kind: k,
                offset: at,
            })
        }
    };
    Ok((Ttlv { tag, value }, total))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn h(s: &str) -> Vec<u8> {
        hex::decode(s.replace(' ', "")).unwrap()
    }

    // Encoding examples from the KMIP 1.4 specification, section 9.1.2.
    #[test]
    fn spec_examples() {
        let cases = [
            (Ttlv::new(0x420020, Value::Integer(8)), "42 00 20 | 02 | 00 00 00 04 | 00 00 00 08 00 00 00 00"),
            (Ttlv::new(0x420020, Value::LongInteger(123456789000000000)), "42 00 20 | 03 | 00 00 00 08 | 01 B6 9B 4B A5 74 92 00"),
            (
                Ttlv::new(0x420020, Value::BigInteger(h("0000000000000000 0000000003FD35EB 6BC2DF4618080000"))),
                "42 00 20 | 04 | 00 00 00 18 | 00 00 00 00 00 00 00 00 00 00 00 00 03 FD 35 EB 6B C2 DF 46 18 08 00 00",
            ),
            (Ttlv::new(0x420020, Value::Enumeration(255)), "42 00 20 | 05 | 00 00 00 04 | 00 00 00 FF 00 00 00 00"),
            (Ttlv::new(0x420020, Value::Boolean(true)), "42 00 20 | 06 | 00 00 00 08 | 00 00 00 00 00 00 00 01"),
            (Ttlv::new(0x420020, Value::TextString("Hello World".into())), "42 00 20 | 07 | 00 00 00 0B | 48 65 6C 6C 6F 20 57 6F 72 6C 64 00 00 00 00 00"),
            (Ttlv::new(0x420020, Value::ByteString(vec![1, 2, 3])), "42 00 20 | 08 | 00 00 00 03 | 01 02 03 00 00 00 00 00"),
            (Ttlv::new(0x420020, Value::DateTime(0x47DA67F8)), "42 00 20 | 09 | 00 00 00 08 | 00 00 00 00 47 DA 67 F8"),
            (Ttlv::new(0x420020, Value::Interval(864000)), "42 00 20 | 0A | 00 00 00 04 | 00 0D 2F 00 00 00 00 00"),
            (
                Ttlv::structure(0x420020, vec![Ttlv::new(0x420004, Value::Enumeration(254)), Ttlv::new(0x420005, Value::Integer(255))]),
                "42 00 20 | 01 | 00 00 00 20 | 42 00 04 | 05 | 00 00 00 04 | 00 00 00 FE 00 00 00 00 | 42 00 05 | 02 | 00 00 00 04 | 00 00 00 FF 00 00 00 00",
            ),
        ];
        for (item, bytes) in cases {
            let want = h(&bytes.replace('|', ""));
            assert_eq!(item.encode(), want, "{item:?}");
            assert_eq!(Ttlv::decode(&want).unwrap(), item);
        }
    }

    #[test]
    fn strictness() {
        let good = Ttlv::new(0x420020, Value::Integer(8)).encode();
        let mut bad_pad = good.clone();
        bad_pad[15] = 1;
        assert!(matches!(
            Ttlv::decode(&bad_pad),
            Err(TtlvError::BadValue {
                detail: "non-zero padding",
                ..
            })
        ));
        let mut bad_len = good.clone();
        bad_len[7] = 5;
        assert!(matches!(
            Ttlv::decode(&bad_len),
            Err(TtlvError::BadLength { .. })
        ));
        let mut huge = good.clone();
        huge[4..8].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            Ttlv::decode(&huge),
            Err(TtlvError::Truncated { .. })
        ));
        assert!(matches!(
            Ttlv::decode(&good[..12]),
            Err(TtlvError::Truncated { .. })
        ));
        let mut bool2 = Ttlv::new(1, Value::Boolean(true)).encode();
        bool2[15] = 2;
        assert!(matches!(
            Ttlv::decode(&bool2),
            Err(TtlvError::BadValue { .. })
        ));
        let mut trailing = good.clone();
        trailing.extend_from_slice(&[0; 8]);
        assert_eq!(Ttlv::decode(&trailing), Err(TtlvError::Trailing(8)));
        // Deep nesting is refused.
        let mut t = Ttlv::new(0x420001, Value::Integer(1));
        for _ in 0..40 {
            t = Ttlv::structure(0x420001, vec![t]);
        }
        assert!(matches!(
            Ttlv::decode(&t.encode()),
            Err(TtlvError::TooDeep { .. })
        ));
        let mut hdr = [0u8; 8];
        hdr[4..].copy_from_slice(&(2u32 << 20).to_be_bytes());
        assert!(frame_len(&hdr, MAX_MESSAGE).is_err());
        hdr[4..].copy_from_slice(&11u32.to_be_bytes());
        assert_eq!(frame_len(&hdr, MAX_MESSAGE).unwrap(), 24);
    }

    #[test]
    fn key_material_is_not_printed() {
        let t = Ttlv::new(0x420043, Value::ByteString(vec![0xAB; 32]));
        assert!(!format!("{t:?}").to_lowercase().contains("ab, ab"));
        assert!(!format!("{t:?}").contains("171"));
    }

    fn arb_ttlv() -> impl Strategy<Value = Ttlv> {
        let leaf = prop_oneof![
            any::<i32>().prop_map(Value::Integer),
            any::<i64>().prop_map(Value::LongInteger),
            proptest::collection::vec(any::<u8>(), 1..4)
                .prop_map(|w| Value::BigInteger(w.iter().flat_map(|&x| [x; 8]).collect())),
            any::<u32>().prop_map(Value::Enumeration),
            any::<bool>().prop_map(Value::Boolean),
            ".{0,20}".prop_map(Value::TextString),
            proptest::collection::vec(any::<u8>(), 0..40).prop_map(Value::ByteString),
            any::<i64>().prop_map(Value::DateTime),
            any::<u32>().prop_map(Value::Interval),
        ];
        let tagged = (0x420000u32..0x4200FF, leaf).prop_map(|(t, v)| Ttlv::new(t, v));
        tagged.prop_recursive(4, 32, 6, |inner| {
            (
                0x420000u32..0x4200FF,
                proptest::collection::vec(inner, 0..6),
            )
                .prop_map(|(t, c)| Ttlv::structure(t, c))
        })
    }

    proptest! {
        #[test]
        fn encode_decode_identity(t in arb_ttlv()) {
            let b = t.encode();
            prop_assert_eq!(b.len() % 8, 0);
            prop_assert_eq!(Ttlv::decode(&b).unwrap(), t);
        }

        #[test]
        fn arbitrary_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = Ttlv::decode(&b);
        }

        #[test]
        fn mutated_messages_never_panic(t in arb_ttlv(), at in any::<usize>(), x in any::<u8>()) {
            let mut b = t.encode();
            let i = at % b.len();
            b[i] ^= x;
            let _ = Ttlv::decode(&b);
        }
    }
}
