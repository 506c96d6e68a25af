//! CPU time of processes, read from `/proc`: the benchmarks report CPU per operation, which
//! varies far less than rates on a shared machine.

/// Fields of `/proc/PID/stat`, counted after the command name: utime and stime (14 and 15 in
/// stat(5)), then cutime and cstime (16 and 17), the children the process has reaped.
const OWN: [usize; 2] = [11, 12];
const SYSTEM: [usize; 1] = [12];
const OWN_AND_REAPED: [usize; 4] = [11, 12, 13, 14];

/// User plus system CPU seconds a process has used so far.
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    seconds(pid, &OWN)
}

/// System CPU seconds a process has used so far: the time the kernel worked for it.
pub fn system_seconds(pid: u32) -> anyhow::Result<f64> {
    seconds(pid, &SYSTEM)
}

/// The machine's CPU ticks so far, all cores: busy, and idle (idle and iowait in
/// `/proc/stat`; guest time is inside user time there, so it is not added again).
pub fn machine_ticks() -> anyhow::Result<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat
        .lines()
        .next()
        .filter(|line| line.starts_with("cpu "))
        .ok_or_else(|| anyhow::anyhow!("/proc/stat does not start with the cpu line"))?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let [user, nice, system, idle, iowait, irq, softirq, steal] = ticks[..] else {
        anyhow::bail!("/proc/stat's cpu line has fewer than 8 fields");
    };
    Ok((user + nice + system + irq + softirq + steal, idle + iowait))
}

/// CPU seconds of a process and its children, live and exited: PostgreSQL's postmaster and
/// backends.
pub fn tree_cpu_seconds(root: u32) -> anyhow::Result<f64> {
    let mut total = seconds(root, &OWN_AND_REAPED)?;
    for pid in walstream::local::child_pids(root) {
        total += cpu_seconds(pid).unwrap_or(0.0);
    }
    Ok(total)
}

/// The sum of `fields` of the process's stat line, in seconds (the kernel counts USER_HZ, 100
/// on Linux).
fn seconds(pid: u32, fields: &[usize]) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let values = walstream::local::stat_fields(&stat);
    let mut ticks = 0.0;
    for &field in fields {
        let value: f64 = values
            .get(field)
            .ok_or_else(|| anyhow::anyhow!("short /proc/{pid}/stat"))?
            .parse()?;
        ticks += value;
    }
    Ok(ticks / 100.0)
}

/// The kernel's autogroup scheduling (`kernel.sched_autogroup_enabled`), on by default in
/// Debian's kernels: CPU time is shared between sessions, and every PostgreSQL backend calls
/// setsid(), so each backend is a session of its own. With the cores saturated, a woken
/// backend then waits up to hundreds of milliseconds for a core while holding or awaiting a
/// lock the others need (BENCHMARKS.md, "The createOrder tail"). None where the kernel has no
/// such setting.
pub fn autogroup_scheduling() -> Option<bool> {
    let setting = std::fs::read_to_string("/proc/sys/kernel/sched_autogroup_enabled").ok()?;
    Some(setting.trim() != "0")
}

/// A line saying how the kernel shares the cores, for the start of a report.
pub fn describe_scheduling() -> String {
    match autogroup_scheduling() {
        Some(true) => "kernel.sched_autogroup_enabled = 1: every PostgreSQL backend is a \
                       scheduling group of its own; with the cores saturated, expect stalls of \
                       100+ ms in every server's tail (with `sysctl kernel.sched_autogroup_enabled=0` \
                       they were gone from this bench's runs; BENCHMARKS.md)"
            .to_owned(),
        Some(false) => "kernel.sched_autogroup_enabled = 0: the cores are shared by thread, \
                        not by session"
            .to_owned(),
        None => "this kernel has no autogroup scheduling".to_owned(),
    }
}
