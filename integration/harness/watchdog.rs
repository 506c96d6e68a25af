//! Turns a hung test into a failure within minutes: CI has one time budget for everything, and
//! a test that never returns would spend all of it and say nothing about where it stuck.

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use walstream::local::LocalPostgres;

/// How long one test may run unless it asks for more (`Cluster::allow`), or
/// `WALSTREAM_TEST_TIMEOUT_SECS`.
const DEFAULT_LIMIT: Duration = Duration::from_secs(600);

/// Armed while a test's cluster lives; dropping it disarms it.
pub struct Watchdog {
    extend: mpsc::Sender<Duration>,
}

impl Watchdog {
    /// After the limit, the watchdog prints the test's name and the tails of its logs, stops its
    /// servers and walstream processes, and exits the test binary with a failure.
    pub fn arm(postgres: LocalPostgres, logs: Vec<PathBuf>) -> Self {
        let test = std::thread::current().name().unwrap_or("a test").to_owned();
        let limit = std::env::var("WALSTREAM_TEST_TIMEOUT_SECS")
            .ok()
            .and_then(|secs| secs.parse().ok())
            .map_or(DEFAULT_LIMIT, Duration::from_secs);
        let (extend, extensions) = mpsc::channel();
        std::thread::spawn(move || {
            let started = Instant::now();
            let mut limit = limit;
            loop {
                let left = limit.saturating_sub(started.elapsed());
                match extensions.recv_timeout(left) {
                    Ok(longer) => limit = limit.max(longer),
                    Err(RecvTimeoutError::Disconnected) => return,
                    Err(RecvTimeoutError::Timeout) => fire(&test, limit, &postgres, &logs),
                }
            }
        });
        Self { extend }
    }

    /// Lets a test that is long by design (a soak) run for `limit` in all.
    pub fn allow(&self, limit: Duration) {
        let _ = self.extend.send(limit);
    }
}

fn fire(test: &str, limit: Duration, postgres: &LocalPostgres, logs: &[PathBuf]) -> ! {
    // Straight to the file descriptor: the test harness captures `eprintln!` of a test's
    // threads and would never show it, as the process exits here.
    let mut report = format!(
        "\nWATCHDOG: {test} still runs after {limit:?}; stopping it and this test binary \
         (WALSTREAM_TEST_TIMEOUT_SECS raises the limit)\n"
    );
    for log in logs {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = &lines[lines.len().saturating_sub(40)..];
        report.push_str(&format!("--- last lines of {}\n", log.display()));
        for line in tail {
            report.push_str(line);
            report.push('\n');
        }
    }
    let _ = std::io::stderr().lock().write_all(report.as_bytes());
    kill_child_processes();
    let _ = postgres.stop("immediate");
    std::process::exit(101);
}

/// walstream and nats-server are this process's children; they would outlive it.
fn kill_child_processes() {
    for pid in walstream::local::child_pids(std::process::id()) {
        // SAFETY: kill(2) on a child process of ours with a valid signal number.
        unsafe {
            libc::kill(pid as i32, libc::SIGKILL);
        }
    }
}
