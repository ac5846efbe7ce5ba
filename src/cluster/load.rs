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

/// CPUs available to this process.
pub fn cpu_count() -> u32 {
    std::thread::available_parallelism().map_or(1, |n| n.get() as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_loadavg() {
        assert_eq!(parse_loadavg("0.52 0.58 0.59 1/389 12345\n"), Some([0.52, 0.58, 0.59]));
        assert_eq!(parse_loadavg("1 2\n"), None);
        assert_eq!(parse_loadavg("x y z"), None);
        assert_eq!(parse_loadavg("-1 0 0"), None);
        assert!(read_loadavg(Path::new("/proc/loadavg")).is_ok());
    }
}
