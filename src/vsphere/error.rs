//! The errors of ferry's vSphere client, and the pure mapping from vim25 faults to
//! them. Every variant names the vCenter and what ferry was doing, so an operator can
//! act on the message alone (docs/vsphere.md has the troubleshooting table).

use super::soap::Fault;

/// What kind of transport failure ended a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportKind {
    /// TCP connect failed or was refused (the request was not sent).
    Connect,
    /// No complete answer within the configured timeout.
    Timeout,
    /// The connection broke while sending or receiving.
    Io,
    /// An HTTP status without a SOAP answer (proxy error, 503 while vpxd restarts...).
    Http(u16),
}

impl std::fmt::Display for TransportKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TransportKind::Connect => f.write_str("cannot connect"),
            TransportKind::Timeout => f.write_str("timed out"),
            TransportKind::Io => f.write_str("connection failed"),
            TransportKind::Http(s) => write!(f, "HTTP status {s}"),
        }
    }
}

/// Errors of the vSphere client.
#[derive(Debug, thiserror::Error)]
pub enum VsphereError {
    /// The client configuration is unusable (URL, CA file, thumbprint...).
    #[error("vCenter {vcenter}: configuration: {detail}")]
    Config {
        /// The vCenter URL.
        vcenter: String,
        /// What is wrong and how to fix it.
        detail: String,
    },
    /// The TLS handshake failed: certificate not signed by the pinned CA, or not the
    /// pinned thumbprint. Never retried.
    #[error("vCenter {vcenter}: {doing}: TLS: {detail} (check [vcenter] ca / thumbprint; `ferry vsphere thumbprint --url {vcenter}` shows what the server presents)")]
    Tls {
        /// The vCenter URL.
        vcenter: String,
        /// What ferry was doing.
        doing: String,
        /// The TLS error.
        detail: String,
    },
    /// vCenter could not be reached or did not answer, after bounded retries.
    #[error("vCenter {vcenter}: {doing}: {kind} after {attempts} attempt(s): {detail}")]
    Transport {
        /// The vCenter URL.
        vcenter: String,
        /// What ferry was doing.
        doing: String,
        /// Kind of failure.
        kind: TransportKind,
        /// Attempts made.
        attempts: u32,
        /// Underlying error.
        detail: String,
    },
    /// The response exceeded the size cap.
    #[error("vCenter {vcenter}: {doing}: response larger than {limit} bytes, refused")]
    TooLarge {
        /// The vCenter URL.
        vcenter: String,
        /// What ferry was doing.
        doing: String,
        /// The cap.
        limit: usize,
    },
    /// The response is not the vim25 SOAP ferry expects.
    #[error("vCenter {vcenter}: {doing}: malformed response: {detail}")]
    Malformed {
        /// The vCenter URL.
        vcenter: String,
        /// What ferry was doing.
        doing: String,
        /// What is wrong.
        detail: String,
    },
    /// Login refused (`InvalidLogin`).
    #[error("vCenter {vcenter}: login as {user:?} refused (InvalidLogin{}): check the user name and the password file", if .message.is_empty() { String::new() } else { format!(": {}", .message) })]
    InvalidLogin {
        /// The vCenter URL.
        vcenter: String,
        /// The user name.
        user: String,
        /// vCenter's message.
        message: String,
    },
    /// Still not authenticated after one re-login.
    #[error("vCenter {vcenter}: {doing}: not authenticated (the session expired and a new login did not help){}", if .message.is_empty() { String::new() } else { format!(": {}", .message) })]
    NotAuthenticated {
        /// The vCenter URL.
        vcenter: String,
        /// What ferry was doing.
        doing: String,
        /// vCenter's message.
        message: String,
    },
    /// The user lacks a privilege (`NoPermission`).
    #[error("vCenter {vcenter}: {doing}: permission denied (privilege {privilege} missing; docs/vsphere.md lists what the backup role needs){}", if .message.is_empty() { String::new() } else { format!(": {}", .message) })]
    NoPermission {
        /// The vCenter URL.
        vcenter: String,
        /// What ferry was doing.
        doing: String,
        /// The missing privilege id, when vCenter says.
        privilege: String,
        /// vCenter's message.
        message: String,
    },
    /// A managed object no longer exists (`ManagedObjectNotFound`).
    #[error("vCenter {vcenter}: {doing}: managed object {object} not found (deleted, or the inventory changed)")]
    ObjectNotFound {
        /// The vCenter URL.
        vcenter: String,
        /// What ferry was doing.
        doing: String,
        /// The object, when vCenter says.
        object: String,
    },
    /// No VM/snapshot/... of that name.
    #[error("vCenter {vcenter}: no {kind} named {name:?}{hint}")]
    NotFound {
        /// The vCenter URL.
        vcenter: String,
        /// `VM`, `snapshot`, ...
        kind: &'static str,
        /// The name asked for.
        name: String,
        /// Extra explanation (leading `; ` included), e.g. ambiguity.
        hint: String,
    },
    /// Encryption refused the operation: typically a hot-add of a disk encrypted under
    /// one key provider to a proxy VM encrypted under another.
    #[error("vCenter {vcenter}: {doing}: cryptographic error ({fault_type}: {message}); an encrypted disk can only be hot-added to a proxy VM encrypted under the same key provider: use a proxy of that provider or NBD-SSL")]
    Crypto {
        /// The vCenter URL.
        vcenter: String,
        /// What ferry was doing.
        doing: String,
        /// vim25 fault type.
        fault_type: String,
        /// vCenter's message.
        message: String,
    },
    /// A file is locked (`FileLocked`): another backup, a consolidation or a running
    /// VM holds the disk.
    #[error("vCenter {vcenter}: {doing}: file locked ({message}); another backup, a snapshot consolidation or a VM holds the disk: retry later")]
    FileLocked {
        /// The vCenter URL.
        vcenter: String,
        /// What ferry was doing.
        doing: String,
        /// vCenter's message.
        message: String,
    },
    /// The object is in the wrong state (`InvalidState`, `InvalidPowerState`,
    /// `TaskInProgress`...).
    #[error("vCenter {vcenter}: {doing}: invalid state ({fault_type}{})", if .message.is_empty() { String::new() } else { format!(": {}", .message) })]
    InvalidState {
        /// The vCenter URL.
        vcenter: String,
        /// What ferry was doing.
        doing: String,
        /// vim25 fault type.
        fault_type: String,
        /// vCenter's message.
        message: String,
    },
    /// QueryChangedDiskAreas refused the changeId: CBT was reset (or never on for
    /// that epoch); the disk must be read in full.
    #[error("vCenter {vcenter}: {doing}: changed block tracking cannot answer for changeId {change_id:?} ({fault_type}{}): CBT was reset, a full read of the disk is needed", if .message.is_empty() { String::new() } else { format!(": {}", .message) })]
    CbtReset {
        /// The vCenter URL.
        vcenter: String,
        /// What ferry was doing.
        doing: String,
        /// The changeId asked for.
        change_id: String,
        /// vim25 fault type.
        fault_type: String,
        /// vCenter's message.
        message: String,
    },
    /// vCenter does not implement the method (`MethodNotFound`, `NotSupported`,
    /// `NotImplemented`).
    #[error("vCenter {vcenter}: {doing}: not supported by this vCenter ({fault_type}{})", if .message.is_empty() { String::new() } else { format!(": {}", .message) })]
    NotSupported {
        /// The vCenter URL.
        vcenter: String,
        /// What ferry was doing.
        doing: String,
        /// vim25 fault type.
        fault_type: String,
        /// vCenter's message.
        message: String,
    },
    /// A task ended in error (other than the typed cases above).
    #[error("vCenter {vcenter}: {doing}: task {task} failed: {fault_type}{}", if .message.is_empty() { String::new() } else { format!(": {}", .message) })]
    TaskFailed {
        /// The vCenter URL.
        vcenter: String,
        /// What ferry was doing.
        doing: String,
        /// The task object id.
        task: String,
        /// vim25 fault type.
        fault_type: String,
        /// vCenter's message.
        message: String,
    },
    /// A task did not finish in time (it may still finish on vCenter).
    #[error("vCenter {vcenter}: {doing}: task {task} not finished after {waited_secs}s (last state {state}); it may still complete on vCenter")]
    TaskTimeout {
        /// The vCenter URL.
        vcenter: String,
        /// What ferry was doing.
        doing: String,
        /// The task object id.
        task: String,
        /// Seconds waited.
        waited_secs: u64,
        /// Last state seen.
        state: String,
    },
    /// Any other vim25 fault.
    #[error("vCenter {vcenter}: {doing}: {fault_type}{}", if .message.is_empty() { String::new() } else { format!(": {}", .message) })]
    Fault {
        /// The vCenter URL.
        vcenter: String,
        /// What ferry was doing.
        doing: String,
        /// vim25 fault type.
        fault_type: String,
        /// vCenter's message.
        message: String,
    },
}

impl VsphereError {
    /// The session expired and could not be renewed.
    pub fn is_not_authenticated(&self) -> bool {
        matches!(self, VsphereError::NotAuthenticated { .. })
    }
    /// CBT cannot answer: read the disk in full.
    pub fn is_cbt_reset(&self) -> bool {
        matches!(self, VsphereError::CbtReset { .. })
    }
    /// Encryption (key provider) refused the operation.
    pub fn is_crypto(&self) -> bool {
        matches!(self, VsphereError::Crypto { .. })
    }
    /// Worth retrying later (transport problems, locks, busy objects).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            VsphereError::Transport { .. }
                | VsphereError::FileLocked { .. }
                | VsphereError::TaskTimeout { .. }
        ) || matches!(self, VsphereError::InvalidState { fault_type, .. } if fault_type == "TaskInProgress")
    }
}

/// Where a fault happened: the vCenter and what ferry was doing.
#[derive(Debug, Clone)]
pub struct Ctx<'a> {
    /// vCenter URL.
    pub vcenter: &'a str,
    /// What ferry was doing.
    pub doing: &'a str,
}

/// Is this fault about encryption? vSphere reports a cross-provider hot-add as
/// `GenericVmConfigFault` with a message about keys or providers (the UI's
/// "Cryptographic Error"), or as one of the `Crypto*` faults.
pub fn is_crypto_fault(f: &Fault) -> bool {
    let t = f.fault_type.to_ascii_lowercase();
    if t.contains("crypto") || t.contains("encrypt") {
        return true;
    }
    let mut texts = vec![f.message.to_ascii_lowercase()];
    if let Some(d) = &f.detail {
        texts.extend(d.child_text("reason").map(str::to_ascii_lowercase));
        texts.extend(
            d.children_named("faultMessage")
                .filter_map(|m| m.child_text("message"))
                .map(str::to_ascii_lowercase),
        );
    }
    // "kms" only as a word of its own: VM names such as "proxy-kms-a" must not
    // turn an unrelated fault into a crypto refusal.
    let kms_word = |m: &str| {
        m.split(|c: char| !(c.is_alphanumeric() || c == '-' || c == '_' || c == '.'))
            .any(|w| w == "kms")
    };
    texts
        .iter()
        .any(|m| m.contains("crypt") || m.contains("key provider") || kms_word(m))
}

fn s(x: &str) -> String {
    x.to_string()
}

/// Map a SOAP fault of a direct call to a typed error.
pub fn from_fault(f: &Fault, ctx: &Ctx<'_>) -> VsphereError {
    let (vcenter, doing) = (s(ctx.vcenter), s(ctx.doing));
    let message = f.message.trim().to_string();
    match f.fault_type.as_str() {
        "NotAuthenticated" => VsphereError::NotAuthenticated {
            vcenter,
            doing,
            message,
        },
        "NoPermission" => VsphereError::NoPermission {
            vcenter,
            doing,
            privilege: f.detail_text("privilegeId").unwrap_or("?").to_string(),
            message,
        },
        "ManagedObjectNotFound" => VsphereError::ObjectNotFound {
            vcenter,
            doing,
            object: f
                .detail
                .as_ref()
                .and_then(|d| d.child("obj"))
                .map(|o| {
                    format!(
                        "{}:{}",
                        o.type_attr.as_deref().unwrap_or("?"),
                        o.text.trim()
                    )
                })
                .unwrap_or_else(|| "?".into()),
        },
        "FileLocked" => VsphereError::FileLocked {
            vcenter,
            doing,
            message,
        },
        "InvalidState"
        | "InvalidPowerState"
        | "InvalidVmState"
        | "InvalidHostState"
        | "TaskInProgress"
        | "InvalidDatastoreState"
        | "HostNotConnected" => VsphereError::InvalidState {
            vcenter,
            doing,
            fault_type: f.fault_type.clone(),
            message,
        },
        "MethodNotFound" | "NotSupported" | "NotImplemented" => VsphereError::NotSupported {
            vcenter,
            doing,
            fault_type: f.fault_type.clone(),
            message,
        },
        _ if is_crypto_fault(f) => VsphereError::Crypto {
            vcenter,
            doing,
            fault_type: f.fault_type.clone(),
            message,
        },
        _ => VsphereError::Fault {
            vcenter,
            doing,
            fault_type: f.fault_type.clone(),
            message,
        },
    }
}

/// Map the `error` of a failed task to a typed error: encryption, lock and state
/// problems keep their own variants; everything else is [`VsphereError::TaskFailed`].
pub fn from_task_fault(f: &Fault, task: &str, ctx: &Ctx<'_>) -> VsphereError {
    match from_fault(f, ctx) {
        e @ (VsphereError::Crypto { .. }
        | VsphereError::FileLocked { .. }
        | VsphereError::InvalidState { .. }
        | VsphereError::NoPermission { .. }
        | VsphereError::NotAuthenticated { .. }) => e,
        _ => VsphereError::TaskFailed {
            vcenter: s(ctx.vcenter),
            doing: s(ctx.doing),
            task: task.to_string(),
            fault_type: f.fault_type.clone(),
            message: f.message.trim().to_string(),
        },
    }
}

/// Map a fault of QueryChangedDiskAreas: `FileFault` (and its kin, except locks) or
/// `InvalidArgument` mean the changeId is unknown to CBT.
pub fn from_cbt_fault(f: &Fault, change_id: &str, ctx: &Ctx<'_>) -> VsphereError {
    match f.fault_type.as_str() {
        "FileFault" | "FileNotFound" | "InvalidArgument" | "CannotAccessFile" => {
            VsphereError::CbtReset {
                vcenter: s(ctx.vcenter),
                doing: s(ctx.doing),
                change_id: change_id.to_string(),
                fault_type: f.fault_type.clone(),
                message: f.message.trim().to_string(),
            }
        }
        _ => from_fault(f, ctx),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fault(t: &str, m: &str) -> Fault {
        Fault {
            fault_type: t.into(),
            message: m.into(),
            detail: None,
        }
    }

    const CTX: Ctx<'static> = Ctx {
        vcenter: "https://vc.example/sdk",
        doing: "testing",
    };

    #[test]
    fn faults_map_to_typed_errors() {
        assert!(matches!(
            from_fault(&fault("NotAuthenticated", ""), &CTX),
            VsphereError::NotAuthenticated { .. }
        ));
        assert!(matches!(
            from_fault(&fault("FileLocked", "x"), &CTX),
            VsphereError::FileLocked { .. }
        ));
        assert!(matches!(
            from_fault(&fault("InvalidPowerState", ""), &CTX),
            VsphereError::InvalidState { .. }
        ));
        assert!(matches!(
            from_fault(&fault("MethodNotFound", ""), &CTX),
            VsphereError::NotSupported { .. }
        ));
        assert!(matches!(
            from_fault(&fault("ManagedObjectNotFound", ""), &CTX),
            VsphereError::ObjectNotFound { .. }
        ));
        assert!(matches!(
            from_fault(&fault("CryptoFault", ""), &CTX),
            VsphereError::Crypto { .. }
        ));
        assert!(matches!(
            from_fault(&fault("SystemError", "boom"), &CTX),
            VsphereError::Fault { .. }
        ));
        let e = from_fault(&fault("SystemError", "boom"), &CTX).to_string();
        assert!(
            e.contains("vc.example") && e.contains("testing") && e.contains("SystemError: boom"),
            "{e}"
        );
    }

    #[test]
    fn task_faults_keep_crypto_and_lock_else_task_failed() {
        let e = from_task_fault(
            &fault(
                "GenericVmConfigFault",
                "Cryptographic Error: the key providers differ (kms-a, kms-b)",
            ),
            "task-7",
            &CTX,
        );
        assert!(e.is_crypto(), "{e}");
        assert!(matches!(
            from_task_fault(&fault("FileLocked", ""), "t", &CTX),
            VsphereError::FileLocked { .. }
        ));
        match from_task_fault(&fault("InvalidDeviceSpec", "slot taken"), "task-8", &CTX) {
            VsphereError::TaskFailed {
                task,
                fault_type,
                message,
                ..
            } => {
                assert_eq!(
                    (task.as_str(), fault_type.as_str(), message.as_str()),
                    ("task-8", "InvalidDeviceSpec", "slot taken")
                )
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn crypto_is_not_guessed_from_vm_names() {
        let slot = fault(
            "InvalidDeviceSpec",
            "unit number 3 is not free on controller 1000 of VM proxy-kms-a",
        );
        assert!(!is_crypto_fault(&slot));
        assert!(is_crypto_fault(&fault(
            "InvalidState",
            "cannot get the key from the KMS for this disk"
        )));
        assert!(is_crypto_fault(&fault(
            "SystemError",
            "Key provider mismatch"
        )));
    }

    #[test]
    fn cbt_faults_mean_reset() {
        for t in ["FileFault", "InvalidArgument"] {
            assert!(
                from_cbt_fault(&fault(t, "changeId"), "52 aa/3", &CTX).is_cbt_reset(),
                "{t}"
            );
        }
        assert!(matches!(
            from_cbt_fault(&fault("FileLocked", ""), "x", &CTX),
            VsphereError::FileLocked { .. }
        ));
        assert!(matches!(
            from_cbt_fault(&fault("MethodNotFound", ""), "x", &CTX),
            VsphereError::NotSupported { .. }
        ));
    }
}
