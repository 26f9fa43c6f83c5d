//! KMIP 1.4 tag and enumeration values ferry uses (values as in the KMIP 1.4
//! specification, section 9.1.3; cross-checked with PyKMIP's `kmip/core/enums.py`).
//! Constants only.
#![allow(missing_docs)]

// Tags.
pub const ACTIVATION_DATE: u32 = 0x420001;
pub const ATTRIBUTE: u32 = 0x420008;
pub const ATTRIBUTE_INDEX: u32 = 0x420009;
pub const ATTRIBUTE_NAME: u32 = 0x42000A;
pub const ATTRIBUTE_VALUE: u32 = 0x42000B;
pub const BATCH_COUNT: u32 = 0x42000D;
pub const BATCH_ITEM: u32 = 0x42000F;
pub const COMMON_TEMPLATE_ATTRIBUTE: u32 = 0x42001F;
pub const CRYPTOGRAPHIC_ALGORITHM: u32 = 0x420028;
pub const CRYPTOGRAPHIC_LENGTH: u32 = 0x42002A;
pub const CRYPTOGRAPHIC_PARAMETERS: u32 = 0x42002B;
pub const CRYPTOGRAPHIC_USAGE_MASK: u32 = 0x42002C;
pub const HASHING_ALGORITHM: u32 = 0x420038;
pub const INITIAL_DATE: u32 = 0x420039;
pub const KEY_BLOCK: u32 = 0x420040;
pub const KEY_FORMAT_TYPE: u32 = 0x420042;
pub const KEY_MATERIAL: u32 = 0x420043;
pub const KEY_VALUE: u32 = 0x420045;
pub const LINK: u32 = 0x42004A;
pub const LINK_TYPE: u32 = 0x42004B;
pub const LINKED_OBJECT_IDENTIFIER: u32 = 0x42004C;
pub const MAXIMUM_RESPONSE_SIZE: u32 = 0x420050;
pub const NAME: u32 = 0x420053;
pub const NAME_TYPE: u32 = 0x420054;
pub const NAME_VALUE: u32 = 0x420055;
pub const OBJECT_TYPE: u32 = 0x420057;
pub const OPERATION: u32 = 0x42005C;
pub const PADDING_METHOD: u32 = 0x42005F;
pub const PRIVATE_KEY: u32 = 0x420064;
pub const PRIVATE_KEY_TEMPLATE_ATTRIBUTE: u32 = 0x420065;
pub const PRIVATE_KEY_UNIQUE_IDENTIFIER: u32 = 0x420066;
pub const PROTOCOL_VERSION: u32 = 0x420069;
pub const PROTOCOL_VERSION_MAJOR: u32 = 0x42006A;
pub const PROTOCOL_VERSION_MINOR: u32 = 0x42006B;
pub const PUBLIC_KEY: u32 = 0x42006D;
pub const PUBLIC_KEY_TEMPLATE_ATTRIBUTE: u32 = 0x42006E;
pub const PUBLIC_KEY_UNIQUE_IDENTIFIER: u32 = 0x42006F;
pub const QUERY_FUNCTION: u32 = 0x420074;
pub const REQUEST_HEADER: u32 = 0x420077;
pub const REQUEST_MESSAGE: u32 = 0x420078;
pub const REQUEST_PAYLOAD: u32 = 0x420079;
pub const RESPONSE_HEADER: u32 = 0x42007A;
pub const RESPONSE_MESSAGE: u32 = 0x42007B;
pub const RESPONSE_PAYLOAD: u32 = 0x42007C;
pub const RESULT_MESSAGE: u32 = 0x42007D;
pub const RESULT_REASON: u32 = 0x42007E;
pub const RESULT_STATUS: u32 = 0x42007F;
pub const REVOCATION_MESSAGE: u32 = 0x420080;
pub const REVOCATION_REASON: u32 = 0x420081;
pub const REVOCATION_REASON_CODE: u32 = 0x420082;
pub const SERVER_INFORMATION: u32 = 0x420088;
pub const STATE: u32 = 0x42008D;
pub const TEMPLATE_ATTRIBUTE: u32 = 0x420091;
pub const TIME_STAMP: u32 = 0x420092;
pub const UNIQUE_BATCH_ITEM_ID: u32 = 0x420093;
pub const UNIQUE_IDENTIFIER: u32 = 0x420094;
pub const VENDOR_IDENTIFICATION: u32 = 0x42009D;
pub const DATA: u32 = 0x4200C2;
pub const DEACTIVATION_DATE: u32 = 0x42002F;
pub const DESTROY_DATE: u32 = 0x420033;
pub const IV_COUNTER_NONCE: u32 = 0x42003D;
pub const KEY_COMPRESSION_TYPE: u32 = 0x420041;
pub const KEY_WRAPPING_SPECIFICATION: u32 = 0x420047;
pub const MAXIMUM_ITEMS: u32 = 0x42004F;
pub const OFFSET: u32 = 0x420058;
pub const OFFSET_ITEMS: u32 = 0x4200D4;
pub const LOCATED_ITEMS: u32 = 0x4200D5;

// Operations.
pub const OP_CREATE_KEY_PAIR: u32 = 0x02;
pub const OP_LOCATE: u32 = 0x08;
pub const OP_GET: u32 = 0x0A;
pub const OP_GET_ATTRIBUTES: u32 = 0x0B;
pub const OP_ACTIVATE: u32 = 0x12;
pub const OP_REVOKE: u32 = 0x13;
pub const OP_DESTROY: u32 = 0x14;
pub const OP_QUERY: u32 = 0x18;
pub const OP_REKEY_KEY_PAIR: u32 = 0x1D;
pub const OP_DISCOVER_VERSIONS: u32 = 0x1E;
pub const OP_DECRYPT: u32 = 0x20;

// Object types.
pub const OBJ_PUBLIC_KEY: u32 = 3;
pub const OBJ_PRIVATE_KEY: u32 = 4;

// Key format types.
pub const FMT_RAW: u32 = 1;
pub const FMT_PKCS1: u32 = 3;
pub const FMT_PKCS8: u32 = 4;
pub const FMT_X509: u32 = 5;

// Algorithms, padding, hashing.
pub const ALG_RSA: u32 = 4;
pub const PAD_OAEP: u32 = 2;
pub const HASH_SHA1: u32 = 4;

// Usage mask bits.
pub const USAGE_ENCRYPT: i32 = 0x04;
pub const USAGE_DECRYPT: i32 = 0x08;
pub const USAGE_WRAP_KEY: i32 = 0x10;
pub const USAGE_UNWRAP_KEY: i32 = 0x20;

// Name type.
pub const NAME_TEXT: u32 = 1;

// States.
pub const STATE_PRE_ACTIVE: u32 = 1;
pub const STATE_ACTIVE: u32 = 2;
pub const STATE_DEACTIVATED: u32 = 3;
pub const STATE_COMPROMISED: u32 = 4;
pub const STATE_DESTROYED: u32 = 5;

// Link types.
pub const LINK_PUBLIC_KEY: u32 = 0x102;
pub const LINK_PRIVATE_KEY: u32 = 0x103;
pub const LINK_REPLACEMENT: u32 = 0x106;
pub const LINK_REPLACED: u32 = 0x107;

// Query functions.
pub const QUERY_OPERATIONS: u32 = 1;
pub const QUERY_OBJECTS: u32 = 2;
pub const QUERY_SERVER_INFORMATION: u32 = 3;

// Revocation reasons.
pub const REVOKE_UNSPECIFIED: u32 = 1;
pub const REVOKE_KEY_COMPROMISE: u32 = 2;
pub const REVOKE_SUPERSEDED: u32 = 5;
pub const REVOKE_CESSATION: u32 = 6;

// Result status.
pub const STATUS_SUCCESS: u32 = 0;
pub const STATUS_FAILED: u32 = 1;

// Result reasons.
pub const REASON_ITEM_NOT_FOUND: u32 = 0x01;
pub const REASON_RESPONSE_TOO_LARGE: u32 = 0x02;
pub const REASON_INVALID_MESSAGE: u32 = 0x04;
pub const REASON_OPERATION_NOT_SUPPORTED: u32 = 0x05;
pub const REASON_MISSING_DATA: u32 = 0x06;
pub const REASON_INVALID_FIELD: u32 = 0x07;
pub const REASON_FEATURE_NOT_SUPPORTED: u32 = 0x08;
pub const REASON_CRYPTOGRAPHIC_FAILURE: u32 = 0x0A;
pub const REASON_ILLEGAL_OPERATION: u32 = 0x0B;
pub const REASON_PERMISSION_DENIED: u32 = 0x0C;
pub const REASON_KEY_FORMAT_TYPE_NOT_SUPPORTED: u32 = 0x10;
pub const REASON_GENERAL_FAILURE: u32 = 0x100;

// Hashing algorithms beyond SHA-1.
pub const HASH_SHA256: u32 = 6;

// Padding methods beyond OAEP.
pub const PAD_PKCS1_V1_5: u32 = 3;

// Cryptographic algorithms beyond RSA (to name what is refused).
pub const ALG_AES: u32 = 3;

/// Name of a result reason, for error messages.
pub fn reason_name(r: u32) -> &'static str {
    match r {
        0x01 => "Item Not Found",
        0x02 => "Response Too Large",
        0x03 => "Authentication Not Successful",
        0x04 => "Invalid Message",
        0x05 => "Operation Not Supported",
        0x06 => "Missing Data",
        0x07 => "Invalid Field",
        0x08 => "Feature Not Supported",
        0x09 => "Operation Canceled By Requester",
        0x0A => "Cryptographic Failure",
        0x0B => "Illegal Operation",
        0x0C => "Permission Denied",
        0x0D => "Object Archived",
        0x0E => "Index Out Of Bounds",
        0x0F => "Application Namespace Not Supported",
        0x10 => "Key Format Type Not Supported",
        0x11 => "Key Compression Type Not Supported",
        0x12 => "Encoding Option Error",
        0x13 => "Key Value Not Present",
        0x14 => "Attestation Required",
        0x15 => "Attestation Failed",
        0x16 => "Sensitive",
        0x17 => "Not Extractable",
        0x18 => "Object Already Exists",
        0x100 => "General Failure",
        _ => "Unknown Reason",
    }
}

/// Name of an operation, for messages.
pub fn operation_name(op: u32) -> &'static str {
    match op {
        OP_CREATE_KEY_PAIR => "CreateKeyPair",
        OP_LOCATE => "Locate",
        OP_GET => "Get",
        OP_GET_ATTRIBUTES => "GetAttributes",
        OP_ACTIVATE => "Activate",
        OP_REVOKE => "Revoke",
        OP_DESTROY => "Destroy",
        OP_QUERY => "Query",
        OP_REKEY_KEY_PAIR => "ReKeyKeyPair",
        OP_DISCOVER_VERSIONS => "DiscoverVersions",
        OP_DECRYPT => "Decrypt",
        _ => "operation",
    }
}

/// Name of a state.
pub fn state_name(s: u32) -> &'static str {
    match s {
        STATE_PRE_ACTIVE => "Pre-Active",
        STATE_ACTIVE => "Active",
        STATE_DEACTIVATED => "Deactivated",
        STATE_COMPROMISED => "Compromised",
        STATE_DESTROYED => "Destroyed",
        6 => "Destroyed Compromised",
        _ => "Unknown",
    }
}
