//! Fault injection: latency on SOAP calls, failure of the next N tasks, dropped
//! connections (before or after the call is processed). Session expiry is an
//! action on the sessions, not a standing plan. Set through the admin API or the Rust
//! handle; consumed by the server and the task runner.
//!
//! Owns the plan only; it never sleeps or closes anything itself.

use super::codec::Fault;
use super::vim;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Delay every SOAP response (optionally only for one method).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Latency {
    /// Milliseconds added before each matching response.
    pub ms: u64,
    /// Only this method (e.g. `RetrievePropertiesEx`); all when absent.
    #[serde(default)]
    pub method: Option<String>,
}

/// Make the next `count` matching tasks end in error.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailTasks {
    /// How many tasks.
    pub count: u32,
    /// Only tasks of this method (e.g. `CreateSnapshot_Task`); all when absent.
    #[serde(default)]
    pub method: Option<String>,
    /// Fault type: `SystemError` (default), `FileLocked`, `GenericVmConfigFault`,
    /// `InvalidState`, `TaskInProgress`, `NotAuthenticated`, `ToolsUnavailable`,
    /// `ApplicationQuiesceFault`, `FilesystemQuiesceFault`.
    #[serde(default)]
    pub fault: Option<String>,
    /// Message (default: says it was injected).
    #[serde(default)]
    pub message: Option<String>,
    /// Only tasks on this entity (VM name or moref id); all when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entity: Option<String>,
}

/// Drop the connection of the next `count` matching SOAP requests.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DropConnections {
    /// How many requests.
    pub count: u32,
    /// Only this method; all when absent.
    #[serde(default)]
    pub method: Option<String>,
    /// Process the request first and drop the response (the work is done but the
    /// client never hears of it, e.g. a snapshot it does not know it created).
    #[serde(default)]
    pub after: bool,
}

/// The standing fault plan.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultPlan {
    /// Response latency.
    pub latency: Option<Latency>,
    /// Extra time every task spends running, ms.
    pub task_ms: u64,
    /// Pending task failures.
    pub fail_tasks: Vec<FailTasks>,
    /// Pending dropped connections.
    pub drop_connections: Vec<DropConnections>,
}

fn matches(filter: &Option<String>, method: &str) -> bool {
    filter.as_deref().is_none_or(|m| m == method)
}

impl FaultPlan {
    /// Latency to add before answering `method`.
    pub fn latency_for(&self, method: &str) -> Duration {
        match &self.latency {
            Some(l) if matches(&l.method, method) => Duration::from_millis(l.ms),
            _ => Duration::ZERO,
        }
    }

    /// Consume one injected failure for a new task of `method` on the entity with
    /// moref id `entity_id` and name `entity_name`.
    pub fn take_task_failure(
        &mut self,
        method: &str,
        entity_id: &str,
        entity_name: &str,
    ) -> Option<Fault> {
        let i = self.fail_tasks.iter().position(|f| {
            f.count > 0
                && matches(&f.method, method)
                && f.entity
                    .as_deref()
                    .is_none_or(|e| e == entity_id || e == entity_name)
        })?;
        let f = &mut self.fail_tasks[i];
        f.count -= 1;
        let fault = vim::injected(
            f.fault.as_deref().unwrap_or("SystemError"),
            f.message
                .as_deref()
                .unwrap_or("injected task failure (mock vCenter fault injection)"),
        );
        if f.count == 0 {
            self.fail_tasks.remove(i);
        }
        Some(fault)
    }

    /// Consume one dropped connection for `method`: `Some(after)` when it applies.
    pub fn take_drop(&mut self, method: &str) -> Option<bool> {
        let i = self
            .drop_connections
            .iter()
            .position(|d| d.count > 0 && matches(&d.method, method))?;
        let d = &mut self.drop_connections[i];
        d.count -= 1;
        let after = d.after;
        if d.count == 0 {
            self.drop_connections.remove(i);
        }
        Some(after)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_by_entity_name_or_moref() {
        let mut p = FaultPlan {
            fail_tasks: vec![FailTasks {
                count: 2,
                method: None,
                fault: None,
                message: None,
                entity: Some("proxy-a".into()),
            }],
            ..Default::default()
        };
        assert!(p
            .take_task_failure("ReconfigVM_Task", "vm-9", "web")
            .is_none());
        assert!(p
            .take_task_failure("ReconfigVM_Task", "vm-3", "proxy-a")
            .is_some());
        assert!(p
            .take_task_failure("ReconfigVM_Task", "proxy-a", "x")
            .is_some());
        assert!(p.fail_tasks.is_empty());
    }

    #[test]
    fn consumes_in_order_and_filters_by_method() {
        let mut p = FaultPlan {
            fail_tasks: vec![FailTasks {
                count: 2,
                method: Some("CreateSnapshot_Task".into()),
                fault: Some("FileLocked".into()),
                message: None,
                entity: None,
            }],
            drop_connections: vec![DropConnections {
                count: 1,
                method: None,
                after: true,
            }],
            latency: Some(Latency {
                ms: 5,
                method: Some("Login".into()),
            }),
            task_ms: 0,
        };
        assert!(p
            .take_task_failure("ReconfigVM_Task", "vm-1", "web")
            .is_none());
        assert_eq!(
            p.take_task_failure("CreateSnapshot_Task", "vm-1", "web")
                .unwrap()
                .obj
                .ty,
            "FileLocked"
        );
        assert!(p
            .take_task_failure("CreateSnapshot_Task", "vm-1", "web")
            .is_some());
        assert!(p
            .take_task_failure("CreateSnapshot_Task", "vm-1", "web")
            .is_none());
        assert_eq!(p.take_drop("Fetch"), Some(true));
        assert_eq!(p.take_drop("Fetch"), None);
        assert_eq!(p.latency_for("Login"), Duration::from_millis(5));
        assert_eq!(p.latency_for("Fetch"), Duration::ZERO);
    }
}
