//! Local PostgreSQL and NATS servers from the machine's own binaries, for `walstream dev` and
//! the integration tests.

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

/// A port nothing listens on right now, and never handed out before by this process: tests run
/// side by side, and the kernel may give a port back that another test was given and has not
/// bound yet (a nats-server then failed to start while a walstream's HTTP port answered its
/// clients). Picked below the kernel's ephemeral range: the servers here are killed and
/// restarted on their ports, and in between an outgoing connection may take a port from that
/// range as its own end, and keep it.
pub fn free_port() -> anyhow::Result<u16> {
    static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    let lowest = 10_000;
    let ephemeral = ephemeral_range_start().unwrap_or(32_768);
    let mut attempts = 0;
    loop {
        attempts += 1;
        let port = if ephemeral > lowest + 1_000 && attempts <= 1_000 {
            let port = fastrand::u16(lowest..ephemeral);
            if TcpListener::bind(("127.0.0.1", port)).is_err() {
                continue;
            }
            port
        } else {
            TcpListener::bind("127.0.0.1:0")?.local_addr()?.port()
        };
        let mut handed_out = HANDED_OUT
            .lock()
            .map_err(|_| anyhow::anyhow!("the port registry is poisoned"))?;
        if handed_out.insert(port) {
            return Ok(port);
        }
    }
}

/// The first port of the range the kernel picks local ports of outgoing connections from.
fn ephemeral_range_start() -> Option<u16> {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The processes whose parent is `parent`, from `/proc`: the servers a test started, or
/// PostgreSQL's backends.
pub fn child_pids(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            let ppid = *stat_fields(&stat).get(1)?;
            (ppid.parse() == Ok(parent)).then_some(pid)
        })
        .collect()
}

/// The fields of a `/proc/PID/stat` line after the command name, which is in parentheses and
/// may hold spaces: the state first, then the parent pid.
pub fn stat_fields(stat: &str) -> Vec<&str> {
    stat.rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default()
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// A PostgreSQL cluster in a directory, run as the `postgres` user when we are root (initdb
/// refuses to run as root).
#[derive(Clone)]
pub struct LocalPostgres {
    pub data_dir: PathBuf,
    pub socket_dir: PathBuf,
    pub port: u16,
    bin_dir: PathBuf,
    log_file: PathBuf,
}

impl LocalPostgres {
    /// The directory holding `initdb` and `pg_ctl`: `$WALSTREAM_PG_BIN`, the newest
    /// `/usr/lib/postgresql/*/bin`, or `pg_config --bindir`.
    pub fn find_binaries() -> anyhow::Result<PathBuf> {
        if let Ok(dir) = std::env::var("WALSTREAM_PG_BIN") {
            return Ok(PathBuf::from(dir));
        }
        let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| {
                let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
                let bin = entry.path().join("bin");
                bin.join("initdb").exists().then_some((version, bin))
            })
            .collect();
        versions.sort();
        if let Some((_, bin)) = versions.pop() {
            return Ok(bin);
        }
        let output = Command::new("pg_config").arg("--bindir").output();
        if let Some(output) = output.ok().filter(|o| o.status.success()) {
            let dir = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
            if dir.join("initdb").exists() {
                return Ok(dir);
            }
        }
        bail!(
            "no PostgreSQL server binaries found (looked in /usr/lib/postgresql/*/bin and \
             pg_config). Install them: apt-get install -y postgresql, or set WALSTREAM_PG_BIN"
        )
    }

    /// Creates the cluster (once) under `dir`, configured for logical replication on `port`.
    pub fn init(dir: &Path, port: u16) -> anyhow::Result<Self> {
        let bin_dir = Self::find_binaries()?;
        let data_dir = dir.join("pgdata");
        let socket_dir = dir.join("pgsocket");
        std::fs::create_dir_all(&socket_dir)?;
        let this = Self {
            log_file: dir.join("postgres.log"),
            data_dir,
            socket_dir,
            port,
            bin_dir,
        };
        if is_root() {
            make_traversable(dir)?;
            chown_to_postgres(dir)?;
        }
        if !this.data_dir.join("PG_VERSION").exists() {
            let initdb = this.bin_dir.join("initdb");
            let status = this
                .command(&initdb)
                .args([
                    "--auth=trust",
                    "--username=postgres",
                    "--encoding=UTF8",
                    "--locale=C",
                    "-D",
                ])
                .arg(&this.data_dir)
                .stdout(Stdio::null())
                .status()
                .with_context(|| format!("cannot run {}", initdb.display()))?;
            if !status.success() {
                bail!("initdb failed for {}", this.data_dir.display());
            }
        }
        Ok(this)
    }

    fn command(&self, program: &Path) -> Command {
        if is_root() {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(program);
            command
        } else {
            Command::new(program)
        }
    }

    /// Starts the server and waits until it accepts connections.
    pub fn start(&self) -> anyhow::Result<()> {
        let options = format!(
            "-c port={} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} \
             -c wal_level=logical -c max_wal_senders=20 -c max_replication_slots=20 \
             -c fsync=off -c wal_sender_timeout=20s -c max_connections=100",
            self.port,
            self.socket_dir.display()
        );
        let status = self
            .command(&self.bin_dir.join("pg_ctl"))
            .args(["start", "-w", "-t", "60", "-D"])
            .arg(&self.data_dir)
            .arg("-l")
            .arg(&self.log_file)
            .args(["-o", &options])
            .stdout(Stdio::null())
            .status()
            .context("cannot run pg_ctl")?;
        if !status.success() {
            bail!(
                "PostgreSQL did not start on port {}; see {}",
                self.port,
                self.log_file.display()
            );
        }
        Ok(())
    }

    /// Stops the server: `fast` (clean) or `immediate` (as a crash would).
    pub fn stop(&self, mode: &str) -> anyhow::Result<()> {
        let status = self
            .command(&self.bin_dir.join("pg_ctl"))
            .args(["stop", "-w", "-m", mode, "-D"])
            .arg(&self.data_dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .context("cannot run pg_ctl")?;
        if !status.success() {
            bail!(
                "pg_ctl stop -m {mode} failed for {}",
                self.data_dir.display()
            );
        }
        Ok(())
    }

    /// Promotes a standby of this data directory to primary, waiting until it is one.
    pub fn promote(&self) -> anyhow::Result<()> {
        let status = self
            .command(&self.bin_dir.join("pg_ctl"))
            .args(["promote", "-w", "-t", "60", "-D"])
            .arg(&self.data_dir)
            .stdout(Stdio::null())
            .status()
            .context("cannot run pg_ctl")?;
        if !status.success() {
            bail!("pg_ctl promote failed for {}", self.data_dir.display());
        }
        Ok(())
    }

    /// Stops a server of this data directory that an earlier run left behind (a
    /// `walstream dev` that was killed): pg_ctl started it detached, so it outlives its parent.
    /// Returns its pid when there was one.
    pub fn stop_leftover(&self) -> anyhow::Result<Option<u32>> {
        let Some(pid) = self.pid().filter(|pid| process_alive(*pid)) else {
            return Ok(None);
        };
        self.stop("fast")
            .with_context(|| format!("stopping the PostgreSQL left running (pid {pid})"))?;
        Ok(Some(pid))
    }

    /// The postmaster's process id while the server runs.
    pub fn pid(&self) -> Option<u32> {
        let pid_file = std::fs::read_to_string(self.data_dir.join("postmaster.pid")).ok()?;
        pid_file.lines().next()?.trim().parse().ok()
    }

    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Runs SQL through psql-free means: a short tokio-postgres session.
    pub async fn execute(&self, database: &str, sql: &str) -> anyhow::Result<()> {
        let (client, connection) =
            tokio_postgres::connect(&self.url(database), tokio_postgres::NoTls)
                .await
                .with_context(|| format!("cannot connect to {}", self.url(database)))?;
        let task = tokio::spawn(connection);
        let result = client.batch_execute(sql).await;
        drop(client);
        let _ = task.await;
        result.map_err(|e| anyhow::anyhow!("{}", crate::postgres::db_error(&e)))
    }
}

/// Lets the `postgres` user reach `dir` through its parents (temp dirs are 0700).
fn make_traversable(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mut current = Some(dir);
    while let Some(path) = current {
        if let Ok(metadata) = std::fs::metadata(path) {
            let mode = metadata.permissions().mode();
            if mode & 0o001 == 0 {
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode | 0o011))?;
            }
        }
        current = path.parent();
    }
    Ok(())
}

fn chown_to_postgres(dir: &Path) -> anyhow::Result<()> {
    let status = Command::new("chown")
        .args(["-R", "postgres:postgres"])
        .arg(dir)
        .status()
        .context("cannot run chown")?;
    if !status.success() {
        bail!(
            "cannot chown {} to the postgres user (does it exist?)",
            dir.display()
        );
    }
    Ok(())
}

/// A `nats-server -js` child process.
pub struct LocalNats {
    pub port: u16,
    pub store_dir: PathBuf,
    extra_args: Vec<String>,
    child: Option<Child>,
    log_file: PathBuf,
}

impl LocalNats {
    /// The nats-server binary: `$WALSTREAM_NATS_SERVER` or `nats-server` on the PATH.
    pub fn binary() -> anyhow::Result<PathBuf> {
        if let Ok(path) = std::env::var("WALSTREAM_NATS_SERVER") {
            return Ok(PathBuf::from(path));
        }
        for dir in std::env::var("PATH")
            .unwrap_or_default()
            .split(':')
            .chain(["/usr/sbin", "/usr/bin"])
        {
            let candidate = Path::new(dir).join("nats-server");
            if candidate.exists() {
                return Ok(candidate);
            }
        }
        bail!("nats-server not found: apt-get install -y nats-server, or set WALSTREAM_NATS_SERVER")
    }

    pub fn new(dir: &Path, port: u16, extra_args: &[&str]) -> anyhow::Result<Self> {
        Self::binary()?;
        let store_dir = dir.join("nats");
        std::fs::create_dir_all(&store_dir)?;
        Ok(Self {
            port,
            log_file: dir.join("nats.log"),
            store_dir,
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            child: None,
        })
    }

    /// Starts the server and waits until its port accepts connections. On Linux it gets
    /// SIGTERM when the thread that started it ends (with the process, for the main thread).
    pub fn start(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_file)?;
        let mut command = Command::new(Self::binary()?);
        command
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-sd",
            ])
            .arg(&self.store_dir)
            .args(&self.extra_args)
            .stdout(log.try_clone()?)
            .stderr(log);
        die_with_parent(&mut command);
        let child = command.spawn().context("cannot start nats-server")?;
        std::fs::write(self.pid_file(), child.id().to_string())?;
        self.child = Some(child);
        wait_for_port(self.port, Duration::from_secs(20)).with_context(|| {
            format!(
                "nats-server did not listen; see {}",
                self.log_file.display()
            )
        })
    }

    /// Stops a server of this store that an earlier run left behind (where the platform did
    /// not stop it with its parent). Returns its pid when there was one.
    pub fn stop_leftover(&self) -> anyhow::Result<Option<u32>> {
        let Ok(text) = std::fs::read_to_string(self.pid_file()) else {
            return Ok(None);
        };
        let Ok(pid) = text.trim().parse::<u32>() else {
            return Ok(None);
        };
        // The pid may have been reused by another program since: only a nats-server of this
        // store is ours to stop.
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let store = self.store_dir.as_os_str().as_encoded_bytes();
        if !cmdline.windows(store.len()).any(|w| w == store) {
            return Ok(None);
        }
        // SAFETY: kill(2) with a pid checked above and a valid signal number.
        unsafe {
            libc::kill(pid as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while process_alive(pid) {
            if Instant::now() > deadline {
                bail!("the nats-server left running (pid {pid}) did not stop on SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Some(pid))
    }

    fn pid_file(&self) -> PathBuf {
        self.store_dir.with_extension("pid")
    }

    /// Kills the server (SIGKILL).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The server's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

impl Drop for LocalNats {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether a process with this id exists (a zombie counts until reaped).
fn process_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Asks Linux to send the child SIGTERM when its parent thread ends, so a killed parent does
/// not leave it running; elsewhere a no-op.
fn die_with_parent(command: &mut Command) {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt as _;
        // SAFETY: prctl is async-signal-safe and touches only the child's own state.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = command;
}

/// Waits until something accepts TCP connections on `port`.
pub fn wait_for_port(port: u16, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("nothing listens on port {port} after {timeout:?}")
}
