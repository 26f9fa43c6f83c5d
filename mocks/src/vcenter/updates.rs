//! PropertyCollector filters and update waiting: `CreateFilter`,
//! `DestroyPropertyFilter`, `WaitForUpdatesEx`, `WaitForUpdates`, `CheckForUpdates`
//! (what pyvmomi's `WaitForTask` and many scripts use).
//!
//! The mock computes updates by comparing each filter's current values with what
//! it last reported (values compared in their XML form), per session; one waiter per
//! session is assumed, and the version string is a counter. Owns that bookkeeping;
//! traversal and property values come from [`super::propcoll`].

use super::codec::{write_val, Element, Fault, MoRef, Obj, Val};
use super::propcoll::{self, Ctx};
use std::collections::BTreeMap;

/// One property filter of a session.
#[derive(Debug, Clone)]
pub struct Filter {
    /// Moref id (`PropertyFilter`).
    pub id: String,
    /// The PropertyCollector it was created on.
    pub collector: String,
    /// The `PropertyFilterSpec` as sent.
    pub spec: Element,
    /// Last reported values: object → property path → value as XML.
    seen: BTreeMap<MoRef, BTreeMap<String, String>>,
}

impl Filter {
    /// A new filter on `spec`, created on `collector`.
    pub fn new(id: String, collector: String, spec: Element) -> Filter {
        Filter {
            id,
            collector,
            spec,
            seen: BTreeMap::new(),
        }
    }

    /// Forget what was reported (the next wait reports everything).
    pub fn reset(&mut self) {
        self.seen.clear();
    }

    /// Changes since the last report as a `PropertyFilterUpdate`, recorded as seen.
    pub fn changes(&mut self, ctx: &Ctx<'_>) -> Result<Option<Val>, Fault> {
        let now = propcoll::collect(ctx, &[&self.spec])?;
        let mut updates = Vec::new();
        let mut next: BTreeMap<MoRef, BTreeMap<String, String>> = BTreeMap::new();
        for (obj, props) in now {
            let old = self.seen.get(&obj);
            let mut changes = Vec::new();
            let mut cur = BTreeMap::new();
            for (name, v) in props {
                let mut xml = String::new();
                write_val(&mut xml, "v", &v, true);
                if old.and_then(|o| o.get(&name)) != Some(&xml) {
                    changes.push(change(&name, "assign", Some(v)));
                }
                cur.insert(name, xml);
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
        for gone in self.seen.keys().filter(|k| !next.contains_key(*k)) {
            updates.push(Val::Obj(
                Obj::new("ObjectUpdate")
                    .f("kind", Val::Enum("ObjectUpdateKind", "leave".into()))
                    .f("obj", Val::Ref(gone.clone())),
            ));
        }
        self.seen = next;
        if updates.is_empty() {
            return Ok(None);
        }
        Ok(Some(Val::Obj(
            Obj::new("PropertyFilterUpdate")
                .f("filter", Val::r("PropertyFilter", &self.id))
                .f("objectSet", Val::Arr("ObjectUpdate", updates)),
        )))
    }
}

fn change(name: &str, op: &str, v: Option<Val>) -> Val {
    Val::Obj(
        Obj::new("PropertyChange")
            .f("name", Val::s(name))
            .f("op", Val::Enum("PropertyChangeOp", op.into()))
            .opt("val", v.map(|v| Val::Any(Box::new(v)))),
    )
}

/// An `UpdateSet`.
pub fn update_set(version: u64, filters: Vec<Val>) -> Val {
    Val::Obj(
        Obj::new("UpdateSet")
            .f("version", Val::s(version.to_string()))
            .f("filterSet", Val::Arr("PropertyFilterUpdate", filters)),
    )
}
