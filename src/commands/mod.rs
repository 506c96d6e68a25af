//! The `walstream` commands, one module each; `main.rs` parses the command line and calls them.

pub mod backfill;
pub mod check;
pub mod dev;
pub mod reset_lsn;
pub mod run;
pub mod setup;
pub mod status;
pub mod tail;

/// What a one-shot command answers: text for a person, or JSON for a script (`--json`).
pub trait Answer: serde::Serialize {
    fn print_text(&self);

    fn print(&self, json: bool) -> anyhow::Result<()> {
        if json {
            println!("{}", serde_json::to_string_pretty(self)?);
        } else {
            self.print_text();
        }
        Ok(())
    }
}
