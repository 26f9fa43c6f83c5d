//! The example configurations under deploy/ stay valid: each parses and passes
//! the same validation `ferry agent` and `ferry orchestrator` apply at start, and
//! the systemd units start the commands that exist.

use std::path::Path;

fn examples() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/examples")
}

#[test]
fn agent_examples_are_valid_and_serve_the_right_tenants() {
    for (file, id, tenants, modes) in [
        ("agent-tenant-a.toml", "proxy-a1", vec!["tenant-a"], 2),
        ("agent-tenant-b.toml", "proxy-b1", vec!["tenant-b"], 2),
        (
            "agent-shared-nbd.toml",
            "shared-nbd",
            vec!["tenant-a", "tenant-b"],
            1,
        ),
    ] {
        let p = examples().join(file);
        let text = std::fs::read_to_string(&p).unwrap();
        let cfg = ferry::config::Config::parse(&text, &p).unwrap_or_else(|e| panic!("{e}"));
        let a = cfg.agent.as_ref().unwrap();
        assert_eq!(a.id, id, "{file}");
        assert_eq!(a.modes.len(), modes, "{file}");
        let names: Vec<&str> = cfg.tenants.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, tenants, "{file}");
        assert_eq!(
            cfg.vcenter.as_ref().unwrap().proxy_vm.as_deref(),
            Some(id),
            "{file}: the agent discovers its own proxy VM"
        );
        assert!(!cfg.policy.allow_cleartext_nbd, "{file}");
        for t in &cfg.tenants {
            assert!(
                t.kms.is_some(),
                "{file}: tenant keys live in the tenant's KMS"
            );
            // Restores through the API go to the tenant's own directory,
            // writable under the systemd unit (ReadWritePaths=/srv/ferry).
            assert_eq!(
                t.restore_dirs,
                [Path::new("/srv/ferry/restores").join(&t.name)],
                "{file}"
            );
        }
    }
}

#[test]
fn orchestrator_example_is_valid_and_matches_the_agents() {
    let p = examples().join("orchestrator.toml");
    let text = std::fs::read_to_string(&p).unwrap();
    let cfg =
        ferry::orchestrator::OrchestratorConfig::parse(&text, &p).unwrap_or_else(|e| panic!("{e}"));
    let ids: Vec<&str> = cfg.agents.iter().map(|a| a.id.as_str()).collect();
    assert_eq!(ids, ["proxy-a1", "proxy-b1", "shared-nbd"]);
    assert_eq!(cfg.jobs.len(), 2);
    assert_eq!(
        cfg.key_sync.every,
        std::time::Duration::from_secs(24 * 3600)
    );
}

#[test]
fn systemd_units_run_existing_commands_with_hardening() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/systemd");
    for (unit, args) in [
        ("ferry-agent.service", vec!["agent", "--help"]),
        (
            "ferry-orchestrator.service",
            vec!["orchestrator", "run", "--help"],
        ),
    ] {
        let text = std::fs::read_to_string(dir.join(unit)).unwrap();
        for directive in [
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "PrivateTmp=yes",
            "CapabilityBoundingSet=",
        ] {
            assert!(text.contains(directive), "{unit} lacks {directive}");
        }
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args(&args)
            .output()
            .unwrap();
        assert!(o.status.success(), "{unit}: ferry {args:?} does not exist");
    }
}
