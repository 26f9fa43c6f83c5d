//! The wire types of the agent API (requests and responses), their OpenAPI schemas
//! (utoipa) and request validation.
//!
//! These are the API contract, deliberately separate from the library's internal
//! types ([`crate::transport::select`], [`crate::state`]) so the contract changes
//! only on purpose; conversions live here. Every limit a schema documents
//! (`minLength`, `maxLength`, `maxItems`, `minimum`...) is enforced by
//! [`Validate`], and nothing beyond what the schema says plus the few cross-field
//! rules documented on each type. Optional request fields may be absent but never
//! `null`. Response types are also what the orchestrator deserializes.

use super::error::ApiError;
pub use crate::job::quiesce::QuiescePolicy;
use crate::state::{JobKind, JobState};
use crate::transport::select::{DiskInfo, HostReach, Mode, Policy, ProxyInfo, VmInfo};
use serde::{Deserialize, Deserializer, Serialize};
use std::collections::BTreeSet;
use utoipa::openapi::schema::{ObjectBuilder, Schema, SchemaType, Type};
use utoipa::openapi::RefOr;
use utoipa::{IntoParams, PartialSchema, ToSchema};

/// Longest name (tenant, VM, moref, host, datastore, label, key provider), in
/// characters.
pub const NAME_MAX: usize = 256;
/// Longest path, in characters.
pub const PATH_MAX: usize = 4096;
/// Most disks per VM.
pub const DISKS_MAX: usize = 64;
/// Largest retention count.
pub const KEEP_MAX: u32 = 10_000;
/// Most tenant names in a key sync request.
pub const TENANTS_MAX: usize = 100;
/// Largest page of jobs.
pub const LIMIT_MAX: u32 = 1000;

/// Deserialize an optional field that may be absent (`#[serde(default)]`) but not
/// `null`, as the schemas say.
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

/// A JSON integer for `T`. JSON Schema counts `2.0` as an integer, so integral
/// floats are accepted; anything out of `T`'s range is an error.
struct JsonInt<T>(T);

impl<'de, T: TryFrom<i128>> Deserialize<'de> for JsonInt<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(std::marker::PhantomData<T>);
        impl<T: TryFrom<i128>> serde::de::Visitor<'_> for V<T> {
            type Value = T;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "an integer in range ({})", std::any::type_name::<T>())
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<T, E> {
                T::try_from(v as i128).map_err(|_| E::custom(format!("integer {v} out of range")))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<T, E> {
                T::try_from(v as i128).map_err(|_| E::custom(format!("integer {v} out of range")))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<T, E> {
                if v.is_finite() && v.fract() == 0.0 && v.abs() < 1e30 {
                    T::try_from(v as i128)
                        .map_err(|_| E::custom(format!("integer {v} out of range")))
                } else {
                    Err(E::invalid_type(serde::de::Unexpected::Float(v), &self))
                }
            }
        }
        d.deserialize_any(V(std::marker::PhantomData)).map(JsonInt)
    }
}

fn int<'de, D: Deserializer<'de>, T: TryFrom<i128>>(d: D) -> Result<T, D::Error> {
    JsonInt::<T>::deserialize(d).map(|x| x.0)
}

fn present_int<'de, D: Deserializer<'de>, T: TryFrom<i128>>(d: D) -> Result<Option<T>, D::Error> {
    int(d).map(Some)
}

fn present_int_vec<'de, D: Deserializer<'de>, T: TryFrom<i128>>(
    d: D,
) -> Result<Option<Vec<T>>, D::Error> {
    Vec::<JsonInt<T>>::deserialize(d).map(|v| Some(v.into_iter().map(|x| x.0).collect()))
}

fn string_array_schema(min_items: usize, max_items: usize, description: &str) -> Schema {
    use utoipa::openapi::schema::ArrayBuilder;
    ArrayBuilder::new()
        .items(string_field(1, NAME_MAX, None, "A name."))
        .min_items(Some(min_items))
        .max_items(Some(max_items))
        .description(Some(description))
        .into()
}

/// Largest disk number in a restore request.
pub const DISK_NUMBER_MAX: u32 = 255;

fn disk_number_schema() -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(SchemaType::Type(Type::Integer))
        .minimum(Some(0))
        .maximum(Some(DISK_NUMBER_MAX))
        .description(Some("Disk number (0-based); default 0."))
}

fn disk_numbers_schema() -> Schema {
    use utoipa::openapi::schema::ArrayBuilder;
    ArrayBuilder::new()
        .items(
            ObjectBuilder::new()
                .schema_type(SchemaType::Type(Type::Integer))
                .minimum(Some(0))
                .maximum(Some(DISK_NUMBER_MAX)),
        )
        .min_items(Some(1))
        .max_items(Some(DISKS_MAX))
        .description(Some(
            "Disk numbers (0-based, unique, at most 64); absent: every disk.",
        ))
        .into()
}

fn tenant_names_schema() -> Schema {
    string_array_schema(
        1,
        TENANTS_MAX,
        "Only these tenants (absent: every tenant of the agent).",
    )
}

fn string_enum_schema(values: &[&str], description: &str) -> RefOr<Schema> {
    ObjectBuilder::new()
        .schema_type(SchemaType::Type(Type::String))
        .enum_values(Some(values.iter().copied()))
        .description(Some(description))
        .into()
}

impl PartialSchema for Mode {
    fn schema() -> RefOr<Schema> {
        let names: Vec<&str> = Mode::ALL.iter().map(|m| m.as_str()).collect();
        string_enum_schema(
            &names,
            "Transport mode: hotadd (the proxy VM attaches the snapshot disk), nbdssl (NBD over TLS through the ESXi host), nbd (clear text, unencrypted VMs only).",
        )
    }
}
impl ToSchema for Mode {
    fn name() -> std::borrow::Cow<'static, str> {
        "Mode".into()
    }
}

impl PartialSchema for QuiescePolicy {
    fn schema() -> RefOr<Schema> {
        let names: Vec<&str> = QuiescePolicy::ALL.iter().map(|p| p.as_str()).collect();
        string_enum_schema(
            &names,
            "Snapshot consistency policy: off (crash-consistent, the guest is not asked), prefer (quiesced through VMware Tools; crash-consistent when the guest cannot be quiesced, recorded in the point), require (quiesced, or the backup fails with the reason).",
        )
    }
}
impl ToSchema for QuiescePolicy {
    fn name() -> std::borrow::Cow<'static, str> {
        "QuiescePolicy".into()
    }
}

impl PartialSchema for JobState {
    fn schema() -> RefOr<Schema> {
        let names: Vec<&str> = JobState::ALL.iter().map(|s| s.as_str()).collect();
        string_enum_schema(
            &names,
            "Job state: queued -> running -> succeeded | failed | cancelled. Terminal states never change.",
        )
    }
}
impl ToSchema for JobState {
    fn name() -> std::borrow::Cow<'static, str> {
        "JobState".into()
    }
}

impl PartialSchema for JobKind {
    fn schema() -> RefOr<Schema> {
        let names: Vec<&str> = JobKind::ALL.iter().map(|s| s.as_str()).collect();
        string_enum_schema(&names, "What a job does.")
    }
}
impl ToSchema for JobKind {
    fn name() -> std::borrow::Cow<'static, str> {
        "JobKind".into()
    }
}

/// Request validation beyond what serde checks (lengths, ranges, cross-field rules).
pub trait Validate {
    /// `Err` with a message naming the field.
    fn validate(&self) -> Result<(), ApiError>;
}

fn check_name(field: &str, v: &str) -> Result<(), ApiError> {
    let n = v.chars().count();
    if n == 0 {
        return Err(ApiError::invalid(format!("{field}: must not be empty")));
    }
    if n > NAME_MAX {
        return Err(ApiError::invalid(format!(
            "{field}: at most {NAME_MAX} characters (got {n})"
        )));
    }
    Ok(())
}

// ---- requests ---------------------------------------------------------------

/// One virtual disk of the VM to back up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DiskSpec {
    /// vSphere device key (e.g. 2000). Unique within the VM.
    #[serde(deserialize_with = "int")]
    #[schema(minimum = -2147483648, maximum = 2147483647)]
    pub key: i32,
    /// Device label (e.g. "Hard disk 1").
    #[schema(min_length = 1, max_length = 256)]
    pub label: String,
    /// Datastore holding the disk.
    #[schema(min_length = 1, max_length = 256)]
    pub datastore: String,
    /// Whether the disk itself is encrypted.
    pub encrypted: bool,
    /// Key provider of the disk's key when it differs from the VM's.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(nullable = false, min_length = 1, max_length = 256)]
    pub key_provider: Option<String>,
}

/// The VM to back up, as the orchestrator's inventory sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    /// Display name.
    #[schema(min_length = 1, max_length = 256)]
    pub name: String,
    /// Managed object reference (e.g. "vm-42").
    #[schema(min_length = 1, max_length = 256)]
    pub moref: String,
    /// ESXi host the VM runs on.
    #[schema(min_length = 1, max_length = 256)]
    pub host: String,
    /// vCenter folder path (informational).
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(nullable = false, min_length = 1, max_length = 4096)]
    pub folder: Option<String>,
    /// Whether the VM home is encrypted.
    pub encrypted: bool,
    /// Key provider (vSphere KMS cluster id) of the VM's key.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(nullable = false, min_length = 1, max_length = 256)]
    pub key_provider: Option<String>,
    /// The disks, 1 to 64, device keys unique.
    #[schema(min_items = 1, max_items = 64)]
    pub disks: Vec<DiskSpec>,
}

impl VmSpec {
    /// The selector's view of this VM.
    pub fn to_vm_info(&self) -> VmInfo {
        VmInfo {
            name: self.name.clone(),
            moref: self.moref.clone(),
            host: self.host.clone(),
            encrypted: self.encrypted,
            key_provider: self.key_provider.clone(),
            disks: self
                .disks
                .iter()
                .map(|d| DiskInfo {
                    key: d.key,
                    label: d.label.clone(),
                    datastore: d.datastore.clone(),
                    encrypted: d.encrypted,
                    key_provider: d.key_provider.clone(),
                })
                .collect(),
        }
    }

    /// The API form of a selector VM.
    pub fn from_vm_info(vm: &VmInfo, folder: Option<&str>) -> VmSpec {
        VmSpec {
            name: vm.name.clone(),
            moref: vm.moref.clone(),
            host: vm.host.clone(),
            folder: folder.map(str::to_string),
            encrypted: vm.encrypted,
            key_provider: vm.key_provider.clone(),
            disks: vm
                .disks
                .iter()
                .map(|d| DiskSpec {
                    key: d.key,
                    label: d.label.clone(),
                    datastore: d.datastore.clone(),
                    encrypted: d.encrypted,
                    key_provider: d.key_provider.clone(),
                })
                .collect(),
        }
    }
}

impl Validate for VmSpec {
    fn validate(&self) -> Result<(), ApiError> {
        check_name("vm.name", &self.name)?;
        check_name("vm.moref", &self.moref)?;
        check_name("vm.host", &self.host)?;
        if let Some(f) = &self.folder {
            let n = f.chars().count();
            if n == 0 || n > PATH_MAX {
                return Err(ApiError::invalid(format!(
                    "vm.folder: 1 to {PATH_MAX} characters"
                )));
            }
        }
        if let Some(k) = &self.key_provider {
            check_name("vm.key_provider", k)?;
        }
        if self.disks.is_empty() || self.disks.len() > DISKS_MAX {
            return Err(ApiError::invalid(format!(
                "vm.disks: 1 to {DISKS_MAX} disks (got {})",
                self.disks.len()
            )));
        }
        let mut keys = BTreeSet::new();
        for (i, d) in self.disks.iter().enumerate() {
            check_name(&format!("vm.disks[{i}].label"), &d.label)?;
            check_name(&format!("vm.disks[{i}].datastore"), &d.datastore)?;
            if let Some(k) = &d.key_provider {
                check_name(&format!("vm.disks[{i}].key_provider"), k)?;
            }
            if !keys.insert(d.key) {
                return Err(ApiError::invalid(format!(
                    "vm.disks[{i}].key: device key {} appears twice",
                    d.key
                )));
            }
        }
        Ok(())
    }
}

/// Transport policy. Absent fields take the defaults shown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicySpec {
    /// Allow NBD-SSL (and NBD) when HotAdd is impossible (automatic mode only).
    #[serde(default = "yes")]
    #[schema(default = true)]
    pub failover_to_network: bool,
    /// Allow clear-text NBD for unencrypted VMs. Never used for encrypted ones.
    #[serde(default)]
    #[schema(default = false)]
    pub allow_cleartext_nbd: bool,
    /// Absent or `hotadd`: automatic (HotAdd, then network); `nbdssl` or `nbd`:
    /// force network transport, that mode first.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(nullable = false)]
    pub preferred: Option<Mode>,
}

fn yes() -> bool {
    true
}

impl From<&PolicySpec> for Policy {
    fn from(p: &PolicySpec) -> Policy {
        Policy {
            failover_to_network: p.failover_to_network,
            allow_cleartext_nbd: p.allow_cleartext_nbd,
            preferred: p.preferred,
        }
    }
}

impl From<&Policy> for PolicySpec {
    fn from(p: &Policy) -> PolicySpec {
        PolicySpec {
            failover_to_network: p.failover_to_network,
            allow_cleartext_nbd: p.allow_cleartext_nbd,
            preferred: p.preferred,
        }
    }
}

/// Retention applied to the VM's chain after a successful backup: a point is kept
/// if any rule keeps it. At least one rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(min_properties = 1)]
pub struct RetentionSpec {
    /// Keep the newest N points.
    #[serde(
        default,
        deserialize_with = "present_int",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(nullable = false, minimum = 1, maximum = 10000)]
    pub keep_last: Option<u32>,
    /// Keep the newest point of each of the last N days (UTC).
    #[serde(
        default,
        deserialize_with = "present_int",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(nullable = false, minimum = 1, maximum = 10000)]
    pub keep_daily: Option<u32>,
    /// Keep the newest point of each of the last N ISO weeks.
    #[serde(
        default,
        deserialize_with = "present_int",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(nullable = false, minimum = 1, maximum = 10000)]
    pub keep_weekly: Option<u32>,
    /// Keep the newest point of each of the last N months.
    #[serde(
        default,
        deserialize_with = "present_int",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(nullable = false, minimum = 1, maximum = 10000)]
    pub keep_monthly: Option<u32>,
}

impl RetentionSpec {
    /// The repository's retention policy.
    pub fn to_policy(&self) -> crate::repo::retention::Policy {
        crate::repo::retention::Policy {
            keep_last: self.keep_last,
            keep_daily: self.keep_daily,
            keep_weekly: self.keep_weekly,
            keep_monthly: self.keep_monthly,
        }
    }
}

impl Validate for RetentionSpec {
    fn validate(&self) -> Result<(), ApiError> {
        let all = [
            ("keep_last", self.keep_last),
            ("keep_daily", self.keep_daily),
            ("keep_weekly", self.keep_weekly),
            ("keep_monthly", self.keep_monthly),
        ];
        if all.iter().all(|(_, v)| v.is_none()) {
            return Err(ApiError::invalid(
                "retention: give at least one of keep_last, keep_daily, keep_weekly, keep_monthly (an empty policy would delete every point)",
            ));
        }
        for (k, v) in all {
            if let Some(n) = v {
                if n == 0 || n > KEEP_MAX {
                    return Err(ApiError::invalid(format!(
                        "retention.{k}: 1 to {KEEP_MAX} (got {n})"
                    )));
                }
            }
        }
        Ok(())
    }
}

/// `POST /v1/backups`: back up one VM through this proxy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BackupRequest {
    /// Tenant, as configured on the agent (`[[tenant]] name`).
    #[schema(min_length = 1, max_length = 256)]
    pub tenant: String,
    /// The VM.
    pub vm: VmSpec,
    /// Transport policy; absent: the agent's `[policy]`.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(nullable = false)]
    pub policy: Option<PolicySpec>,
    /// Retention applied after a successful backup; absent: none.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(nullable = false)]
    pub retention: Option<RetentionSpec>,
    /// Force a full backup (ignore changed-block tracking).
    #[serde(default)]
    #[schema(default = false)]
    pub full: bool,
    /// The orchestrator's placement per disk (proxy, mode, why), recorded as
    /// the disk's reason where the agent's own selector agrees; absent: the
    /// agent's own reasons.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(nullable = false, max_items = 256)]
    pub placement: Option<Vec<DiskPlacement>>,
    /// Quiesce policy of the VM's snapshot; absent: `off` (crash-consistent).
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(nullable = false)]
    pub quiesce: Option<QuiescePolicy>,
}

/// Where and why the orchestrator placed one disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DiskPlacement {
    /// vSphere device key.
    pub disk_key: i32,
    /// The agent it was placed on.
    #[schema(min_length = 1, max_length = 256)]
    pub proxy: String,
    /// The mode it was placed in.
    pub mode: Mode,
    /// Why (every agent of the tenant and its reason, as `plan --explain`).
    #[schema(max_length = 65536)]
    pub reason: String,
}

/// Longest placement reason accepted (a reason names every agent of a tenant).
const MAX_PLACEMENT_REASON: usize = 65536;

impl Validate for BackupRequest {
    fn validate(&self) -> Result<(), ApiError> {
        check_name("tenant", &self.tenant)?;
        self.vm.validate()?;
        if let Some(r) = &self.retention {
            r.validate()?;
        }
        if let Some(p) = &self.placement {
            if p.len() > 256 {
                return Err(ApiError::invalid("placement: at most 256 disks"));
            }
            for d in p {
                check_name("placement.proxy", &d.proxy)?;
                if d.reason.len() > MAX_PLACEMENT_REASON {
                    return Err(ApiError::invalid(format!(
                        "placement.reason of disk {}: at most {MAX_PLACEMENT_REASON} bytes",
                        d.disk_key
                    )));
                }
            }
        }
        Ok(())
    }
}

/// Where a restore writes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum RestoreTargetSpec {
    /// One raw image per disk in a directory on the agent host.
    Directory {
        /// Absolute directory path (created if missing), at or under one of
        /// the tenant's `restore_dirs`.
        path: String,
    },
    /// Into new disks of an existing VM (one per restored disk, created and
    /// written through the transport the selector allows; removed again if the
    /// restore fails).
    Vm {
        /// The VM's managed object reference.
        moref: String,
        /// Datastore for the new disks (by name); absent: the datastore of the
        /// VM's first disk. Must be mounted on the VM's host and have room.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        datastore: Option<String>,
        /// Storage policy (SPBM profile id) for the new disks; absent: the
        /// datastore's default.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        storage_policy: Option<String>,
        /// Write disk N of the point over the VM's disk N instead of into new
        /// disks: only into a powered-off VM without snapshots.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        overwrite: bool,
    },
    /// Single files and directories of one disk (file-level restore), copied
    /// with their times and permissions into a directory on the agent host.
    Files {
        /// Absolute directory path on the agent host (created if missing), at
        /// or under one of the tenant's `restore_dirs`.
        path: String,
        /// Disk number (default 0).
        #[serde(default)]
        disk: u32,
        /// Partition (Linux numbering; absent: the only readable one).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        partition: Option<u32>,
        /// Paths inside the volume (1 to 256): files or whole directories.
        paths: Vec<String>,
    },
}

fn string_field(min: usize, max: usize, pattern: Option<&str>, description: &str) -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(SchemaType::Type(Type::String))
        .min_length(Some(min))
        .max_length(Some(max))
        .pattern(pattern)
        .description(Some(description))
}

// Written by hand: utoipa does not carry `deny_unknown_fields` into the variants
// of an internally tagged enum, and the schema must say that unknown fields are
// rejected (they are; see the tests).
impl PartialSchema for RestoreTargetSpec {
    fn schema() -> RefOr<Schema> {
        use utoipa::openapi::schema::{AdditionalProperties, OneOfBuilder};
        let variant = |kind: &str, field: &str, f: ObjectBuilder, description: &str| {
            ObjectBuilder::new()
                .schema_type(SchemaType::Type(Type::Object))
                .property(
                    "kind",
                    ObjectBuilder::new()
                        .schema_type(SchemaType::Type(Type::String))
                        .enum_values(Some([kind])),
                )
                .property(field, f)
                .required("kind")
                .required(field)
                .additional_properties(Some(AdditionalProperties::FreeForm(false)))
                .description(Some(description))
        };
        OneOfBuilder::new()
            .item(variant(
                "directory",
                "path",
                string_field(
                    1,
                    PATH_MAX,
                    Some("^/"),
                    "Absolute directory path on the agent host (created if missing), at or under one of the tenant's `restore_dirs` in the agent's configuration (symlinks followed).",
                ),
                "One raw image per disk in a directory on the agent host.",
            ))
            .item(
                variant(
                    "vm",
                    "moref",
                    string_field(1, NAME_MAX, None, "The VM's managed object reference."),
                    "Into new disks of an existing VM (one per restored disk, created and written through the transport the selector allows; removed again if the restore fails), or over the disks of a powered-off VM with `overwrite`.",
                )
                .property(
                    "datastore",
                    string_field(1, NAME_MAX, None, "Datastore for the new disks (by name); absent: the datastore of the VM's first disk. Must be mounted on the VM's host and have room."),
                )
                .property(
                    "storage_policy",
                    string_field(1, NAME_MAX, None, "Storage policy (SPBM profile id) for the new disks; absent: the datastore's default."),
                )
                .property(
                    "overwrite",
                    ObjectBuilder::new()
                        .schema_type(SchemaType::Type(Type::Boolean))
                        .description(Some("Write disk N of the point over the VM's disk N instead of into new disks: only into a powered-off VM without snapshots. Default false.")),
                ),
            )
            .item(
                variant(
                    "files",
                    "path",
                    string_field(1, PATH_MAX, Some("^/"), "Absolute directory path on the agent host (created if missing), at or under one of the tenant's `restore_dirs` in the agent's configuration (symlinks followed)."),
                    "Single files and directories of one disk (file-level restore: ext2/3/4, NTFS, FAT), copied with their times and permissions into a directory on the agent host. Existing files are never overwritten.",
                )
                .property("disk", disk_number_schema())
                .property(
                    "partition",
                    ObjectBuilder::new()
                        .schema_type(SchemaType::Type(Type::Integer))
                        .minimum(Some(0))
                        .maximum(Some(PARTITION_MAX))
                        .description(Some("Partition (Linux numbering: 1-4 primary, 5+ logical, GPT entry + 1; 0 the whole disk). Absent: the only partition with a readable file system.")),
                )
                .property(
                    "paths",
                    utoipa::openapi::schema::ArrayBuilder::new()
                        .items(string_field(1, PATH_MAX, Some("^/"), "Absolute path inside the volume."))
                        .min_items(Some(1))
                        .max_items(Some(PATHS_MAX))
                        .description(Some("Files or directories to restore.")),
                )
                .required("paths"),
            )
            .description(Some("Where a restore writes, chosen by `kind`."))
            .into()
    }
}
impl ToSchema for RestoreTargetSpec {
    fn name() -> std::borrow::Cow<'static, str> {
        "RestoreTargetSpec".into()
    }
}

/// `POST /v1/restores`: restore a point through this proxy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RestoreRequest {
    /// Tenant, as configured on the agent.
    #[schema(min_length = 1, max_length = 256)]
    pub tenant: String,
    /// Restore point id, or `latest:<vm name>`.
    #[schema(min_length = 1, max_length = 256)]
    pub point: String,
    /// Disk numbers (0-based, unique, at most 64); absent: every disk.
    #[serde(
        default,
        deserialize_with = "present_int_vec",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(schema_with = disk_numbers_schema)]
    pub disks: Option<Vec<u32>>,
    /// Where to write.
    pub target: RestoreTargetSpec,
}

impl Validate for RestoreRequest {
    fn validate(&self) -> Result<(), ApiError> {
        check_name("tenant", &self.tenant)?;
        check_name("point", &self.point)?;
        if let Some(d) = &self.disks {
            if d.is_empty() || d.len() > DISKS_MAX {
                return Err(ApiError::invalid(format!(
                    "disks: 1 to {DISKS_MAX} disk numbers (omit the field for every disk)"
                )));
            }
            let mut seen = BTreeSet::new();
            for n in d {
                if *n > DISK_NUMBER_MAX {
                    return Err(ApiError::invalid(format!(
                        "disks: disk number {n} is above {DISK_NUMBER_MAX}"
                    )));
                }
                if !seen.insert(*n) {
                    return Err(ApiError::invalid(format!("disks: disk {n} appears twice")));
                }
            }
        }
        match &self.target {
            RestoreTargetSpec::Directory { path } => {
                let n = path.chars().count();
                if n == 0 || n > PATH_MAX {
                    return Err(ApiError::invalid(format!(
                        "target.path: 1 to {PATH_MAX} characters"
                    )));
                }
                if !path.starts_with('/') {
                    return Err(ApiError::invalid(
                        "target.path: must be an absolute path on the agent host",
                    ));
                }
            }
            RestoreTargetSpec::Files {
                path,
                disk,
                partition,
                paths,
            } => {
                check_abs_path("target.path", path)?;
                if self.disks.is_some() {
                    return Err(ApiError::invalid(
                        "disks: not with a files target (it names its disk in target.disk)",
                    ));
                }
                check_disk_partition("target.", *disk, *partition)?;
                if paths.is_empty() || paths.len() > PATHS_MAX {
                    return Err(ApiError::invalid(format!(
                        "target.paths: 1 to {PATHS_MAX} paths"
                    )));
                }
                for p in paths {
                    check_abs_path("target.paths", p)?;
                }
            }
            RestoreTargetSpec::Vm {
                moref,
                datastore,
                storage_policy,
                overwrite: _,
            } => {
                check_name("target.moref", moref)?;
                if let Some(d) = datastore {
                    check_name("target.datastore", d)?;
                }
                if let Some(p) = storage_policy {
                    check_name("target.storage_policy", p)?;
                }
            }
        }
        Ok(())
    }
}

/// `POST /v1/verifies`: verify a tenant's repository, or one restore point in
/// it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VerifyRequest {
    /// Tenant, as configured on the agent.
    #[schema(min_length = 1, max_length = 256)]
    pub tenant: String,
    /// Restore point id, or `latest:<vm name>`; absent: every point of the
    /// tenant's repository.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(nullable = false, min_length = 1, max_length = 256)]
    pub point: Option<String>,
    /// Read, decrypt and authenticate every chunk the points reference
    /// (`false`: only the manifests and indexes).
    #[serde(default = "yes")]
    #[schema(default = true)]
    pub read_data: bool,
}

impl Validate for VerifyRequest {
    fn validate(&self) -> Result<(), ApiError> {
        check_name("tenant", &self.tenant)?;
        if let Some(p) = &self.point {
            check_name("point", p)?;
        }
        Ok(())
    }
}

/// Most paths in one file-level restore.
pub const PATHS_MAX: usize = 256;
/// Highest partition number accepted.
pub const PARTITION_MAX: u32 = 1024;
/// Most entries a file search returns.
pub const FIND_LIMIT_MAX: u32 = 10_000;

fn check_abs_path(field: &str, p: &str) -> Result<(), ApiError> {
    let n = p.chars().count();
    if n == 0 || n > PATH_MAX {
        return Err(ApiError::invalid(format!(
            "{field}: 1 to {PATH_MAX} characters"
        )));
    }
    if !p.starts_with('/') {
        return Err(ApiError::invalid(format!(
            "{field}: must be an absolute path"
        )));
    }
    if p.contains('\0') {
        return Err(ApiError::invalid(format!("{field}: must not contain NUL")));
    }
    Ok(())
}

fn check_disk_partition(prefix: &str, disk: u32, partition: Option<u32>) -> Result<(), ApiError> {
    if disk > DISK_NUMBER_MAX {
        return Err(ApiError::invalid(format!(
            "{prefix}disk: disk number {disk} is above {DISK_NUMBER_MAX}"
        )));
    }
    if partition.is_some_and(|p| p > PARTITION_MAX) {
        return Err(ApiError::invalid(format!(
            "{prefix}partition: at most {PARTITION_MAX}"
        )));
    }
    Ok(())
}

fn root_path() -> String {
    "/".into()
}

/// `POST /v1/files/list`: one directory (or file) of a restore point's disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FilesListRequest {
    /// Tenant, as configured on the agent.
    #[schema(min_length = 1, max_length = 256)]
    pub tenant: String,
    /// Restore point id, or `latest:<vm name>`.
    #[schema(min_length = 1, max_length = 256)]
    pub point: String,
    /// Disk number (default 0).
    #[serde(default)]
    #[schema(maximum = 255)]
    pub disk: u32,
    /// Partition (Linux numbering); absent: the only readable one.
    #[serde(default)]
    #[schema(maximum = 1024)]
    pub partition: Option<u32>,
    /// Absolute path inside the volume (default `/`).
    #[serde(default = "root_path")]
    #[schema(min_length = 1, max_length = 4096, pattern = "^/")]
    pub path: String,
}

impl Validate for FilesListRequest {
    fn validate(&self) -> Result<(), ApiError> {
        check_name("tenant", &self.tenant)?;
        check_name("point", &self.point)?;
        check_disk_partition("", self.disk, self.partition)?;
        check_abs_path("path", &self.path)
    }
}

/// `POST /v1/files/find`: search a restore point's disk by name pattern.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FilesFindRequest {
    /// Tenant, as configured on the agent.
    #[schema(min_length = 1, max_length = 256)]
    pub tenant: String,
    /// Restore point id, or `latest:<vm name>`.
    #[schema(min_length = 1, max_length = 256)]
    pub point: String,
    /// Disk number (default 0).
    #[serde(default)]
    #[schema(maximum = 255)]
    pub disk: u32,
    /// Partition (Linux numbering); absent: the only readable one.
    #[serde(default)]
    #[schema(maximum = 1024)]
    pub partition: Option<u32>,
    /// Search under this directory (default `/`).
    #[serde(default = "root_path")]
    #[schema(min_length = 1, max_length = 4096, pattern = "^/")]
    pub under: String,
    /// Name pattern (`*` any run, `?` one character), matched against names.
    #[schema(min_length = 1, max_length = 256)]
    pub pattern: String,
    /// Most entries returned (default 1000, at most 10000).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 10000)]
    pub limit: Option<u32>,
}

impl Validate for FilesFindRequest {
    fn validate(&self) -> Result<(), ApiError> {
        check_name("tenant", &self.tenant)?;
        check_name("point", &self.point)?;
        check_disk_partition("", self.disk, self.partition)?;
        check_abs_path("under", &self.under)?;
        let n = self.pattern.chars().count();
        if n == 0 || n > NAME_MAX {
            return Err(ApiError::invalid(format!(
                "pattern: 1 to {NAME_MAX} characters"
            )));
        }
        if self.limit.is_some_and(|l| l == 0 || l > FIND_LIMIT_MAX) {
            return Err(ApiError::invalid(format!("limit: 1 to {FIND_LIMIT_MAX}")));
        }
        Ok(())
    }
}

/// Files listed or found on a restore point's disk.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct FilesResponse {
    /// The restore point read (resolved id).
    pub point: String,
    /// Disk number.
    pub disk: u32,
    /// The volume read.
    pub volume: crate::files::VolumeInfo,
    /// Every volume of the disk, with the file system found on each.
    pub volumes: Vec<crate::files::VolumeInfo>,
    /// Directory entries (list) or matches (find).
    pub entries: Vec<crate::files::Entry>,
    /// More matched than the limit.
    pub truncated: bool,
    /// Directories that could not be read during a search (damaged data).
    pub errors: Vec<String>,
    /// Chunks fetched and decoded to answer (the rest of the disk was not read).
    pub chunks_read: u64,
}

/// `POST /v1/keys/sync` body (optional).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct KeySyncRequest {
    /// Only these tenants (absent: every tenant of the agent).
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(schema_with = tenant_names_schema)]
    pub tenants: Option<Vec<String>>,
}

impl Validate for KeySyncRequest {
    fn validate(&self) -> Result<(), ApiError> {
        if let Some(t) = &self.tenants {
            if t.is_empty() || t.len() > TENANTS_MAX {
                return Err(ApiError::invalid(format!(
                    "tenants: 1 to {TENANTS_MAX} names (omit the field for every tenant)"
                )));
            }
            for (i, n) in t.iter().enumerate() {
                check_name(&format!("tenants[{i}]"), n)?;
            }
        }
        Ok(())
    }
}

/// Query of `GET /v1/jobs`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct JobsQuery {
    /// Only jobs in this state.
    #[serde(default)]
    #[param(nullable = false)]
    pub state: Option<JobState>,
    /// Only jobs of this kind.
    #[serde(default)]
    #[param(nullable = false)]
    pub kind: Option<JobKind>,
    /// Only jobs of this tenant.
    #[serde(default)]
    #[param(nullable = false, min_length = 1, max_length = 256)]
    pub tenant: Option<String>,
    /// At most this many jobs, newest first (default 100).
    #[serde(default)]
    #[param(nullable = false, minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
}

impl Validate for JobsQuery {
    fn validate(&self) -> Result<(), ApiError> {
        if let Some(t) = &self.tenant {
            check_name("tenant", t)?;
        }
        if let Some(l) = self.limit {
            if l == 0 || l > LIMIT_MAX {
                return Err(ApiError::invalid(format!(
                    "limit: 1 to {LIMIT_MAX} (got {l})"
                )));
            }
        }
        Ok(())
    }
}

// ---- responses ----------------------------------------------------------------

/// `GET /v1/health`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Health {
    /// Always `ok` when the agent answers.
    #[schema(example = "ok")]
    pub status: String,
    /// ferry version.
    pub version: String,
}

/// Slot use: one slot per disk being moved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Slots {
    /// Configured slots.
    pub total: u32,
    /// Slots held by queued and running jobs.
    pub used: u32,
    /// `total - used`.
    pub free: u32,
}

/// Where a tenant's key lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum KeySourceKind {
    /// A KMIP server (the tenant's KMS).
    Kms,
    /// PEM key files on the agent host.
    Pem,
}

/// A tenant KMS: address and key name only, never credentials or key material.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct KmsView {
    /// `host:port`.
    pub address: String,
    /// Name of the tenant key pair on the KMS.
    pub key_name: String,
}

/// A tenant this agent serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TenantView {
    /// Tenant name.
    pub name: String,
    /// vSphere key provider of the tenant's VMs, if configured.
    pub key_provider: Option<String>,
    /// Where the tenant key lives.
    pub key_source: KeySourceKind,
    /// The tenant KMS, for `kms` key sources.
    pub kms: Option<KmsView>,
}

/// `GET /v1/info`: what this proxy is and can do (the orchestrator feeds it to the
/// transport selector).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Info {
    /// Proxy id, unique among the orchestrator's agents.
    pub id: String,
    /// ferry version.
    pub version: String,
    /// Whether the proxy is a VM (needed for HotAdd).
    pub is_vm: bool,
    /// ESXi host the proxy VM runs on, if known.
    pub host: Option<String>,
    /// Key provider the proxy VM is encrypted under; `null`: not encrypted.
    pub key_provider: Option<String>,
    /// Datastores the proxy's host sees (HotAdd).
    pub datastores: Vec<String>,
    /// ESXi hosts reachable for NBD/NBD-SSL; `null`: every host.
    pub reachable_hosts: Option<Vec<String>>,
    /// Transport modes enabled.
    pub modes: Vec<Mode>,
    /// Which layer carries the disks: `native` (ferry's ReconfigVM hot-add and
    /// NBD client), `vddk <version> (<library>)`, or `vddk unavailable: <why>`.
    #[serde(default = "native")]
    #[schema(max_length = 4096)]
    pub data_path: String,
    /// Slot use.
    pub slots: Slots,
    /// Tenants served.
    pub tenants: Vec<TenantView>,
    /// The agent's default transport policy.
    pub policy: PolicySpec,
}

fn native() -> String {
    "native".into()
}

impl Info {
    /// This agent as a selector candidate, with its current free slots.
    pub fn to_proxy_info(&self) -> ProxyInfo {
        ProxyInfo {
            id: self.id.clone(),
            is_vm: self.is_vm,
            host: self.host.clone(),
            reachable_hosts: match &self.reachable_hosts {
                None => HostReach::Any,
                Some(h) => HostReach::Hosts(h.clone()),
            },
            datastores: self.datastores.clone(),
            key_provider: self.key_provider.clone(),
            modes: self.modes.clone(),
            free_slots: self.slots.free,
        }
    }
}

/// A job error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct JobError {
    /// Stable code: `cancelled`, `interrupted`, `vm_refused`, `not_found`,
    /// `key_error`, `vsphere_error`, `transport_error`, `repository_error`,
    /// `runner_unavailable`, `job_failed`.
    pub code: String,
    /// What went wrong.
    pub message: String,
}

/// One disk of a job: the plan while queued/running, the result once finished.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DiskView {
    /// vSphere device key (backups) or disk number (restores).
    pub disk_key: i32,
    /// Device label.
    pub label: String,
    /// Proxy moving the disk (this agent).
    pub proxy: String,
    /// Transport mode; `null` when none applies (restore to a directory).
    pub mode: Option<Mode>,
    /// Why this proxy and mode: the transport selector's reason.
    pub reason: String,
    /// Bytes processed (known when the job has finished).
    pub bytes: u64,
    /// Bytes per second for this disk (known when the job has finished).
    pub rate_bytes_per_sec: f64,
    /// Error of this disk.
    pub error: Option<String>,
    /// Backups, once finished: `cbt` (only the areas changed since the previous
    /// restore point were read) or `full`.
    #[serde(default)]
    pub read: Option<String>,
    /// Why that read mode: the previous point used, or why a full read (no
    /// previous point, CBT reset, disk resized...).
    #[serde(default)]
    pub read_reason: Option<String>,
}

/// A job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Job {
    /// Job id.
    pub id: String,
    /// Backup, restore or verify.
    pub kind: JobKind,
    /// State.
    pub state: JobState,
    /// Tenant.
    pub tenant: String,
    /// VM name (backups), restore point (restores), or the point or
    /// `repository` (verifies).
    pub subject: String,
    /// When the job was accepted (RFC 3339, UTC).
    #[schema(format = DateTime)]
    pub created_at: String,
    /// When it started running.
    #[schema(format = DateTime)]
    pub started_at: Option<String>,
    /// When it finished.
    #[schema(format = DateTime)]
    pub finished_at: Option<String>,
    /// Bytes processed so far.
    pub bytes_done: u64,
    /// Bytes to process (0 until the runner knows).
    pub bytes_total: u64,
    /// Average bytes per second since the job started.
    pub rate_bytes_per_sec: f64,
    /// Estimated seconds remaining, while running with a known rate.
    pub eta_secs: Option<f64>,
    /// Whether cancellation was requested (the job stops at the next check).
    pub cancel_requested: bool,
    /// Per disk: proxy, mode, the selector's reason, and results.
    pub disks: Vec<DiskView>,
    /// Why the job failed or was cancelled.
    pub error: Option<JobError>,
    /// What the orphan sweep cleaned up after an interruption.
    pub cleanup: Option<String>,
    /// Restore point created (backup), read (restore) or verified (a verify
    /// of one point).
    pub point_id: Option<String>,
    /// Notes from the job (backups: how the snapshot was taken, as
    /// `snapshot: crash-consistent (why)`; retention applied, ...).
    pub notes: Vec<String>,
}

/// `GET /v1/jobs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct JobList {
    /// Jobs, newest first.
    pub jobs: Vec<Job>,
}

/// One tenant's key after a sync. Ids and versions only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct KeySyncResult {
    /// Tenant.
    pub tenant: String,
    /// KMS address, or `pem`.
    pub kms: Option<String>,
    /// Key name.
    pub key_name: Option<String>,
    /// Current key's KMS object id.
    pub key_id: Option<String>,
    /// Current key version.
    pub version: Option<u64>,
    /// Key id seen at the previous sync.
    pub previous_key_id: Option<String>,
    /// Version seen at the previous sync.
    pub previous_version: Option<u64>,
    /// True when the key changed since the previous sync (rotation).
    pub rotated: bool,
    /// When checked (RFC 3339).
    #[schema(format = DateTime)]
    pub checked_at: Option<String>,
    /// Why this tenant's key could not be checked.
    pub error: Option<JobError>,
}

/// `POST /v1/keys/sync`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct KeySyncResponse {
    /// One result per tenant.
    pub results: Vec<KeySyncResult>,
}

/// `GET /v1/repositories`: every tenant's repository as stored now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RepositoryList {
    /// One entry per tenant of the agent.
    pub repositories: Vec<RepositoryUsage>,
}

/// One tenant's repository: what it holds and, on a local directory, the space
/// left. Counts come from a listing of the repository at the time of the call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RepositoryUsage {
    /// Tenant.
    pub tenant: String,
    /// `local` or `s3`; absent when the repository could not be opened.
    pub backend: Option<String>,
    /// Where it is stored (directory or bucket/prefix/endpoint; no credentials).
    pub location: String,
    /// Committed restore points.
    pub points: Option<u64>,
    /// Stored chunks.
    pub chunks: Option<u64>,
    /// Bytes of the stored chunks (compressed and encrypted, as stored).
    pub stored_bytes: Option<u64>,
    /// Size of the file system under a local repository.
    pub filesystem_total_bytes: Option<u64>,
    /// Space left on it for ferry (unprivileged).
    pub filesystem_free_bytes: Option<u64>,
    /// When it was measured (RFC 3339).
    pub measured_at: String,
    /// Why the repository could not be read (not yet initialised, unreachable).
    pub error: Option<JobError>,
}

/// `POST /v1/keys/check` body: the disaster-recovery key check of one tenant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct KeyCheckRequest {
    /// Tenant, as configured on the agent.
    #[schema(min_length = 1, max_length = 256)]
    pub tenant: String,
}

impl Validate for KeyCheckRequest {
    fn validate(&self) -> Result<(), ApiError> {
        check_name("tenant", &self.tenant)
    }
}

/// Whether a restore point opens with the tenant's keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PointKeyView {
    /// Point id.
    pub point_id: String,
    /// VM or image the point is of.
    pub source: Option<String>,
    /// Creation time.
    pub created: Option<String>,
    /// The tenant key that wrapped its data key (`kmip key ID vN on KMS (fingerprint ...)`).
    pub key: Option<String>,
    /// Every path that opens it: `own_key`, `keyring`, `recovery_key`.
    pub opens_with: Vec<String>,
    /// `opens`, `key_missing` or `damaged`.
    pub status: String,
    /// Why not, when it does not open.
    pub why: Option<String>,
}

/// A key to obtain from the KMS (or its backup) and the points that need it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct MissingKeyView {
    /// The key.
    pub key: String,
    /// Points only it (or the recovery key) opens.
    pub points: Vec<String>,
    /// The provider's recovery key that opens them too, if they were protected.
    pub or_recovery_key: Option<String>,
}

/// `POST /v1/keys/check`: for every restore point of the tenant's repository,
/// whether the tenant's keys (as the agent's key source reaches them now)
/// open it, and which keys to obtain for those that do not: the report `ferry
/// repo import` prints for disaster recovery. Key ids and fingerprints only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct KeyCheckResponse {
    /// Tenant.
    pub tenant: String,
    /// When the check ran (RFC 3339).
    pub checked_at: String,
    /// Whether the repository's keyring opens with the tenant's current key.
    pub keyring_opens: bool,
    /// Why not.
    pub keyring_error: Option<String>,
    /// The provider's recovery key the keyring records (key-loss protection).
    pub recovery_key: Option<String>,
    /// Per point, oldest first.
    pub points: Vec<PointKeyView>,
    /// Keys to obtain, only for points no available path opens.
    pub missing_keys: Vec<MissingKeyView>,
    /// Why the check could not run (the KMS or the repository cannot be
    /// reached or read); the other fields are then empty.
    pub error: Option<JobError>,
}

impl KeyCheckResponse {
    /// The wire form of a key check report.
    pub fn from_report(
        tenant: &str,
        checked_at: String,
        r: &crate::repo::keycheck::KeyCheckReport,
    ) -> Self {
        use crate::repo::keycheck::PointKeyStatus as S;
        let word = |p: &crate::repo::KeyPath| {
            match p {
                crate::repo::KeyPath::OwnKey => "own_key",
                crate::repo::KeyPath::Keyring => "keyring",
                crate::repo::KeyPath::RecoveryKey => "recovery_key",
            }
            .to_string()
        };
        KeyCheckResponse {
            tenant: tenant.to_string(),
            checked_at,
            keyring_opens: r.keyring_opens,
            keyring_error: r.keyring_error.clone(),
            recovery_key: r.recovery.as_ref().map(|k| k.to_string()),
            points: r
                .points
                .iter()
                .map(|p| {
                    let (status, why) = match &p.status {
                        S::Opens => ("opens", None),
                        S::KeyMissing { why } => ("key_missing", Some(why.clone())),
                        S::Damaged { why } => ("damaged", Some(why.clone())),
                    };
                    PointKeyView {
                        point_id: p.point_id.clone(),
                        source: p.source.clone(),
                        created: p.created.clone(),
                        key: p.key.as_ref().map(|k| k.to_string()),
                        opens_with: p.opens_with.iter().map(word).collect(),
                        status: status.into(),
                        why,
                    }
                })
                .collect(),
            missing_keys: r
                .missing_keys()
                .into_iter()
                .map(|m| MissingKeyView {
                    key: m.key.to_string(),
                    points: m.points,
                    or_recovery_key: m.or_recovery_key.map(|k| k.to_string()),
                })
                .collect(),
            error: None,
        }
    }

    /// The answer when the check could not run.
    pub fn failed(tenant: &str, checked_at: String, error: JobError) -> Self {
        KeyCheckResponse {
            tenant: tenant.to_string(),
            checked_at,
            keyring_opens: false,
            keyring_error: None,
            recovery_key: None,
            points: vec![],
            missing_keys: vec![],
            error: Some(error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backup_json() -> serde_json::Value {
        serde_json::json!({
            "tenant": "a",
            "vm": {"name": "web", "moref": "vm-1", "host": "esx-1", "encrypted": true, "key_provider": "KMS-A",
                   "disks": [{"key": 2000, "label": "Hard disk 1", "datastore": "ds-a", "encrypted": true}]},
        })
    }

    fn parse<T: for<'de> Deserialize<'de>>(v: serde_json::Value) -> Result<T, String> {
        serde_json::from_value(v).map_err(|e| e.to_string())
    }

    #[test]
    fn valid_backup_round_trips_and_converts() {
        let r: BackupRequest = parse(backup_json()).unwrap();
        r.validate().unwrap();
        assert!(!r.full && r.policy.is_none());
        let vm = r.vm.to_vm_info();
        assert_eq!(vm.disks[0].key, 2000);
        assert_eq!(VmSpec::from_vm_info(&vm, None), r.vm);
        let back: BackupRequest = parse(serde_json::to_value(&r).unwrap()).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn null_unknown_and_out_of_range_are_rejected_with_the_field_named() {
        let mut v = backup_json();
        v["policy"] = serde_json::Value::Null;
        assert!(parse::<BackupRequest>(v).unwrap_err().contains("null"));
        let mut v = backup_json();
        v["surprise"] = 1.into();
        assert!(parse::<BackupRequest>(v).unwrap_err().contains("surprise"));
        let mut v = backup_json();
        v["vm"]["disks"][0]["key_provider"] = serde_json::Value::Null;
        assert!(parse::<BackupRequest>(v).is_err());

        let cases: Vec<(serde_json::Value, &str)> = vec![
            (serde_json::json!({"tenant": ""}), "tenant"),
            (
                serde_json::json!({"tenant": "x".repeat(NAME_MAX + 1)}),
                "tenant",
            ),
            (serde_json::json!({"vm": {"disks": []}}), "vm.disks"),
            (serde_json::json!({"retention": {}}), "retention"),
            (
                serde_json::json!({"retention": {"keep_last": 0}}),
                "retention.keep_last",
            ),
        ];
        for (patch, field) in cases {
            let mut v = backup_json();
            merge(&mut v, &patch);
            let r: BackupRequest = parse(v.clone()).unwrap();
            let e = r.validate().unwrap_err();
            assert!(e.message.starts_with(field), "{v}: {e}");
        }
        let mut v = backup_json();
        let d = v["vm"]["disks"][0].clone();
        v["vm"]["disks"].as_array_mut().unwrap().push(d);
        let e = parse::<BackupRequest>(v).unwrap().validate().unwrap_err();
        assert!(e.message.contains("appears twice"), "{e}");
        // Characters, not bytes.
        let mut v = backup_json();
        v["tenant"] = "é".repeat(NAME_MAX).into();
        parse::<BackupRequest>(v).unwrap().validate().unwrap();
    }

    fn merge(v: &mut serde_json::Value, patch: &serde_json::Value) {
        if let (Some(o), Some(p)) = (v.as_object_mut(), patch.as_object()) {
            for (k, pv) in p {
                match o.get_mut(k) {
                    Some(ov) if ov.is_object() && pv.is_object() => merge(ov, pv),
                    _ => {
                        o.insert(k.clone(), pv.clone());
                    }
                }
            }
        }
    }

    #[test]
    fn verify_requests() {
        let all: VerifyRequest = parse(serde_json::json!({"tenant": "a"})).unwrap();
        all.validate().unwrap();
        assert_eq!((all.point, all.read_data), (None, true));
        let one: VerifyRequest =
            parse(serde_json::json!({"tenant": "a", "point": "latest:web", "read_data": false}))
                .unwrap();
        one.validate().unwrap();
        assert_eq!(
            (one.point.as_deref(), one.read_data),
            (Some("latest:web"), false)
        );
        let empty: VerifyRequest = parse(serde_json::json!({"tenant": "a", "point": ""})).unwrap();
        assert!(empty.validate().is_err());
        assert!(parse::<VerifyRequest>(serde_json::json!({"tenant": "a", "point": null})).is_err());
        assert!(parse::<VerifyRequest>(serde_json::json!({"tenant": "a", "x": 1})).is_err());
    }

    #[test]
    fn restore_targets_and_disks() {
        let ok: RestoreRequest = parse(serde_json::json!({"tenant": "a", "point": "latest:web", "target": {"kind": "directory", "path": "/tmp/out"}})).unwrap();
        ok.validate().unwrap();
        let rel: RestoreRequest = parse(serde_json::json!({"tenant": "a", "point": "p", "target": {"kind": "directory", "path": "out"}})).unwrap();
        assert!(rel.validate().unwrap_err().message.contains("absolute"));
        let dup: RestoreRequest = parse(serde_json::json!({"tenant": "a", "point": "p", "disks": [1, 1], "target": {"kind": "vm", "moref": "vm-1"}})).unwrap();
        assert!(dup.validate().is_err());
        assert!(parse::<RestoreRequest>(
            serde_json::json!({"tenant": "a", "point": "p", "target": {"kind": "tape"}})
        )
        .is_err());
        assert!(parse::<RestoreRequest>(serde_json::json!({"tenant": "a", "point": "p", "target": {"kind": "vm", "moref": "m", "x": 1}})).is_err());
    }

    #[test]
    fn info_converts_to_a_selector_candidate() {
        let i = Info {
            id: "p".into(),
            version: "0".into(),
            is_vm: true,
            host: None,
            key_provider: Some("KMS-A".into()),
            datastores: vec!["ds".into()],
            data_path: "native".into(),
            reachable_hosts: Some(vec!["esx-1".into()]),
            modes: vec![Mode::HotAdd],
            slots: Slots {
                total: 4,
                used: 1,
                free: 3,
            },
            tenants: vec![],
            policy: PolicySpec::from(&Policy::default()),
        };
        let p = i.to_proxy_info();
        assert_eq!(p.free_slots, 3);
        assert!(p.reachable_hosts.reaches("esx-1") && !p.reachable_hosts.reaches("esx-2"));
        assert_eq!(p.key_provider.as_deref(), Some("KMS-A"));
    }
}
