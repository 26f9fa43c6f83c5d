//! Output for humans and scripts: tables, summaries, JSON, progress bars, errors.

use ferry::progress::Progress;
use ferry::repo::gc::PruneReport;
use ferry::repo::verify::VerifyReport;
use serde::Serialize;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Where results and errors go.
pub struct Output {
    json: bool,
    bars: bool,
}

impl Output {
    pub fn new(json: bool, bars: bool) -> Self {
        Output {
            json,
            bars: bars && std::io::stderr().is_terminal(),
        }
    }

    /// Print a result: JSON on stdout, or the human text.
    pub fn result<T: Serialize + ?Sized>(&self, v: &T, human: impl FnOnce() -> String) {
        if self.json {
            println!(
                "{}",
                serde_json::to_string_pretty(v)
                    .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
            );
        } else {
            println!("{}", human());
        }
    }

    /// Print an error with its causes.
    pub fn error(&self, e: &anyhow::Error, code: u8) {
        let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
        if self.json {
            println!(
                "{}",
                serde_json::json!({"error": chain.first(), "causes": &chain[1..], "exit_code": code})
            );
        } else {
            eprintln!("error: {}", chain.join("\n  caused by: "));
        }
    }

    /// A progress bar on stderr while the returned guard lives (no-op without a TTY).
    pub fn progress_bar(&self, p: Arc<Progress>, what: &str) -> Option<BarGuard> {
        if !self.bars {
            return None;
        }
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(&format!(
                "{what} [{{bar:30}}] {{bytes}}/{{total_bytes}} {{binary_bytes_per_sec}} ETA {{eta}}"
            ))
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        let b2 = bar.clone();
        let h = std::thread::spawn(move || {
            while !s2.load(Ordering::Relaxed) {
                let snap = p.snapshot();
                b2.set_length(snap.total);
                b2.set_position(snap.done);
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
            b2.finish_and_clear();
        });
        Some(BarGuard {
            stop,
            handle: Some(h),
        })
    }
}

/// Stops the progress bar on drop.
pub struct BarGuard {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}
impl Drop for BarGuard {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

pub fn human_bytes(b: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < units.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", units[i])
    }
}

pub fn generate_pem(dir: &Path, name: &str, bits: usize) -> anyhow::Result<(PathBuf, PathBuf)> {
    Ok(ferry::keys::generate_pem_pair(dir, name, bits)?)
}

pub fn backup_summary(r: &ferry::job::BackupReport) -> String {
    let mut s = format!(
        "restore point {} created in {:.1}s{}\n",
        r.point_id,
        r.seconds,
        r.parent
            .as_ref()
            .map(|p| format!(" (deduplicated against {p})"))
            .unwrap_or_default()
    );
    s.push_str(&format!(
        "{:<5} {:>10} {:>10} {:>8} {:>8} {:>8} {:>10} {:>10}  transport\n",
        "disk", "size", "read", "chunks", "new", "zero", "stored", "rate"
    ));
    for d in &r.disks {
        s.push_str(&format!(
            "{:<5} {:>10} {:>10} {:>8} {:>8} {:>8} {:>10} {:>8}/s  {}\n",
            d.disk,
            human_bytes(d.size),
            human_bytes(d.bytes_read),
            d.chunks_total,
            d.chunks_new,
            d.chunks_zero,
            human_bytes(d.bytes_new_stored),
            human_bytes((d.size as f64 / r.seconds.max(1e-6)) as u64),
            d.transport
        ));
    }
    s.trim_end().to_string()
}

pub fn points_table(rows: &[serde_json::Value]) -> String {
    if rows.is_empty() {
        return "no restore points".into();
    }
    let mut s = format!(
        "{:<30} {:<31} {:<20} {:<13} {:>5} {:>10}  {:<11}  key\n",
        "point", "created", "name", "vm", "disks", "size", "consistency"
    );
    for r in rows {
        let id = r["point_id"].as_str().unwrap_or("");
        if let Some(e) = r.get("error") {
            s.push_str(&format!("{id:<30} DAMAGED: {}\n", e.as_str().unwrap_or("")));
            continue;
        }
        let disks = r["disks"].as_array().map(|d| d.len()).unwrap_or(0);
        let size: u64 = r["disks"]
            .as_array()
            .map(|d| d.iter().filter_map(|x| x["size"].as_u64()).sum())
            .unwrap_or(0);
        // Image backups (and points from before it was recorded) have no snapshot.
        let consistency = r["snapshot"]["consistency"].as_str().unwrap_or("-");
        // The VM's instance UUID, shortened: two VMs that shared a name differ here.
        let vm: String = r["identity"]
            .as_str()
            .and_then(|i| i.rsplit('/').next())
            .map(|u| u.chars().take(13).collect())
            .unwrap_or_else(|| "-".into());
        s.push_str(&format!(
            "{id:<30} {:<31} {:<20} {vm:<13} {disks:>5} {:>10}  {consistency:<11}  {} {}{}\n",
            r["created"].as_str().unwrap_or(""),
            r["name"].as_str().unwrap_or(""),
            human_bytes(size),
            r["key"]["source"].as_str().unwrap_or(""),
            r["key"]["key_id"].as_str().unwrap_or(""),
            // Key-loss protection: the provider's recovery key opens it too.
            if r["recovery_key"].is_object() {
                " + recovery key"
            } else {
                ""
            }
        ));
    }
    s.trim_end().to_string()
}

pub fn verify_summary(r: &VerifyReport) -> String {
    let mut s = String::new();
    if let Some(k) = &r.keyring {
        s.push_str(&format!("DAMAGED keyring: {}: {}\n", k.file, k.error));
    }
    for p in &r.points {
        s.push_str(&format!(
            "{} {:<26} {}\n",
            if p.ok {
                "ok     "
            } else if p.key_unavailable {
                "NO KEY "
            } else {
                "DAMAGED"
            },
            p.point_id,
            p.source.as_deref().unwrap_or("?")
        ));
        for pr in &p.problems {
            s.push_str(&format!(
                "        {}: {}\n",
                if pr.file.is_empty() { "-" } else { &pr.file },
                pr.error
            ));
        }
    }
    s.push_str(&format!(
        "{} points, {} unique chunks read, {} damaged chunks: {}",
        r.points.len(),
        r.chunks_checked,
        r.chunks_damaged,
        if r.ok() {
            "repository OK"
        } else if r.damaged() {
            "DAMAGE FOUND"
        } else {
            "some points could not be checked: key unavailable"
        }
    ));
    for p in &r.repair_problems {
        s.push_str(&format!(
            "\nrepair: {}{}",
            if p.file.is_empty() {
                String::new()
            } else {
                format!("{}: ", p.file)
            },
            p.error
        ));
    }
    if !r.chunks_quarantined.is_empty() {
        s.push_str(&format!(
            "\nrepair: {} damaged or missing chunks moved to damaged/; the next backup of the same data stores them again, which mends the points above",
            r.chunks_quarantined.len()
        ));
    }
    s
}

pub fn prune_summary(r: &PruneReport) -> String {
    let mut s = String::new();
    for (name, ds) in &r.decisions {
        s.push_str(&format!("{name}:\n"));
        for d in ds {
            s.push_str(&format!(
                "  {} {}  {}\n",
                if d.keep { "keep  " } else { "remove" },
                d.point_id,
                d.reasons.join(", ")
            ));
        }
    }
    s.push_str(&format!(
        "{}{} points removed, {} chunks ({}) {}, {} chunks kept",
        if r.dry_run { "dry run: " } else { "" },
        r.points_removed.len(),
        r.chunks_deleted,
        human_bytes(r.bytes_freed),
        if r.dry_run { "would be freed" } else { "freed" },
        r.chunks_kept
    ));
    match (r.keyring_keys_dropped, &r.keyring_note) {
        (Some(n), _) => s.push_str(&format!(
            "\nkeyring: {n} data key(s) no point references {}",
            if r.dry_run {
                "would be dropped"
            } else {
                "dropped"
            }
        )),
        (None, Some(note)) => s.push_str(&format!("\n{note}")),
        (None, None) => {}
    }
    s
}

pub fn bench_summary(v: &serde_json::Value) -> String {
    let mut s = format!(
        "chunk size {}\n{:<36} {:<15} {:>8} {:>8}\n",
        human_bytes(v["chunk_size"].as_u64().unwrap_or(0)),
        "stage (one core)",
        "data",
        "MiB/s",
        "stored"
    );
    for st in v["stages"].as_array().into_iter().flatten() {
        let stored = match st["stored_ratio"].as_f64() {
            Some(r) => format!("{:.1}%", r * 100.0),
            None => String::new(),
        };
        s.push_str(&format!(
            "{:<36} {:<15} {:>8.0} {stored:>8}\n",
            st["stage"].as_str().unwrap_or(""),
            st["data"].as_str().unwrap_or(""),
            st["mib_per_sec"].as_f64().unwrap_or(0.0)
        ));
    }
    for e in v["end_to_end"].as_array().into_iter().flatten() {
        s.push_str(&format!(
            "end to end on {} ({}) with {}: backup {:.0} MiB/s ({:.1}s), restore {:.0} MiB/s ({:.1}s), stored {}\n",
            e["image"].as_str().unwrap_or(""),
            human_bytes(e["size"].as_u64().unwrap_or(0)),
            e["compression"].as_str().unwrap_or(""),
            e["backup_mib_s"].as_f64().unwrap_or(0.0),
            e["backup_seconds"].as_f64().unwrap_or(0.0),
            e["restore_mib_s"].as_f64().unwrap_or(0.0),
            e["restore_seconds"].as_f64().unwrap_or(0.0),
            human_bytes(e["stored_bytes"].as_u64().unwrap_or(0))
        ));
    }
    s.trim_end().to_string()
}

pub fn keycheck_summary(r: &ferry::repo::keycheck::KeyCheckReport) -> String {
    use ferry::repo::keycheck::PointKeyStatus as S;
    use ferry::repo::KeyPath;
    let mut s = format!(
        "keyring: {}\nkey-loss protection: {}\n{:<30} {:<16} {:<8} {:<18} {:<6} {:<18} {:<9} opens with\n",
        if r.keyring_opens {
            "opens with the configured keys (it holds every data key)".to_string()
        } else {
            format!("not usable ({})", r.keyring_error.as_deref().unwrap_or("?"))
        },
        match &r.recovery {
            Some(k) => format!(
                "on for new points (recovery key {})",
                k.fingerprint.chars().take(16).collect::<String>()
            ),
            None => "off: the provider cannot open new points without the tenant's key".into(),
        },
        "point",
        "name",
        "source",
        "key id",
        "ver",
        "fingerprint",
        "recovery"
    );
    for p in &r.points {
        let (src, kid, ver, fp) = match &p.key {
            Some(k) => (
                k.source.clone(),
                k.key_id.clone(),
                k.key_version.to_string(),
                k.fingerprint.chars().take(16).collect::<String>(),
            ),
            None => ("?".into(), "?".into(), "?".into(), "?".into()),
        };
        let st = match &p.status {
            S::Opens => p
                .opens_with
                .iter()
                .map(|v| match v {
                    KeyPath::OwnKey => "own key",
                    KeyPath::Keyring => "keyring",
                    KeyPath::RecoveryKey => "recovery key",
                })
                .collect::<Vec<_>>()
                .join(", "),
            S::KeyMissing { .. } => "KEY MISSING".to_string(),
            S::Damaged { why } => format!("DAMAGED: {why}"),
        };
        let rec = if p.recovery_key.is_some() {
            "yes"
        } else {
            "no"
        };
        s.push_str(&format!(
            "{:<30} {:<16} {src:<8} {kid:<18} {ver:<6} {fp:<18} {rec:<9} {st}\n",
            p.point_id,
            p.source.as_deref().unwrap_or("?")
        ));
    }
    let missing = r.missing_keys();
    let opening = r.points.iter().filter(|p| p.status == S::Opens).count();
    if missing.is_empty() {
        s.push_str(&format!(
            "{} with the available keys ({} through their own key, {} through the keyring, {} through the recovery key); no key to obtain",
            if opening == r.points.len() {
                "every restore point opens".to_string()
            } else {
                format!("{opening} of {} restore point(s) open", r.points.len())
            },
            r.count(KeyPath::OwnKey),
            r.count(KeyPath::Keyring),
            r.count(KeyPath::RecoveryKey)
        ));
    } else {
        s.push_str("keys to obtain, for the points no available key opens (export them from the KMS, then pass --extra-private-key):\n");
        for m in missing {
            s.push_str(&format!(
                "  {}\n    needed by {} point(s): {}\n",
                m.key,
                m.points.len(),
                m.points.join(", ")
            ));
            if let Some(rk) = &m.or_recovery_key {
                s.push_str(&format!(
                    "    or the provider's recovery key {} (--recovery-private-key): these points were made under key-loss protection\n",
                    rk.fingerprint.chars().take(16).collect::<String>()
                ));
            }
        }
    }
    s.trim_end().to_string()
}
