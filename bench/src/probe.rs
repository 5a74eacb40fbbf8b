//! What the load generator reads about the processes it measures: CPU time and
//! resident memory from `/proc`, and the server's delivery histogram from
//! `/metrics`.

use std::collections::BTreeMap;

/// CPU time (user + system) and resident set of one process.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcStat {
    /// CPU seconds used so far.
    pub cpu_seconds: f64,
    /// Resident memory, bytes.
    pub rss_bytes: u64,
}

/// Reads `/proc/<pid>` (`self` for this process).
pub fn proc_stat(pid: &str) -> anyhow::Result<ProcStat> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name may hold spaces; the fields after its ')' are fixed.
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| anyhow::anyhow!("malformed /proc/{pid}/stat"))?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 here.
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Ok(ProcStat {
        cpu_seconds: ticks / clock_ticks(),
        rss_bytes: rss_kib * 1024,
    })
}

/// Kernel clock ticks per second (`getconf CLK_TCK`; 100 on Linux).
fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// Cumulative bucket counts of one histogram (say
/// `pollcast_event_delivery_seconds`), summed over its labels, by upper bound.
#[derive(Clone, Debug, Default)]
pub struct Buckets(BTreeMap<u64, f64>);

impl Buckets {
    /// Parses histogram `name`'s buckets out of a `/metrics` scrape.
    pub fn from_scrape(text: &str, name: &str) -> Self {
        let prefix = format!("{name}_bucket{{");
        let mut buckets = BTreeMap::new();
        for line in text.lines() {
            let Some(rest) = line.strip_prefix(prefix.as_str()) else {
                continue;
            };
            let Some((labels, value)) = rest.rsplit_once("} ") else {
                continue;
            };
            let le = labels
                .split(',')
                .find_map(|l| l.strip_prefix("le=\""))
                .map(|v| v.trim_end_matches('"'));
            let bound = match le {
                Some("+Inf") => u64::MAX,
                Some(v) => v.parse::<f64>().map_or(u64::MAX, |s| (s * 1e6) as u64),
                None => continue,
            };
            *buckets.entry(bound).or_insert(0.0) += value.parse::<f64>().unwrap_or(0.0);
        }
        Buckets(buckets)
    }

    /// What was recorded between `earlier` and this scrape.
    pub fn since(&self, earlier: &Buckets) -> Buckets {
        Buckets(
            self.0
                .iter()
                .map(|(le, n)| (*le, n - earlier.0.get(le).copied().unwrap_or(0.0)))
                .collect(),
        )
    }

    /// Samples counted.
    pub fn count(&self) -> f64 {
        self.0.get(&u64::MAX).copied().unwrap_or(0.0)
    }

    /// The `q` quantile in milliseconds, interpolated inside its bucket as
    /// Prometheus's `histogram_quantile` does.
    pub fn quantile_ms(&self, q: f64) -> Option<f64> {
        let total = self.count();
        if total <= 0.0 {
            return None;
        }
        let rank = q * total;
        let (mut lower_bound, mut lower_count) = (0.0, 0.0);
        for (&le, &count) in &self.0 {
            if count >= rank {
                if le == u64::MAX {
                    return Some(lower_bound);
                }
                let upper = le as f64 / 1000.0;
                let share = (rank - lower_count) / (count - lower_count).max(f64::MIN_POSITIVE);
                return Some(lower_bound + (upper - lower_bound) * share);
            }
            lower_bound = le as f64 / 1000.0;
            lower_count = count;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_inside_the_bucket() {
        let scrape = "\
pollcast_event_delivery_seconds_bucket{event_type=\"a\",le=\"0.01\"} 50
pollcast_event_delivery_seconds_bucket{event_type=\"a\",le=\"0.1\"} 100
pollcast_event_delivery_seconds_bucket{event_type=\"a\",le=\"+Inf\"} 100
pollcast_event_delivery_seconds_bucket{event_type=\"b\",le=\"0.01\"} 0
pollcast_event_delivery_seconds_bucket{event_type=\"b\",le=\"0.1\"} 0
pollcast_event_delivery_seconds_bucket{event_type=\"b\",le=\"+Inf\"} 0
pollcast_event_publish_seconds_bucket{le=\"0.01\"} 7
pollcast_event_publish_seconds_bucket{le=\"+Inf\"} 7
";
        let buckets = Buckets::from_scrape(scrape, "pollcast_event_delivery_seconds");
        assert_eq!(buckets.count(), 100.0);
        let p50 = buckets.quantile_ms(0.5).expect("p50");
        assert!((p50 - 10.0).abs() < 1e-9, "{p50}");
        let p75 = buckets.quantile_ms(0.75).expect("p75");
        assert!((p75 - 55.0).abs() < 1e-9, "{p75}");
        assert_eq!(buckets.since(&buckets).count(), 0.0);
        let publish = Buckets::from_scrape(scrape, "pollcast_event_publish_seconds");
        assert_eq!(publish.count(), 7.0, "only the histogram asked for");
    }

    #[test]
    fn this_process_can_be_read() {
        let stat = proc_stat("self").expect("/proc/self");
        assert!(stat.rss_bytes > 0);
    }
}
