//! vim25 method handlers: decode each method's arguments from the request element,
//! check the session, call the world, and say what to return. One function per
//! method; unknown methods get `MethodNotFound`.
//!
//! Must not do HTTP (the server does) nor long file work inline (tasks run it on
//! blocking threads).

use super::codec::{Element, Fault, MoRef, Request, Returns, Val};
use super::inventory::{AddDisk, CreateDisk, DeviceChange, ReconfigSpec};
use super::propcoll::{self, Ctx};
use super::session::View;
use super::vim;
use super::world::{lock, TaskStart, World};
use std::sync::Arc;

/// Who is calling and how.
pub struct Call<'a> {
    /// The world.
    pub world: &'a Arc<World>,
    /// Runtime for tasks.
    pub rt: &'a tokio::runtime::Handle,
    /// The parsed request.
    pub req: &'a Request,
    /// Session cookie value.
    pub cookie: Option<String>,
    /// Client address.
    pub peer: String,
    /// Client User-Agent.
    pub user_agent: String,
}

/// A handler's answer.
pub struct Reply {
    /// What to return.
    pub ret: Returns,
    /// A new session cookie to set.
    pub set_cookie: Option<String>,
}

fn ok(ret: Returns) -> Result<Reply, Fault> {
    Ok(Reply {
        ret,
        set_cookie: None,
    })
}

fn arg<'a>(req: &'a Request, name: &str) -> Result<&'a str, Fault> {
    req.body
        .text_of(name)
        .ok_or_else(|| vim::invalid_argument(Some(name), format!("argument {name} is missing")))
}

fn arg_bool(req: &Request, name: &str, default: bool) -> Result<bool, Fault> {
    match req.body.text_of(name) {
        None => Ok(default),
        Some("true") | Some("1") => Ok(true),
        Some("false") | Some("0") => Ok(false),
        Some(v) => Err(vim::invalid_argument(
            Some(name),
            format!("{name}: {v:?} is not a boolean"),
        )),
    }
}

fn num<T: std::str::FromStr>(e: &Element, name: &str) -> Result<Option<T>, Fault> {
    match e.text_of(name) {
        None => Ok(None),
        Some(v) => v.parse().map(Some).map_err(|_| {
            vim::invalid_argument(Some(name), format!("{name}: {v:?} is not a number"))
        }),
    }
}

fn expect_this(req: &Request, ty: &str) -> Result<(), Fault> {
    if req.this.ty == ty {
        Ok(())
    } else {
        Err(vim::method_not_found(&req.this, &req.method))
    }
}

/// Run one request.
pub fn dispatch(c: &Call<'_>) -> Result<Reply, Fault> {
    let req = c.req;
    // Methods that work without a session.
    match req.method.as_str() {
        "RetrieveServiceContent" => {
            expect_this(req, "ServiceInstance")?;
            return ok(Returns::Typed(Val::Obj(vim::service_content(&lock(
                &c.world.inv,
            )))));
        }
        "Login" => return login(c),
        "CurrentTime" => {
            expect_this(req, "ServiceInstance")?;
            return ok(Returns::Typed(Val::Time(super::ids::now())));
        }
        "Fetch" if req.this.ty == "ServiceInstance" => return fetch(c, None),
        _ => {}
    }
    let (session_key, user) = {
        let mut s = lock(&c.world.sessions);
        let sess = s.active(c.cookie.as_deref())?;
        (sess.key.clone(), sess.user.clone())
    };
    c.world.log_call(&req.method, &req.this);
    match req.method.as_str() {
        "Logout" => {
            expect_this(req, "SessionManager")?;
            lock(&c.world.sessions).logout(&session_key);
            ok(Returns::Void)
        }
        "SessionIsActive" => {
            expect_this(req, "SessionManager")?;
            let id = arg(req, "sessionID")?;
            let active = lock(&c.world.sessions).peek(id).is_some();
            ok(Returns::Typed(Val::Bool(active)))
        }
        "Fetch" => fetch(c, Some(&session_key)),
        "CreateContainerView" => create_view(c, &session_key),
        "DestroyView" => {
            expect_this(req, "ContainerView")?;
            let mut s = lock(&c.world.sessions);
            let sess = s.active(Some(&session_key))?;
            let before = sess.views.len();
            sess.views.retain(|v| v.id != req.this.value);
            if sess.views.len() == before {
                return Err(vim::not_found(&req.this));
            }
            ok(Returns::Void)
        }
        "RetrievePropertiesEx" | "RetrieveProperties" => retrieve(c, &session_key),
        "ContinueRetrievePropertiesEx" => {
            expect_this(req, "PropertyCollector")?;
            let token = arg(req, "token")?;
            let mut s = lock(&c.world.sessions);
            let sess = s.active(Some(&session_key))?;
            let (size, items) = sess.pages.remove(token).ok_or_else(|| {
                vim::invalid_argument(Some("token"), format!("unknown token {token:?}"))
            })?;
            let (page, rest) = propcoll::page(items, size);
            let next = store_rest(sess, size, rest);
            ok(Returns::Typed(propcoll::retrieve_result(page, next)))
        }
        "CancelRetrievePropertiesEx" => {
            expect_this(req, "PropertyCollector")?;
            let token = arg(req, "token")?;
            let mut s = lock(&c.world.sessions);
            s.active(Some(&session_key))?.pages.remove(token);
            ok(Returns::Void)
        }
        "CreateFilter" => create_filter(c, &session_key),
        "CreatePropertyCollector" => {
            expect_this(req, "PropertyCollector")?;
            let mut s = lock(&c.world.sessions);
            let sess = s.active(Some(&session_key))?;
            if !sess.has_collector(&req.this.value) {
                return Err(vim::not_found(&req.this));
            }
            if sess.collectors.len() >= 100 {
                return Err(vim::invalid_state(
                    "this session has 100 property collectors; destroy some",
                ));
            }
            let id = format!("session[{session_key}]{}", super::ids::uuid());
            sess.collectors.push(id.clone());
            ok(Returns::Typed(Val::r("PropertyCollector", id)))
        }
        "DestroyPropertyCollector" => {
            expect_this(req, "PropertyCollector")?;
            let mut s = lock(&c.world.sessions);
            let sess = s.active(Some(&session_key))?;
            let id = &req.this.value;
            if !sess.collectors.iter().any(|x| x == id) {
                return Err(vim::not_found(&req.this));
            }
            sess.collectors.retain(|x| x != id);
            sess.filters.retain(|f| &f.collector != id);
            sess.update_version.remove(id);
            sess.pending_updates.remove(id);
            ok(Returns::Void)
        }
        "DestroyPropertyFilter" => {
            expect_this(req, "PropertyFilter")?;
            let mut s = lock(&c.world.sessions);
            let sess = s.active(Some(&session_key))?;
            let before = sess.filters.len();
            sess.filters.retain(|f| f.id != req.this.value);
            if sess.filters.len() == before {
                return Err(vim::not_found(&req.this));
            }
            ok(Returns::Void)
        }
        "WaitForUpdatesEx" | "WaitForUpdates" | "CheckForUpdates" => {
            wait_for_updates(c, &session_key)
        }
        "CancelWaitForUpdates" => {
            expect_this(req, "PropertyCollector")?;
            ok(Returns::Void)
        }
        "CreateSnapshot_Task" => create_snapshot(c, &user),
        "RemoveSnapshot_Task" => remove_snapshot(c, &user),
        "ReconfigVM_Task" => reconfigure(c, &user),
        "PowerOnVM_Task" => set_power(c, &user, "poweredOn"),
        "PowerOffVM_Task" => set_power(c, &user, "poweredOff"),
        "QueryChangedDiskAreas" => query_changed(c),
        "AcquireGenericServiceTicket" => {
            expect_this(req, "SessionManager")?;
            let spec = req
                .body
                .child("spec")
                .ok_or_else(|| vim::invalid_argument(Some("spec"), "argument spec is missing"))?;
            let method = spec.text_of("method").unwrap_or_default();
            let url = spec
                .text_of("url")
                .ok_or_else(|| vim::invalid_argument(Some("spec.url"), "spec.url is missing"))?;
            ok(Returns::Typed(super::tickets::acquire(
                c.world, method, url,
            )?))
        }
        _ => Err(vim::method_not_found(&req.this, &req.method)),
    }
}

fn login(c: &Call<'_>) -> Result<Reply, Fault> {
    let req = c.req;
    expect_this(req, "SessionManager")?;
    let user = arg(req, "userName")?;
    let password = arg(req, "password")?;
    if user != c.world.cfg.user || password != c.world.cfg.password {
        tracing::info!(user, "login refused");
        return Err(vim::invalid_login());
    }
    let mut s = lock(&c.world.sessions);
    let key = s.login(user, &c.peer, &c.user_agent);
    let us = s
        .active(Some(&key))
        .map(|x| x.user_session())
        .map_err(|_| vim::not_authenticated())?;
    Ok(Reply {
        ret: Returns::Typed(Val::Obj(us)),
        set_cookie: Some(key),
    })
}

fn fetch(c: &Call<'_>, session: Option<&str>) -> Result<Reply, Fault> {
    let prop = arg(c.req, "prop")?;
    let sessions = lock(&c.world.sessions);
    let sess = session.and_then(|k| sessions.peek(k));
    let inv = lock(&c.world.inv);
    let tasks = lock(&c.world.tasks);
    let ctx = Ctx {
        inv: &inv,
        tasks: &tasks,
        session: sess,
    };
    match ctx.path(&c.req.this, prop)? {
        Some(v) => ok(Returns::Any(v)),
        None => ok(Returns::Void),
    }
}

fn create_view(c: &Call<'_>, key: &str) -> Result<Reply, Fault> {
    let req = c.req;
    expect_this(req, "ViewManager")?;
    let container = req
        .body
        .child("container")
        .and_then(MoRef::from_element)
        .ok_or_else(|| vim::invalid_argument(Some("container"), "argument container is missing"))?;
    if !propcoll::is_container(&lock(&c.world.inv), &container) {
        return Err(vim::not_found(&container));
    }
    let types: Vec<String> = req
        .body
        .all("type")
        .map(|t| t.text.trim().to_string())
        .collect();
    for t in &types {
        const KNOWN: [&str; 10] = [
            "ManagedEntity",
            "Folder",
            "Datacenter",
            "ComputeResource",
            "ClusterComputeResource",
            "HostSystem",
            "Datastore",
            "VirtualMachine",
            "ResourcePool",
            "Network",
        ];
        if !KNOWN.contains(&t.as_str()) {
            return Err(vim::invalid_argument(
                Some("type"),
                format!("{t:?} is not a managed entity type"),
            ));
        }
    }
    let recursive = arg_bool(req, "recursive", false)?;
    let id = format!("session[{key}]{}", super::ids::uuid());
    let mut s = lock(&c.world.sessions);
    let sess = s.active(Some(key))?;
    if sess.views.len() >= 1000 {
        return Err(vim::invalid_state(
            "this session has 1000 container views; destroy some (DestroyView)",
        ));
    }
    sess.views.push(View {
        id: id.clone(),
        container,
        types,
        recursive,
    });
    ok(Returns::Typed(Val::r("ContainerView", id)))
}

fn store_rest(sess: &mut super::session::Session, size: usize, rest: Vec<Val>) -> Option<String> {
    if rest.is_empty() {
        return None;
    }
    let token = super::ids::token(12);
    if sess.pages.len() >= 100 {
        // Forget the oldest abandoned paging; a client that never finishes must not
        // grow the session forever.
        if let Some(k) = sess.pages.keys().next().cloned() {
            sess.pages.remove(&k);
        }
    }
    sess.pages.insert(token.clone(), (size, rest));
    Some(token)
}

fn retrieve(c: &Call<'_>, key: &str) -> Result<Reply, Fault> {
    let req = c.req;
    expect_this(req, "PropertyCollector")?;
    let specs: Vec<&Element> = req.body.all("specSet").collect();
    let items = {
        let sessions = lock(&c.world.sessions);
        let inv = lock(&c.world.inv);
        let tasks = lock(&c.world.tasks);
        let ctx = Ctx {
            inv: &inv,
            tasks: &tasks,
            session: sessions.peek(key),
        };
        propcoll::retrieve(&ctx, &specs)?
    };
    if req.method == "RetrieveProperties" {
        return ok(Returns::Many(items));
    }
    if items.is_empty() {
        return ok(Returns::Void);
    }
    let max = match req.body.child("options") {
        Some(o) => num::<i64>(o, "maxObjects")?,
        None => None,
    };
    let size = match max {
        Some(m) if m > 0 => m as usize,
        _ => propcoll::DEFAULT_PAGE,
    };
    let (page, rest) = propcoll::page(items, size);
    let mut s = lock(&c.world.sessions);
    let sess = s.active(Some(key))?;
    let token = store_rest(sess, size, rest);
    ok(Returns::Typed(propcoll::retrieve_result(page, token)))
}

fn create_filter(c: &Call<'_>, key: &str) -> Result<Reply, Fault> {
    let req = c.req;
    expect_this(req, "PropertyCollector")?;
    let spec = req
        .body
        .child("spec")
        .ok_or_else(|| vim::invalid_argument(Some("spec"), "argument spec is missing"))?
        .clone();
    arg_bool(req, "partialUpdates", false)?;
    let mut s = lock(&c.world.sessions);
    let sess = s.active(Some(key))?;
    if !sess.has_collector(&req.this.value) {
        return Err(vim::not_found(&req.this));
    }
    {
        // Check the spec now, as vCenter does.
        let inv = lock(&c.world.inv);
        let tasks = lock(&c.world.tasks);
        let ctx = Ctx {
            inv: &inv,
            tasks: &tasks,
            session: Some(&*sess),
        };
        propcoll::collect(&ctx, &[&spec])?;
    }
    if sess.filters.len() >= 1000 {
        return Err(vim::invalid_state(
            "this session has 1000 property filters; destroy some (DestroyPropertyFilter)",
        ));
    }
    let id = format!("session[{key}]{}", super::ids::uuid());
    sess.filters.push(super::updates::Filter::new(
        id.clone(),
        req.this.value.clone(),
        spec,
    ));
    ok(Returns::Typed(Val::r("PropertyFilter", id)))
}

/// Longest a WaitForUpdates call blocks.
const MAX_WAIT: std::time::Duration = std::time::Duration::from_secs(600);

fn wait_for_updates(c: &Call<'_>, key: &str) -> Result<Reply, Fault> {
    use super::updates::{filter_updates, invalid_collector_version, update_set, Pending};
    use std::time::{Duration, Instant};
    let req = c.req;
    expect_this(req, "PropertyCollector")?;
    let version = req.body.text_of("version").unwrap_or("").trim();
    let options = req.body.child("options");
    let wait = match req.method.as_str() {
        "CheckForUpdates" => Duration::ZERO,
        "WaitForUpdatesEx" => match options {
            Some(o) => match num::<i64>(o, "maxWaitSeconds")? {
                Some(s) => Duration::from_secs(s.max(0) as u64).min(MAX_WAIT),
                None => MAX_WAIT,
            },
            None => MAX_WAIT,
        },
        _ => MAX_WAIT,
    };
    // Object updates per answer (WaitForUpdatesEx only); the rest is truncated.
    let max_objects = match (req.method.as_str(), options) {
        ("WaitForUpdatesEx", Some(o)) => num::<i64>(o, "maxObjectUpdates")?
            .filter(|n| *n > 0)
            .map(|n| n as usize),
        _ => None,
    };
    let collector = req.this.value.as_str();
    {
        let mut s = lock(&c.world.sessions);
        let sess = s.live_mut(key)?;
        if !sess.has_collector(collector) {
            return Err(vim::not_found(&req.this));
        }
        let current = sess.update_version.get(collector).copied().unwrap_or(0);
        if version.is_empty() {
            for f in sess.filters.iter_mut().filter(|f| f.collector == collector) {
                f.reset();
            }
            sess.pending_updates.remove(collector);
        } else if version != current.to_string() {
            return Err(invalid_collector_version(version, current));
        }
    }
    // One answer of at most `max_objects` object updates from `queue`.
    let answer = |sess: &mut super::session::Session, mut queue: Pending| -> Reply {
        let n = max_objects.unwrap_or(usize::MAX).min(queue.updates.len());
        let part: Vec<(String, Val)> = queue.updates.drain(..n).collect();
        let truncated = !queue.updates.is_empty();
        if truncated {
            sess.pending_updates.insert(collector.to_string(), queue);
        } else {
            sess.pending_updates.remove(collector);
        }
        let v = sess
            .update_version
            .entry(collector.to_string())
            .or_insert(0);
        *v += 1;
        Reply {
            ret: Returns::Typed(update_set(*v, filter_updates(part), truncated)),
            set_cookie: None,
        }
    };
    let deadline = Instant::now() + wait;
    loop {
        {
            let mut s = lock(&c.world.sessions);
            let sess = s.live_mut(key)?;
            // The rest of a truncated answer comes first.
            if let Some(p) = sess.pending_updates.remove(collector) {
                if !p.updates.is_empty() {
                    return Ok(answer(sess, p));
                }
            }
            let mut filters = std::mem::take(&mut sess.filters);
            let result = {
                let inv = lock(&c.world.inv);
                let tasks = lock(&c.world.tasks);
                let ctx = Ctx {
                    inv: &inv,
                    tasks: &tasks,
                    session: Some(&*sess),
                };
                filters
                    .iter_mut()
                    .filter(|f| f.collector == collector)
                    .map(|f| f.changes(&ctx).map(|u| (f.id.clone(), u)))
                    .collect::<Result<Vec<_>, Fault>>()
            };
            sess.filters = filters;
            let mut queue = Pending::default();
            for (f, updates) in result? {
                queue
                    .updates
                    .extend(updates.into_iter().map(|u| (f.clone(), u)));
            }
            if !queue.updates.is_empty() {
                return Ok(answer(sess, queue));
            }
            if Instant::now() >= deadline {
                let ver = sess.update_version.get(collector).copied().unwrap_or(0);
                return if req.method == "WaitForUpdates" {
                    ok(Returns::Typed(update_set(ver, Vec::new(), false)))
                } else {
                    ok(Returns::Void)
                };
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn vm_of(c: &Call<'_>) -> Result<(usize, String, Arc<std::sync::Mutex<()>>), Fault> {
    expect_this(c.req, "VirtualMachine")?;
    let inv = lock(&c.world.inv);
    let vi = inv
        .vm_index(&c.req.this.value)
        .ok_or_else(|| vim::not_found(&c.req.this))?;
    Ok((vi, inv.vms[vi].name.clone(), inv.vms[vi].op.clone()))
}

/// Start a task of the call's method on the VM it names (`name` and `op` as
/// [`vm_of`] gives them) running `work`, and answer its reference.
fn vm_task<F>(
    c: &Call<'_>,
    user: &str,
    name: &str,
    op: Arc<std::sync::Mutex<()>>,
    work: F,
) -> Result<Reply, Fault>
where
    F: FnOnce(&Arc<World>) -> Result<Option<Val>, Fault> + Send + 'static,
{
    let task = c.world.spawn_task(
        c.rt,
        TaskStart {
            method: &c.req.method,
            entity: c.req.this.clone(),
            entity_name: name,
            user,
            op,
        },
        work,
    );
    ok(Returns::Typed(Val::Ref(task)))
}

fn create_snapshot(c: &Call<'_>, user: &str) -> Result<Reply, Fault> {
    let (vi, name, op) = vm_of(c)?;
    let snap_name = arg(c.req, "name")?.to_string();
    let description = c.req.body.text_of("description").unwrap_or("").to_string();
    let quiesce = arg_bool(c.req, "quiesce", false)?;
    arg_bool(c.req, "memory", false)?;
    let name_for_log = name.clone();
    vm_task(c, user, &name, op, move |w| {
        let r = lock(&w.inv).create_snapshot(vi, &snap_name, &description, quiesce);
        lock(&w.snapshot_log).push(super::guest::SnapshotAttempt {
            vm: name_for_log,
            name: snap_name,
            quiesce,
            snapshot: r.as_ref().ok().cloned(),
            fault: r.as_ref().err().map(|f| f.obj.ty.to_string()),
            message: r.as_ref().err().map(|f| f.message.clone()),
        });
        Ok(Some(Val::r("VirtualMachineSnapshot", r?)))
    })
}

fn remove_snapshot(c: &Call<'_>, user: &str) -> Result<Reply, Fault> {
    expect_this(c.req, "VirtualMachineSnapshot")?;
    let remove_children = arg_bool(c.req, "removeChildren", false)?;
    arg_bool(c.req, "consolidate", true)?;
    let (vm_ref, name, op) = {
        let inv = lock(&c.world.inv);
        let (vi, _) = inv
            .snapshot_index(&c.req.this.value)
            .ok_or_else(|| vim::not_found(&c.req.this))?;
        let vm = &inv.vms[vi];
        (
            MoRef::new("VirtualMachine", &vm.id),
            vm.name.clone(),
            vm.op.clone(),
        )
    };
    let id = c.req.this.value.clone();
    // The task's entity is the VM, as in vSphere (pyvmomi type-checks it).
    let start = TaskStart {
        method: &c.req.method,
        entity: vm_ref,
        entity_name: &name,
        user,
        op,
    };
    let task = c.world.spawn_task(c.rt, start, move |w| {
        w.remove_snapshot(&id, remove_children)?;
        Ok(None)
    });
    ok(Returns::Typed(Val::Ref(task)))
}

/// Decode the parts of a `VirtualMachineConfigSpec` the mock supports; anything else
/// in `deviceChange` is refused with NotSupported, other spec fields are ignored.
pub fn parse_config_spec(spec: &Element) -> Result<ReconfigSpec, Fault> {
    let cbt = match spec.text_of("changeTrackingEnabled") {
        None => None,
        Some("true") | Some("1") => Some(true),
        Some("false") | Some("0") => Some(false),
        Some(v) => {
            return Err(vim::invalid_argument(
                Some("spec.changeTrackingEnabled"),
                format!("{v:?} is not a boolean"),
            ))
        }
    };
    let mut changes = Vec::new();
    for (i, dc) in spec.all("deviceChange").enumerate() {
        let op = dc.text_of("operation").unwrap_or_default();
        let device = dc
            .child("device")
            .ok_or_else(|| vim::invalid_device(i, "deviceChange without device"))?;
        let dtype = device.xsi_type().unwrap_or("VirtualDevice");
        if dtype != "VirtualDisk" {
            return Err(vim::not_supported(format!(
                "the mock vCenter only adds and removes VirtualDisk devices, not {dtype}"
            )));
        }
        let key: i32 =
            num(device, "key")?.ok_or_else(|| vim::invalid_device(i, "device.key is missing"))?;
        let file_op = dc.text_of("fileOperation").filter(|f| !f.is_empty());
        match (op, file_op) {
            ("add", Some("create")) => {
                let backing = device
                    .child("backing")
                    .ok_or_else(|| vim::invalid_device(i, "device.backing is missing"))?;
                let file_name = backing
                    .text_of("fileName")
                    .filter(|f| !f.is_empty())
                    .ok_or_else(|| {
                        vim::invalid_device(i, "backing.fileName is missing (give at least \"[datastore]\")")
                    })?;
                let capacity = match num::<u64>(device, "capacityInBytes")? {
                    Some(b) => b,
                    None => num::<u64>(device, "capacityInKB")?
                        .and_then(|k| k.checked_mul(1024))
                        .ok_or_else(|| {
                            vim::invalid_device(i, "capacityInBytes or capacityInKB is missing")
                        })?,
                };
                let crypto = match dc.child("backing").and_then(|b| b.child("crypto")) {
                    None => None,
                    Some(c) if c.xsi_type() == Some("CryptoSpecEncrypt") => {
                        let id = c.child("cryptoKeyId").ok_or_else(|| {
                            vim::invalid_device(i, "CryptoSpecEncrypt without cryptoKeyId")
                        })?;
                        Some((
                            id.text_of("keyId").unwrap_or("").to_string(),
                            id.child("providerId")
                                .and_then(|p| p.text_of("id"))
                                .filter(|p| !p.is_empty())
                                .map(str::to_string),
                        ))
                    }
                    Some(c) => {
                        return Err(vim::not_supported(format!(
                            "crypto spec {} on a new disk is not supported by the mock vCenter (CryptoSpecEncrypt is)",
                            c.xsi_type().unwrap_or("CryptoSpec")
                        )))
                    }
                };
                let profile = match dc.child("profile") {
                    None => None,
                    Some(p) if p.xsi_type() == Some("VirtualMachineEmptyProfileSpec") => None,
                    Some(p) if p.xsi_type() == Some("VirtualMachineDefinedProfileSpec") => Some(
                        p.text_of("profileId")
                            .map(str::trim)
                            .filter(|id| !id.is_empty())
                            .ok_or_else(|| {
                                vim::invalid_argument(
                                    Some("spec.deviceChange.profile.profileId"),
                                    "VirtualMachineDefinedProfileSpec without profileId",
                                )
                            })?
                            .to_string(),
                    ),
                    Some(p) => {
                        return Err(vim::not_supported(format!(
                            "profile spec {} on a new disk is not supported by the mock vCenter (VirtualMachineDefinedProfileSpec is)",
                            p.xsi_type().unwrap_or("VirtualMachineProfileSpec")
                        )))
                    }
                };
                changes.push(DeviceChange::Create(CreateDisk {
                    key,
                    controller_key: num(device, "controllerKey")?
                        .unwrap_or(super::inventory::SCSI_KEY),
                    unit: num(device, "unitNumber")?,
                    file_name: file_name.to_string(),
                    capacity,
                    disk_mode: backing.text_of("diskMode").unwrap_or("persistent").into(),
                    crypto,
                    profile,
                }));
            }
            ("remove", Some("destroy")) => changes.push(DeviceChange::Destroy { key }),
            (_, Some(fo)) => {
                return Err(vim::not_supported(format!(
                    "fileOperation {fo:?} with operation {op:?} is not supported by the mock vCenter (add+create and remove+destroy are)"
                )))
            }
            ("add", None) => {
                let backing = device
                    .child("backing")
                    .ok_or_else(|| vim::invalid_device(i, "device.backing is missing"))?;
                let file_name = backing
                    .text_of("fileName")
                    .filter(|f| !f.is_empty())
                    .ok_or_else(|| vim::invalid_device(i, "backing.fileName is missing"))?;
                changes.push(DeviceChange::Add(AddDisk {
                    key,
                    controller_key: num(device, "controllerKey")?
                        .unwrap_or(super::inventory::SCSI_KEY),
                    unit: num(device, "unitNumber")?,
                    file_name: file_name.to_string(),
                    disk_mode: backing.text_of("diskMode").unwrap_or("persistent").into(),
                }));
            }
            ("remove", None) => changes.push(DeviceChange::Remove { key }),
            (other, None) => {
                return Err(vim::not_supported(format!(
                    "deviceChange operation {other:?} is not supported by the mock vCenter (add and remove are)"
                )))
            }
        }
    }
    Ok(ReconfigSpec { cbt, changes })
}

fn reconfigure(c: &Call<'_>, user: &str) -> Result<Reply, Fault> {
    let (vi, name, op) = vm_of(c)?;
    let spec = c
        .req
        .body
        .child("spec")
        .ok_or_else(|| vim::invalid_argument(Some("spec"), "argument spec is missing"))?;
    let spec = parse_config_spec(spec)?;
    vm_task(c, user, &name, op, move |w| {
        w.reconfigure(vi, &spec)?;
        Ok(None)
    })
}

/// PowerOnVM_Task / PowerOffVM_Task: a task that sets the power state, failing
/// with `InvalidPowerState` when the VM already is in `want` (as vSphere does).
fn set_power(c: &Call<'_>, user: &str, want: &'static str) -> Result<Reply, Fault> {
    let (vi, name, op) = vm_of(c)?;
    vm_task(c, user, &name, op, move |w| {
        let mut inv = lock(&w.inv);
        let have = &mut inv.vms[vi].power_state;
        if have == want {
            return Err(vim::invalid_power_state(
                have,
                format!(
                    "The attempted operation cannot be performed in the current state ({have})."
                ),
            ));
        }
        *have = want.to_string();
        Ok(None)
    })
}

fn query_changed(c: &Call<'_>) -> Result<Reply, Fault> {
    let (vi, _, _) = vm_of(c)?;
    let req = c.req;
    let snap = req
        .body
        .child("snapshot")
        .and_then(MoRef::from_element)
        .ok_or_else(|| {
            vim::invalid_argument(
                Some("snapshot"),
                "a snapshot is required: the mock's VMs are powered on",
            )
        })?;
    let key: i32 = num(&req.body, "deviceKey")?
        .ok_or_else(|| vim::invalid_argument(Some("deviceKey"), "argument deviceKey is missing"))?;
    let start: i64 = num(&req.body, "startOffset")?.ok_or_else(|| {
        vim::invalid_argument(Some("startOffset"), "argument startOffset is missing")
    })?;
    if start < 0 {
        return Err(vim::invalid_argument(
            Some("startOffset"),
            "startOffset must not be negative",
        ));
    }
    let change_id = arg(req, "changeId")?;
    let (disk, id) = {
        let inv = lock(&c.world.inv);
        let vm = &inv.vms[vi];
        let s = vm
            .snapshots
            .iter()
            .find(|s| s.id == snap.value)
            .ok_or_else(|| {
                vim::invalid_argument(
                    Some("snapshot"),
                    format!("{} is not a snapshot of VM {}", snap.value, vm.name),
                )
            })?;
        let d = s.disks.iter().find(|d| d.key == key).ok_or_else(|| {
            vim::invalid_argument(
                Some("deviceKey"),
                format!("VM {} has no virtual disk with key {key}", vm.name),
            )
        })?;
        (d.disk.clone(), d.snap)
    };
    let info = disk
        .changed_areas(id, start as u64, change_id, c.world.cfg.qcda_max_areas)
        .map_err(super::inventory::disk_fault)?;
    let areas = info
        .areas
        .iter()
        .map(|(s, l)| {
            Val::Obj(
                super::codec::Obj::new("DiskChangeExtent")
                    .f("start", Val::Long(*s as i64))
                    .f("length", Val::Long(*l as i64)),
            )
        })
        .collect();
    ok(Returns::Typed(Val::Obj(
        super::codec::Obj::new("DiskChangeInfo")
            .f("startOffset", Val::Long(info.start as i64))
            .f("length", Val::Long(info.length as i64))
            .f("changedArea", Val::Arr("DiskChangeExtent", areas)),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vcenter::codec::parse;
    use proptest::prelude::*;
    use std::sync::OnceLock;

    struct Fixture {
        _dir: tempfile::TempDir,
        rt: tokio::runtime::Runtime,
        world: Arc<World>,
        key: String,
    }

    fn fixture() -> &'static Fixture {
        static F: OnceLock<Fixture> = OnceLock::new();
        F.get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let sc = crate::vcenter::scenario::Scenario::parse(
                r#"
[[cluster]]
name = "c"
[[host]]
name = "h"
cluster = "c"
datastores = ["d"]
[[datastore]]
name = "d"
[[key_provider]]
id = "K"
[[vm]]
name = "v"
host = "h"
key_provider = "K"
cbt = true
[[vm.disk]]
size_mib = 1
[[proxy]]
name = "p"
host = "h"
"#,
                std::path::Path::new("fuzz.toml"),
            )
            .unwrap();
            let inv = crate::vcenter::inventory::Inventory::build(&sc, dir.path()).unwrap();
            let world = Arc::new(World::new(
                inv,
                crate::vcenter::world::WorldConfig {
                    user: "u".into(),
                    password: "p".into(),
                    qcda_max_areas: 4,
                    remove_wait: std::time::Duration::from_millis(10),
                },
                std::time::Duration::from_secs(3600),
                std::time::Duration::from_secs(3600),
                dir.path().to_path_buf(),
            ));
            let key = lock(&world.sessions).login("u", "", "");
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            Fixture {
                _dir: dir,
                rt,
                world,
                key,
            }
        })
    }

    /// (method, its `_this`, well-formed arguments) for the fixture's world
    /// (ids: datastore-7, domain-c8, host-9, vm-10 = "v", vm-11 = proxy "p").
    const METHODS: &[(&str, (&str, &str), &str)] = &[
        (
            "RetrieveServiceContent",
            ("ServiceInstance", "ServiceInstance"),
            "",
        ),
        (
            "Login",
            ("SessionManager", "SessionManager"),
            "<userName>u</userName><password>p</password>",
        ),
        ("Logout", ("SessionManager", "SessionManager"), ""),
        (
            "SessionIsActive",
            ("SessionManager", "SessionManager"),
            "<sessionID>x</sessionID><userName>u</userName>",
        ),
        ("CurrentTime", ("ServiceInstance", "ServiceInstance"), ""),
        (
            "Fetch",
            ("VirtualMachine", "vm-10"),
            "<prop>config.hardware.device</prop>",
        ),
        (
            "CreateContainerView",
            ("ViewManager", "ViewManager"),
            r#"<container type="Folder">group-d1</container><type>VirtualMachine</type><recursive>true</recursive>"#,
        ),
        ("DestroyView", ("ContainerView", "x"), ""),
        (
            "RetrievePropertiesEx",
            ("PropertyCollector", "propertyCollector"),
            r#"<specSet><propSet><type>VirtualMachine</type><all>true</all></propSet><objectSet><obj type="Folder">group-d1</obj><selectSet xsi:type="TraversalSpec"><name>f</name><type>Folder</type><path>childEntity</path><selectSet><name>f</name></selectSet></selectSet></objectSet></specSet><options><maxObjects>1</maxObjects></options>"#,
        ),
        (
            "RetrieveProperties",
            ("PropertyCollector", "propertyCollector"),
            r#"<specSet><propSet><type>Task</type><all>true</all></propSet><objectSet><obj type="TaskManager">TaskManager</obj><selectSet xsi:type="TraversalSpec"><type>TaskManager</type><path>recentTask</path></selectSet></objectSet></specSet>"#,
        ),
        (
            "ContinueRetrievePropertiesEx",
            ("PropertyCollector", "propertyCollector"),
            "<token>t</token>",
        ),
        (
            "CancelRetrievePropertiesEx",
            ("PropertyCollector", "propertyCollector"),
            "<token>t</token>",
        ),
        (
            "CreateFilter",
            ("PropertyCollector", "propertyCollector"),
            r#"<spec><propSet><type>VirtualMachine</type><pathSet>snapshot</pathSet></propSet><objectSet><obj type="VirtualMachine">vm-10</obj></objectSet></spec><partialUpdates>false</partialUpdates>"#,
        ),
        ("DestroyPropertyFilter", ("PropertyFilter", "x"), ""),
        (
            "CheckForUpdates",
            ("PropertyCollector", "propertyCollector"),
            "<version></version>",
        ),
        (
            "CreateSnapshot_Task",
            ("VirtualMachine", "vm-10"),
            "<name>s</name><memory>false</memory><quiesce>false</quiesce>",
        ),
        (
            "RemoveSnapshot_Task",
            ("VirtualMachineSnapshot", "snapshot-12"),
            "<removeChildren>true</removeChildren>",
        ),
        (
            "ReconfigVM_Task",
            ("VirtualMachine", "vm-11"),
            r#"<spec><deviceChange><operation>add</operation><device xsi:type="VirtualDisk"><key>-1</key><controllerKey>1000</controllerKey><backing><fileName>[d] v/v.vmdk</fileName><diskMode>independent_nonpersistent</diskMode></backing></device></deviceChange><changeTrackingEnabled>true</changeTrackingEnabled></spec>"#,
        ),
        (
            "QueryChangedDiskAreas",
            ("VirtualMachine", "vm-10"),
            r#"<snapshot type="VirtualMachineSnapshot">snapshot-12</snapshot><deviceKey>2000</deviceKey><startOffset>0</startOffset><changeId>*</changeId>"#,
        ),
        (
            "AcquireGenericServiceTicket",
            ("SessionManager", "SessionManager"),
            "<spec><method>httpGet</method><url>nbd://host-9/vm-10/snapshot-12/2000</url></spec>",
        ),
        ("Bogus", ("VirtualMachine", "vm-10"), ""),
    ];
    const TYPES: &[(&str, &str)] = &[
        ("ServiceInstance", "ServiceInstance"),
        ("SessionManager", "SessionManager"),
        ("PropertyCollector", "propertyCollector"),
        ("ViewManager", "ViewManager"),
        ("VirtualMachine", "vm-10"),
        ("VirtualMachine", "vm-11"),
        ("Folder", "group-d1"),
        ("VirtualMachineSnapshot", "snapshot-12"),
        ("Task", "task-13"),
        ("ContainerView", "x"),
    ];
    const ARGS: &[&str] = &[
        "prop",
        "specSet",
        "spec",
        "token",
        "version",
        "deviceKey",
        "startOffset",
        "changeId",
        "snapshot",
        "userName",
        "password",
        "container",
        "type",
        "recursive",
        "options",
        "removeChildren",
        "name",
        "quiesce",
        "memory",
        "deviceChange",
        "operation",
        "device",
        "backing",
        "fileName",
        "key",
        "unitNumber",
        "controllerKey",
        "propSet",
        "pathSet",
        "objectSet",
        "obj",
        "selectSet",
        "path",
        "skip",
        "all",
        "maxObjects",
        "url",
        "method",
        "changeTrackingEnabled",
        "diskMode",
        "sessionID",
    ];
    const TEXTS: &[&str] = &[
        "",
        "name",
        "config.hardware.device",
        "*",
        "-1",
        "2000",
        "99999999999999999999",
        "true",
        "x",
        "VirtualMachine",
        "vm-9",
        "nbd://host-8/vm-9/snapshot-1/2000",
        "add",
        "remove",
        "httpGet",
        "[d] v/v.vmdk",
        "independent_nonpersistent",
        "0",
    ];

    fn element() -> impl Strategy<Value = String> {
        let leaf = (0..ARGS.len(), 0..TEXTS.len(), any::<bool>()).prop_map(|(a, t, typed)| {
            let attr = if typed {
                " type=\"VirtualMachine\" xsi:type=\"VirtualDisk\""
            } else {
                ""
            };
            format!("<{0}{attr}>{1}</{0}>", ARGS[a], TEXTS[t])
        });
        leaf.prop_recursive(3, 24, 4, |inner| {
            (0..ARGS.len(), proptest::collection::vec(inner, 0..4))
                .prop_map(|(a, kids)| format!("<{0}>{1}</{0}>", ARGS[a], kids.concat()))
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        #[test]
        fn well_formed_but_arbitrary_calls_never_panic(
            m in 0..METHODS.len(), t in proptest::option::weighted(0.2, 0..TYPES.len()),
            good in any::<bool>(),
            args in proptest::collection::vec(element(), 0..4), with_session in proptest::bool::weighted(0.9))
        {
            let f = fixture();
            let (method, this, template) = METHODS[m];
            let this = t.map(|t| TYPES[t]).unwrap_or(this);
            let body = format!(
                r#"<Envelope><Body><{method} xmlns="urn:vim25"><_this type="{}">{}</_this>{}{}</{method}></Body></Envelope>"#,
                this.0, this.1, if good { template } else { "" }, args.concat()
            );
            let req = crate::vcenter::codec::parse_request(body.as_bytes()).unwrap();
            // Logout would end the shared session: run it on a throwaway one.
            let cookie = if req.method == "Logout" {
                Some(lock(&f.world.sessions).login("u", "", ""))
            } else {
                with_session.then(|| f.key.clone())
            };
            let handle = f.rt.handle().clone();
            let call = Call { world: &f.world, rt: &handle, req: &req, cookie, peer: String::new(), user_agent: String::new() };
            let _ = dispatch(&call);
        }
    }

    #[test]
    fn config_specs() {
        let e = parse(br#"<spec><deviceChange><operation>add</operation><device xsi:type="VirtualDisk"><key>-1</key><backing xsi:type="VirtualDiskFlatVer2BackingInfo"><fileName>[ds] v/v.vmdk</fileName><diskMode>independent_nonpersistent</diskMode></backing><controllerKey>1000</controllerKey><unitNumber>3</unitNumber><capacityInBytes>5</capacityInBytes></device></deviceChange><deviceChange><operation>remove</operation><device xsi:type="VirtualDisk"><key>2001</key></device></deviceChange><changeTrackingEnabled>true</changeTrackingEnabled></spec>"#).unwrap();
        let s = parse_config_spec(&e).unwrap();
        assert_eq!(s.cbt, Some(true));
        assert_eq!(
            s.changes,
            vec![
                DeviceChange::Add(AddDisk {
                    key: -1,
                    controller_key: 1000,
                    unit: Some(3),
                    file_name: "[ds] v/v.vmdk".into(),
                    disk_mode: "independent_nonpersistent".into()
                }),
                DeviceChange::Remove { key: 2001 }
            ]
        );
        let destroy = parse(br#"<spec><deviceChange><operation>remove</operation><fileOperation>destroy</fileOperation><device xsi:type="VirtualDisk"><key>2001</key></device></deviceChange></spec>"#).unwrap();
        assert_eq!(
            parse_config_spec(&destroy).unwrap().changes,
            vec![DeviceChange::Destroy { key: 2001 }]
        );
        let replace = parse(br#"<spec><deviceChange><operation>edit</operation><fileOperation>replace</fileOperation><device xsi:type="VirtualDisk"><key>2001</key></device></deviceChange></spec>"#).unwrap();
        assert_eq!(
            parse_config_spec(&replace).unwrap_err().obj.ty,
            "NotSupported"
        );
        let create = parse(br#"<spec><deviceChange><operation>add</operation><fileOperation>create</fileOperation><device xsi:type="VirtualDisk"><key>-200</key><backing xsi:type="VirtualDiskFlatVer2BackingInfo"><fileName>[ds-a] web/ferry-restore-j-disk0.vmdk</fileName><diskMode>persistent</diskMode></backing><controllerKey>1000</controllerKey><capacityInKB>8</capacityInKB></device><backing xsi:type="VirtualDeviceConfigSpecBackingSpec"><crypto xsi:type="CryptoSpecEncrypt"><cryptoKeyId><keyId>k1</keyId><providerId><id>KMS-A</id></providerId></cryptoKeyId></crypto></backing></deviceChange></spec>"#).unwrap();
        assert_eq!(
            parse_config_spec(&create).unwrap().changes,
            vec![DeviceChange::Create(CreateDisk {
                key: -200,
                controller_key: 1000,
                unit: None,
                file_name: "[ds-a] web/ferry-restore-j-disk0.vmdk".into(),
                capacity: 8192,
                disk_mode: "persistent".into(),
                crypto: Some(("k1".into(), Some("KMS-A".into()))),
                profile: None,
            })]
        );
        let with_policy = parse(br#"<spec><deviceChange><operation>add</operation><fileOperation>create</fileOperation><device xsi:type="VirtualDisk"><key>-200</key><backing xsi:type="VirtualDiskFlatVer2BackingInfo"><fileName>[ds-a]</fileName></backing><capacityInKB>8</capacityInKB></device><profile xsi:type="VirtualMachineDefinedProfileSpec"><profileId>gold-1</profileId></profile></deviceChange></spec>"#).unwrap();
        match &parse_config_spec(&with_policy).unwrap().changes[0] {
            DeviceChange::Create(c) => assert_eq!(c.profile.as_deref(), Some("gold-1")),
            other => panic!("{other:?}"),
        }
        let empty_policy = parse(br#"<spec><deviceChange><operation>add</operation><fileOperation>create</fileOperation><device xsi:type="VirtualDisk"><key>-200</key><backing xsi:type="VirtualDiskFlatVer2BackingInfo"><fileName>[ds-a]</fileName></backing><capacityInKB>8</capacityInKB></device><profile xsi:type="VirtualMachineDefinedProfileSpec"><profileId></profileId></profile></deviceChange></spec>"#).unwrap();
        assert_eq!(
            parse_config_spec(&empty_policy).unwrap_err().obj.ty,
            "InvalidArgument"
        );
        let nic = parse(br#"<spec><deviceChange><operation>add</operation><device xsi:type="VirtualE1000"><key>-1</key></device></deviceChange></spec>"#).unwrap();
        assert_eq!(parse_config_spec(&nic).unwrap_err().obj.ty, "NotSupported");
        let badkey = parse(br#"<spec><deviceChange><operation>remove</operation><device xsi:type="VirtualDisk"><key>x</key></device></deviceChange></spec>"#).unwrap();
        assert_eq!(
            parse_config_spec(&badkey).unwrap_err().obj.ty,
            "InvalidArgument"
        );
    }
}
