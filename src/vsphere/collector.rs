//! Property collection: `RetrievePropertiesEx` over a container view (or a list of
//! objects) with `RetrieveOptions.maxObjects`, then `ContinueRetrievePropertiesEx`
//! until vCenter returns no token. Container views are destroyed after use.
//!
//! A session renewed in the middle of a collection invalidates the view and the
//! paging token (both belong to the old session), so a collection interrupted by a
//! re-login is started over once.
//!
//! Request bodies and result decoding are pure functions, tested without a server.
//! Watching for changes instead of reading again is [`super::updates`].

use super::client::{Client, Replay};
use super::error::{from_fault, VsphereError};
use super::soap::{self, Body, Fault};
use super::types::{DecodeError, MoRef, ObjectContent};
use super::xml::Element;

/// Which objects a property filter starts from.
#[derive(Debug, Clone, Copy)]
pub enum Select<'a> {
    /// Every object in a container view (traversing its `view` property).
    View(&'a MoRef),
    /// Exactly these objects.
    Objects(&'a [MoRef]),
}

/// Most pages followed in one collection; a server sending tokens forever is cut off.
pub const MAX_PAGES: usize = 100_000;

/// Write a `PropertyFilterSpec` (WSDL order: propSet, objectSet).
pub fn filter_spec(b: &mut Body, kind: &str, paths: &[&str], sel: Select<'_>) {
    filter_spec_multi(b, "specSet", &[(kind, paths)], sel);
}

/// Write a `PropertyFilterSpec` as element `tag` (`specSet` for
/// RetrievePropertiesEx, `spec` for CreateFilter) with one `propSet` per
/// `(type, paths)`.
pub fn filter_spec_multi(b: &mut Body, tag: &str, props: &[(&str, &[&str])], sel: Select<'_>) {
    b.open(tag);
    for (kind, paths) in props {
        b.open("propSet").leaf("type", kind).leaf("all", "false");
        for p in *paths {
            b.leaf("pathSet", p);
        }
        b.close("propSet");
    }
    match sel {
        Select::View(view) => {
            b.open("objectSet").moref("obj", view).leaf("skip", "true");
            b.open_typed("selectSet", "TraversalSpec")
                .leaf("name", "traverseView")
                .leaf("type", "ContainerView")
                .leaf("path", "view")
                .leaf("skip", "false")
                .close("selectSet");
            b.close("objectSet");
        }
        Select::Objects(objs) => {
            for o in objs {
                b.open("objectSet")
                    .moref("obj", o)
                    .leaf("skip", "false")
                    .close("objectSet");
            }
        }
    }
    b.close(tag);
}

/// Body of `RetrievePropertiesEx`.
pub fn retrieve_body(
    pc: &MoRef,
    kind: &str,
    paths: &[&str],
    sel: Select<'_>,
    max_objects: u32,
) -> String {
    soap::envelope("RetrievePropertiesEx", pc, |b| {
        filter_spec(b, kind, paths, sel);
        b.open("options")
            .leaf("maxObjects", max_objects.max(1))
            .close("options");
    })
}

/// Body of `ContinueRetrievePropertiesEx`.
pub fn continue_body(pc: &MoRef, token: &str) -> String {
    soap::envelope("ContinueRetrievePropertiesEx", pc, |b| {
        b.leaf("token", token);
    })
}

/// Decode a `RetrievePropertiesExResponse` / `ContinueRetrievePropertiesExResponse`:
/// the objects and the continuation token. No `returnval` means no objects.
pub fn decode_result(resp: &Element) -> Result<(Vec<ObjectContent>, Option<String>), DecodeError> {
    let Some(rv) = resp.child("returnval") else {
        return Ok((Vec::new(), None));
    };
    let objects = rv
        .children_named("objects")
        .map(ObjectContent::decode)
        .collect::<Result<Vec<_>, _>>()?;
    let token = rv
        .child_text("token")
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_string);
    Ok((objects, token))
}

/// A `NotAuthenticated` fault hidden in a result's `missingSet` (vcsim answers an
/// unauthenticated RetrievePropertiesEx that way instead of with a SOAP fault).
pub fn hidden_not_authenticated(resp: &Element) -> Option<Fault> {
    let rv = resp.child("returnval")?;
    rv.children_named("objects")
        .flat_map(|o| o.children_named("missingSet"))
        .filter_map(|m| m.child("fault"))
        .map(Fault::from_localized)
        .find(|f| f.fault_type == "NotAuthenticated")
}

impl Client {
    /// Run `f` once more if it failed after the session was renewed during it.
    async fn once_more_after_relogin<T, F, Fut>(&self, f: F) -> Result<T, VsphereError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, VsphereError>>,
    {
        let before = self.logins();
        match f().await {
            Err(e)
                if self.logins() != before
                    && !matches!(
                        e,
                        VsphereError::InvalidLogin { .. } | VsphereError::NotAuthenticated { .. }
                    ) =>
            {
                tracing::info!(vcenter = %self.url(), error = %e, "collection interrupted by a re-login; starting it over");
                f().await
            }
            r => r,
        }
    }

    /// Collect `paths` of every object of type `kind` under the inventory root.
    pub async fn collect(
        &self,
        kind: &str,
        paths: &[&str],
        doing: &str,
    ) -> Result<Vec<ObjectContent>, VsphereError> {
        self.once_more_after_relogin(|| async {
            let view = self.create_view(kind, doing).await?;
            let r = self.retrieve(kind, paths, Select::View(&view), doing).await;
            self.destroy_view(&view).await;
            r
        })
        .await
    }

    /// Collect `paths` of exactly `objs` (all of type `kind`).
    pub async fn collect_objects(
        &self,
        objs: &[MoRef],
        kind: &str,
        paths: &[&str],
        doing: &str,
    ) -> Result<Vec<ObjectContent>, VsphereError> {
        if objs.is_empty() {
            return Ok(Vec::new());
        }
        self.once_more_after_relogin(|| self.retrieve(kind, paths, Select::Objects(objs), doing))
            .await
    }

    async fn create_view(&self, kind: &str, doing: &str) -> Result<MoRef, VsphereError> {
        let sc = self.service_content();
        let body = soap::envelope("CreateContainerView", &sc.view_manager, |b| {
            b.moref("container", &sc.root_folder)
                .leaf("type", kind)
                .leaf("recursive", "true");
        });
        let resp = self
            .invoke("CreateContainerView", &body, Replay::Safe, doing)
            .await?
            .map_err(|f| from_fault(&f, &self.ctx(doing)))?;
        resp.child("returnval")
            .ok_or_else(|| self.malformed(doing, "CreateContainerView: no returnval"))
            .and_then(|r| MoRef::decode(r).map_err(|e| self.malformed(doing, e)))
    }

    async fn destroy_view(&self, view: &MoRef) {
        let body = soap::envelope("DestroyView", view, |_| {});
        match self
            .invoke(
                "DestroyView",
                &body,
                Replay::Safe,
                "destroying a container view",
            )
            .await
        {
            Ok(Ok(_)) => {}
            Ok(Err(f)) => {
                tracing::debug!(fault = %f.summary(), "DestroyView failed (the view dies with the session)")
            }
            Err(e) => {
                tracing::debug!(error = %e, "DestroyView failed (the view dies with the session)")
            }
        }
    }

    async fn retrieve(
        &self,
        kind: &str,
        paths: &[&str],
        sel: Select<'_>,
        doing: &str,
    ) -> Result<Vec<ObjectContent>, VsphereError> {
        let pc = self.service_content().property_collector.clone();
        let body = retrieve_body(&pc, kind, paths, sel, self.config().page_size);
        let mut out = Vec::new();
        let mut next = Some(("RetrievePropertiesEx", body));
        let mut pages = 0usize;
        while let Some((method, body)) = next.take() {
            pages += 1;
            if pages > MAX_PAGES {
                return Err(self.malformed(
                    doing,
                    format!("more than {MAX_PAGES} property collector pages"),
                ));
            }
            let resp = self
                .invoke_checked(method, &body, Replay::Safe, doing, hidden_not_authenticated)
                .await?
                .map_err(|f| from_fault(&f, &self.ctx(doing)))?;
            let (objects, token) = decode_result(&resp).map_err(|e| self.malformed(doing, e))?;
            for o in objects {
                if let Some((path, f)) = o
                    .missing
                    .iter()
                    .find(|(_, f)| f.fault_type == "NoPermission")
                {
                    return Err(VsphereError::NoPermission {
                        vcenter: self.url().to_string(),
                        doing: format!("{doing}: reading {path} of {}", o.obj),
                        privilege: f
                            .detail_text("privilegeId")
                            .unwrap_or("System.Read")
                            .to_string(),
                        message: f.message.clone(),
                    });
                }
                for (path, f) in &o.missing {
                    tracing::debug!(obj = %o.obj, %path, fault = %f.summary(), "property not readable; ignored");
                }
                out.push(o);
            }
            next = token.map(|t| ("ContinueRetrievePropertiesEx", continue_body(&pc, &t)));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vsphere::xml::{parse, Limits};

    #[test]
    fn filter_spec_for_a_view_traverses_it() {
        let body = retrieve_body(
            &MoRef::new("PropertyCollector", "propertyCollector"),
            "VirtualMachine",
            &["name", "config.keyId"],
            Select::View(&MoRef::new("ContainerView", "session[1]2")),
            2,
        );
        let root = parse(body.as_bytes(), &Limits::default()).unwrap();
        let r = root.path(&["Body", "RetrievePropertiesEx"]).unwrap();
        let spec = r.child("specSet").unwrap();
        let ps: Vec<_> = spec
            .path(&["propSet"])
            .unwrap()
            .children_named("pathSet")
            .map(|p| p.text.as_str())
            .collect();
        assert_eq!(ps, ["name", "config.keyId"]);
        let os = spec.child("objectSet").unwrap();
        assert_eq!(os.child_text("skip"), Some("true"));
        let ss = os.child("selectSet").unwrap();
        assert_eq!(ss.xsi_type.as_deref(), Some("TraversalSpec"));
        assert_eq!(ss.child_text("path"), Some("view"));
        assert_eq!(r.path(&["options", "maxObjects"]).unwrap().text, "2");
        // WSDL order inside RetrievePropertiesEx: _this, specSet, options.
        let order: Vec<_> = r.children.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(order, ["_this", "specSet", "options"]);
    }

    #[test]
    fn results_decode_with_token_and_without_returnval() {
        let x = br#"<RetrievePropertiesExResponse xmlns="urn:vim25" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><returnval><token>tok-1</token><objects><obj type="VirtualMachine">vm-1</obj><propSet><name>name</name><val xsi:type="xsd:string">a</val></propSet><propSet><name>unknownFutureProperty</name><val xsi:type="SomethingNew"><x>1</x></val></propSet></objects><objects><obj type="VirtualMachine">vm-2</obj><missingSet><path>config.keyId</path><fault><fault xsi:type="NotAuthenticated"/><localizedMessage>no</localizedMessage></fault></missingSet></objects></returnval></RetrievePropertiesExResponse>"#;
        let e = parse(x, &Limits::default()).unwrap();
        let (objs, token) = decode_result(&e).unwrap();
        assert_eq!(token.as_deref(), Some("tok-1"));
        assert_eq!(objs.len(), 2);
        assert_eq!(objs[0].prop("name").unwrap().text, "a");
        assert_eq!(objs[1].missing[0].1.fault_type, "NotAuthenticated");
        assert_eq!(hidden_not_authenticated(&e).unwrap().message, "no");
        let empty = parse(b"<RetrievePropertiesExResponse/>", &Limits::default()).unwrap();
        assert_eq!(decode_result(&empty).unwrap(), (Vec::new(), None));
    }
}
