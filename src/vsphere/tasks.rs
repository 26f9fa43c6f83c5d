//! Waiting for vCenter tasks: poll `Task.info` through the property collector until
//! the task succeeds or fails, with a growing interval and an overall deadline
//! (`ClientConfig::task_timeout`). Failed tasks become typed errors
//! ([`super::error::from_task_fault`]).

use super::client::Client;
use super::error::{from_task_fault, VsphereError};
use super::types::{MoRef, TaskInfo, TaskState};
use std::time::{Duration, Instant};

impl Client {
    /// Wait for `task` to finish; its final `TaskInfo` on success. `doing` says what
    /// the task does, for errors.
    pub async fn wait_task(&self, task: &MoRef, doing: &str) -> Result<TaskInfo, VsphereError> {
        let start = Instant::now();
        let deadline = self.config().task_timeout;
        let max_poll = self.config().task_poll.max(Duration::from_millis(10));
        let mut interval = Duration::from_millis(50).min(max_poll);
        loop {
            let info = self.task_info(task, doing).await?;
            match info.state {
                TaskState::Success => return Ok(info),
                TaskState::Error => {
                    let f = info.error.unwrap_or_else(|| super::soap::Fault {
                        fault_type: "MethodFault".into(),
                        message: "task ended in error without saying why".into(),
                        detail: None,
                    });
                    return Err(from_task_fault(&f, &task.value, &self.ctx(doing)));
                }
                TaskState::Queued | TaskState::Running => {}
            }
            let waited = start.elapsed();
            if waited >= deadline {
                return Err(VsphereError::TaskTimeout {
                    vcenter: self.url().to_string(),
                    doing: doing.to_string(),
                    task: task.value.clone(),
                    waited_secs: waited.as_secs(),
                    state: format!("{:?}", info.state).to_lowercase(),
                });
            }
            tokio::time::sleep(interval.min(deadline - waited)).await;
            interval = (interval * 3 / 2).min(max_poll);
        }
    }

    /// Read `Task.info` once.
    pub async fn task_info(&self, task: &MoRef, doing: &str) -> Result<TaskInfo, VsphereError> {
        let objs = self
            .collect_objects(std::slice::from_ref(task), "Task", &["info"], doing)
            .await?;
        let info = objs
            .iter()
            .find(|o| &o.obj == task)
            .and_then(|o| o.prop("info"))
            .ok_or_else(|| self.malformed(doing, format!("no info for task {}", task.value)))?;
        TaskInfo::decode(info).map_err(|e| self.malformed(doing, e))
    }

    /// Decode the task reference a `*_Task` method returned.
    pub(super) fn task_ref(
        &self,
        resp: &super::xml::Element,
        doing: &str,
    ) -> Result<MoRef, VsphereError> {
        resp.child("returnval")
            .ok_or_else(|| self.malformed(doing, "no task returned"))
            .and_then(|r| MoRef::decode(r).map_err(|e| self.malformed(doing, e)))
    }
}
