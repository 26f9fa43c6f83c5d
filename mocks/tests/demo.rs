//! The README's first command, `ferry-sim demo`, runs end to end (on a small disk
//! here to keep the test suite fast) and reports bit-identical restores.

#[test]
fn demo_runs_and_checks_its_restores() {
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_ferry-sim"))
        .args(["demo", "--disk-mib", "48", "--json"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rows: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let rows = rows.as_array().unwrap();
    let steps: Vec<&str> = rows.iter().map(|r| r["step"].as_str().unwrap()).collect();
    assert_eq!(
        steps,
        [
            "full backup",
            "incremental",
            "restore full",
            "restore incr",
            "verify"
        ]
    );
    assert_eq!(rows[2]["check"], "bit-identical");
    assert_eq!(rows[3]["check"], "bit-identical");
    // The incremental stores far less than the full backup.
    assert!(rows[1]["stored"].as_u64().unwrap() * 2 < rows[0]["stored"].as_u64().unwrap());
}
