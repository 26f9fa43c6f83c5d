//! The README's first command, `ferry-sim demo`, runs end to end (with disks
//! capped at 8 MiB here to keep the suite fast): every VM of the whitepaper world
//! is backed up full and incremental through the orchestrator and the agents, by
//! HotAdd only through its tenant's own proxy, else NBD-SSL; one restore is
//! checked bit for bit and every tenant repository verifies.

#[test]
fn demo_runs_the_whole_world_and_checks_its_restore() {
    let dir = tempfile::tempdir().unwrap();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_ferry-sim"))
        .args(["demo", "--disk-mib-max", "8", "--json", "--keep"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let rows = r["rows"].as_array().unwrap();
    // 20 VMs, every second one with a data disk.
    assert_eq!(rows.len(), 30, "{r:#}");
    for row in rows {
        let mode = row["mode"].as_str().unwrap();
        let proxy = row["proxy"].as_str().unwrap();
        let tenant = row["tenant"].as_str().unwrap();
        match mode {
            // proxy-kms-a serves tenant-a, proxy-kms-b tenant-b.
            "hotadd" => assert_eq!(
                proxy.trim_start_matches("proxy-kms-"),
                tenant.trim_start_matches("tenant-"),
                "{row}"
            ),
            "nbdssl" => assert_eq!(proxy, "proxy-nbd", "{row}"),
            other => panic!("mode {other}: {row}"),
        }
        assert!(!row["reason"].as_str().unwrap().is_empty());
        // The guests wrote 1% between the backups: CBT incrementals read little.
        assert_eq!(row["incr_read"], "cbt", "{row}");
    }
    assert!(rows.iter().any(|x| x["mode"] == "hotadd"));
    assert!(
        r["restore"].as_str().unwrap().contains("bit-identical"),
        "{r:#}"
    );
    assert_eq!(r["verify"].as_array().unwrap().len(), 2);
    // Nothing of the world leaks outside its directory: configs are where they say.
    assert!(dir.path().join("orchestrator/orchestrator.toml").is_file());
}
