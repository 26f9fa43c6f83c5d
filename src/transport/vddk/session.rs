//! A VDDK connection to one VM (and snapshot) through vCenter, and the calls
//! around it: `PrepareForAccess`/`EndAccess` ([`AccessGuard`]), `ConnectEx`/
//! `Disconnect` ([`Connection`]) and `Cleanup` ([`cleanup`]).
//!
//! Owns: building `VixDiskLibConnectParams` (allocated by the library when it
//! exports `AllocateConnectParams`, else a zeroed box) with strings owned here for
//! as long as the library may read them; the credentials are ferry's existing
//! vCenter session cookie (`VIXDISKLIB_CRED_SESSIONID`), so no password is ever
//! handed to VDDK; the thumbprint helpers.
//!
//! Must not: choose or widen the transport. `ConnectEx` gets exactly the one mode
//! the selector chose (never a list, never NULL, which would let VDDK pick).

use super::error::VddkError;
use super::ffi;
use super::loader::{cstring, Vddk};
use crate::transport::select::Mode;
use std::ffi::{c_char, CString};
use std::ptr::NonNull;
use std::sync::Arc;
use zeroize::Zeroize;

/// The identity ferry gives `PrepareForAccess`/`EndAccess` (shown in vCenter as
/// the reason relocation is disabled).
pub const ACCESS_IDENTITY: &str = "ferry";
/// vCenter's HTTPS port.
pub const DEFAULT_PORT: u16 = 443;
/// ESXi's NFC port (NBD/NBD-SSL data).
pub const DEFAULT_NFC_PORT: u16 = 902;

/// Where and as whom to connect, and with which transport.
#[derive(Clone)]
pub struct ConnectSpec {
    /// vCenter host name or address.
    pub server: String,
    /// vCenter port (443).
    pub port: u16,
    /// ESXi NFC port (902).
    pub nfc_host_port: u16,
    /// SHA-1 thumbprint of vCenter's certificate, `AA:BB:...` (20 pairs); see
    /// [`thumbprint_from_der`] and [`normalize_thumbprint`].
    pub thumbprint: String,
    /// ferry's vCenter session: the `vmware_soap_session` cookie value (a
    /// `vmware_soap_session=` prefix is accepted and removed).
    pub session_cookie: String,
    /// The VM's managed object id (`vm-16`).
    pub vm_moref: String,
    /// The snapshot's managed object id (`snapshot-47`); `None` for the VM's
    /// current disks (a restore into a new disk).
    pub snapshot_moref: Option<String>,
    /// The transport the selector chose; the only one VDDK may use.
    pub mode: Mode,
    /// Read-only connection (backups); restores connect read-write.
    pub read_only: bool,
}

impl std::fmt::Debug for ConnectSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectSpec")
            .field("server", &self.server)
            .field("port", &self.port)
            .field("nfc_host_port", &self.nfc_host_port)
            .field("thumbprint", &self.thumbprint)
            .field("session_cookie", &"<redacted>")
            .field("vm_moref", &self.vm_moref)
            .field("snapshot_moref", &self.snapshot_moref)
            .field("mode", &self.mode)
            .field("read_only", &self.read_only)
            .finish()
    }
}

impl ConnectSpec {
    /// A read-only spec with the default ports.
    pub fn new(
        server: impl Into<String>,
        thumbprint: impl Into<String>,
        session_cookie: impl Into<String>,
        vm_moref: impl Into<String>,
        snapshot_moref: Option<String>,
        mode: Mode,
    ) -> ConnectSpec {
        ConnectSpec {
            server: server.into(),
            port: DEFAULT_PORT,
            nfc_host_port: DEFAULT_NFC_PORT,
            thumbprint: thumbprint.into(),
            session_cookie: session_cookie.into(),
            vm_moref: vm_moref.into(),
            snapshot_moref,
            mode,
            read_only: true,
        }
    }
}

/// Credentials and server for `VixDiskLib_Cleanup` (no VM: `vmxSpec` is NULL).
#[derive(Clone)]
pub struct CleanupSpec {
    /// vCenter host.
    pub server: String,
    /// vCenter port.
    pub port: u16,
    /// ESXi NFC port.
    pub nfc_host_port: u16,
    /// SHA-1 thumbprint of vCenter's certificate.
    pub thumbprint: String,
    /// `vmware_soap_session` cookie value.
    pub session_cookie: String,
}

impl std::fmt::Debug for CleanupSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CleanupSpec")
            .field("server", &self.server)
            .field("port", &self.port)
            .field("thumbprint", &self.thumbprint)
            .finish_non_exhaustive()
    }
}

impl From<&ConnectSpec> for CleanupSpec {
    fn from(s: &ConnectSpec) -> CleanupSpec {
        CleanupSpec {
            server: s.server.clone(),
            port: s.port,
            nfc_host_port: s.nfc_host_port,
            thumbprint: s.thumbprint.clone(),
            session_cookie: s.session_cookie.clone(),
        }
    }
}

/// The uppercase, colon-separated SHA-1 thumbprint of a DER certificate, as
/// VDDK's `thumbPrint` expects (`B2:31:BD:...`, 20 pairs).
pub fn thumbprint_from_der(der: &[u8]) -> String {
    format_pairs(&crate::tls::sha1_fingerprint(der))
}

fn format_pairs(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Normalise a SHA-1 thumbprint given with or without colons (or spaces), in
/// any case, to VDDK's form. Anything that is not 20 bytes of hex is refused,
/// with a hint when it is a SHA-256 (what `[vcenter] thumbprint` pins).
pub fn normalize_thumbprint(s: &str) -> Result<String, VddkError> {
    let hex: String = s
        .chars()
        .filter(|c| !matches!(c, ':' | ' ' | '-'))
        .collect();
    let bytes = hex::decode(&hex)
        .map_err(|_| VddkError::InvalidArgument(format!("thumbprint {s:?} is not hexadecimal")))?;
    match bytes.len() {
        20 => Ok(format_pairs(&bytes)),
        32 => Err(VddkError::InvalidArgument(
            "VDDK needs vCenter's SHA-1 thumbprint (20 bytes); this is a SHA-256 one. \
             Compute the SHA-1 from the certificate (thumbprint_from_der)"
                .into(),
        )),
        n => Err(VddkError::InvalidArgument(format!(
            "thumbprint has {n} bytes; VDDK needs the 20-byte SHA-1 of vCenter's certificate"
        ))),
    }
}

/// The cookie value without a `vmware_soap_session=` prefix.
fn cookie_value(c: &str) -> &str {
    let c = c.trim();
    c.strip_prefix("vmware_soap_session=").unwrap_or(c)
}

/// The `vmxSpec` for a VM moref.
pub fn vmx_spec(vm_moref: &str) -> String {
    format!("moref={vm_moref}")
}

/// A NUL-terminated secret (the session cookie), wiped on drop.
struct SecretCString(Vec<u8>);

impl SecretCString {
    fn new(what: &str, s: &str) -> Result<SecretCString, VddkError> {
        if s.as_bytes().contains(&0) {
            return Err(VddkError::InvalidArgument(format!(
                "{what} contains a NUL byte"
            )));
        }
        let mut v = Vec::with_capacity(s.len() + 1);
        v.extend_from_slice(s.as_bytes());
        v.push(0);
        Ok(SecretCString(v))
    }
    fn as_ptr(&self) -> *const c_char {
        self.0.as_ptr().cast()
    }
}

impl Drop for SecretCString {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

/// What goes into one `VixDiskLibConnectParams`.
struct ParamFields<'a> {
    vm_moref: Option<&'a str>,
    server: &'a str,
    port: u16,
    nfc_host_port: u16,
    thumbprint: &'a str,
    cookie: &'a str,
}

/// A `VixDiskLibConnectParams` and the strings it points to, owned together so
/// the strings outlive every call that reads the struct.
pub(crate) struct OwnedParams {
    vddk: Arc<Vddk>,
    ptr: NonNull<ffi::ConnectParams>,
    from_library: bool,
    _strings: Vec<CString>,
    _cookie: SecretCString,
}

// SAFETY: the struct and its strings are owned exclusively by this value; the
// library reads them only during calls made under `Vddk::lock`.
unsafe impl Send for OwnedParams {}
// SAFETY: shared references only pass `as_ptr()` to calls serialised by `Vddk::lock`.
unsafe impl Sync for OwnedParams {}

impl OwnedParams {
    fn new(vddk: &Arc<Vddk>, f: &ParamFields<'_>) -> Result<OwnedParams, VddkError> {
        if f.server.trim().is_empty() {
            return Err(VddkError::InvalidArgument(
                "vCenter server name is empty".into(),
            ));
        }
        let cookie = cookie_value(f.cookie);
        if cookie.is_empty() {
            return Err(VddkError::InvalidArgument(
                "no vCenter session cookie: ferry connects VDDK with its own vCenter session"
                    .into(),
            ));
        }
        let thumbprint = normalize_thumbprint(f.thumbprint)?;
        let vmx = match f.vm_moref {
            Some(m) if m.trim().is_empty() => {
                return Err(VddkError::InvalidArgument("VM moref is empty".into()))
            }
            Some(m) => Some(cstring("VM moref", &vmx_spec(m.trim()))?),
            None => None,
        };
        let server = cstring("server name", f.server.trim())?;
        let thumb = cstring("thumbprint", &thumbprint)?;
        let empty = cstring("", "")?;
        let empty_key = cstring("", "")?;
        let cookie = SecretCString::new("session cookie", cookie)?;

        let (raw, from_library) = match vddk.api().allocate_connect_params {
            Some(alloc) => {
                // SAFETY: AllocateConnectParams takes no arguments and returns a
                // library-owned struct (or NULL), freed with FreeConnectParams.
                let p = unsafe { alloc() };
                (p, true)
            }
            None => {
                // SAFETY: all-zero is a valid ConnectParams (NULL pointers, zero
                // integers and enums, zero bytes).
                let b: Box<ffi::ConnectParams> = Box::new(unsafe { std::mem::zeroed() });
                (Box::into_raw(b), false)
            }
        };
        let ptr = NonNull::new(raw).ok_or(VddkError::Protocol {
            call: "VixDiskLib_AllocateConnectParams",
            detail: "returned NULL".into(),
        })?;
        let p = ptr.as_ptr();
        // SAFETY: `p` points to a valid, exclusively owned ConnectParams; every
        // pointer written refers to a string owned by the value returned below.
        // The library-internal fields (`reserved`, `state`) are left as allocated.
        unsafe {
            (*p).vmx_spec = vmx
                .as_ref()
                .map_or(std::ptr::null_mut(), |c| c.as_ptr().cast_mut());
            (*p).server_name = server.as_ptr().cast_mut();
            (*p).thumb_print = thumb.as_ptr().cast_mut();
            (*p).private_use = 0;
            (*p).cred_type = ffi::CRED_SESSIONID;
            (*p).creds = ffi::Creds {
                session_id: ffi::SessionIdCreds {
                    cookie: cookie.as_ptr().cast_mut(),
                    user_name: empty.as_ptr().cast_mut(),
                    key: empty_key.as_ptr().cast_mut(),
                },
            };
            (*p).port = u32::from(f.port);
            (*p).nfc_host_port = u32::from(f.nfc_host_port);
            (*p).vim_api_ver = std::ptr::null_mut();
            (*p).spec = ffi::Spec {
                v_storage_obj_spec: ffi::VStorageObjectSpec {
                    id: std::ptr::null_mut(),
                    datastore_mo_ref: std::ptr::null_mut(),
                    ss_id: std::ptr::null_mut(),
                },
            };
            (*p).spec_type = ffi::SPEC_VMX;
        }
        let mut strings = vec![server, thumb, empty, empty_key];
        strings.extend(vmx);
        Ok(OwnedParams {
            vddk: vddk.clone(),
            ptr,
            from_library,
            _strings: strings,
            _cookie: cookie,
        })
    }

    pub(crate) fn as_ptr(&self) -> *const ffi::ConnectParams {
        self.ptr.as_ptr()
    }
}

impl Drop for OwnedParams {
    fn drop(&mut self) {
        let p = self.ptr.as_ptr();
        // SAFETY: `p` is valid and exclusively ours. The pointers into our strings
        // are cleared first so that no free routine can see (or free) them.
        unsafe {
            (*p).vmx_spec = std::ptr::null_mut();
            (*p).server_name = std::ptr::null_mut();
            (*p).thumb_print = std::ptr::null_mut();
            (*p).creds = ffi::Creds {
                session_id: ffi::SessionIdCreds {
                    cookie: std::ptr::null_mut(),
                    user_name: std::ptr::null_mut(),
                    key: std::ptr::null_mut(),
                },
            };
        }
        if self.from_library {
            // SAFETY: allocated by AllocateConnectParams, freed exactly once.
            unsafe { (self.vddk.api().free_connect_params)(p) };
        } else {
            // SAFETY: allocated by Box::into_raw in `new`, freed exactly once.
            drop(unsafe { Box::from_raw(p) });
        }
    }
}

/// `PrepareForAccess` on creation, `EndAccess` (same params, same identity) on
/// [`AccessGuard::end`] or drop: vCenter disables relocation (Storage vMotion)
/// of the VM while ferry reads or writes its disks.
pub struct AccessGuard {
    params: OwnedParams,
    identity: CString,
    vm_moref: String,
    ended: bool,
}

impl AccessGuard {
    /// `VixDiskLib_PrepareForAccess` for the VM of `spec`.
    pub fn prepare(vddk: &Arc<Vddk>, spec: &ConnectSpec) -> Result<AccessGuard, VddkError> {
        vddk.ensure_live()?;
        let params = OwnedParams::new(vddk, &fields(spec, Some(&spec.vm_moref)))?;
        let identity = cstring("identity", ACCESS_IDENTITY)?;
        let code = {
            let _g = vddk.lock();
            // SAFETY: params and identity are valid and outlive the call.
            unsafe { (vddk.api().prepare_for_access)(params.as_ptr(), identity.as_ptr()) }
        };
        vddk.check("VixDiskLib_PrepareForAccess", code)?;
        tracing::debug!(vm = %spec.vm_moref, "VDDK PrepareForAccess");
        Ok(AccessGuard {
            params,
            identity,
            vm_moref: spec.vm_moref.clone(),
            ended: false,
        })
    }

    /// `VixDiskLib_EndAccess`, reporting its result.
    pub fn end(mut self) -> Result<(), VddkError> {
        self.ended = true;
        self.end_access()
    }

    fn end_access(&self) -> Result<(), VddkError> {
        let vddk = &self.params.vddk;
        vddk.ensure_live()?;
        let code = {
            let _g = vddk.lock();
            // SAFETY: the same params and identity PrepareForAccess got, still owned.
            unsafe { (vddk.api().end_access)(self.params.as_ptr(), self.identity.as_ptr()) }
        };
        vddk.check("VixDiskLib_EndAccess", code)?;
        tracing::debug!(vm = %self.vm_moref, "VDDK EndAccess");
        Ok(())
    }
}

impl Drop for AccessGuard {
    fn drop(&mut self) {
        if !self.ended {
            if let Err(e) = self.end_access() {
                tracing::warn!(vm = %self.vm_moref, error = %e, "VDDK EndAccess failed; relocation of the VM may stay disabled until vCenter clears it");
            }
        }
    }
}

fn fields<'a>(spec: &'a ConnectSpec, vm: Option<&'a str>) -> ParamFields<'a> {
    ParamFields {
        vm_moref: vm,
        server: &spec.server,
        port: spec.port,
        nfc_host_port: spec.nfc_host_port,
        thumbprint: &spec.thumbprint,
        cookie: &spec.session_cookie,
    }
}

/// An open `VixDiskLib_ConnectEx` connection; `Disconnect` on drop.
pub struct Connection {
    vddk: Arc<Vddk>,
    raw: ffi::Connection,
    /// Kept until Disconnect (nbdkit does the same; VDDK may keep pointers).
    _params: OwnedParams,
    _snapshot: Option<CString>,
    _modes: CString,
    mode: Mode,
    read_only: bool,
    vm_moref: String,
    snapshot_moref: Option<String>,
}

// SAFETY: the raw connection is only used by Open (under `Vddk::lock`) and by
// Disconnect in drop (under the lock); VDDK connections are not tied to a thread.
unsafe impl Send for Connection {}
// SAFETY: as above; `&Connection` only hands the pointer to calls made under the lock.
unsafe impl Sync for Connection {}

impl Connection {
    /// `VixDiskLib_ConnectEx` to the VM (and snapshot) of `spec`, allowing exactly
    /// `spec.mode` as transport.
    pub fn connect(vddk: &Arc<Vddk>, spec: &ConnectSpec) -> Result<Arc<Connection>, VddkError> {
        vddk.ensure_live()?;
        let params = OwnedParams::new(vddk, &fields(spec, Some(&spec.vm_moref)))?;
        let snapshot = match spec.snapshot_moref.as_deref().map(str::trim) {
            Some("") => return Err(VddkError::InvalidArgument("snapshot moref is empty".into())),
            Some(s) => Some(cstring("snapshot moref", s)?),
            None => None,
        };
        // Exactly one mode: VDDK tries each listed mode in turn, so a list (or
        // NULL, "all") would let it fall back behind ferry's back.
        let modes = cstring("transport mode", spec.mode.as_str())?;
        let mut raw: ffi::Connection = std::ptr::null_mut();
        let code = {
            let _g = vddk.lock();
            // SAFETY: every pointer is valid for the call; `raw` is a valid out-param.
            unsafe {
                (vddk.api().connect_ex)(
                    params.as_ptr(),
                    ffi::Bool::from(spec.read_only),
                    snapshot.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
                    modes.as_ptr(),
                    &mut raw,
                )
            }
        };
        vddk.check("VixDiskLib_ConnectEx", code)?;
        if raw.is_null() {
            return Err(VddkError::Protocol {
                call: "VixDiskLib_ConnectEx",
                detail: "succeeded but returned no connection".into(),
            });
        }
        tracing::info!(server = %spec.server, vm = %spec.vm_moref, snapshot = ?spec.snapshot_moref, mode = %spec.mode, read_only = spec.read_only, "VDDK connected");
        Ok(Arc::new(Connection {
            vddk: vddk.clone(),
            raw,
            _params: params,
            _snapshot: snapshot,
            _modes: modes,
            mode: spec.mode,
            read_only: spec.read_only,
            vm_moref: spec.vm_moref.clone(),
            snapshot_moref: spec.snapshot_moref.clone(),
        }))
    }

    /// The transport this connection allows.
    pub fn mode(&self) -> Mode {
        self.mode
    }
    /// Whether the connection is read-only.
    pub fn read_only(&self) -> bool {
        self.read_only
    }
    /// The VM's moref.
    pub fn vm_moref(&self) -> &str {
        &self.vm_moref
    }
    /// The snapshot's moref.
    pub fn snapshot_moref(&self) -> Option<&str> {
        self.snapshot_moref.as_deref()
    }
    /// The library.
    pub fn vddk(&self) -> &Arc<Vddk> {
        &self.vddk
    }
    pub(crate) fn raw(&self) -> ffi::Connection {
        self.raw
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        if self.vddk.ensure_live().is_err() {
            return;
        }
        let code = {
            let _g = self.vddk.lock();
            // SAFETY: `raw` came from ConnectEx and is disconnected exactly once;
            // every disk opened on it holds an Arc to this connection, so all are
            // closed by now.
            unsafe { (self.vddk.api().disconnect)(self.raw) }
        };
        if let Err(e) = self.vddk.check("VixDiskLib_Disconnect", code) {
            tracing::warn!(vm = %self.vm_moref, error = %e, "VDDK Disconnect failed");
        }
    }
}

/// `VixDiskLib_Cleanup`: remove what an unclean stop left behind (HotAdd disks
/// still attached to this proxy, NFC state); call at agent start. Returns
/// (cleaned up, remaining).
pub fn cleanup(vddk: &Arc<Vddk>, spec: &CleanupSpec) -> Result<(u32, u32), VddkError> {
    vddk.ensure_live()?;
    let params = OwnedParams::new(
        vddk,
        &ParamFields {
            vm_moref: None,
            server: &spec.server,
            port: spec.port,
            nfc_host_port: spec.nfc_host_port,
            thumbprint: &spec.thumbprint,
            cookie: &spec.session_cookie,
        },
    )?;
    let (mut cleaned, mut remaining) = (0u32, 0u32);
    let code = {
        let _g = vddk.lock();
        // SAFETY: valid params (vmxSpec NULL, as the header asks) and out-params.
        unsafe { (vddk.api().cleanup)(params.as_ptr(), &mut cleaned, &mut remaining) }
    };
    vddk.check("VixDiskLib_Cleanup", code)?;
    if cleaned > 0 || remaining > 0 {
        tracing::info!(cleaned, remaining, "VDDK cleanup");
    }
    Ok((cleaned, remaining))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thumbprints_are_uppercase_colon_sha1() {
        // SHA-1("abc") = a9993e36 4706816a ba3e2571 7850c26c 9cd0d89d
        let t = thumbprint_from_der(b"abc");
        assert_eq!(
            t,
            "A9:99:3E:36:47:06:81:6A:BA:3E:25:71:78:50:C2:6C:9C:D0:D8:9D"
        );
        assert_eq!(normalize_thumbprint(&t.to_lowercase()).unwrap(), t);
        assert_eq!(
            normalize_thumbprint("a9993e364706816aba3e25717850c26c9cd0d89d").unwrap(),
            t
        );
        let sha256 = "ab".repeat(32);
        assert!(normalize_thumbprint(&sha256)
            .unwrap_err()
            .to_string()
            .contains("SHA-256"));
        assert!(normalize_thumbprint("zz:11").is_err());
        assert!(normalize_thumbprint("AB:CD").is_err());
    }

    #[test]
    fn vmx_spec_and_cookie() {
        assert_eq!(vmx_spec("vm-16"), "moref=vm-16");
        assert_eq!(cookie_value("vmware_soap_session=\"52ab\""), "\"52ab\"");
        assert_eq!(cookie_value(" \"52ab\" "), "\"52ab\"");
    }

    #[test]
    fn debug_never_shows_the_cookie() {
        let s = ConnectSpec::new("vc", "AA", "secret-cookie", "vm-1", None, Mode::NbdSsl);
        assert!(!format!("{s:?}").contains("secret-cookie"));
        assert!(!format!("{:?}", CleanupSpec::from(&s)).contains("secret-cookie"));
        assert_eq!(s.port, 443);
        assert_eq!(s.nfc_host_port, 902);
        assert!(s.read_only);
    }

    #[test]
    fn secret_strings_are_nul_terminated_and_refuse_nul() {
        let c = SecretCString::new("x", "abc").unwrap();
        assert_eq!(c.0, b"abc\0");
        assert!(SecretCString::new("x", "a\0b").is_err());
    }
}
