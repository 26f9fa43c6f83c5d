//! Property collector updates: a private `PropertyCollector`
//! (`CreatePropertyCollector`), a container view of several types, one
//! `PropertyFilter` (`CreateFilter`) over it per group of types, and
//! `WaitForUpdatesEx` with
//! `maxWaitSeconds` (0: one computation, no waiting) and `maxObjectUpdates` (the
//! answer comes in parts marked `truncated`, each asked for with the previous
//! part's version).
//!
//! Owns the request bodies, the decoding of `UpdateSet`s (pure, tested without a
//! server) and the calls. Must not decide what a change means for the inventory
//! (that is the caller's, e.g. `orchestrator::vcenter`), and must not hide a lost
//! session: a watch made on one session is dead after a re-login (filters belong
//! to their session), which [`Watch::is_current`] tells.

use super::client::{Client, Replay};
use super::collector::{filter_spec_multi, Select};
use super::error::{from_fault, VsphereError};
use super::soap;
use super::types::{DecodeError, MoRef, ObjectContent};
use super::xml::Element;

/// Most parts of one truncated answer followed; a server truncating forever is
/// cut off.
pub const MAX_PARTS: usize = 100_000;

/// `ObjectUpdate.kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpdateKind {
    /// The object entered the filter's set (new, or first report).
    Enter,
    /// Some of its properties changed.
    Modify,
    /// It left the set (deleted, or moved out of the view).
    Leave,
}

/// One `PropertyChange`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PropertyChange {
    /// Property path (with `partialUpdates` false: a path of the filter's spec).
    pub name: String,
    /// `assign`, `remove`, `add`, `indirectRemove`.
    pub op: String,
    /// The new value (`None` for `remove`, or an unset property).
    pub val: Option<Element>,
}

/// One `ObjectUpdate`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectUpdate {
    /// What happened to the object.
    pub kind: UpdateKind,
    /// The object.
    pub obj: MoRef,
    /// Its changed properties (every requested property that is set, for `Enter`).
    pub changes: Vec<PropertyChange>,
    /// Properties vCenter could not read (`missingSet`): path and fault type.
    pub missing: Vec<(String, String)>,
}

impl ObjectUpdate {
    /// The properties it carries, as a `RetrievePropertiesEx` result would (for
    /// `Enter` updates, which carry every requested property that is set).
    pub fn content(&self) -> ObjectContent {
        ObjectContent {
            obj: self.obj.clone(),
            props: self
                .changes
                .iter()
                .filter(|c| c.op == "assign")
                .filter_map(|c| c.val.clone().map(|v| (c.name.clone(), v)))
                .collect(),
            missing: Vec::new(),
        }
    }
}

/// One `UpdateSet` (its filters' object updates flattened, in order).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UpdateSet {
    /// The version to send next.
    pub version: String,
    /// More parts follow.
    pub truncated: bool,
    /// The object updates of every filter.
    pub objects: Vec<ObjectUpdate>,
}

fn derr(field: &str, detail: impl Into<String>) -> DecodeError {
    DecodeError {
        field: field.to_string(),
        detail: detail.into(),
    }
}

/// Decode a `WaitForUpdatesExResponse`: `None` when there is no `returnval` (no
/// change within `maxWaitSeconds`).
pub fn decode_update_set(resp: &Element) -> Result<Option<UpdateSet>, DecodeError> {
    let Some(rv) = resp.child("returnval") else {
        return Ok(None);
    };
    let version = rv
        .child_text("version")
        .map(|v| v.trim().to_string())
        .unwrap_or_default();
    let truncated = matches!(
        rv.child_text("truncated").map(str::trim),
        Some("true" | "1")
    );
    let mut objects = Vec::new();
    for fs in rv.children_named("filterSet") {
        for ou in fs.children_named("objectSet") {
            let kind = match ou.child_text("kind").map(str::trim) {
                Some("enter") => UpdateKind::Enter,
                Some("modify") => UpdateKind::Modify,
                Some("leave") => UpdateKind::Leave,
                other => {
                    return Err(derr(
                        "filterSet.objectSet.kind",
                        format!("unknown ObjectUpdateKind {other:?}"),
                    ))
                }
            };
            let obj = ou
                .child("obj")
                .map(MoRef::decode)
                .transpose()?
                .ok_or_else(|| derr("filterSet.objectSet.obj", "missing"))?;
            let changes = ou
                .children_named("changeSet")
                .map(|c| {
                    Ok(PropertyChange {
                        name: c
                            .child_text("name")
                            .map(|n| n.trim().to_string())
                            .ok_or_else(|| derr("changeSet.name", "missing"))?,
                        op: c
                            .child_text("op")
                            .map(|n| n.trim().to_string())
                            .unwrap_or_else(|| "assign".into()),
                        val: c.child("val").cloned(),
                    })
                })
                .collect::<Result<Vec<_>, DecodeError>>()?;
            let missing = ou
                .children_named("missingSet")
                .map(|m| {
                    (
                        m.child_text("path").unwrap_or_default().trim().to_string(),
                        m.child("fault")
                            .map(|f| soap::Fault::from_localized(f).fault_type)
                            .unwrap_or_else(|| "MethodFault".into()),
                    )
                })
                .collect();
            objects.push(ObjectUpdate {
                kind,
                obj,
                changes,
                missing,
            });
        }
    }
    Ok(Some(UpdateSet {
        version,
        truncated,
        objects,
    }))
}

/// Body of `WaitForUpdatesEx`.
pub fn wait_body(pc: &MoRef, version: &str, max_wait_secs: u32, max_objects: u32) -> String {
    soap::envelope("WaitForUpdatesEx", pc, |b| {
        b.leaf("version", version);
        b.open("options")
            .leaf("maxWaitSeconds", max_wait_secs)
            .leaf("maxObjectUpdates", max_objects.max(1))
            .close("options");
    })
}

/// A filter being watched: the private collector, the view and the filter of
/// one session, and the version reached.
#[derive(Debug, Clone)]
pub struct Watch {
    /// The private PropertyCollector.
    pub collector: MoRef,
    /// The container view the filter starts from.
    pub view: MoRef,
    /// The filters, one per group of types.
    pub filters: Vec<MoRef>,
    /// The version of the last update set applied (empty before the first).
    pub version: String,
    /// [`Client::logins`] when the watch was made: another value means the session
    /// it lived in is gone.
    pub logins: u64,
}

impl Watch {
    /// True while the session the watch was made in is the client's session.
    pub fn is_current(&self, client: &Client) -> bool {
        client.logins() == self.logins
    }
}

/// A `NotAuthenticated` fault hidden in an update set's `missingSet`
/// (`returnval/filterSet/objectSet/missingSet`, the WaitForUpdatesEx layout;
/// `collector::hidden_not_authenticated` reads RetrievePropertiesEx's), so
/// that a session lost during a read is renewed as after a SOAP fault.
fn hidden_not_authenticated_in_updates(resp: &Element) -> Option<soap::Fault> {
    resp.child("returnval")?
        .children_named("filterSet")
        .flat_map(|f| f.children_named("objectSet"))
        .flat_map(|o| o.children_named("missingSet"))
        .filter_map(|m| m.child("fault"))
        .map(soap::Fault::from_localized)
        .find(|f| f.fault_type == "NotAuthenticated")
}

impl Client {
    /// Make a watch: a private collector, a recursive container view of `types`
    /// under the root folder and one filter per entry of `filters`, each asking,
    /// per type, for its paths (`(type, paths)`). Nothing is read yet: the first
    /// [`Client::wait_for_updates`] with the watch's empty version reports every
    /// object as `Enter`.
    pub async fn create_watch(
        &self,
        types: &[&str],
        filters: &[&[(&str, &[&str])]],
    ) -> Result<Watch, VsphereError> {
        let doing = "creating an inventory property filter";
        let logins = self.logins();
        let sc = self.service_content().clone();
        let body = soap::envelope("CreatePropertyCollector", &sc.property_collector, |_| {});
        let collector = self
            .returned_ref("CreatePropertyCollector", &body, doing)
            .await?;
        let body = soap::envelope("CreateContainerView", &sc.view_manager, |b| {
            b.moref("container", &sc.root_folder);
            for t in types {
                b.leaf("type", t);
            }
            b.leaf("recursive", "true");
        });
        let view = match self.returned_ref("CreateContainerView", &body, doing).await {
            Ok(v) => v,
            Err(e) => {
                self.destroy_collector(&collector).await;
                return Err(e);
            }
        };
        let mut made = Vec::new();
        for props in filters {
            let body = soap::envelope("CreateFilter", &collector, |b| {
                filter_spec_multi(b, "spec", props, Select::View(&view));
                b.leaf("partialUpdates", "false");
            });
            match self.returned_ref("CreateFilter", &body, doing).await {
                Ok(f) => made.push(f),
                Err(e) => {
                    self.destroy_watch_parts(&collector, &view).await;
                    return Err(e);
                }
            }
        }
        Ok(Watch {
            collector,
            view,
            filters: made,
            version: String::new(),
            logins,
        })
    }

    /// Every change since `watch.version` (all objects when it is empty), all
    /// parts of a truncated answer followed, without waiting (`maxWaitSeconds` 0).
    /// Advances `watch.version`. Faults come back as errors (`InvalidCollectorVersion`
    /// as [`VsphereError::Fault`] with that type; a collector that died with its
    /// session as [`VsphereError::ObjectNotFound`]).
    pub async fn wait_for_updates(
        &self,
        watch: &mut Watch,
        max_objects: u32,
    ) -> Result<Vec<ObjectUpdate>, VsphereError> {
        let doing = "reading inventory changes (WaitForUpdatesEx)";
        let mut out = Vec::new();
        for _ in 0..MAX_PARTS {
            let body = wait_body(&watch.collector, &watch.version, 0, max_objects);
            let resp = self
                .invoke_checked(
                    "WaitForUpdatesEx",
                    &body,
                    Replay::Safe,
                    doing,
                    hidden_not_authenticated_in_updates,
                )
                .await?
                .map_err(|f| from_fault(&f, &self.ctx(doing)))?;
            let Some(set) = decode_update_set(&resp).map_err(|e| self.malformed(doing, e))? else {
                return Ok(out);
            };
            if let Some((u, path)) = set.objects.iter().find_map(|u| {
                u.missing
                    .iter()
                    .find(|(_, f)| f == "NoPermission")
                    .map(|(p, _)| (u, p))
            }) {
                return Err(VsphereError::NoPermission {
                    vcenter: self.url().to_string(),
                    doing: format!("{doing}: reading {path} of {}", u.obj),
                    privilege: "System.Read".into(),
                    message: "the account may not read this property".into(),
                });
            }
            if let Some(u) = set
                .objects
                .iter()
                .find(|u| u.missing.iter().any(|(_, f)| f == "NotAuthenticated"))
            {
                return Err(self.malformed(
                    doing,
                    format!(
                        "{}: properties not readable ({})",
                        u.obj,
                        u.missing
                            .iter()
                            .map(|(p, f)| format!("{p}: {f}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ));
            }
            watch.version = set.version;
            out.extend(set.objects);
            if !set.truncated {
                return Ok(out);
            }
        }
        Err(self.malformed(
            doing,
            format!("more than {MAX_PARTS} truncated update parts"),
        ))
    }

    /// Destroy the watch's collector (and with it its filter) and view. Best
    /// effort: they die with the session anyway.
    pub async fn destroy_watch(&self, watch: &Watch) {
        if watch.is_current(self) {
            self.destroy_watch_parts(&watch.collector, &watch.view)
                .await;
        }
    }

    async fn destroy_watch_parts(&self, collector: &MoRef, view: &MoRef) {
        self.destroy_collector(collector).await;
        let body = soap::envelope("DestroyView", view, |_| {});
        if let Err(e) = self
            .invoke(
                "DestroyView",
                &body,
                Replay::Safe,
                "destroying a container view",
            )
            .await
        {
            tracing::debug!(error = %e, "DestroyView failed (the view dies with the session)");
        }
    }

    async fn destroy_collector(&self, collector: &MoRef) {
        let body = soap::envelope("DestroyPropertyCollector", collector, |_| {});
        if let Err(e) = self
            .invoke(
                "DestroyPropertyCollector",
                &body,
                Replay::Safe,
                "destroying a property collector",
            )
            .await
        {
            tracing::debug!(error = %e, "DestroyPropertyCollector failed (it dies with the session)");
        }
    }

    async fn returned_ref(
        &self,
        method: &str,
        body: &str,
        doing: &str,
    ) -> Result<MoRef, VsphereError> {
        let resp = self
            .invoke(method, body, Replay::Safe, doing)
            .await?
            .map_err(|f| from_fault(&f, &self.ctx(doing)))?;
        resp.child("returnval")
            .ok_or_else(|| self.malformed(doing, format!("{method}: no returnval")))
            .and_then(|r| MoRef::decode(r).map_err(|e| self.malformed(doing, e)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vsphere::xml::{parse, Limits};

    #[test]
    fn a_lost_session_hidden_in_an_update_set_is_found() {
        let lost = br#"<WaitForUpdatesExResponse xmlns="urn:vim25" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><returnval><version>3</version><filterSet><filter type="PropertyFilter">f1</filter>
          <objectSet><kind>modify</kind><obj type="VirtualMachine">vm-2</obj><missingSet><path>name</path><fault><fault xsi:type="NotAuthenticated"/><localizedMessage>session gone</localizedMessage></fault></missingSet></objectSet>
          </filterSet></returnval></WaitForUpdatesExResponse>"#;
        let e = parse(lost, &Limits::default()).unwrap();
        let f = hidden_not_authenticated_in_updates(&e).expect("found");
        assert_eq!(f.fault_type, "NotAuthenticated");
        // The RetrievePropertiesEx detector does not read this layout.
        assert!(crate::vsphere::collector::hidden_not_authenticated(&e).is_none());
        let other = String::from_utf8_lossy(lost).replace("NotAuthenticated", "SystemError");
        let e = parse(other.as_bytes(), &Limits::default()).unwrap();
        assert!(hidden_not_authenticated_in_updates(&e).is_none());
    }

    #[test]
    fn update_sets_decode_enter_modify_leave_and_truncation() {
        let x = br#"<WaitForUpdatesExResponse xmlns="urn:vim25" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><returnval><version>7</version><filterSet><filter type="PropertyFilter">f1</filter>
          <objectSet><kind>enter</kind><obj type="VirtualMachine">vm-1</obj><changeSet><name>name</name><op>assign</op><val xsi:type="xsd:string">a</val></changeSet><changeSet><name>config.keyId</name><op>assign</op></changeSet></objectSet>
          <objectSet><kind>modify</kind><obj type="VirtualMachine">vm-2</obj><changeSet><name>runtime.host</name><op>assign</op><val type="HostSystem" xsi:type="ManagedObjectReference">host-9</val></changeSet><missingSet><path>x</path><fault><fault xsi:type="SystemError"/><localizedMessage>no</localizedMessage></fault></missingSet></objectSet>
          <objectSet><kind>leave</kind><obj type="VirtualMachine">vm-3</obj></objectSet>
          </filterSet><truncated>true</truncated></returnval></WaitForUpdatesExResponse>"#;
        let e = parse(x, &Limits::default()).unwrap();
        let set = decode_update_set(&e).unwrap().unwrap();
        assert_eq!(set.version, "7");
        assert!(set.truncated);
        assert_eq!(set.objects.len(), 3);
        assert_eq!(set.objects[0].kind, UpdateKind::Enter);
        let c = set.objects[0].content();
        assert_eq!(c.obj, MoRef::new("VirtualMachine", "vm-1"));
        assert_eq!(c.props.len(), 1, "an assign without a value is unset");
        assert_eq!(c.prop("name").unwrap().text, "a");
        assert_eq!(set.objects[1].kind, UpdateKind::Modify);
        assert_eq!(set.objects[1].changes[0].name, "runtime.host");
        assert_eq!(set.objects[1].missing, [("x".into(), "SystemError".into())]);
        assert_eq!(set.objects[2].kind, UpdateKind::Leave);
        assert!(set.objects[2].changes.is_empty());
        let none = parse(b"<WaitForUpdatesExResponse/>", &Limits::default()).unwrap();
        assert_eq!(decode_update_set(&none).unwrap(), None);
        let bad = parse(
            b"<R><returnval><version>1</version><filterSet><objectSet><kind>odd</kind><obj type=\"VirtualMachine\">vm-1</obj></objectSet></filterSet></returnval></R>",
            &Limits::default(),
        )
        .unwrap();
        assert!(decode_update_set(&bad).is_err());
    }

    #[test]
    fn wait_body_in_wsdl_order() {
        let b = wait_body(&MoRef::new("PropertyCollector", "pc-1"), "3", 0, 500);
        let root = parse(b.as_bytes(), &Limits::default()).unwrap();
        let w = root.path(&["Body", "WaitForUpdatesEx"]).unwrap();
        let order: Vec<_> = w.children.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(order, ["_this", "version", "options"]);
        assert_eq!(w.path(&["options", "maxWaitSeconds"]).unwrap().text, "0");
        assert_eq!(
            w.path(&["options", "maxObjectUpdates"]).unwrap().text,
            "500"
        );
    }
}
