//! Task objects: what a `*_Task` method returns and clients poll through
//! `Task.info` (queued → running → success | error, result, error fault).
//!
//! Owns the task table and the `TaskInfo` shape; running the work is the handlers'
//! job (they report progress here).

use super::codec::{Fault, MoRef, Obj, Val};
use super::ids;
use std::collections::BTreeMap;

/// Tasks kept after completion (older completed tasks are forgotten first).
pub const KEEP_TASKS: usize = 2000;

/// `TaskInfoState`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    /// Waiting to run.
    Queued,
    /// Running.
    Running,
    /// Done.
    Success,
    /// Failed.
    Error,
}

impl TaskState {
    fn as_str(self) -> &'static str {
        match self {
            TaskState::Queued => "queued",
            TaskState::Running => "running",
            TaskState::Success => "success",
            TaskState::Error => "error",
        }
    }
}

/// One task.
#[derive(Clone, Debug)]
pub struct TaskRec {
    /// Moref id (`task-N`).
    pub id: String,
    /// Method that created it.
    pub method: String,
    /// `descriptionId`.
    pub description_id: String,
    /// The entity it works on.
    pub entity: MoRef,
    /// Its name.
    pub entity_name: String,
    /// Who started it.
    pub user: String,
    /// State.
    pub state: TaskState,
    /// Result on success.
    pub result: Option<Val>,
    /// Fault on error.
    pub error: Option<Fault>,
    /// Timestamps.
    pub queue_time: String,
    /// Start time.
    pub start_time: Option<String>,
    /// Completion time.
    pub complete_time: Option<String>,
    /// Event chain id.
    pub chain: i32,
}

impl TaskRec {
    /// `TaskInfo` as vSphere returns it.
    pub fn info(&self) -> Obj {
        Obj::new("TaskInfo")
            .f("key", Val::s(&self.id))
            .f("task", Val::r("Task", &self.id))
            .f("descriptionId", Val::s(&self.description_id))
            .f("entity", Val::Ref(self.entity.clone()))
            .f("entityName", Val::s(&self.entity_name))
            .f(
                "state",
                Val::Enum("TaskInfoState", self.state.as_str().into()),
            )
            .f("cancelled", Val::Bool(false))
            .f("cancelable", Val::Bool(false))
            .opt("error", self.error.as_ref().map(Fault::localized))
            .opt("result", self.result.clone().map(|v| Val::Any(Box::new(v))))
            .opt(
                "progress",
                (self.state == TaskState::Running).then_some(Val::Int(50)),
            )
            .f(
                "reason",
                Val::Obj(Obj::new("TaskReasonUser").f("userName", Val::s(&self.user))),
            )
            .f("queueTime", Val::Time(self.queue_time.clone()))
            .opt("startTime", self.start_time.clone().map(Val::Time))
            .opt("completeTime", self.complete_time.clone().map(Val::Time))
            .f("eventChainId", Val::Int(self.chain))
    }
}

/// The task table.
#[derive(Debug, Default)]
pub struct Tasks {
    map: BTreeMap<u64, TaskRec>,
    next_chain: i32,
}

fn num(id: &str) -> Option<u64> {
    id.strip_prefix("task-")?.parse().ok()
}

impl Tasks {
    /// Register a queued task with moref id `id` (from the inventory's id generator).
    pub fn create(
        &mut self,
        id: String,
        method: &str,
        entity: MoRef,
        entity_name: &str,
        user: &str,
    ) -> MoRef {
        self.next_chain += 1;
        let description_id = match method {
            "CreateSnapshot_Task" => "VirtualMachine.createSnapshot",
            "RemoveSnapshot_Task" => "vm.Snapshot.remove",
            "ReconfigVM_Task" => "VirtualMachine.reconfigure",
            other => other,
        };
        let rec = TaskRec {
            id: id.clone(),
            method: method.into(),
            description_id: description_id.into(),
            entity,
            entity_name: entity_name.into(),
            user: user.into(),
            state: TaskState::Queued,
            result: None,
            error: None,
            queue_time: ids::now(),
            start_time: None,
            complete_time: None,
            chain: self.next_chain,
        };
        if let Some(n) = num(&id) {
            self.map.insert(n, rec);
        }
        self.prune();
        MoRef::new("Task", id)
    }

    fn prune(&mut self) {
        while self.map.len() > KEEP_TASKS {
            let old = self
                .map
                .iter()
                .find(|(_, t)| matches!(t.state, TaskState::Success | TaskState::Error))
                .map(|(k, _)| *k);
            match old {
                Some(k) => {
                    self.map.remove(&k);
                }
                None => break,
            }
        }
    }

    /// Mark running.
    pub fn start(&mut self, id: &str) {
        if let Some(t) = num(id).and_then(|n| self.map.get_mut(&n)) {
            t.state = TaskState::Running;
            t.start_time = Some(ids::now());
        }
    }

    /// Record the outcome.
    pub fn finish(&mut self, id: &str, outcome: Result<Option<Val>, Fault>) {
        if let Some(t) = num(id).and_then(|n| self.map.get_mut(&n)) {
            if t.start_time.is_none() {
                t.start_time = Some(ids::now());
            }
            t.complete_time = Some(ids::now());
            match outcome {
                Ok(r) => {
                    t.state = TaskState::Success;
                    t.result = r;
                }
                Err(f) => {
                    t.state = TaskState::Error;
                    t.error = Some(f);
                }
            }
        }
    }

    /// A task by moref id.
    pub fn get(&self, id: &str) -> Option<&TaskRec> {
        num(id).and_then(|n| self.map.get(&n))
    }

    /// All tasks, oldest first.
    pub fn all(&self) -> impl Iterator<Item = &TaskRec> {
        self.map.values()
    }
}
