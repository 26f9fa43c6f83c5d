//! PropertyCollector filters and update waiting: `CreateFilter`,
//! `DestroyPropertyFilter`, `WaitForUpdatesEx`, `WaitForUpdates`, `CheckForUpdates`
//! (what pyvmomi's `WaitForTask` and many scripts use).
//!
//! The mock computes updates by comparing each filter's current values with what
//! it last reported (values compared structurally), per session; one waiter per
//! session is assumed, and the version string is a counter. As vCenter does, a
//! `WaitForUpdatesEx` with a version other than the last one sent (or, while a
//! truncated set is being handed out, the last part's) is refused with
//! `InvalidCollectorVersion`, and `options.maxObjectUpdates` cuts an answer into
//! parts marked `truncated` (the rest is kept in the session, [`Pending`]). Owns
//! that bookkeeping; traversal and property values come from [`super::propcoll`].
//!
//! Must not hold inventory locks longer than one computation of the changes: at
//! 10,000 VMs one pass over a VM container view is the cost of one wait.

use super::codec::{Element, Fault, MoRef, Obj, Val};
use super::propcoll::{self, Ctx};
use std::collections::{BTreeMap, HashMap, VecDeque};

/// One property filter of a session.
#[derive(Debug, Clone)]
pub struct Filter {
    /// Moref id (`PropertyFilter`).
    pub id: String,
    /// The PropertyCollector it was created on.
    pub collector: String,
    /// The `PropertyFilterSpec` as sent.
    pub spec: Element,
    /// Last reported values: object → property path → value.
    seen: HashMap<MoRef, BTreeMap<String, Val>>,
}

impl Filter {
    /// A new filter on `spec`, created on `collector`.
    pub fn new(id: String, collector: String, spec: Element) -> Filter {
        Filter {
            id,
            collector,
            spec,
            seen: HashMap::new(),
        }
    }

    /// Forget what was reported (the next wait reports everything).
    pub fn reset(&mut self) {
        self.seen.clear();
    }

    /// Changes since the last report as `ObjectUpdate`s, recorded as seen.
    pub fn changes(&mut self, ctx: &Ctx<'_>) -> Result<Vec<Val>, Fault> {
        let now = propcoll::collect(ctx, &[&self.spec])?;
        let mut updates = Vec::new();
        let mut next: HashMap<MoRef, BTreeMap<String, Val>> = HashMap::with_capacity(now.len());
        for (obj, props) in now {
            let old = self.seen.get(&obj);
            let mut changes = Vec::new();
            let mut cur = BTreeMap::new();
            for (name, v) in props {
                if old.and_then(|o| o.get(&name)) != Some(&v) {
                    changes.push(change(&name, "assign", Some(v.clone())));
                }
                cur.insert(name, v);
            }
            if let Some(o) = old {
                for gone in o.keys().filter(|k| !cur.contains_key(*k)) {
                    changes.push(change(gone, "remove", None));
                }
            }
            if old.is_none() || !changes.is_empty() {
                updates.push(Val::Obj(
                    Obj::new("ObjectUpdate")
                        .f(
                            "kind",
                            Val::Enum(
                                "ObjectUpdateKind",
                                if old.is_none() { "enter" } else { "modify" }.into(),
                            ),
                        )
                        .f("obj", Val::Ref(obj.clone()))
                        .f("changeSet", Val::Arr("PropertyChange", changes)),
                ));
            }
            next.insert(obj, cur);
        }
        let mut gone: Vec<&MoRef> = self
            .seen
            .keys()
            .filter(|k| !next.contains_key(*k))
            .collect();
        gone.sort();
        for gone in gone {
            updates.push(Val::Obj(
                Obj::new("ObjectUpdate")
                    .f("kind", Val::Enum("ObjectUpdateKind", "leave".into()))
                    .f("obj", Val::Ref(gone.clone())),
            ));
        }
        self.seen = next;
        Ok(updates)
    }
}

/// What is left of a truncated answer: `(filter id, ObjectUpdate)`s in order, handed
/// out `maxObjectUpdates` at a time, and the version the client must send to get
/// the next part.
#[derive(Debug, Default)]
pub struct Pending {
    /// Object updates not sent yet, with the filter they belong to.
    pub updates: VecDeque<(String, Val)>,
}

/// Group `(filter id, ObjectUpdate)`s into `PropertyFilterUpdate`s, in order.
pub fn filter_updates(items: Vec<(String, Val)>) -> Vec<Val> {
    let mut out: Vec<(String, Vec<Val>)> = Vec::new();
    for (f, u) in items {
        match out.last_mut() {
            Some((last, v)) if *last == f => v.push(u),
            _ => out.push((f, vec![u])),
        }
    }
    out.into_iter()
        .map(|(f, v)| {
            Val::Obj(
                Obj::new("PropertyFilterUpdate")
                    .f("filter", Val::r("PropertyFilter", &f))
                    .f("objectSet", Val::Arr("ObjectUpdate", v)),
            )
        })
        .collect()
}

fn change(name: &str, op: &str, v: Option<Val>) -> Val {
    Val::Obj(
        Obj::new("PropertyChange")
            .f("name", Val::s(name))
            .f("op", Val::Enum("PropertyChangeOp", op.into()))
            .opt("val", v.map(|v| Val::Any(Box::new(v)))),
    )
}

/// An `UpdateSet` (`truncated`: more parts follow).
pub fn update_set(version: u64, filters: Vec<Val>, truncated: bool) -> Val {
    Val::Obj(
        Obj::new("UpdateSet")
            .f("version", Val::s(version.to_string()))
            .f("filterSet", Val::Arr("PropertyFilterUpdate", filters))
            .opt("truncated", truncated.then_some(Val::Bool(true))),
    )
}

/// `InvalidCollectorVersion`: the client's version is not the last one sent.
pub fn invalid_collector_version(sent: &str, current: u64) -> Fault {
    Fault::new(
        "InvalidCollectorVersion",
        format!(
            "The collector version {sent:?} is not the current one ({current}); start over with an empty version"
        ),
    )
}
