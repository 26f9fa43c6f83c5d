//! The web console in a real browser (issue 19): headless Chromium driven by
//! Selenium (tests/browser/console_test.py) against the console of a simulated
//! world: log in, overview, plan with its candidates and filters, back up now
//! through to a restore point, a restore into new disks of the VM watched live,
//! an idle session expiring, and tenant isolation, CSRF and roles as a browser
//! sees them. The same behaviour over plain HTTP is tests/console.rs.
//!
//! Needs `chromium` and `chromium-driver` (apt) and `selenium` in the venv
//! `.ci/run` creates; without them this test fails, naming the install step.
//! With `FERRY_UPDATE_DOCS=1` the screenshots of every view are written to
//! docs/console/*.png (the ones docs/console.md shows).

use ferry_mocks::console::SimConsole;
use ferry_mocks::vcenter::Scenario;
use ferry_mocks::world::{World, WorldOptions};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// Idle time of the console's sessions: longer than any pause between two
/// requests of one browser session in the script (page loads, polls every
/// 1-2 s), short enough that the script's expired-session check waits little.
const SESSION_IDLE: Duration = Duration::from_secs(20);

/// The whole script, at most (it has its own, shorter, waits).
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(600);

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Chromium, its driver and Selenium, or a message saying how to install them.
fn browser_prerequisites() -> Result<PathBuf, String> {
    let python = root().join(".venv/bin/python");
    let mut missing = Vec::new();
    if !Path::new(CHROMIUM).exists() {
        missing.push(format!("{CHROMIUM} (apt-get install -y chromium)"));
    }
    if !Path::new(CHROMEDRIVER).exists() {
        missing.push(format!(
            "{CHROMEDRIVER} (apt-get install -y chromium-driver)"
        ));
    }
    let selenium = Command::new(&python)
        .args(["-c", "import selenium"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !selenium {
        missing.push(format!(
            "selenium in {} (python3 -m venv .venv && .venv/bin/pip install selenium)",
            python.display()
        ));
    }
    if missing.is_empty() {
        Ok(python)
    } else {
        Err(format!(
            "the browser test needs {}; .ci/run installs them (run it, or the commands above)",
            missing.join(", ")
        ))
    }
}

/// The whitepaper's world (two tenants of 10 VMs, a HotAdd proxy each, a
/// shared NBD-SSL proxy) with 4 MiB disks: the console is what is tested.
fn small_world(dir: &Path) -> World {
    let mut s = Scenario::load(&root().join("mocks/scenarios/whitepaper.toml")).unwrap();
    for vm in &mut s.vms {
        for d in vm.disks.iter_mut() {
            d.size_mib = 4;
        }
    }
    World::start(WorldOptions::new(s, dir)).unwrap()
}

/// Where the screenshots go: docs/console/ when updating the docs, else a
/// directory that is removed with `tmp`.
fn screenshot_dir(tmp: &Path) -> PathBuf {
    if std::env::var("FERRY_UPDATE_DOCS").as_deref() == Ok("1") {
        root().join("docs/console")
    } else {
        tmp.join("screenshots")
    }
}

/// The script's input: the console, its accounts, each tenant's VMs.
fn script_config(world: &World, console: &SimConsole, shots: &Path) -> serde_json::Value {
    let state = world.vcenter.admin().state();
    let tenants: serde_json::Map<String, serde_json::Value> = world
        .tenants
        .iter()
        .map(|t| {
            let vms: Vec<serde_json::Value> = t
                .vms
                .iter()
                .map(|name| {
                    let vm = state
                        .vm(name)
                        .unwrap_or_else(|| panic!("{name} in the mock vCenter"));
                    serde_json::json!({ "moref": vm.moref, "name": name })
                })
                .collect();
            (t.name.clone(), serde_json::Value::Array(vms))
        })
        .collect();
    let accounts: serde_json::Map<String, serde_json::Value> = console
        .accounts
        .iter()
        .map(|a| {
            (
                a.name.clone(),
                serde_json::Value::String(a.password.clone()),
            )
        })
        .collect();
    serde_json::json!({
        "url": console.url(),
        "accounts": accounts,
        "tenants": tenants,
        "session_idle_s": SESSION_IDLE.as_secs(),
        "screenshots": shots,
    })
}

/// Run the script to its end (or `SCRIPT_TIMEOUT`); its exit status and output.
fn run_script(
    python: &Path,
    config: &Path,
    log: &Path,
) -> (Option<std::process::ExitStatus>, String) {
    let out = std::fs::File::create(log).unwrap();
    let mut child = Command::new(python)
        .arg(root().join("tests/browser/console_test.py"))
        .arg(config)
        .current_dir(root())
        // Selenium Manager must not go looking for browsers or drivers online.
        .env("SE_OFFLINE", "true")
        .env("PYTHONUNBUFFERED", "1")
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", python.display()));
    let deadline = Instant::now() + SCRIPT_TIMEOUT;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    (status, std::fs::read_to_string(log).unwrap_or_default())
}

#[test]
fn the_console_works_in_a_real_browser() {
    let python = browser_prerequisites().unwrap_or_else(|m| panic!("\n\n*** {m} ***\n"));
    let dir = tempfile::tempdir().unwrap();
    let world = small_world(&dir.path().join("world"));
    let console = SimConsole::start_with(&world, 0, SESSION_IDLE).unwrap();
    let shots = screenshot_dir(dir.path());
    let config = dir.path().join("console_test.json");
    std::fs::write(
        &config,
        serde_json::to_vec_pretty(&script_config(&world, &console, &shots)).unwrap(),
    )
    .unwrap();

    let started = Instant::now();
    let (status, output) = run_script(&python, &config, &dir.path().join("console_test.log"));
    println!(
        "---- tests/browser/console_test.py ({:.1} s) ----\n{output}",
        started.elapsed().as_secs_f64()
    );
    let status = status.unwrap_or_else(|| {
        panic!("the browser script did not finish within {SCRIPT_TIMEOUT:?}:\n{output}")
    });
    assert!(
        status.success(),
        "the browser script failed ({status}):\n{output}"
    );
}
