//! `ferry-sim vcenter` runs the mock standalone: it prints how to connect (here as
//! JSON), serves SOAP and the admin API with that, and stops cleanly on SIGTERM.

mod vcenter_common;

use std::io::BufRead;
use std::path::Path;
use std::process::{Command, Stdio};
use vcenter_common::Soap;

#[test]
fn ferry_sim_vcenter_serves_and_stops() {
    let dir = tempfile::tempdir().unwrap();
    let scenario = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios/small.toml");
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferry-sim"))
        .args(["vcenter", "--port", "0", "--json", "--scenario"])
        .arg(&scenario)
        .arg("--dir")
        .arg(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let info: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| {
        let _ = child.kill();
        panic!("ferry-sim printed {line:?}: {e}")
    });
    let url = info["url"].as_str().unwrap();
    let addr = url
        .strip_prefix("https://")
        .and_then(|u| u.strip_suffix("/sdk"))
        .unwrap();
    assert_eq!(info["ca"], dir.path().join("ca-cert.pem").to_str().unwrap());
    assert_eq!(
        info["device_dirs"]["proxy-a"],
        dir.path().join("devices/proxy-a").to_str().unwrap()
    );
    let mut soap = Soap::connect(
        addr,
        Path::new(info["ca"].as_str().unwrap()),
        info["user"].as_str().unwrap(),
        info["password"].as_str().unwrap(),
        info["admin_token"].as_str().unwrap(),
    );
    soap.login();
    let view = soap
        .call(
            "CreateContainerView",
            ("ViewManager", "ViewManager"),
            r#"<container type="Folder">group-d1</container><type>VirtualMachine</type><recursive>true</recursive>"#,
        )
        .unwrap()
        .child("returnval")
        .unwrap()
        .text
        .clone();
    let vms = soap
        .fetch(("ContainerView", &view), "view")
        .unwrap()
        .unwrap();
    assert_eq!(vms.children.len(), 6);
    let (status, state) = soap.admin("state", None, None);
    assert_eq!(status, 200);
    assert_eq!(state["sessions"].as_array().unwrap().len(), 1);
    assert!(dir
        .path()
        .join("datastores/ds-tenant-a/tenant-a-web/tenant-a-web.vmdk")
        .exists());

    let st = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let code = child.wait().unwrap();
    assert!(
        code.success(),
        "ferry-sim vcenter exits 0 on SIGTERM: {code:?}"
    );
}
