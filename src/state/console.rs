//! The console's records in the state database: accounts (name, argon2id
//! hash, role, tenant scope), the audit log of console actions, and a VM's
//! backup history across runs (by moref).
//!
//! Stores what it is given: hashing passwords and deciding who may do what
//! belong to `crate::console`, never here.

use super::records::{RawItem, RunItem};
use super::{now_ms, StateError, StateStore};
use rusqlite::{params, OptionalExtension};

/// A console account as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountRecord {
    /// Login name.
    pub name: String,
    /// argon2id PHC string (never the password).
    pub password_hash: String,
    /// `viewer`, `operator` or `admin`.
    pub role: String,
    /// The tenant it is confined to; `None`: the provider (every tenant).
    pub tenant: Option<String>,
    /// Unix ms.
    pub created_at: i64,
    /// Unix ms of the last change.
    pub updated_at: i64,
}

/// One audit log entry.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AuditEntry {
    /// Unix ms.
    pub at: i64,
    /// Who (`-` for an unauthenticated request, e.g. a failed login).
    pub account: String,
    /// Whose data the action touched, if a tenant's.
    pub tenant: Option<String>,
    /// What (`login`, `backup_now`, `restore`, ...).
    pub action: String,
    /// On what (VM moref, point id, account name).
    pub target: String,
    /// `ok`, `refused` or `failed`.
    pub outcome: String,
    /// Free text: the run or job started, or why it was refused.
    pub detail: String,
    /// Remote address.
    pub remote: String,
}

/// One VM's item in one run, with the run's times.
#[derive(Debug, Clone, PartialEq)]
pub struct VmHistoryEntry {
    /// The run's job.
    pub job: String,
    /// When the run started (Unix ms).
    pub started_at: i64,
    /// When the run finished (Unix ms), if it has.
    pub finished_at: Option<i64>,
    /// The VM's record in that run.
    pub item: RunItem,
}

impl StateStore {
    /// Create or replace an account.
    pub fn put_account(&self, a: &AccountRecord) -> Result<(), StateError> {
        let now = now_ms();
        self.lock()
            .execute(
                "INSERT INTO console_accounts (name, password_hash, role, tenant, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?5)
                 ON CONFLICT (name) DO UPDATE SET password_hash = excluded.password_hash,
                    role = excluded.role, tenant = excluded.tenant, updated_at = excluded.updated_at",
                params![a.name, a.password_hash, a.role, a.tenant, now],
            )
            .map_err(self.sql("writing console account"))?;
        Ok(())
    }

    /// One account.
    pub fn get_account(&self, name: &str) -> Result<Option<AccountRecord>, StateError> {
        self.lock()
            .query_row(
                "SELECT name, password_hash, role, tenant, created_at, updated_at
                 FROM console_accounts WHERE name = ?1",
                params![name],
                account_row,
            )
            .optional()
            .map_err(self.sql("reading console account"))
    }

    /// Every account, by name.
    pub fn list_accounts(&self) -> Result<Vec<AccountRecord>, StateError> {
        let c = self.lock();
        let mut st = c
            .prepare(
                "SELECT name, password_hash, role, tenant, created_at, updated_at
                 FROM console_accounts ORDER BY name",
            )
            .map_err(self.sql("listing console accounts"))?;
        let rows = st
            .query_map([], account_row)
            .map_err(self.sql("listing console accounts"))?;
        rows.collect::<Result<_, _>>()
            .map_err(self.sql("listing console accounts"))
    }

    /// Remove an account; false if there was none.
    pub fn remove_account(&self, name: &str) -> Result<bool, StateError> {
        let n = self
            .lock()
            .execute(
                "DELETE FROM console_accounts WHERE name = ?1",
                params![name],
            )
            .map_err(self.sql("removing console account"))?;
        Ok(n > 0)
    }

    /// Append to the audit log (`at` is set now).
    pub fn audit(&self, e: &AuditEntry) -> Result<(), StateError> {
        self.lock()
            .execute(
                "INSERT INTO console_audit (at, account, tenant, action, target, outcome, detail, remote)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![now_ms(), e.account, e.tenant, e.action, e.target, e.outcome, e.detail, e.remote],
            )
            .map_err(self.sql("writing audit log"))?;
        Ok(())
    }

    /// The newest audit entries, at most `limit`; only of `tenant` when given.
    pub fn list_audit(
        &self,
        tenant: Option<&str>,
        limit: u32,
    ) -> Result<Vec<AuditEntry>, StateError> {
        let c = self.lock();
        let mut st = c
            .prepare(
                "SELECT at, account, tenant, action, target, outcome, detail, remote FROM console_audit
                 WHERE (?1 IS NULL OR tenant = ?1) ORDER BY id DESC LIMIT ?2",
            )
            .map_err(self.sql("reading audit log"))?;
        let rows = st
            .query_map(params![tenant, limit.clamp(1, 10_000) as i64], |r| {
                Ok(AuditEntry {
                    at: r.get(0)?,
                    account: r.get(1)?,
                    tenant: r.get(2)?,
                    action: r.get(3)?,
                    target: r.get(4)?,
                    outcome: r.get(5)?,
                    detail: r.get(6)?,
                    remote: r.get(7)?,
                })
            })
            .map_err(self.sql("reading audit log"))?;
        rows.collect::<Result<_, _>>()
            .map_err(self.sql("reading audit log"))
    }

    /// A VM's records (by moref) in backup runs, newest first, at most `limit`.
    pub fn vm_history(&self, moref: &str, limit: u32) -> Result<Vec<VmHistoryEntry>, StateError> {
        self.history_entries(
            "i.item = ?1 AND r.kind = 'backup' ORDER BY r.started_at DESC, r.rowid DESC LIMIT ?2",
            params![moref, limit.clamp(1, 10_000) as i64],
            "reading VM history",
        )
    }

    /// Per VM moref, its newest record in a backup run (for overviews).
    pub fn latest_vm_items(&self) -> Result<Vec<VmHistoryEntry>, StateError> {
        self.history_entries(
            "r.kind = 'backup' AND i.rowid = (
                SELECT i2.rowid FROM orch_run_items i2 JOIN orch_runs r2 ON r2.id = i2.run_id
                WHERE i2.item = i.item AND r2.kind = 'backup'
                ORDER BY r2.started_at DESC, r2.rowid DESC LIMIT 1)",
            [],
            "reading latest VM results",
        )
    }

    /// Run items joined with their runs, `tail` being the WHERE clause (and
    /// its ORDER/LIMIT).
    fn history_entries(
        &self,
        tail: &str,
        args: impl rusqlite::Params,
        op: &'static str,
    ) -> Result<Vec<VmHistoryEntry>, StateError> {
        let raws: Vec<(String, i64, Option<i64>, RawItem)> = {
            let c = self.lock();
            let mut st = c
                .prepare(&format!(
                    "SELECT i.run_id, i.item, i.agent, i.agent_job_id, i.state, i.attempts, i.detail,
                            i.error, i.bytes, i.updated_at, r.job, r.started_at, r.finished_at
                     FROM orch_run_items i JOIN orch_runs r ON r.id = i.run_id WHERE {tail}"
                ))
                .map_err(self.sql(op))?;
            let rows = st
                .query_map(args, |r| {
                    Ok((r.get(10)?, r.get(11)?, r.get(12)?, RawItem::from_row(r)?))
                })
                .map_err(self.sql(op))?;
            rows.collect::<Result<_, _>>().map_err(self.sql(op))?
        };
        raws.into_iter()
            .map(|(job, started_at, finished_at, raw)| {
                Ok(VmHistoryEntry {
                    job,
                    started_at,
                    finished_at,
                    item: raw.decode(self)?,
                })
            })
            .collect()
    }

    /// Per VM moref, when its newest successful backup run started (Unix ms).
    pub fn last_vm_successes(&self) -> Result<Vec<(String, i64)>, StateError> {
        let c = self.lock();
        let mut st = c
            .prepare(
                "SELECT i.item, MAX(r.started_at) FROM orch_run_items i JOIN orch_runs r ON r.id = i.run_id
                 WHERE r.kind = 'backup' AND i.state = 'succeeded' GROUP BY i.item",
            )
            .map_err(self.sql("reading last successes"))?;
        let rows = st
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(self.sql("reading last successes"))?;
        rows.collect::<Result<_, _>>()
            .map_err(self.sql("reading last successes"))
    }
}

fn account_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<AccountRecord> {
    Ok(AccountRecord {
        name: r.get(0)?,
        password_hash: r.get(1)?,
        role: r.get(2)?,
        tenant: r.get(3)?,
        created_at: r.get(4)?,
        updated_at: r.get(5)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{ItemState, RunKind, RunState};

    fn store() -> (tempfile::TempDir, StateStore) {
        let d = tempfile::tempdir().unwrap();
        let (s, _) = StateStore::open(&d.path().join("state.db")).unwrap();
        (d, s)
    }

    fn item(run: &str, vm: &str, state: ItemState) -> RunItem {
        RunItem {
            run_id: run.into(),
            item: vm.into(),
            agent: Some("px".into()),
            agent_job_id: None,
            state,
            attempts: 1,
            detail: serde_json::json!({"vm": vm}),
            error: None,
            bytes: 5,
            updated_at: 0,
        }
    }

    #[test]
    fn accounts_round_trip_and_replace() {
        let (_d, s) = store();
        let mut a = AccountRecord {
            name: "alice".into(),
            password_hash: "$argon2id$x".into(),
            role: "operator".into(),
            tenant: Some("tenant-a".into()),
            created_at: 0,
            updated_at: 0,
        };
        s.put_account(&a).unwrap();
        let got = s.get_account("alice").unwrap().unwrap();
        assert_eq!(
            (got.role.as_str(), got.tenant.as_deref()),
            ("operator", Some("tenant-a"))
        );
        a.role = "viewer".into();
        s.put_account(&a).unwrap();
        assert_eq!(s.list_accounts().unwrap().len(), 1);
        assert_eq!(s.get_account("alice").unwrap().unwrap().role, "viewer");
        assert!(s.remove_account("alice").unwrap());
        assert!(!s.remove_account("alice").unwrap());
        assert!(s.get_account("alice").unwrap().is_none());
    }

    #[test]
    fn a_bad_role_is_refused_by_the_schema() {
        let (_d, s) = store();
        let a = AccountRecord {
            name: "x".into(),
            password_hash: "h".into(),
            role: "root".into(),
            tenant: None,
            created_at: 0,
            updated_at: 0,
        };
        assert!(s.put_account(&a).is_err());
    }

    #[test]
    fn audit_is_newest_first_and_filters_by_tenant() {
        let (_d, s) = store();
        for (i, t) in [Some("a"), None, Some("b"), Some("a")].iter().enumerate() {
            s.audit(&AuditEntry {
                at: 0,
                account: format!("u{i}"),
                tenant: t.map(str::to_string),
                action: "backup_now".into(),
                target: "vm-1".into(),
                outcome: "ok".into(),
                detail: String::new(),
                remote: "127.0.0.1".into(),
            })
            .unwrap();
        }
        let all = s.list_audit(None, 10).unwrap();
        assert_eq!(all.len(), 4);
        assert_eq!(all[0].account, "u3");
        let a = s.list_audit(Some("a"), 10).unwrap();
        assert_eq!(
            a.iter().map(|e| e.account.as_str()).collect::<Vec<_>>(),
            ["u3", "u0"]
        );
    }

    #[test]
    fn vm_history_latest_and_last_success() {
        let (_d, s) = store();
        s.start_run("r1", "j", RunKind::Backup).unwrap();
        s.put_run_item(&item("r1", "vm-1", ItemState::Succeeded))
            .unwrap();
        s.put_run_item(&item("r1", "vm-2", ItemState::Failed))
            .unwrap();
        s.finish_run("r1", RunState::Failed, &serde_json::json!({}), None)
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(3));
        s.start_run("r2", "j", RunKind::Backup).unwrap();
        s.put_run_item(&item("r2", "vm-1", ItemState::Failed))
            .unwrap();
        let h = s.vm_history("vm-1", 10).unwrap();
        assert_eq!(
            h.iter().map(|e| e.item.run_id.as_str()).collect::<Vec<_>>(),
            ["r2", "r1"]
        );
        assert!(h[1].finished_at.is_some());
        let latest = s.latest_vm_items().unwrap();
        let l1 = latest.iter().find(|e| e.item.item == "vm-1").unwrap();
        assert_eq!(
            (l1.item.run_id.as_str(), l1.item.state),
            ("r2", ItemState::Failed)
        );
        assert_eq!(latest.len(), 2);
        let ok = s.last_vm_successes().unwrap();
        assert_eq!(ok.len(), 1);
        assert_eq!(ok[0].0, "vm-1");
    }
}
