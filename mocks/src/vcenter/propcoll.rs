//! The PropertyCollector and friends: property paths on any object (also used by
//! `Fetch`, which pyvmomi uses for attribute access), container views, traversal of
//! `PropertyFilterSpec`s (TraversalSpec / SelectionSpec), and result paging for
//! RetrievePropertiesEx / ContinueRetrievePropertiesEx.
//!
//! Pure logic over the inventory, tasks and the calling session; the handlers own
//! locking and the session's paging tokens.

use super::codec::{Element, Fault, MoRef, Obj, Val};
use super::inventory::{Inventory, ROOT_FOLDER};
use super::session::{Session, View};
use super::tasks::Tasks;
use super::vim::{self, Props};
use std::collections::{HashMap, HashSet};

/// Objects per page when the client sets no `maxObjects`.
pub const DEFAULT_PAGE: usize = 100;

/// What property lookups can see.
pub struct Ctx<'a> {
    /// The inventory.
    pub inv: &'a Inventory,
    /// The task table.
    pub tasks: &'a Tasks,
    /// The calling session.
    pub session: Option<&'a Session>,
}

impl Ctx<'_> {
    /// Every known property of `r` (unset ones as `None`), or ManagedObjectNotFound.
    pub fn props(&self, r: &MoRef) -> Result<Props, Fault> {
        let inv = self.inv;
        let id = r.value.as_str();
        let found = match r.ty.as_str() {
            "Folder" => vim::folder_props(inv, id),
            "Datacenter" => vim::datacenter_props(inv, id),
            "ClusterComputeResource" => vim::cluster_props(inv, id),
            "HostSystem" => vim::host_props(inv, id),
            "Datastore" => vim::datastore_props(inv, id),
            "VirtualMachine" => vim::vm_props(inv, id),
            "VirtualMachineSnapshot" => vim::snapshot_props(inv, id),
            "Task" => self
                .tasks
                .get(id)
                .map(|t| vec![("info", Some(Val::Obj(t.info())))]),
            "ContainerView" => self.session.and_then(|s| s.view(id)).map(|v| {
                vec![
                    (
                        "view",
                        Some(Val::Arr(
                            "ManagedObjectReference",
                            view_contents(inv, v).into_iter().map(Val::Ref).collect(),
                        )),
                    ),
                    ("container", Some(Val::Ref(v.container.clone()))),
                    (
                        "type",
                        Some(Val::Arr(
                            "string",
                            v.types.iter().map(|t| Val::s(t.as_str())).collect(),
                        )),
                    ),
                    ("recursive", Some(Val::Bool(v.recursive))),
                ]
            }),
            "ServiceInstance" if id == vim::SERVICE_INSTANCE => Some(vec![
                ("content", Some(Val::Obj(vim::service_content(inv)))),
                ("serverClock", Some(Val::Time(super::ids::now()))),
            ]),
            "SessionManager" if id == vim::SESSION_MANAGER => {
                Some(vim::session_manager_props(self.session))
            }
            "ViewManager" if id == vim::VIEW_MANAGER => Some(vec![(
                "viewList",
                Some(Val::refs(
                    "ContainerView",
                    self.session
                        .map(|s| s.views.iter().map(|v| v.id.clone()).collect::<Vec<_>>())
                        .unwrap_or_default(),
                )),
            )]),
            "TaskManager" if id == vim::TASK_MANAGER => Some(vec![(
                "recentTask",
                Some(Val::refs("Task", self.tasks.all().map(|t| t.id.clone()))),
            )]),
            "PropertyCollector"
                if id == vim::PROPERTY_COLLECTOR
                    || self
                        .session
                        .is_some_and(|s| s.collectors.iter().any(|c| c == id)) =>
            {
                Some(vec![(
                    "filter",
                    Some(Val::refs(
                        "PropertyFilter",
                        self.session
                            .map(|s| {
                                s.filters
                                    .iter()
                                    .filter(|f| f.collector == id)
                                    .map(|f| f.id.clone())
                                    .collect::<Vec<_>>()
                            })
                            .unwrap_or_default(),
                    )),
                )])
            }
            _ => None,
        };
        found.ok_or_else(|| vim::not_found(r))
    }

    /// The value at property path `path` of `r` (`None` when unset).
    pub fn path(&self, r: &MoRef, path: &str) -> Result<Option<Val>, Fault> {
        let props = self.props(r)?;
        get_path(&props, path)
    }
}

/// Navigate `a.b.c` through data objects. The first segment must be a property of
/// the object (else InvalidProperty); deeper segments that are unset give `None`.
pub fn get_path(props: &Props, path: &str) -> Result<Option<Val>, Fault> {
    let mut parts = path.split('.');
    let first = parts.next().unwrap_or_default();
    let Some((_, top)) = props.iter().find(|(n, _)| *n == first) else {
        return Err(vim::invalid_property(path));
    };
    let mut cur = match top {
        Some(v) => v.clone(),
        None => return Ok(None),
    };
    for p in parts {
        cur = match cur {
            Val::Obj(o) => match o.get(p) {
                Some(v) => v.clone(),
                None => return Ok(None),
            },
            _ => return Err(vim::invalid_property(path)),
        };
    }
    Ok(Some(cur))
}

/// True when an object of type `ty` is a `wanted` (exact, or a base type).
pub fn is_a(ty: &str, wanted: &str) -> bool {
    ty == wanted
        || wanted == "ManagedEntity"
            && matches!(
                ty,
                "Folder"
                    | "Datacenter"
                    | "ClusterComputeResource"
                    | "HostSystem"
                    | "Datastore"
                    | "VirtualMachine"
            )
        || wanted == "ComputeResource" && ty == "ClusterComputeResource"
        || wanted == "ManagedObject"
        || wanted == "View" && ty == "ContainerView"
}

/// Direct children of a container in the inventory tree.
fn children(inv: &Inventory, r: &MoRef) -> Vec<MoRef> {
    let dc = &inv.dc;
    match r.ty.as_str() {
        "Folder" if r.value == ROOT_FOLDER => vec![MoRef::new("Datacenter", &dc.id)],
        "Folder" if r.value == dc.vm_folder => inv
            .vms
            .iter()
            .map(|v| MoRef::new("VirtualMachine", &v.id))
            .collect(),
        "Folder" if r.value == dc.host_folder => inv
            .clusters
            .iter()
            .map(|c| MoRef::new("ClusterComputeResource", &c.id))
            .collect(),
        "Folder" if r.value == dc.datastore_folder => inv
            .datastores
            .iter()
            .map(|d| MoRef::new("Datastore", &d.id))
            .collect(),
        "Datacenter" if r.value == dc.id => [
            &dc.vm_folder,
            &dc.host_folder,
            &dc.datastore_folder,
            &dc.network_folder,
        ]
        .into_iter()
        .map(|f| MoRef::new("Folder", f))
        .collect(),
        "ClusterComputeResource" => match inv.clusters.iter().find(|c| c.id == r.value) {
            // Hosts, and (through the cluster's resource pool) the VMs running there.
            Some(c) => c
                .hosts
                .iter()
                .map(|h| MoRef::new("HostSystem", &inv.hosts[*h].id))
                .chain(
                    inv.vms
                        .iter()
                        .filter(|v| c.hosts.contains(&v.host))
                        .map(|v| MoRef::new("VirtualMachine", &v.id)),
                )
                .collect(),
            None => Vec::new(),
        },
        _ => Vec::new(),
    }
}

/// True when `r` exists and can contain others.
pub fn is_container(inv: &Inventory, r: &MoRef) -> bool {
    match r.ty.as_str() {
        "Folder" => vim::folder_props(inv, &r.value).is_some(),
        "Datacenter" => r.value == inv.dc.id,
        "ClusterComputeResource" => inv.clusters.iter().any(|c| c.id == r.value),
        _ => false,
    }
}

/// What a container view shows now.
pub fn view_contents(inv: &Inventory, v: &View) -> Vec<MoRef> {
    let mut out = Vec::new();
    let mut seen: HashSet<MoRef> = HashSet::new();
    let mut queue = vec![v.container.clone()];
    seen.insert(v.container.clone());
    while let Some(c) = queue.pop() {
        for ch in children(inv, &c) {
            if !seen.insert(ch.clone()) {
                continue;
            }
            if v.types.is_empty() || v.types.iter().any(|t| is_a(&ch.ty, t)) {
                out.push(ch.clone());
            }
            if v.recursive {
                queue.push(ch);
            }
        }
    }
    // Stable order: by type then numeric id.
    out.sort_by_key(|r| (r.ty.clone(), id_num(&r.value), r.value.clone()));
    out
}

fn id_num(v: &str) -> u64 {
    v.rsplit('-')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// A parsed `TraversalSpec` or `SelectionSpec`.
#[derive(Clone, Debug)]
struct Sel {
    name: Option<String>,
    /// `None` for a SelectionSpec (a reference by name).
    traversal: Option<Traversal>,
}

#[derive(Clone, Debug)]
struct Traversal {
    ty: String,
    path: String,
    skip: bool,
    select: Vec<Sel>,
}

fn parse_bool(e: &Element, name: &str) -> Result<Option<bool>, Fault> {
    match e.text_of(name) {
        None => Ok(None),
        Some("true") | Some("1") => Ok(Some(true)),
        Some("false") | Some("0") => Ok(Some(false)),
        Some(other) => Err(vim::invalid_argument(
            Some(name),
            format!("{name}: {other:?} is not a boolean"),
        )),
    }
}

fn parse_sel(e: &Element, depth: usize) -> Result<Sel, Fault> {
    if depth > 16 {
        return Err(vim::invalid_argument(
            Some("selectSet"),
            "selectSet nested too deeply",
        ));
    }
    let name = e.text_of("name").map(str::to_string);
    let is_traversal = e.xsi_type() == Some("TraversalSpec") || e.child("path").is_some();
    let traversal = if is_traversal {
        let ty = e.text_of("type").unwrap_or_default().to_string();
        let path = e.text_of("path").unwrap_or_default().to_string();
        if ty.is_empty() || path.is_empty() {
            return Err(vim::invalid_argument(
                Some("selectSet"),
                "a TraversalSpec needs type and path",
            ));
        }
        Some(Traversal {
            ty,
            path,
            skip: parse_bool(e, "skip")?.unwrap_or(false),
            select: e
                .all("selectSet")
                .map(|s| parse_sel(s, depth + 1))
                .collect::<Result<_, _>>()?,
        })
    } else {
        if name.is_none() {
            return Err(vim::invalid_argument(
                Some("selectSet"),
                "a SelectionSpec needs a name",
            ));
        }
        None
    };
    Ok(Sel { name, traversal })
}

fn collect_named(sel: &[Sel], into: &mut HashMap<String, Traversal>) {
    for s in sel {
        if let Some(t) = &s.traversal {
            if let Some(n) = &s.name {
                into.entry(n.clone()).or_insert_with(|| t.clone());
            }
            collect_named(&t.select, into);
        }
    }
}

struct PropSpec {
    ty: String,
    all: bool,
    paths: Vec<String>,
}

struct ObjSpec {
    obj: MoRef,
    skip: bool,
    select: Vec<Sel>,
}

struct FilterSpec {
    props: Vec<PropSpec>,
    objs: Vec<ObjSpec>,
}

fn parse_filter(e: &Element) -> Result<FilterSpec, Fault> {
    let mut props = Vec::new();
    for p in e.all("propSet") {
        let ty = p
            .text_of("type")
            .filter(|t| !t.is_empty())
            .ok_or_else(|| vim::invalid_argument(Some("propSet"), "PropertySpec without type"))?;
        props.push(PropSpec {
            ty: ty.to_string(),
            all: parse_bool(p, "all")?.unwrap_or(false),
            paths: p
                .all("pathSet")
                .map(|x| x.text.trim().to_string())
                .collect(),
        });
    }
    let mut objs = Vec::new();
    for o in e.all("objectSet") {
        let obj = o
            .child("obj")
            .and_then(MoRef::from_element)
            .ok_or_else(|| vim::invalid_argument(Some("objectSet"), "ObjectSpec without obj"))?;
        objs.push(ObjSpec {
            obj,
            skip: parse_bool(o, "skip")?.unwrap_or(false),
            select: o
                .all("selectSet")
                .map(|s| parse_sel(s, 0))
                .collect::<Result<_, _>>()?,
        });
    }
    Ok(FilterSpec { props, objs })
}

fn refs_of(v: &Val) -> Vec<MoRef> {
    match v {
        Val::Ref(r) => vec![r.clone()],
        Val::Arr(_, items) => items
            .iter()
            .filter_map(|i| match i {
                Val::Ref(r) => Some(r.clone()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// Objects found by a filter, with the requested properties that are set.
pub type Collected = Vec<(MoRef, Vec<(String, Val)>)>;

/// Objects reached by a traversal, in order, each once (a set beside the list: a
/// container view of 10,000 VMs must not cost a quadratic `contains`).
#[derive(Default)]
struct Found {
    list: Vec<MoRef>,
    set: HashSet<MoRef>,
}

impl Found {
    fn add(&mut self, r: &MoRef) {
        if self.set.insert(r.clone()) {
            self.list.push(r.clone());
        }
    }
}

/// Run `specSet`: every object reached, in traversal order, with its requested
/// properties (unset ones left out).
pub fn collect(ctx: &Ctx<'_>, spec_set: &[&Element]) -> Result<Collected, Fault> {
    if spec_set.is_empty() {
        return Err(vim::invalid_argument(Some("specSet"), "specSet is empty"));
    }
    let mut out = Vec::new();
    let mut reported: HashSet<MoRef> = HashSet::new();
    for spec in spec_set {
        let f = parse_filter(spec)?;
        let mut named = HashMap::new();
        for o in &f.objs {
            collect_named(&o.select, &mut named);
        }
        let mut found = Found::default();
        let mut visited: HashSet<(MoRef, usize)> = HashSet::new();
        for o in &f.objs {
            ctx.props(&o.obj)?;
            if !o.skip {
                found.add(&o.obj);
            }
            walk(ctx, &o.obj, &o.select, &named, &mut found, &mut visited, 0)?;
        }
        for obj in found.list {
            let specs: Vec<&PropSpec> = f.props.iter().filter(|p| is_a(&obj.ty, &p.ty)).collect();
            if specs.is_empty() || !reported.insert(obj.clone()) {
                continue;
            }
            let props = ctx.props(&obj)?;
            let mut set: Vec<(String, Val)> = Vec::new();
            let mut names: Vec<String> = Vec::new();
            for p in specs {
                let wanted: Vec<String> = if p.all {
                    props.iter().map(|(n, _)| n.to_string()).collect()
                } else {
                    p.paths.clone()
                };
                for path in wanted {
                    if names.contains(&path) {
                        continue;
                    }
                    if let Some(v) = get_path(&props, &path)? {
                        set.push((path.clone(), v));
                    }
                    names.push(path);
                }
            }
            out.push((obj, set));
        }
    }
    Ok(out)
}

/// Run `specSet` and return the `ObjectContent`s, in traversal order.
pub fn retrieve(ctx: &Ctx<'_>, spec_set: &[&Element]) -> Result<Vec<Val>, Fault> {
    Ok(collect(ctx, spec_set)?
        .into_iter()
        .map(|(obj, set)| {
            let set = set
                .into_iter()
                .map(|(name, v)| {
                    Val::Obj(
                        Obj::new("DynamicProperty")
                            .f("name", Val::Str(name))
                            .f("val", Val::Any(Box::new(v))),
                    )
                })
                .collect();
            Val::Obj(
                Obj::new("ObjectContent")
                    .f("obj", Val::Ref(obj))
                    .f("propSet", Val::Arr("DynamicProperty", set)),
            )
        })
        .collect())
}

fn walk(
    ctx: &Ctx<'_>,
    obj: &MoRef,
    select: &[Sel],
    named: &HashMap<String, Traversal>,
    found: &mut Found,
    visited: &mut HashSet<(MoRef, usize)>,
    depth: usize,
) -> Result<(), Fault> {
    if depth > 32 {
        return Ok(());
    }
    for s in select {
        let t = match (&s.traversal, &s.name) {
            (Some(t), _) => t,
            (None, Some(n)) => match named.get(n) {
                Some(t) => t,
                None => {
                    return Err(vim::invalid_argument(
                        Some("selectSet"),
                        format!("SelectionSpec {n:?} names no TraversalSpec"),
                    ))
                }
            },
            (None, None) => continue,
        };
        if !is_a(&obj.ty, &t.ty) {
            continue;
        }
        // Identify the traversal by its address to stop cycles through named specs.
        let key = (obj.clone(), t as *const Traversal as usize);
        if !visited.insert(key) {
            continue;
        }
        let Some(v) = ctx.path(obj, &t.path)? else {
            continue;
        };
        for child in refs_of(&v) {
            if !t.skip {
                found.add(&child);
            }
            walk(ctx, &child, &t.select, named, found, visited, depth + 1)?;
        }
    }
    Ok(())
}

/// Build a `RetrieveResult` page from `items` (taking at most `page`); the rest is
/// returned for the caller to store under the token.
pub fn page(mut items: Vec<Val>, page: usize) -> (Vec<Val>, Vec<Val>) {
    let n = page.max(1).min(items.len());
    let rest = items.split_off(n);
    (items, rest)
}

/// `RetrieveResult { token?, objects }`.
pub fn retrieve_result(objects: Vec<Val>, token: Option<String>) -> Val {
    Val::Obj(
        Obj::new("RetrieveResult")
            .opt("token", token.map(Val::Str))
            .f("objects", Val::Arr("ObjectContent", objects)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vcenter::codec::parse;
    use crate::vcenter::scenario::Scenario;
    use std::path::Path;

    fn inv() -> (tempfile::TempDir, Inventory) {
        let t = tempfile::tempdir().unwrap();
        let sc =
            Scenario::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios/small.toml"))
                .unwrap();
        let inv = Inventory::build(&sc, t.path()).unwrap();
        (t, inv)
    }

    #[test]
    fn container_views_and_traversal() {
        let (_t, inv) = inv();
        let tasks = Tasks::default();
        let ctx = Ctx {
            inv: &inv,
            tasks: &tasks,
            session: None,
        };
        let root = MoRef::new("Folder", ROOT_FOLDER);
        let all_vms = view_contents(
            &inv,
            &View {
                id: "v".into(),
                container: root.clone(),
                types: vec!["VirtualMachine".into()],
                recursive: true,
            },
        );
        assert_eq!(all_vms.len(), inv.vms.len());
        let flat = view_contents(
            &inv,
            &View {
                id: "v".into(),
                container: root.clone(),
                types: vec![],
                recursive: false,
            },
        );
        assert_eq!(flat, vec![MoRef::new("Datacenter", &inv.dc.id)]);
        let hosts = view_contents(
            &inv,
            &View {
                id: "v".into(),
                container: root,
                types: vec!["HostSystem".into()],
                recursive: true,
            },
        );
        assert_eq!(hosts.len(), inv.hosts.len());
        // Root folder → datacenter → vmFolder → VMs, through named specs.
        let spec = format!(
            r#"<specSet><propSet><type>VirtualMachine</type><pathSet>name</pathSet><pathSet>config.keyId.providerId.id</pathSet></propSet>
          <objectSet><obj type="Folder">{ROOT_FOLDER}</obj><skip>true</skip>
            <selectSet xsi:type="TraversalSpec"><name>f2dc</name><type>Folder</type><path>childEntity</path><skip>false</skip><selectSet><name>dc2vm</name></selectSet></selectSet>
            <selectSet xsi:type="TraversalSpec"><name>dc2vm</name><type>Datacenter</type><path>vmFolder</path><skip>true</skip><selectSet><name>f2dc</name></selectSet></selectSet>
          </objectSet></specSet>"#
        );
        let e = parse(spec.as_bytes()).unwrap();
        let res = retrieve(&ctx, &[&e]).unwrap();
        assert_eq!(res.len(), inv.vms.len());
        // Unencrypted VMs simply lack the keyId property.
        let with_key = res
            .iter()
            .filter(|oc| match oc {
                Val::Obj(o) => matches!(o.get("propSet"), Some(Val::Arr(_, p)) if p.len() == 2),
                _ => false,
            })
            .count();
        assert_eq!(
            with_key,
            inv.vms.iter().filter(|v| v.crypto.is_some()).count()
        );
        let (first, rest) = page(res, 2);
        assert_eq!(first.len(), 2);
        assert_eq!(rest.len(), inv.vms.len() - 2);
    }

    #[test]
    fn bad_paths_and_objects() {
        let (_t, inv) = inv();
        let tasks = Tasks::default();
        let ctx = Ctx {
            inv: &inv,
            tasks: &tasks,
            session: None,
        };
        let vm = MoRef::new("VirtualMachine", &inv.vms[0].id);
        assert_eq!(
            ctx.path(&vm, "nonsense").unwrap_err().obj.ty,
            "InvalidProperty"
        );
        assert_eq!(
            ctx.path(&vm, "name.x").unwrap_err().obj.ty,
            "InvalidProperty"
        );
        assert_eq!(ctx.path(&vm, "snapshot").unwrap(), None);
        assert_eq!(ctx.path(&vm, "config.nothing").unwrap(), None);
        assert_eq!(
            ctx.path(&MoRef::new("VirtualMachine", "vm-999999"), "name")
                .unwrap_err()
                .obj
                .ty,
            "ManagedObjectNotFound"
        );
        let e = parse(b"<specSet><propSet><type>VirtualMachine</type></propSet><objectSet><obj type=\"VirtualMachine\">vm-424242</obj></objectSet></specSet>").unwrap();
        assert_eq!(
            retrieve(&ctx, &[&e]).unwrap_err().obj.ty,
            "ManagedObjectNotFound"
        );
        let e = parse(b"<specSet><objectSet><obj type=\"Folder\">group-d1</obj><selectSet><name>nope</name></selectSet></objectSet></specSet>").unwrap();
        assert_eq!(retrieve(&ctx, &[&e]).unwrap_err().obj.ty, "InvalidArgument");
    }
}
