//! `ferry-sim night`: one backup night over a generated world, measured from
//! the outside. Starts the [`crate::world`] on [`crate::scale::scenario`] (the
//! whitepaper's provider with `n` small VMs), selects every VM (encrypted ones
//! by their tenant's key provider, plain ones added to their tenant's job),
//! writes the `[dispatch]` caps into the orchestrator's configuration, runs
//! every job once (concurrently, as a night's schedule would) and reports:
//! wall time, jobs per second, busy answers (`429`), the most backups running
//! at once per host and datastore, and the share of time agents sat idle while
//! work for them was queued.
//!
//! The idle share is computed from the agents' own job records (accepted at,
//! finished at, slots = disks) and each run's first dispatch (when its queue
//! surely exists; before, it reads the inventory): for each agent, the time
//! during which some VM that eventually went to it was still queued (the run
//! had started, the agent had not accepted it yet) **and** the agent had a free
//! slot, over the time during which some VM for it was queued. Waits imposed by
//! the snapshot caps count as idle too: they are the price of the caps.
//! "A free slot" means as many free slots as the smallest waiting VM needs.
//! `FERRY_NIGHT_TRACE=1` prints every agent job's times (ms after the start).
//!
//! Owns the night's steps and its report. Must not: reach into ferry's
//! internals — everything goes through the orchestrator, the agents' HTTP API
//! and the mocks' admin API.

use crate::scale;
use crate::world::{World, WorldOptions};
use anyhow::Context;
use ferry::orchestrator::client::AgentApi;
use ferry::state::ItemState;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

/// Night parameters.
#[derive(Clone, Debug)]
pub struct NightOptions {
    /// Generated VMs.
    pub vms: usize,
    /// Scenario seed.
    pub seed: u64,
    /// Slots of each agent.
    pub agent_slots: u32,
    /// The orchestrator's `poll_interval` (and the agents' vCenter task poll).
    pub poll: Duration,
    /// `[dispatch] max_snapshots_per_host` (0: no cap).
    pub max_snapshots_per_host: u32,
    /// `[dispatch] max_snapshots_per_datastore` (0: no cap).
    pub max_snapshots_per_datastore: u32,
    /// Pipeline workers per job.
    pub workers: usize,
}

impl Default for NightOptions {
    fn default() -> Self {
        NightOptions {
            vms: 200,
            seed: 7,
            agent_slots: 4,
            poll: Duration::from_millis(50),
            max_snapshots_per_host: 4,
            max_snapshots_per_datastore: 4,
            workers: 1,
        }
    }
}

/// One agent's night.
#[derive(Clone, Debug, Serialize)]
pub struct AgentNight {
    /// Agent id.
    pub agent: String,
    /// Its slots.
    pub slots: u32,
    /// VMs it backed up (or tried to).
    pub jobs: usize,
    /// Seconds during which work for it was queued.
    pub queued_seconds: f64,
    /// Of those, seconds during which it had a free slot.
    pub idle_while_queued_seconds: f64,
    /// Seconds with at least one of its jobs running.
    pub busy_seconds: f64,
}

/// What the night did.
#[derive(Clone, Debug, Serialize)]
pub struct NightReport {
    /// Generated VMs.
    pub vms: usize,
    /// Disks over all VMs.
    pub disks: usize,
    /// Tenants (one job each).
    pub tenants: usize,
    /// Seed.
    pub seed: u64,
    /// Slots over all agents.
    pub slots: u32,
    /// `poll_interval`, ms.
    pub poll_ms: u64,
    /// The caps.
    pub max_snapshots_per_host: u32,
    /// The caps.
    pub max_snapshots_per_datastore: u32,
    /// Wall-clock seconds of the runs (first dispatch round to the last VM's end).
    pub wall_seconds: f64,
    /// Agent jobs per second over the wall time.
    pub jobs_per_second: f64,
    /// VMs backed up.
    pub succeeded: usize,
    /// VMs not backed up (with their errors in `failures`).
    pub failed: usize,
    /// First few failures, `vm: error`.
    pub failures: Vec<String>,
    /// Busy answers (`429`) the orchestrator got.
    pub busy_answers: u64,
    /// VMs held back by a cap, per host/datastore, summed over rounds.
    pub cap_waits: BTreeMap<String, u64>,
    /// Most VMs with a backup running at once per host (the orchestrator's count).
    pub peak_per_host: BTreeMap<String, u32>,
    /// Most VMs with a backup running at once per datastore.
    pub peak_per_datastore: BTreeMap<String, u32>,
    /// Over all agents: idle-while-queued seconds over queued seconds.
    pub idle_share: f64,
    /// Per agent.
    pub agents: Vec<AgentNight>,
}

/// `2026-12-07T23:11:51.429Z` → ms since the epoch.
fn parse_ms(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 20 {
        return None;
    }
    let num = |a: usize, n: usize| -> Option<i64> { s.get(a..a + n)?.parse().ok() };
    let month = time::Month::try_from(num(5, 2)? as u8).ok()?;
    let date = time::Date::from_calendar_date(num(0, 4)? as i32, month, num(8, 2)? as u8).ok()?;
    let ms = if b.get(19) == Some(&b'.') {
        num(20, 3)?
    } else {
        0
    };
    let t = time::Time::from_hms_milli(
        num(11, 2)? as u8,
        num(14, 2)? as u8,
        num(17, 2)? as u8,
        ms as u16,
    )
    .ok()?;
    let dt = time::PrimitiveDateTime::new(date, t).assume_utc();
    Some((dt.unix_timestamp_nanos() / 1_000_000) as i64)
}

/// One VM's life on its agent: queued from `queued` to `accepted`, then
/// holding `slots` until `finished`.
struct Life {
    queued: i64,
    accepted: i64,
    finished: i64,
    slots: u32,
}

/// Per agent: (queued ms, idle-while-queued ms, busy ms) over `lives`. Idle
/// while queued: some VM for the agent waits and the agent has at least as
/// many free slots as the smallest waiting VM needs.
fn idle_while_queued(lives: &[Life], slots: u32) -> (i64, i64, i64) {
    // Events at a time: (time, queued slots +/-, used slots +/-).
    let mut ev: Vec<(i64, i32, i32)> = Vec::new();
    for l in lives {
        let n = l.slots as i32;
        ev.push((l.queued, n, 0));
        ev.push((l.accepted, -n, n));
        ev.push((l.finished.max(l.accepted), 0, -n));
    }
    ev.sort_by_key(|e| e.0);
    // Waiting VMs by the slots they need.
    let mut queued: BTreeMap<i32, u32> = BTreeMap::new();
    let mut used = 0i32;
    let (mut q_ms, mut idle_ms, mut busy_ms) = (0i64, 0i64, 0i64);
    let mut last = ev.first().map(|e| e.0).unwrap_or(0);
    for (t, dq, du) in ev {
        let dt = t - last;
        if let Some(smallest) = queued.keys().next() {
            q_ms += dt;
            if slots as i32 - used >= *smallest {
                idle_ms += dt;
            }
        }
        if used > 0 {
            busy_ms += dt;
        }
        if dq > 0 {
            *queued.entry(dq).or_default() += 1;
        } else if dq < 0 {
            if let Some(c) = queued.get_mut(&-dq) {
                *c -= 1;
                if *c == 0 {
                    queued.remove(&-dq);
                }
            }
        }
        used += du;
        last = t;
    }
    (q_ms, idle_ms, busy_ms)
}

/// Run the night in `dir`; `say` gets progress lines.
pub fn run(dir: &Path, o: &NightOptions, say: &mut dyn FnMut(&str)) -> anyhow::Result<NightReport> {
    let scenario = scale::scenario(o.vms, o.seed);
    let disks: usize = scenario.vms.iter().map(|v| v.disks.len()).sum();
    let mut opts = WorldOptions::new(scenario.clone(), dir);
    opts.agent_slots = o.agent_slots;
    opts.poll = o.poll;
    opts.workers = Some(o.workers);
    say(&format!(
        "starting the world: {} VMs ({disks} disks), {} proxies with {} slots each",
        o.vms,
        scenario.proxies.len(),
        o.agent_slots
    ));
    let world = World::start(opts).context("starting the world")?;
    scale::select_plain_vms(&world, &scenario).context("selecting the plain VMs")?;
    let mut cfg = std::fs::read_to_string(&world.orchestrator_config)?;
    cfg.push_str(&format!(
        "\n[dispatch]\nmax_snapshots_per_host = {}\nmax_snapshots_per_datastore = {}\n",
        o.max_snapshots_per_host, o.max_snapshots_per_datastore
    ));
    std::fs::write(&world.orchestrator_config, cfg)?;
    let orch = world.orchestrator().context("opening the orchestrator")?;
    let tenants = orch.config().jobs.len();
    say(&format!("backing up every VM: {tenants} jobs at once"));
    let t0_ms = ferry::state::now_ms();
    let t0 = Instant::now();
    let runs = world
        .runtime()
        .block_on(orch.run_once(&[], false))
        .context("the night's runs")?;
    let wall = t0.elapsed();
    say(&format!(
        "runs finished in {:.1}s; reading the agents' job records",
        wall.as_secs_f64()
    ));
    let clients: BTreeMap<String, ferry::orchestrator::client::HttpAgent> = world
        .agents
        .iter()
        .map(|a| Ok((a.id.clone(), world.agent_client(&a.id)?)))
        .collect::<Result<_, crate::world::WorldError>>()?;
    let mut lives: BTreeMap<String, Vec<Life>> = BTreeMap::new();
    let (mut succeeded, mut failed, mut jobs) = (0, 0, 0usize);
    let mut failures = Vec::new();
    for r in &runs {
        // A run's VMs are queued once it has read the inventory: from its
        // first dispatch on at the latest (earlier, the run was reading it).
        let mut run_lives: Vec<(String, Life)> = Vec::new();
        for it in &r.items {
            if it.state == ItemState::Succeeded {
                succeeded += 1;
            } else {
                failed += 1;
                if failures.len() < 10 {
                    failures.push(format!(
                        "{}: {}",
                        it.detail["vm"].as_str().unwrap_or(&it.item),
                        it.error.as_deref().unwrap_or("-")
                    ));
                }
            }
            let (Some(agent), Some(job)) = (&it.agent, &it.agent_job_id) else {
                continue;
            };
            let Some(c) = clients.get(agent) else {
                continue;
            };
            let j = world
                .runtime()
                .block_on(c.job(job))
                .with_context(|| format!("job {job} on {agent}"))?;
            jobs += 1;
            let accepted = parse_ms(&j.created_at).unwrap_or(t0_ms);
            let finished = j
                .finished_at
                .as_deref()
                .and_then(parse_ms)
                .unwrap_or(accepted);
            run_lives.push((
                agent.clone(),
                Life {
                    queued: t0_ms,
                    accepted,
                    finished,
                    slots: j.disks.len().max(1) as u32,
                },
            ));
        }
        let first = run_lives.iter().map(|(_, l)| l.accepted).min();
        for (agent, mut l) in run_lives {
            l.queued = first.unwrap_or(l.queued).max(t0_ms);
            lives.entry(agent).or_default().push(l);
        }
    }
    if std::env::var_os("FERRY_NIGHT_TRACE").is_some() {
        for (a, ls) in &lives {
            let mut v: Vec<&Life> = ls.iter().collect();
            v.sort_by_key(|l| l.accepted);
            for l in v {
                eprintln!(
                    "{a} queued {} accepted {} finished {} slots {}",
                    l.queued - t0_ms,
                    l.accepted - t0_ms,
                    l.finished - t0_ms,
                    l.slots
                );
            }
        }
    }
    let mut agents = Vec::new();
    let (mut q_all, mut idle_all) = (0i64, 0i64);
    for a in &world.agents {
        let l = lives.remove(&a.id).unwrap_or_default();
        let (q, idle, busy) = idle_while_queued(&l, o.agent_slots);
        q_all += q;
        idle_all += idle;
        agents.push(AgentNight {
            agent: a.id.clone(),
            slots: o.agent_slots,
            jobs: l.len(),
            queued_seconds: q as f64 / 1000.0,
            idle_while_queued_seconds: idle as f64 / 1000.0,
            busy_seconds: busy as f64 / 1000.0,
        });
    }
    let stats = orch.dispatch_stats();
    Ok(NightReport {
        vms: o.vms,
        disks,
        tenants,
        seed: o.seed,
        slots: o.agent_slots * world.agents.len() as u32,
        poll_ms: o.poll.as_millis() as u64,
        max_snapshots_per_host: o.max_snapshots_per_host,
        max_snapshots_per_datastore: o.max_snapshots_per_datastore,
        wall_seconds: wall.as_secs_f64(),
        jobs_per_second: jobs as f64 / wall.as_secs_f64().max(1e-9),
        succeeded,
        failed,
        failures,
        busy_answers: stats.busy_answers,
        cap_waits: stats.cap_waits,
        peak_per_host: stats.peak_per_host,
        peak_per_datastore: stats.peak_per_datastore,
        idle_share: if q_all > 0 {
            idle_all as f64 / q_all as f64
        } else {
            0.0
        },
        agents,
    })
}

/// The report as text.
pub fn render(r: &NightReport) -> String {
    let mut s = format!(
        "night over {} VMs ({} disks), {} tenants, {} slots, poll {} ms, caps {}/host {}/datastore (seed {})\n",
        r.vms,
        r.disks,
        r.tenants,
        r.slots,
        r.poll_ms,
        r.max_snapshots_per_host,
        r.max_snapshots_per_datastore,
        r.seed
    );
    s.push_str(&format!(
        "wall {:.1} s, {:.2} jobs/s, {} succeeded, {} failed, {} busy answers (429)\n",
        r.wall_seconds, r.jobs_per_second, r.succeeded, r.failed, r.busy_answers
    ));
    s.push_str(&format!(
        "agents idle while work for them was queued: {:.1}% of the queued time\n",
        r.idle_share * 100.0
    ));
    for a in &r.agents {
        s.push_str(&format!(
            "  {:<14} {:>2} slots {:>5} jobs  queued {:>7.1} s  idle while queued {:>6.1} s  busy {:>7.1} s\n",
            a.agent,
            a.slots,
            a.jobs,
            a.queued_seconds,
            a.idle_while_queued_seconds,
            a.busy_seconds
        ));
    }
    s.push_str(&format!(
        "peak backups at once per host: {:?}\npeak per datastore: {:?}\ncap waits: {:?}\n",
        r.peak_per_host, r.peak_per_datastore, r.cap_waits
    ));
    for f in &r.failures {
        s.push_str(&format!("  failed: {f}\n"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_parse_and_idle_is_counted_only_while_work_waits_with_a_free_slot() {
        assert_eq!(parse_ms("1970-01-01T00:00:01.250Z"), Some(1250));
        assert_eq!(parse_ms("1970-01-02T00:00:00Z"), Some(86_400_000));
        assert_eq!(parse_ms("nonsense"), None);
        // 1 slot; A queued 0..0 runs 0..10; B queued 0..12 runs 12..20.
        let lives = [
            Life {
                queued: 0,
                accepted: 0,
                finished: 10,
                slots: 1,
            },
            Life {
                queued: 0,
                accepted: 12,
                finished: 20,
                slots: 1,
            },
        ];
        // Queued 0..12; the slot was free (A done) 10..12: 2 ms idle.
        assert_eq!(idle_while_queued(&lives, 1), (12, 2, 18));
        // With 2 slots B could have run at once: idle 0..12.
        assert_eq!(idle_while_queued(&lives, 2), (12, 12, 18));
        // A 2-slot VM waiting on a 2-slot agent with one slot taken is not
        // idle time: it cannot start there.
        let lives = [
            Life {
                queued: 0,
                accepted: 0,
                finished: 10,
                slots: 1,
            },
            Life {
                queued: 0,
                accepted: 10,
                finished: 20,
                slots: 2,
            },
        ];
        assert_eq!(idle_while_queued(&lives, 2), (10, 0, 20));
    }
}
