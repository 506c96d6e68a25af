//! CPU time of processes, read from `/proc`: the benchmarks report CPU per operation, which
//! varies far less than rates on a shared machine.

/// User plus system CPU seconds a process has used so far.
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let fields = stat_fields(&stat);
    let ticks = |i: usize| -> anyhow::Result<f64> {
        Ok(fields
            .get(i)
            .ok_or_else(|| anyhow::anyhow!("short /proc/{pid}/stat"))?
            .parse()?)
    };
    // utime and stime are fields 14 and 15 of stat(5), 11 and 12 after the name; the kernel
    // counts them in USER_HZ, 100 on Linux.
    Ok((ticks(11)? + ticks(12)?) / 100.0)
}

/// CPU seconds of a process and its live children: PostgreSQL's postmaster and backends.
pub fn tree_cpu_seconds(root: u32) -> anyhow::Result<f64> {
    let mut total = cpu_seconds(root)?;
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // The parent pid is the second field after the command name.
        if stat_fields(&stat).get(1) == Some(&root.to_string().as_str()) {
            total += cpu_seconds(pid).unwrap_or(0.0);
        }
    }
    Ok(total)
}

/// The fields of a `/proc/PID/stat` line after the command name, which may hold spaces.
fn stat_fields(stat: &str) -> Vec<&str> {
    stat.rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default()
}
