//! `walstream setup`: creates the publication and the slot, or prints the SQL for a DBA.

use crate::config::Config;
use crate::postgres;

/// Creates the publication and the replication slot (idempotent).
pub async fn run(config: &Config) -> anyhow::Result<()> {
    let client = postgres::connect(&config.database.url).await?;
    postgres::ensure_publication_and_slot(&client, config, true, true).await?;
    println!(
        "publication {} and slot {} are ready",
        config.replication.publication, config.replication.slot
    );
    Ok(())
}

/// Prints what `run` would do, and a least-privilege role named `role`, for a DBA.
pub fn print_sql(config: &Config, role: &str) {
    println!("-- walstream setup for slot {}", config.replication.slot);
    println!("-- Run as a superuser or the owner of the tables. Requires wal_level = logical.\n");
    for statement in postgres::setup_sql(config) {
        println!("{statement};");
    }
    println!();
    print!("{}", postgres::role_sql(config, role));
    if config.replication.failover {
        println!();
        print!("{}", postgres::failover_settings(config));
    }
}
