//! `GET /metrics`: the agent's Prometheus metrics, rendered with the
//! `prometheus-client` crate (the Prometheus project's Rust client) in the
//! OpenMetrics text format, which Prometheus scrapes natively.
//!
//! Values are read at scrape time (job counts and finished bytes from the state
//! database, live progress and slots from the job manager), so nothing here keeps
//! its own counters that could drift from the records.

use super::http::AppState;
use crate::state::{JobKind, JobState};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Content type of the exposition.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

type Labels = Vec<(String, String)>;

/// Render the metrics.
pub(crate) fn render(
    s: &AppState,
    counts: &[(JobState, u64)],
    finished_bytes: &[(JobKind, u64)],
) -> Result<String, std::fmt::Error> {
    let mut reg = Registry::with_prefix("ferry_agent");

    let jobs = Family::<Labels, Gauge>::default();
    for (state, n) in counts {
        jobs.get_or_create(&vec![("state".into(), state.as_str().into())])
            .set(*n as i64);
    }
    reg.register("jobs", "Jobs recorded by this agent, by state", jobs);

    let bytes = Family::<Labels, Counter>::default();
    for (kind, n) in finished_bytes {
        bytes
            .get_or_create(&vec![("kind".into(), kind.as_str().into())])
            .inc_by(n + s.jobs.live_bytes(*kind));
    }
    reg.register(
        "bytes_moved",
        "Bytes processed by jobs (finished jobs plus the progress of live ones)",
        bytes,
    );

    let running = Gauge::<i64>::default();
    running.set(s.jobs.running() as i64);
    reg.register("running_jobs", "Jobs the runner is working on now", running);

    let (total, used) = s.jobs.slots();
    let slots = Gauge::<i64>::default();
    slots.set(total as i64);
    reg.register(
        "slots",
        "Configured slots (one per disk being moved)",
        slots,
    );
    let slots_used = Gauge::<i64>::default();
    slots_used.set(used as i64);
    reg.register(
        "slots_used",
        "Slots held by queued and running jobs",
        slots_used,
    );

    let info = Family::<Labels, Gauge>::default();
    info.get_or_create(&vec![
        ("id".into(), s.settings.id.clone()),
        ("version".into(), env!("CARGO_PKG_VERSION").into()),
        ("data_path".into(), data_path_label(&s.settings.data_path)),
    ])
    .set(1);
    reg.register(
        "info",
        "Agent id, version and data path (native, vddk <version>, vddk-unavailable; value is always 1)",
        info,
    );

    let mut out = String::new();
    encode(&mut out, &reg)?;
    Ok(out)
}

/// The data path as a short label: `native`, `vddk 8.0.3`, `vddk-unavailable`.
fn data_path_label(d: &str) -> String {
    if d.starts_with("vddk unavailable") {
        "vddk-unavailable".into()
    } else if let Some(rest) = d.strip_prefix("vddk ") {
        format!("vddk {}", rest.split_whitespace().next().unwrap_or(""))
    } else {
        "native".into()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn data_path_labels_are_short() {
        assert_eq!(super::data_path_label("native"), "native");
        assert_eq!(
            super::data_path_label("vddk 8.0.3 (/opt/vddk/lib64/libvixDiskLib.so.8)"),
            "vddk 8.0.3"
        );
        assert_eq!(
            super::data_path_label("vddk unavailable: VDDK (libvixDiskLib) not found under /x"),
            "vddk-unavailable"
        );
    }
}
