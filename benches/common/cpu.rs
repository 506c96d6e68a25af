//! CPU time of processes, read from `/proc`: the benchmarks report CPU per operation, which
//! varies far less than rates on a shared machine.

/// Fields of `/proc/PID/stat`, counted after the command name: utime and stime (14 and 15 in
/// stat(5)), then cutime and cstime (16 and 17), the children the process has reaped.
const OWN: [usize; 2] = [11, 12];
const SYSTEM: [usize; 1] = [12];
const OWN_AND_REAPED: [usize; 4] = [11, 12, 13, 14];
const REAPED: [usize; 2] = [13, 14];

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
///
/// A child reaped while its siblings are being read would be in neither the live children
/// nor the reaped time, and then, whole, in the next reading's reaped time: a walsender that
/// exits as a drain starts (the previous reader's, having decoded the same backlog) would add
/// its whole life to the drain. So the reading is taken again until no child was reaped
/// during it.
pub fn tree_cpu_seconds(root: u32) -> anyhow::Result<f64> {
    for _ in 0..100 {
        let reaped_before = seconds(root, &REAPED)?;
        let children: f64 = walstream::local::child_pids(root)
            .into_iter()
            .map(|pid| cpu_seconds(pid).unwrap_or(0.0))
            .sum();
        let own_and_reaped = seconds(root, &OWN_AND_REAPED)?;
        if seconds(root, &REAPED)? == reaped_before {
            return Ok(own_and_reaped + children);
        }
    }
    anyhow::bail!("process {root} kept reaping children while its tree's CPU was read")
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
