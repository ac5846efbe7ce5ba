//! This node's load: the load averages from `loadavg-path` (the first three
//! fields of `/proc/loadavg`) and the CPU count.

use std::io;
use std::path::Path;

/// Read the 1, 5 and 15 minute load averages.
pub fn read_loadavg(path: &Path) -> io::Result<[f64; 3]> {
    let text = std::fs::read_to_string(path)?;
    parse_loadavg(&text).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} does not start with three load averages", path.display()),
        )
    })
}

fn parse_loadavg(text: &str) -> Option<[f64; 3]> {
    let mut fields = text.split_whitespace().map(|f| f.parse::<f64>().ok().filter(|v| v.is_finite() && *v >= 0.0));
    Some([fields.next()??, fields.next()??, fields.next()??])
}

/// The load averages as fractions of total CPU (load ÷ CPUs), as the
/// status page shows them and `system-load` compares them.
pub fn per_cpu(load: [f64; 3], cpus: u32) -> [f64; 3] {
    load.map(|l| l / f64::from(cpus.max(1)))
}

/// A fraction for the status page: at most three decimals, no trailing zeros.
pub fn format_fraction(x: f64) -> String {
    let rounded = (x * 1000.0).round() / 1000.0;
    format!("{rounded}")
}

/// What a node last wrote of its load, to skip writes that tell nothing new.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoadReport {
    pub load: [f64; 3],
    pub cpus: u32,
    pub pins_recent: u64,
}

/// Smallest change of a load average per CPU worth a write (issue 12: 50
/// idle nodes wrote their unchanged load every `load-report-interval`).
pub const LOAD_REPORT_STEP: f64 = 0.05;

impl LoadReport {
    /// Whether `self` should be written, given the report written last and
    /// how long ago: when there is none, when it is older than `max_age`,
    /// when the CPUs or the recent pins changed, or when a load average per
    /// CPU moved by [`LOAD_REPORT_STEP`] or more.
    pub fn worth_writing(
        &self,
        last: Option<&LoadReport>,
        age: std::time::Duration,
        max_age: std::time::Duration,
    ) -> bool {
        let Some(last) = last else { return true };
        if age >= max_age || self.cpus != last.cpus || self.pins_recent != last.pins_recent {
            return true;
        }
        let (now, then) = (per_cpu(self.load, self.cpus), per_cpu(last.load, last.cpus));
        now.iter().zip(then).any(|(a, b)| (a - b).abs() >= LOAD_REPORT_STEP)
    }
}

/// CPUs available to this process.
pub fn cpu_count() -> u32 {
    std::thread::available_parallelism().map_or(1, |n| n.get() as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_load_report_is_written_only_when_it_says_something_new() {
        use std::time::Duration;
        let max = Duration::from_secs(300);
        let last = LoadReport { load: [1.0, 1.0, 1.0], cpus: 4, pins_recent: 3 };
        let now = |load: [f64; 3], cpus, pins_recent| LoadReport { load, cpus, pins_recent };
        let young = Duration::from_secs(5);
        assert!(last.worth_writing(None, young, max), "the first report");
        assert!(!now([1.1, 1.0, 1.0], 4, 3).worth_writing(Some(&last), young, max), "0.025 per CPU: noise");
        assert!(now([1.3, 1.0, 1.0], 4, 3).worth_writing(Some(&last), young, max), "0.075 per CPU");
        assert!(now([1.0, 1.0, 0.7], 4, 3).worth_writing(Some(&last), young, max), "any of the three");
        assert!(now([1.0, 1.0, 1.0], 2, 3).worth_writing(Some(&last), young, max), "CPUs changed");
        assert!(now([1.0, 1.0, 1.0], 4, 4).worth_writing(Some(&last), young, max), "pins changed");
        assert!(last.worth_writing(Some(&last), max, max), "unchanged but old");
        assert!(!last.worth_writing(Some(&last), young, max));
    }

    #[test]
    fn parses_proc_loadavg() {
        assert_eq!(parse_loadavg("0.52 0.58 0.59 1/389 12345\n"), Some([0.52, 0.58, 0.59]));
        assert_eq!(parse_loadavg("1 2\n"), None);
        assert_eq!(parse_loadavg("x y z"), None);
        assert_eq!(parse_loadavg("-1 0 0"), None);
        assert!(read_loadavg(Path::new("/proc/loadavg")).is_ok());
    }

    #[test]
    fn load_is_shown_as_a_fraction_of_total_cpu() {
        assert_eq!(per_cpu([2.0, 1.0, 0.5], 4), [0.5, 0.25, 0.125]);
        assert_eq!(per_cpu([1.0, 0.0, 0.0], 0), [1.0, 0.0, 0.0], "a node that reports no CPUs counts one");
        let shown: Vec<String> = per_cpu([0.52, 0.58, 0.0034], 2).into_iter().map(format_fraction).collect();
        assert_eq!(shown, ["0.26", "0.29", "0.002"]);
        assert_eq!(format_fraction(0.0), "0");
        assert_eq!(format_fraction(1.5), "1.5");
    }
}
