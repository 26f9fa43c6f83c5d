//! Retention policy: which restore points to keep. Pure: takes point ids and
//! creation times, returns decisions with reasons. No file access.

use serde::{Deserialize, Serialize};
use std::collections::HashSet;

/// Keep rules (a point is kept if any rule keeps it).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// Keep the newest N points.
    pub keep_last: Option<u32>,
    /// Keep the newest point of each of the last N days (UTC) that have points.
    pub keep_daily: Option<u32>,
    /// Keep the newest point of each of the last N ISO weeks that have points.
    pub keep_weekly: Option<u32>,
    /// Keep the newest point of each of the last N months that have points.
    pub keep_monthly: Option<u32>,
}

impl Policy {
    /// True when no rule is set (such a policy would delete everything; refused).
    pub fn is_empty(&self) -> bool {
        self.keep_last.is_none()
            && self.keep_daily.is_none()
            && self.keep_weekly.is_none()
            && self.keep_monthly.is_none()
    }
}

/// One point's fate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Decision {
    /// Point id.
    pub point_id: String,
    /// Kept?
    pub keep: bool,
    /// Rules that keep it (empty when removed).
    pub reasons: Vec<String>,
}

/// Decide for the points of one chain (`(id, created_unix)`), in any order.
pub fn apply(policy: &Policy, points: &[(String, i64)]) -> Vec<Decision> {
    let mut sorted: Vec<&(String, i64)> = points.iter().collect();
    sorted.sort_by(|a, b| b.1.cmp(&a.1).then(b.0.cmp(&a.0))); // newest first
    let mut reasons: Vec<Vec<String>> = vec![Vec::new(); sorted.len()];
    if let Some(n) = policy.keep_last {
        for (i, r) in reasons.iter_mut().enumerate().take(n as usize) {
            r.push(format!("last {}", i + 1));
        }
    }
    let mut bucketed = |n: Option<u32>, name: &str, key: &dyn Fn(i64) -> String| {
        let Some(n) = n else { return };
        let mut seen = HashSet::new();
        for (i, p) in sorted.iter().enumerate() {
            let k = key(p.1);
            if seen.len() >= n as usize && !seen.contains(&k) {
                break;
            }
            if seen.insert(k.clone()) {
                reasons[i].push(format!("{name} {k}"));
            }
        }
    };
    let date = |t: i64| {
        time::OffsetDateTime::from_unix_timestamp(t).unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
    };
    bucketed(policy.keep_daily, "daily", &|t| date(t).date().to_string());
    bucketed(policy.keep_weekly, "weekly", &|t| {
        let (y, w, _) = date(t).date().to_iso_week_date();
        format!("{y}-W{w:02}")
    });
    bucketed(policy.keep_monthly, "monthly", &|t| {
        let d = date(t).date();
        format!("{}-{:02}", d.year(), d.month() as u8)
    });
    sorted
        .iter()
        .zip(reasons)
        .map(|(p, r)| Decision {
            point_id: p.0.clone(),
            keep: !r.is_empty(),
            reasons: r,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    const DAY: i64 = 86_400;

    fn pts(times: &[i64]) -> Vec<(String, i64)> {
        times
            .iter()
            .enumerate()
            .map(|(i, t)| (format!("p{i:02}"), *t))
            .collect()
    }
    fn kept(d: &[Decision]) -> Vec<String> {
        let mut v: Vec<String> = d
            .iter()
            .filter(|d| d.keep)
            .map(|d| d.point_id.clone())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn keep_last() {
        let p = pts(&(0..10).map(|i| i * 100).collect::<Vec<_>>());
        let d = apply(
            &Policy {
                keep_last: Some(3),
                ..Default::default()
            },
            &p,
        );
        assert_eq!(kept(&d), vec!["p07", "p08", "p09"]);
    }

    #[test]
    fn keep_daily_takes_newest_per_day() {
        // two points per day over 5 days
        let base = 1_700_000_000 - 1_700_000_000 % DAY;
        let times: Vec<i64> = (0..5)
            .flat_map(|d| [base + d * DAY + 10, base + d * DAY + 20])
            .collect();
        let d = apply(
            &Policy {
                keep_daily: Some(3),
                ..Default::default()
            },
            &pts(&times),
        );
        assert_eq!(kept(&d), vec!["p05", "p07", "p09"]);
    }

    #[test]
    fn keep_weekly_and_monthly_union_with_last() {
        let base = 1_700_000_000;
        let times: Vec<i64> = (0..60).map(|d| base + d * DAY).collect();
        let d = apply(
            &Policy {
                keep_last: Some(1),
                keep_weekly: Some(2),
                keep_monthly: Some(2),
                ..Default::default()
            },
            &pts(&times),
        );
        let k = kept(&d);
        assert!(k.contains(&"p59".to_string()));
        assert!(k.len() >= 3 && k.len() <= 5, "{k:?}");
        assert!(d.iter().filter(|d| d.keep).all(|d| !d.reasons.is_empty()));
    }

    #[test]
    fn empty_policy_is_detected() {
        assert!(Policy::default().is_empty());
    }
}
