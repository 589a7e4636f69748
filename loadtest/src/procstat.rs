//! CPU time a server process used, from `/proc/PID/stat`: CPU per event or
//! request is a far steadier figure than throughput on a shared machine (other
//! work steals wall time, not the server's own CPU cost per operation).

/// Linux reports utime/stime in USER_HZ ticks, 100 per second on every
/// mainstream architecture.
const TICKS_PER_SECOND: f64 = 100.0;

/// user + system CPU seconds from the text of `/proc/PID/stat`, or None if it
/// is not in that format. The command name (field 2) may hold spaces and
/// parentheses, so fields are counted after its last `)`.
pub fn cpu_seconds_of(stat: &str) -> Option<f64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state (3), ppid, pgrp, session, tty_nr, tpgid, flags,
    // minflt, cminflt, majflt, cmajflt, utime (14), stime (15).
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / TICKS_PER_SECOND)
}

/// CPU seconds process `pid` has used so far, or None if it cannot be read.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    cpu_seconds_of(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_utime_plus_stime_after_the_name() {
        let stat = "4242 (meterd (x) y) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 4 0 1000 1 1";
        assert_eq!(cpu_seconds_of(stat), Some(3.0));
        assert_eq!(cpu_seconds_of("garbage"), None);
        assert_eq!(cpu_seconds_of("1 (x) S 1 2"), None);
    }

    #[test]
    fn this_process_has_a_cpu_time() {
        assert!(cpu_seconds(std::process::id()).is_some_and(|s| s >= 0.0));
    }
}
