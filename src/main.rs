//! The `walstream` command line.

use clap::{Parser, Subcommand};

// Every event allocates a few small buffers; mimalloc handles that churn with far less
// overhead than glibc's allocator (measured: benches/pipeline.rs). Built without its
// transparent huge pages: see Cargo.toml.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use std::path::PathBuf;
use std::process::ExitCode;

use walstream::commands::{backfill, check, dev, reset_lsn, run, setup, status, tail, Answer};
use walstream::config::{Config, LogFormat};

#[derive(Parser)]
#[command(
    name = "walstream",
    version,
    about = "PostgreSQL logical replication to NATS JetStream"
)]
struct Cli {
    /// Config file.
    #[arg(
        long,
        global = true,
        env = "WALSTREAM_CONFIG",
        default_value = "walstream.toml"
    )]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Stream committed changes of the watched tables to JetStream.
    Stream,
    /// Serve the GraphQL API alone; subscriptions read the JetStream stream.
    Serve,
    /// Stream and serve GraphQL in one process (the sidecar).
    Run,
    /// Create the publication and the replication slot (idempotent).
    Setup {
        /// Print the SQL for a DBA, including a least-privilege role, and execute nothing.
        #[arg(long)]
        print_sql: bool,
        /// Name of the replication role in the printed SQL.
        #[arg(long, default_value = "walstream")]
        role: String,
    },
    /// Check PostgreSQL, NATS and the checkpoint directory; non-zero exit on any failure.
    Check,
    /// Show the slot, the checkpoint, the stream and the lag.
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Print the stream sequence of the first event at or after an LSN or a commit time.
    Seek {
        /// A WAL position such as 0/16B3748.
        #[arg(long)]
        lsn: Option<String>,
        /// An RFC 3339 time such as 2026-11-22T08:00:00Z.
        #[arg(long)]
        time: Option<String>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Follow the stream and print each event as it arrives, until Ctrl-C.
    Tail {
        /// Only subjects matching this NATS pattern (`fraiseql.mutation.Order.>`).
        #[arg(long)]
        subject: Option<String>,
        /// Start at this stream sequence.
        #[arg(long, conflicts_with_all = ["since", "last"])]
        from_seq: Option<u64>,
        /// Start at the first event committed at or after this LSN (0/16B3748).
        #[arg(long, conflicts_with = "last")]
        since: Option<String>,
        /// Start with the last N messages (default: only new ones).
        #[arg(long)]
        last: Option<u64>,
        /// One JSON object a line.
        #[arg(long)]
        json: bool,
    },
    /// Deliver every event committed at or after an LSN again, at walstream's next start.
    ResetLsn {
        /// A WAL position such as 0/16B3748 (`walstream seek` and the events' `lsn` show them).
        lsn: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Emit a table's current rows as BACKFILL events, online, while streaming goes on.
    Backfill {
        /// The table (`public.tb_order`, or unqualified when unambiguous in replication.tables).
        #[arg(long)]
        table: String,
        /// Only rows matching this SQL condition (`status = 'open'`).
        #[arg(long = "where")]
        filter: Option<String>,
        /// Rows per chunk: each chunk is one short transaction.
        #[arg(long, default_value_t = 1000)]
        chunk_size: usize,
        /// Start over, even if a backfill of the table is unfinished.
        #[arg(long, conflicts_with = "cancel")]
        restart: bool,
        /// Stop an unfinished backfill of the table.
        #[arg(long)]
        cancel: bool,
    },
    /// Start a local PostgreSQL and NATS with the example schema; stream it and serve GraphQL.
    Dev {
        /// Where the local servers keep their data.
        #[arg(long, default_value = ".walstream-dev")]
        dir: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    walstream::tls::install_crypto_provider();
    // The streamer is one sequential loop and runs best on one thread; the GraphQL server
    // answers many requests at once and wants every core.
    let runtime = match cli.command {
        Command::Serve | Command::Run | Command::Dev { .. } => {
            tokio::runtime::Builder::new_multi_thread()
        }
        _ => tokio::runtime::Builder::new_current_thread(),
    }
    .enable_all()
    .build();
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(error) => {
            report(format_args!("cannot start the async runtime: {error}"));
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(execute(cli)) {
        Ok(code) => code,
        Err(error) => {
            tracing::error!("{error:#}");
            report(format_args!("{error:#}"));
            ExitCode::FAILURE
        }
    }
}

/// Prints why walstream stops. Where stderr cannot take it (a full disk behind a log file, a
/// closed pipe) the message is lost, but the exit stays the error's: `eprintln!` would panic
/// and turn it into a crash (seen when a full disk stopped the checkpoint).
fn report(message: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "walstream: {message}");
}

async fn execute(cli: Cli) -> anyhow::Result<ExitCode> {
    if let Command::Dev { dir } = &cli.command {
        init_logging(LogFormat::Human, None);
        return dev::run(dir).await.map(|()| ExitCode::SUCCESS);
    }
    let config = Config::load(&cli.config)?;
    // One-shot commands print their answer; routine connection logs would only bury it.
    let quiet = matches!(
        cli.command,
        Command::Status { .. }
            | Command::Seek { .. }
            | Command::Tail { .. }
            | Command::ResetLsn { .. }
            | Command::Backfill { .. }
    );
    let level = config.log.level.as_deref().or(quiet.then_some("warn"));
    init_logging(config.log.format, level);
    match cli.command {
        Command::Stream => {
            run::run_streamer(config, run::shutdown_on_signal()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve => {
            run::run_graphql(config, run::shutdown_on_signal()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Run => {
            run::run_all(config, run::shutdown_on_signal()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Setup { print_sql, role } => {
            if print_sql {
                setup::print_sql(&config, &role);
            } else {
                setup::run(&config).await?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Check => {
            let report = check::run(&config).await;
            report.print();
            Ok(if report.failures() == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Status { json } => {
            status::status(&config).await?.print(json)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Seek { lsn, time, json } => {
            let target = status::SeekTarget::parse(lsn.as_deref(), time.as_deref())?;
            let found = status::seek(&config, target).await?;
            found.print(json)?;
            Ok(if found.sequence.is_some() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            })
        }
        Command::Tail {
            subject,
            from_seq,
            since,
            last,
            json,
        } => {
            let start = match (from_seq, since, last) {
                (Some(sequence), _, _) => tail::Start::Sequence(sequence),
                (_, Some(lsn), _) => {
                    tail::Start::Since(walstream::lsn::parse_lsn(&lsn).map_err(anyhow::Error::msg)?)
                }
                (_, _, Some(count)) => tail::Start::Last(count),
                _ => tail::Start::New,
            };
            tail::run(&config, subject, start, json).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::ResetLsn { lsn, json } => {
            let from = walstream::lsn::parse_lsn(&lsn).map_err(anyhow::Error::msg)?;
            reset_lsn::request(&config, from).await?.print(json)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Backfill {
            table,
            filter,
            chunk_size,
            restart,
            cancel,
        } => {
            let args = backfill::BackfillArgs {
                table,
                filter,
                chunk_size,
                restart,
                cancel,
            };
            backfill::run(&config, &args).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Dev { .. } => unreachable!("handled above"),
    }
}

fn init_logging(format: LogFormat, level: Option<&str>) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level.unwrap_or("info")))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
