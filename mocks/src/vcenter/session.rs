//! Sessions: Login/Logout, the `vmware_soap_session` cookie, idle expiry, and what a
//! session owns (container views, PropertyCollector paging tokens).
//!
//! Owns session state only; checking passwords against the scenario and deciding
//! which methods need a session is the handlers' job.

use super::codec::{Fault, MoRef, Obj, Val};
use super::ids;
use super::vim;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// The session cookie's name.
pub const COOKIE: &str = "vmware_soap_session";

/// A container view (`ViewManager.CreateContainerView`).
#[derive(Clone, Debug)]
pub struct View {
    /// Moref id (`session[<key>]<uuid>`, as vCenter names them).
    pub id: String,
    /// Container.
    pub container: MoRef,
    /// Managed object types to include (empty: all).
    pub types: Vec<String>,
    /// Recurse into child containers.
    pub recursive: bool,
}

/// One logged-in session.
#[derive(Debug)]
pub struct Session {
    /// Session key (cookie value).
    pub key: String,
    /// User name.
    pub user: String,
    /// Login time.
    pub login_time: String,
    /// Last call time (xsd:dateTime).
    pub last_active_time: String,
    last_active: Instant,
    /// Client address.
    pub ip: String,
    /// Client User-Agent.
    pub user_agent: String,
    /// Calls made.
    pub call_count: i64,
    /// Container views it created.
    pub views: Vec<View>,
    /// RetrievePropertiesEx continuation: token → (page size, remaining
    /// `ObjectContent`s).
    pub pages: HashMap<String, (usize, Vec<Val>)>,
    /// PropertyCollector filters (CreateFilter).
    pub filters: Vec<super::updates::Filter>,
    /// Version of the last UpdateSet sent, per PropertyCollector.
    pub update_version: HashMap<String, u64>,
    /// The rest of a truncated UpdateSet, per PropertyCollector.
    pub pending_updates: HashMap<String, super::updates::Pending>,
    /// PropertyCollectors created by this session (CreatePropertyCollector).
    pub collectors: Vec<String>,
}

impl Session {
    /// True when `id` is the service's PropertyCollector or one this session made.
    pub fn has_collector(&self, id: &str) -> bool {
        id == super::vim::PROPERTY_COLLECTOR || self.collectors.iter().any(|c| c == id)
    }
}

impl Session {
    /// `UserSession` as vSphere returns it.
    pub fn user_session(&self) -> Obj {
        Obj::new("UserSession")
            .f("key", Val::s(&self.key))
            .f("userName", Val::s(&self.user))
            .f("fullName", Val::s(&self.user))
            .f("loginTime", Val::Time(self.login_time.clone()))
            .f("lastActiveTime", Val::Time(self.last_active_time.clone()))
            .f("locale", Val::s("en"))
            .f("messageLocale", Val::s("en"))
            .f("extensionSession", Val::Bool(false))
            .f("ipAddress", Val::s(&self.ip))
            .f("userAgent", Val::s(&self.user_agent))
            .f("callCount", Val::Long(self.call_count))
    }

    /// A view of this session by id.
    pub fn view(&self, id: &str) -> Option<&View> {
        self.views.iter().find(|v| v.id == id)
    }
}

/// All sessions.
#[derive(Debug)]
pub struct Sessions {
    map: HashMap<String, Session>,
    /// Idle time after which a session expires.
    pub idle: Duration,
}

impl Sessions {
    /// No sessions; sessions expire after `idle` without calls.
    pub fn new(idle: Duration) -> Sessions {
        Sessions {
            map: HashMap::new(),
            idle,
        }
    }

    /// Create a session for `user`; returns its key.
    pub fn login(&mut self, user: &str, ip: &str, user_agent: &str) -> String {
        let key = ids::uuid();
        let now = ids::now();
        self.map.insert(
            key.clone(),
            Session {
                key: key.clone(),
                user: user.into(),
                login_time: now.clone(),
                last_active_time: now,
                last_active: Instant::now(),
                ip: ip.into(),
                user_agent: user_agent.chars().take(256).collect(),
                call_count: 1,
                views: Vec::new(),
                pages: HashMap::new(),
                filters: Vec::new(),
                update_version: HashMap::new(),
                pending_updates: HashMap::new(),
                collectors: Vec::new(),
            },
        );
        key
    }

    /// The live session for cookie value `key`, touched (or `NotAuthenticated`).
    pub fn active(&mut self, key: Option<&str>) -> Result<&mut Session, Fault> {
        let Some(key) = key else {
            return Err(vim::not_authenticated());
        };
        let expired = match self.map.get(key) {
            None => return Err(vim::not_authenticated()),
            Some(s) => s.last_active.elapsed() > self.idle,
        };
        if expired {
            self.map.remove(key);
            return Err(vim::not_authenticated());
        }
        let s = self.map.get_mut(key).ok_or_else(vim::not_authenticated)?;
        s.last_active = Instant::now();
        s.last_active_time = ids::now();
        s.call_count += 1;
        Ok(s)
    }

    /// A live session without counting a call (for long waits).
    pub fn live_mut(&mut self, key: &str) -> Result<&mut Session, Fault> {
        let idle = self.idle;
        match self.map.get_mut(key) {
            Some(s) if s.last_active.elapsed() <= idle => Ok(s),
            _ => Err(vim::not_authenticated()),
        }
    }

    /// Read-only access to a live session.
    pub fn peek(&self, key: &str) -> Option<&Session> {
        self.map
            .get(key)
            .filter(|s| s.last_active.elapsed() <= self.idle)
    }

    /// End a session.
    pub fn logout(&mut self, key: &str) -> bool {
        self.map.remove(key).is_some()
    }

    /// End every session now (fault injection). Returns how many ended.
    pub fn expire_all(&mut self) -> usize {
        let n = self.map.len();
        self.map.clear();
        n
    }

    /// Drop sessions idle for longer than the timeout.
    pub fn sweep(&mut self) {
        let idle = self.idle;
        self.map.retain(|_, s| s.last_active.elapsed() <= idle);
    }

    /// Live sessions.
    pub fn all(&self) -> impl Iterator<Item = &Session> {
        self.map.values()
    }
}

/// The session key from a `Cookie` header (`vmware_soap_session="..."`; attributes
/// such as `Path` that pyvmomi echoes back are ignored).
pub fn cookie_key(header: &str) -> Option<String> {
    header.split(';').find_map(|part| {
        let (k, v) = part.trim().split_once('=')?;
        (k.trim() == COOKIE).then(|| v.trim().trim_matches('"').to_string())
    })
}

/// The `Set-Cookie` header value for session `key`.
pub fn set_cookie(key: &str) -> String {
    format!("{COOKIE}=\"{key}\"; Path=/; HttpOnly; Secure;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_and_expiry() {
        let h = set_cookie("abc");
        assert_eq!(cookie_key(&h).as_deref(), Some("abc"));
        assert_eq!(
            cookie_key("a=b; vmware_soap_session=xyz").as_deref(),
            Some("xyz")
        );
        assert_eq!(cookie_key("a=b"), None);
        let mut s = Sessions::new(Duration::from_secs(60));
        let k = s.login("u", "1.2.3.4", "test");
        assert!(s.active(Some(&k)).is_ok());
        assert_eq!(
            s.active(Some("nope")).unwrap_err().obj.ty,
            "NotAuthenticated"
        );
        assert_eq!(s.active(None).unwrap_err().obj.ty, "NotAuthenticated");
        s.idle = Duration::ZERO;
        std::thread::sleep(Duration::from_millis(2));
        assert!(s.active(Some(&k)).is_err(), "idle sessions expire");
        s.idle = Duration::from_secs(60);
        let k = s.login("u", "", "");
        assert_eq!(s.expire_all(), 1);
        assert!(s.active(Some(&k)).is_err());
    }
}
