//! The mock vCenter's PropertyCollector as a vim25 client sees it: traversal from the
//! root folder through named selection specs, paging, unset and invalid properties,
//! container views of each type, and update filters (CreateFilter, WaitForUpdatesEx,
//! CheckForUpdates, DestroyPropertyFilter).

mod vcenter_common;

use ferry_mocks::vcenter::{VcenterMock, VcenterOptions};
use std::path::Path;
use vcenter_common::{el, Soap};

fn start() -> VcenterMock {
    VcenterMock::start(
        VcenterOptions::from_file(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios/small.toml"),
        )
        .unwrap(),
    )
    .unwrap()
}

const FOLDER_TRAVERSAL: &str = r#"<objectSet><obj type="Folder">group-d1</obj><skip>true</skip>
  <selectSet xsi:type="TraversalSpec"><name>folder</name><type>Folder</type><path>childEntity</path><skip>false</skip><selectSet><name>folder</name></selectSet><selectSet><name>dcVm</name></selectSet><selectSet><name>dcHost</name></selectSet><selectSet><name>dcDs</name></selectSet><selectSet><name>cluster</name></selectSet></selectSet>
  <selectSet xsi:type="TraversalSpec"><name>dcVm</name><type>Datacenter</type><path>vmFolder</path><skip>false</skip><selectSet><name>folder</name></selectSet></selectSet>
  <selectSet xsi:type="TraversalSpec"><name>dcHost</name><type>Datacenter</type><path>hostFolder</path><skip>false</skip><selectSet><name>folder</name></selectSet></selectSet>
  <selectSet xsi:type="TraversalSpec"><name>dcDs</name><type>Datacenter</type><path>datastoreFolder</path><skip>false</skip><selectSet><name>folder</name></selectSet></selectSet>
  <selectSet xsi:type="TraversalSpec"><name>cluster</name><type>ClusterComputeResource</type><path>host</path><skip>false</skip></selectSet>
</objectSet>"#;

fn props(oc: &ferry_mocks::vcenter::codec::Element) -> Vec<(String, String)> {
    oc.all("propSet")
        .map(|p| {
            let v = p.child("val").unwrap();
            (
                p.text_of("name").unwrap().to_string(),
                v.xsi_type().unwrap_or("").to_string(),
            )
        })
        .collect()
}

#[test]
fn property_collector_traversal_paging_and_properties() {
    let mock = start();
    let mut soap = Soap::new(&mock);
    soap.login();
    let spec = format!(
        r#"<specSet><propSet><type>HostSystem</type><pathSet>name</pathSet><pathSet>datastore</pathSet><pathSet>parent</pathSet></propSet><propSet><type>Datastore</type><pathSet>name</pathSet><pathSet>summary.capacity</pathSet></propSet><propSet><type>VirtualMachine</type><pathSet>name</pathSet><pathSet>config.keyId</pathSet><pathSet>snapshot</pathSet></propSet><propSet><type>ClusterComputeResource</type><all>true</all></propSet>{FOLDER_TRAVERSAL}</specSet>"#
    );
    // All at once.
    let r = soap
        .call(
            "RetrieveProperties",
            ("PropertyCollector", "propertyCollector"),
            &spec,
        )
        .unwrap();
    let objs: Vec<_> = r.all("returnval").cloned().collect();
    let count = |ty: &str| {
        objs.iter()
            .filter(|o| o.child("obj").unwrap().attr("type") == Some(ty))
            .count()
    };
    assert_eq!(count("HostSystem"), 2);
    assert_eq!(count("Datastore"), 4);
    assert_eq!(count("VirtualMachine"), 6);
    assert_eq!(count("ClusterComputeResource"), 1);
    assert_eq!(
        objs.len(),
        13,
        "folders and the datacenter have no property spec"
    );
    let host = objs
        .iter()
        .find(|o| o.child("obj").unwrap().attr("type") == Some("HostSystem"))
        .unwrap();
    assert_eq!(
        props(host),
        [
            ("name".to_string(), "string".to_string()),
            ("datastore".into(), "ArrayOfManagedObjectReference".into()),
            ("parent".into(), "ManagedObjectReference".into())
        ]
    );
    // Unset properties are left out (unencrypted VMs, no snapshots).
    let plain = objs
        .iter()
        .find(|o| {
            o.all("propSet")
                .any(|p| p.text_of("name") == Some("name") && p.text_of("val") == Some("plain-app"))
        })
        .unwrap();
    assert_eq!(props(plain), [("name".to_string(), "string".to_string())]);
    let ds = objs
        .iter()
        .find(|o| o.child("obj").unwrap().attr("type") == Some("Datastore"))
        .unwrap();
    assert!(props(ds).contains(&("summary.capacity".into(), "long".into())));

    // Paged: 13 objects, 5 per page, tokens until none.
    let opts = "<options><maxObjects>5</maxObjects></options>";
    let first = soap
        .call(
            "RetrievePropertiesEx",
            ("PropertyCollector", "propertyCollector"),
            &(spec.clone() + opts),
        )
        .unwrap();
    let mut page = first.child("returnval").unwrap().clone();
    let mut sizes = vec![page.all("objects").count()];
    while let Some(token) = page.text_of("token").map(str::to_string) {
        page = soap
            .call(
                "ContinueRetrievePropertiesEx",
                ("PropertyCollector", "propertyCollector"),
                &el("token", &token),
            )
            .unwrap()
            .child("returnval")
            .unwrap()
            .clone();
        sizes.push(page.all("objects").count());
    }
    assert_eq!(sizes, [5, 5, 3]);
    assert_eq!(mock.admin().state().sessions[0].pending_pages, 0);
    let e = soap
        .call(
            "ContinueRetrievePropertiesEx",
            ("PropertyCollector", "propertyCollector"),
            &el("token", "nope"),
        )
        .unwrap_err();
    assert_eq!(e.ty, "InvalidArgument");
    // Nothing found: no returnval at all, as vCenter does.
    let none = soap
        .call(
            "RetrievePropertiesEx",
            ("PropertyCollector", "propertyCollector"),
            r#"<specSet><propSet><type>VirtualMachine</type><pathSet>name</pathSet></propSet><objectSet><obj type="Folder">group-d1</obj><skip>true</skip></objectSet></specSet><options/>"#,
        )
        .unwrap();
    assert!(none.child("returnval").is_none());
    // Invalid property and missing object.
    let e = soap
        .call(
            "RetrievePropertiesEx",
            ("PropertyCollector", "propertyCollector"),
            &(spec
                .replace("summary.capacity", "summary.capacityy")
                .replace(
                    "<pathSet>snapshot</pathSet>",
                    "<pathSet>snapshotz</pathSet>",
                )
                + "<options/>"),
        )
        .unwrap_err();
    assert_eq!(e.ty, "InvalidProperty", "{}", e.message);
    let e = soap
        .call(
            "RetrievePropertiesEx",
            ("PropertyCollector", "propertyCollector"),
            r#"<specSet><propSet><type>VirtualMachine</type></propSet><objectSet><obj type="VirtualMachine">vm-424242</obj></objectSet></specSet><options/>"#,
        )
        .unwrap_err();
    assert_eq!(e.ty, "ManagedObjectNotFound");

    // Container views of each type the client uses.
    for (ty, n) in [
        ("VirtualMachine", 6),
        ("HostSystem", 2),
        ("Datastore", 4),
        ("ClusterComputeResource", 1),
    ] {
        let v = soap
            .call(
                "CreateContainerView",
                ("ViewManager", "ViewManager"),
                &format!(r#"<container type="Folder">group-d1</container><type>{ty}</type><recursive>true</recursive>"#),
            )
            .unwrap()
            .child("returnval")
            .unwrap()
            .text
            .clone();
        let view = soap.fetch(("ContainerView", &v), "view").unwrap().unwrap();
        assert_eq!(view.children.len(), n, "{ty}");
        assert!(view.children.iter().all(|c| c.attr("type") == Some(ty)));
        soap.call("DestroyView", ("ContainerView", &v), "").unwrap();
    }
    let e = soap
        .call(
            "CreateContainerView",
            ("ViewManager", "ViewManager"),
            r#"<container type="Folder">group-zzz</container><type>VirtualMachine</type><recursive>true</recursive>"#,
        )
        .unwrap_err();
    assert_eq!(e.ty, "ManagedObjectNotFound");
}

#[test]
fn update_filters_report_task_progress() {
    let mock = start();
    let mut soap = Soap::new(&mock);
    soap.login();
    let vm = mock.admin().state().vm("plain-app").unwrap().moref.clone();
    mock.admin().set_task_delay(300);
    let task = soap
        .call(
            "CreateSnapshot_Task",
            ("VirtualMachine", &vm),
            &(el("name", "f") + &el("memory", "false") + &el("quiesce", "false")),
        )
        .unwrap()
        .child("returnval")
        .unwrap()
        .text
        .clone();
    let filter = soap
        .call(
            "CreateFilter",
            ("PropertyCollector", "propertyCollector"),
            &format!(r#"<spec><propSet><type>Task</type><pathSet>info.state</pathSet></propSet><objectSet><obj type="Task">{task}</obj></objectSet></spec><partialUpdates>false</partialUpdates>"#),
        )
        .unwrap()
        .child("returnval")
        .unwrap()
        .text
        .clone();
    assert_eq!(mock.admin().state().sessions[0].filters, 1);
    // First wait: the object enters with its current state.
    let mut version = String::new();
    let mut states = Vec::new();
    loop {
        let r = soap
            .call(
                "WaitForUpdatesEx",
                ("PropertyCollector", "propertyCollector"),
                &(el("version", &version)
                    + "<options><maxWaitSeconds>30</maxWaitSeconds></options>"),
            )
            .unwrap();
        let set = r.child("returnval").expect("an update within 30 s");
        version = set.text_of("version").unwrap().to_string();
        let fu = set.child("filterSet").unwrap();
        assert_eq!(fu.text_of("filter"), Some(filter.as_str()));
        let ou = fu.child("objectSet").unwrap();
        let change = ou.child("changeSet").unwrap();
        assert_eq!(change.text_of("name"), Some("info.state"));
        assert_eq!(change.text_of("op"), Some("assign"));
        assert_eq!(
            change.child("val").unwrap().xsi_type(),
            Some("TaskInfoState")
        );
        let state = change.text_of("val").unwrap().to_string();
        let kind = ou.text_of("kind").unwrap().to_string();
        states.push((kind, state.clone()));
        if state == "success" {
            break;
        }
    }
    assert_eq!(states[0].0, "enter");
    assert!(states[1..].iter().all(|(k, _)| k == "modify"));
    assert_eq!(states.last().unwrap().1, "success");
    // Nothing new: CheckForUpdates and a zero wait return nothing.
    let r = soap
        .call(
            "CheckForUpdates",
            ("PropertyCollector", "propertyCollector"),
            &el("version", &version),
        )
        .unwrap();
    assert!(r.child("returnval").is_none());
    soap.call("DestroyPropertyFilter", ("PropertyFilter", &filter), "")
        .unwrap();
    assert_eq!(mock.admin().state().sessions[0].filters, 0);
    assert_eq!(
        soap.call("DestroyPropertyFilter", ("PropertyFilter", &filter), "")
            .unwrap_err()
            .ty,
        "ManagedObjectNotFound"
    );
    mock.admin().set_task_delay(0);
    let snap = mock.admin().state().vm("plain-app").unwrap().snapshots[0]
        .moref
        .clone();
    soap.remove(&snap).unwrap();
}
