//! Who may use the console and what they may see and do: roles and tenant
//! scopes, argon2id password hashes, server-side sessions with CSRF tokens,
//! and login throttling. Pure logic and in-memory state; the HTTP layer
//! (`super::http`) reads cookies and forms and calls in here.
//!
//! Must not render pages or read the orchestrator's data.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use rand::RngCore;
use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What an account may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Sees its scope.
    Viewer,
    /// Sees its scope, backs up and restores in it.
    Operator,
    /// The provider's administrator: everything, including the audit log.
    Admin,
}

impl Role {
    /// As stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Role, String> {
        match s {
            "viewer" => Ok(Role::Viewer),
            "operator" => Ok(Role::Operator),
            "admin" => Ok(Role::Admin),
            _ => Err(format!(
                "{s:?} is not a role: use viewer, operator or admin"
            )),
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A logged-in account: who, with which role, over which tenants.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Principal {
    /// Account name.
    pub name: String,
    /// Role.
    pub role: Role,
    /// The tenant it is confined to; `None`: the provider (every tenant).
    pub tenant: Option<String>,
}

impl Principal {
    /// Whether it may see `tenant`'s VMs, points, jobs and keys.
    pub fn sees(&self, tenant: &str) -> bool {
        self.tenant.as_deref().is_none_or(|t| t == tenant)
    }
    /// Whether it may see what belongs to no tenant (VMs no job selects and
    /// whose key provider is no tenant's, agents shared between tenants).
    pub fn is_provider(&self) -> bool {
        self.tenant.is_none()
    }
    /// Whether it may back up and restore `tenant`'s VMs.
    pub fn acts_on(&self, tenant: &str) -> bool {
        self.role >= Role::Operator && self.sees(tenant)
    }
    /// Whether it is the provider's administrator.
    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin && self.tenant.is_none()
    }
}

/// Check an account before it is stored: a name of `[A-Za-z0-9._@-]`, 1 to 64
/// characters; admins belong to the provider; passwords of 12 to 1024 bytes.
pub fn check_account(
    name: &str,
    role: Role,
    tenant: Option<&str>,
    password: &str,
) -> Result<(), String> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._@-".contains(c))
    {
        return Err(format!(
            "account name {name:?}: use 1 to 64 letters, digits, '.', '_', '@' or '-'"
        ));
    }
    if role == Role::Admin && tenant.is_some() {
        return Err(
            "an admin is the provider's: give a tenant account the viewer or operator role".into(),
        );
    }
    if password.len() < 12 {
        return Err("the password must have at least 12 characters".into());
    }
    if password.len() > 1024 {
        return Err("the password must have at most 1024 bytes".into());
    }
    Ok(())
}

/// argon2id hash (PHC string, random salt, the crate's default cost:
/// 19 MiB, 2 passes) of a password.
pub fn hash_password(password: &str) -> Result<String, String> {
    let mut salt = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut salt);
    let salt = SaltString::encode_b64(&salt).map_err(|e| e.to_string())?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| format!("hashing the password: {e}"))
}

/// A hash to verify against when the account does not exist, so that a wrong
/// name costs as long as a wrong password.
pub fn dummy_hash() -> &'static str {
    static H: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    H.get_or_init(|| hash_password("not-a-password-of-anyone").unwrap_or_default())
}

/// Whether `password` matches the PHC string `hash` (false for a malformed hash).
pub fn verify_password(password: &str, hash: &str) -> bool {
    match PasswordHash::new(hash) {
        Ok(h) => Argon2::default()
            .verify_password(password.as_bytes(), &h)
            .is_ok(),
        Err(_) => false,
    }
}

/// A random token of 32 bytes as 64 hex digits.
pub fn random_token() -> String {
    let mut b = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut b);
    hex::encode(b)
}

/// Compare two strings in time independent of where they differ.
pub fn same(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A session as the server keeps it.
#[derive(Debug, Clone)]
pub struct Session {
    /// Who.
    pub principal: Principal,
    /// The token every state-changing request must carry (form field `csrf`
    /// or header `X-CSRF-Token`).
    pub csrf: String,
    /// The account record's `updated_at` at login: a session of an account
    /// changed or removed since (by `ferry orchestrator account`, maybe from
    /// another process) ends at its next request.
    pub account_version: i64,
    created: Instant,
    last_seen: Instant,
}

/// Why a session cookie did not open a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionMiss {
    /// No such session (never existed, logged out, or the console restarted).
    Unknown,
    /// Idle for longer than allowed, or older than the absolute limit.
    Expired,
}

/// Server-side sessions: the cookie carries only a random id.
pub struct Sessions {
    idle: Duration,
    max: Duration,
    map: Mutex<HashMap<String, Session>>,
}

/// How long an expired session is still recognised as expired.
const EXPIRED_KEPT: Duration = Duration::from_secs(3600);

/// Most sessions kept at once; the oldest go first beyond it.
const MAX_SESSIONS: usize = 10_000;

impl Sessions {
    /// Sessions that end after `idle` without a request or `max` after login.
    pub fn new(idle: Duration, max: Duration) -> Sessions {
        Sessions {
            idle,
            max,
            map: Mutex::new(HashMap::new()),
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Start a session; returns its id (the cookie's value).
    pub fn create(
        &self,
        principal: Principal,
        account_version: i64,
        now: Instant,
    ) -> (String, Session) {
        let id = random_token();
        let s = Session {
            principal,
            csrf: random_token(),
            account_version,
            created: now,
            last_seen: now,
        };
        let mut m = self.map();
        // Expired sessions stay known for a while, so their next request can
        // say "expired" rather than "not logged in".
        let (idle, max) = (self.idle, self.max);
        m.retain(|_, v| !expired(v, now, idle + EXPIRED_KEPT, max + EXPIRED_KEPT));
        if m.len() >= MAX_SESSIONS {
            if let Some(oldest) = m
                .iter()
                .min_by_key(|(_, v)| v.last_seen)
                .map(|(k, _)| k.clone())
            {
                m.remove(&oldest);
            }
        }
        m.insert(id.clone(), s.clone());
        (id, s)
    }

    /// The session of cookie value `id`, touched (its idle time restarts).
    pub fn get(&self, id: &str, now: Instant) -> Result<Session, SessionMiss> {
        let mut m = self.map();
        let Some(s) = m.get_mut(id) else {
            return Err(SessionMiss::Unknown);
        };
        if expired(s, now, self.idle, self.max) {
            m.remove(id);
            return Err(SessionMiss::Expired);
        }
        s.last_seen = now;
        Ok(s.clone())
    }

    /// End a session.
    pub fn remove(&self, id: &str) {
        self.map().remove(id);
    }

    /// End every session of account `name` (removed or password changed).
    pub fn remove_account(&self, name: &str) {
        self.map().retain(|_, s| s.principal.name != name);
    }
}

fn expired(s: &Session, now: Instant, idle: Duration, max: Duration) -> bool {
    now.saturating_duration_since(s.last_seen) > idle
        || now.saturating_duration_since(s.created) > max
}

/// Login throttling: after `free` failures in a row for one key (an account
/// name, or a remote address), each further attempt must wait, doubling from
/// 1 s up to 5 minutes; a success clears the key.
pub struct Throttle {
    free: u32,
    map: Mutex<HashMap<String, (u32, Instant)>>,
}

/// Failures allowed in a row for one account before attempts must wait.
pub const FREE_FAILURES: u32 = 5;
/// Failures allowed in a row from one address (several people may share it
/// behind NAT) before attempts must wait.
pub const FREE_FAILURES_PER_ADDRESS: u32 = 20;
const MAX_WAIT: Duration = Duration::from_secs(300);
const MAX_KEYS: usize = 100_000;

impl Default for Throttle {
    fn default() -> Self {
        Throttle::new(FREE_FAILURES)
    }
}

impl Throttle {
    /// A throttle allowing `free` failures in a row per key.
    pub fn new(free: u32) -> Throttle {
        Throttle {
            free,
            map: Mutex::new(HashMap::new()),
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, (u32, Instant)>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How long an attempt for `key` must still wait at `now` (zero: go ahead).
    pub fn wait(&self, key: &str, now: Instant) -> Duration {
        match self.map().get(key) {
            Some(&(n, last)) if n >= self.free => {
                let shift = (n - self.free).min(16);
                let wait = Duration::from_secs(1u64 << shift).min(MAX_WAIT);
                (last + wait).saturating_duration_since(now)
            }
            _ => Duration::ZERO,
        }
    }

    /// Record a failed attempt for `key`.
    pub fn failed(&self, key: &str, now: Instant) {
        let mut m = self.map();
        if m.len() >= MAX_KEYS && !m.contains_key(key) {
            // Forget keys whose wait is over rather than grow without bound.
            m.retain(|_, (_, last)| now.saturating_duration_since(*last) < MAX_WAIT);
            if m.len() >= MAX_KEYS {
                return;
            }
        }
        let e = m.entry(key.to_string()).or_insert((0, now));
        e.0 = e.0.saturating_add(1);
        e.1 = now;
    }

    /// A successful login clears `key`.
    pub fn succeeded(&self, key: &str) {
        self.map().remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(role: Role, tenant: Option<&str>) -> Principal {
        Principal {
            name: "x".into(),
            role,
            tenant: tenant.map(str::to_string),
        }
    }

    #[test]
    fn scopes_and_roles() {
        let admin = p(Role::Admin, None);
        let a_op = p(Role::Operator, Some("a"));
        let a_view = p(Role::Viewer, Some("a"));
        let prov_view = p(Role::Viewer, None);
        assert!(admin.sees("a") && admin.sees("b") && admin.acts_on("b") && admin.is_admin());
        assert!(a_op.sees("a") && !a_op.sees("b") && a_op.acts_on("a") && !a_op.acts_on("b"));
        assert!(!a_op.is_provider() && !a_op.is_admin());
        assert!(a_view.sees("a") && !a_view.acts_on("a"));
        assert!(prov_view.sees("b") && !prov_view.acts_on("b") && !prov_view.is_admin());
        assert!(!a_view.sees("a2"), "tenant names are compared whole");
    }

    #[test]
    fn account_checks() {
        assert!(check_account("alice", Role::Operator, Some("a"), "correct horse battery").is_ok());
        assert!(check_account("", Role::Viewer, None, "correct horse battery").is_err());
        assert!(check_account("a b", Role::Viewer, None, "correct horse battery").is_err());
        assert!(
            check_account(&"a".repeat(65), Role::Viewer, None, "correct horse battery").is_err()
        );
        assert!(
            check_account("root", Role::Admin, Some("a"), "correct horse battery")
                .unwrap_err()
                .contains("provider")
        );
        assert!(check_account("bob", Role::Viewer, None, "short").is_err());
        assert!(check_account("bob", Role::Viewer, None, &"x".repeat(1025)).is_err());
        assert_eq!("operator".parse::<Role>(), Ok(Role::Operator));
        assert!("root".parse::<Role>().is_err());
    }

    #[test]
    fn hashes_verify_only_their_password() {
        let h = hash_password("correct horse battery").unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(verify_password("correct horse battery", &h));
        assert!(!verify_password("correct horse batterY", &h));
        assert!(!verify_password("x", "not a hash"));
        assert_ne!(h, hash_password("correct horse battery").unwrap(), "salted");
        assert!(!verify_password("anything", dummy_hash()));
    }

    #[test]
    fn sessions_expire_idle_and_absolute() {
        let s = Sessions::new(Duration::from_secs(60), Duration::from_secs(300));
        let t0 = Instant::now();
        let (id, sess) = s.create(p(Role::Viewer, Some("a")), 0, t0);
        assert_eq!(sess.csrf.len(), 64);
        assert!(s.get(&id, t0 + Duration::from_secs(50)).is_ok());
        assert!(
            s.get(&id, t0 + Duration::from_secs(100)).is_ok(),
            "touched at 50 s"
        );
        assert_eq!(
            s.get(&id, t0 + Duration::from_secs(200)).unwrap_err(),
            SessionMiss::Expired
        );
        assert_eq!(s.get(&id, t0).unwrap_err(), SessionMiss::Unknown, "removed");
        let (id2, _) = s.create(p(Role::Viewer, None), 0, t0);
        for k in 1..6 {
            assert!(s.get(&id2, t0 + Duration::from_secs(55 * k)).is_ok());
        }
        assert_eq!(
            s.get(&id2, t0 + Duration::from_secs(330)).unwrap_err(),
            SessionMiss::Expired,
            "absolute limit"
        );
        let (old, _) = s.create(p(Role::Viewer, None), 0, t0);
        let _ = s.create(p(Role::Viewer, None), 0, t0 + Duration::from_secs(120));
        assert_eq!(
            s.get(&old, t0 + Duration::from_secs(121)).unwrap_err(),
            SessionMiss::Expired,
            "still recognised after another login"
        );
        let (id3, _) = s.create(p(Role::Viewer, None), 0, t0);
        s.remove_account("x");
        assert_eq!(s.get(&id3, t0).unwrap_err(), SessionMiss::Unknown);
    }

    #[test]
    fn throttle_doubles_after_free_failures_and_clears_on_success() {
        let t = Throttle::default();
        let t0 = Instant::now();
        for _ in 0..FREE_FAILURES - 1 {
            t.failed("bob", t0);
        }
        assert_eq!(t.wait("bob", t0), Duration::ZERO);
        t.failed("bob", t0);
        assert_eq!(t.wait("bob", t0), Duration::from_secs(1));
        t.failed("bob", t0);
        assert_eq!(t.wait("bob", t0), Duration::from_secs(2));
        assert_eq!(t.wait("bob", t0 + Duration::from_secs(2)), Duration::ZERO);
        for _ in 0..30 {
            t.failed("bob", t0);
        }
        assert_eq!(t.wait("bob", t0), MAX_WAIT);
        assert_eq!(t.wait("alice", t0), Duration::ZERO, "keys are separate");
        t.succeeded("bob");
        assert_eq!(t.wait("bob", t0), Duration::ZERO);
    }

    #[test]
    fn same_compares_whole_strings() {
        assert!(same("abc", "abc"));
        assert!(!same("abc", "abd"));
        assert!(!same("abc", "ab"));
    }
}
