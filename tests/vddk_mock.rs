//! ferry's VDDK loader against the mock `libvixDiskLib` (crate
//! `ferry-mock-vddk`, built as `target/debug/libvixDiskLib.so`): the mock is
//! installed as `<tmp>/lib64/libvixDiskLib.so.8`, found by the loader's probe,
//! every required symbol resolves, InitEx runs once, Exit once, and VDDK cannot be
//! initialised again in the same process. `cargo test --workspace` builds the
//! mock first; alone, run `cargo build -p ferry-mock-vddk` before this test.
//!
//! One test function: the VDDK state is process-wide.

mod common;

use ferry::transport::vddk::{loader, Vddk, VddkError};

#[test]
fn the_mock_vddk_loads_initialises_and_exits_once() {
    let mock = common::vsphere::mock_vddk_library();
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("lib64")).unwrap();
    let installed = dir.path().join("lib64/libvixDiskLib.so.8");
    std::fs::copy(&mock, &installed).unwrap();

    // The probe alone: found as a VDDK 8 with every required symbol.
    let lib = loader::load_library(dir.path()).unwrap();
    assert_eq!(lib.path, installed);
    assert_eq!(lib.version.major, 8);
    drop(lib);

    let vddk = Vddk::init(dir.path(), None).unwrap();
    assert_eq!(vddk.library_path(), installed);
    assert_eq!(vddk.version().major, 8);
    assert!(
        vddk.api().has_async(),
        "the mock exports ReadAsync/WriteAsync/Wait"
    );
    assert!(vddk.api().has_query_allocated());
    assert!(!vddk.error_text(16007).is_empty());
    // The same directory again: the same handle, no second InitEx.
    let again = Vddk::init(dir.path(), None).unwrap();
    assert!(std::sync::Arc::ptr_eq(&vddk, &again));
    // Another directory is another library instance (as on another proxy).
    let other = tempfile::tempdir().unwrap();
    std::fs::create_dir(other.path().join("lib64")).unwrap();
    std::fs::copy(&mock, other.path().join("lib64/libvixDiskLib.so.8")).unwrap();
    let second = Vddk::init(other.path(), None).unwrap();
    assert!(!std::sync::Arc::ptr_eq(&vddk, &second));
    assert_eq!(second.libdir(), other.path());
    drop(second);
    // Shutdown is refused while a handle is held, then runs Exit once.
    assert!(Vddk::shutdown().is_err());
    drop(again);
    drop(vddk);
    Vddk::shutdown().unwrap();
    assert!(Vddk::get(dir.path()).is_none());
    assert!(matches!(
        Vddk::init(dir.path(), None),
        Err(VddkError::ShutDown)
    ));
}
