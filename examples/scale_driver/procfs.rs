//! What the processes cost, from `/proc`: CPU ticks, resident memory, the
//! children of a process (PostgreSQL's backends), and the machine's load.

use std::fs;

/// CPU time and memory of one process at one moment.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcSample {
    /// user + system, in clock ticks.
    pub ticks: u64,
    pub rss_kb: u64,
    /// Peak resident memory so far.
    pub hwm_kb: u64,
    pub threads: u64,
}

/// Sample `pid`; `None` if it is gone.
pub fn sample(pid: u32) -> Option<ProcSample> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Some(ProcSample {
        ticks: stat_ticks(&stat)?,
        rss_kb: field("VmRSS:"),
        hwm_kb: field("VmHWM:"),
        threads: field("Threads:"),
    })
}

/// utime + stime of a `/proc/PID/stat` line (fields 14 and 15; the command
/// name in parentheses may contain spaces).
fn stat_ticks(stat: &str) -> Option<u64> {
    let after = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // `after` starts at field 3 (state).
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

fn parent_of(pid: u32) -> Option<u32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 2..];
    after.split_whitespace().nth(1)?.parse().ok()
}

/// `pid` and its direct children (PostgreSQL: the postmaster and its backends).
pub fn with_children(pid: u32) -> Vec<u32> {
    let mut all = vec![pid];
    if let Ok(dir) = fs::read_dir("/proc") {
        for e in dir.flatten() {
            if let Some(child) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok())
                && parent_of(child) == Some(pid)
            {
                all.push(child);
            }
        }
    }
    all
}

/// Total ticks of these processes (those gone count 0).
pub fn ticks_of(pids: &[u32]) -> u64 {
    pids.iter().filter_map(|p| sample(*p)).map(|s| s.ticks).sum()
}

/// Busy ticks of the whole machine (all cores): user + nice + system + irq + softirq + steal.
pub fn machine_busy_ticks() -> u64 {
    let stat = fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(cpu) = stat.lines().find(|l| l.starts_with("cpu ")) else { return 0 };
    let f: Vec<u64> = cpu.split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
    [0, 1, 2, 5, 6, 7].iter().filter_map(|i| f.get(*i)).sum()
}

/// The first three fields of `/proc/loadavg`.
pub fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg").unwrap_or_default().split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

pub fn cpu_count() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ticks_past_a_command_with_spaces() {
        let line = "42 (a b) S 1 42 42 0 -1 4194560 100 0 0 0 7 3 0 0 20 0 1 0 5 0 0";
        assert_eq!(stat_ticks(line), Some(10));
        assert!(sample(std::process::id()).is_some_and(|s| s.rss_kb > 0 && s.threads >= 1));
    }
}
