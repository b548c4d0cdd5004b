//! `fly dead-letters`: the updates poll-echo, forward and serve-webhook could
//! never handle (dead) or keep failing (parked), as NDJSON on stdout;
//! `--retry ID` and `--drop ID` act on one, `--purge` forgets the dead ones.

use std::process::ExitCode;

use serde_json::json;

use crate::cli::DeadLettersArgs;
use crate::commands::credentials::required_token;
use crate::exit;
use crate::output::print_line;
use fly_state::{BotIdentity, PollStore, RedisStore, SqliteStore, StateLocation};

pub fn run(args: DeadLettersArgs) -> anyhow::Result<ExitCode> {
    let store: Box<dyn PollStore> = match args.state.location() {
        // A bot's keys are found from its base URL and token.
        StateLocation::Redis(url) => {
            let token = required_token(&args.api)?;
            let identity = BotIdentity::new(&args.api.base_url, token.expose());
            Box::new(RedisStore::open(&url, &identity)?)
        }
        StateLocation::File(Some(path)) => Box::new(SqliteStore::open_existing(&path)?),
        StateLocation::File(None) => {
            // The bot's default state file; looking never creates it.
            let token = required_token(&args.api)?;
            let identity = BotIdentity::new(&args.api.base_url, token.expose());
            let path = identity.default_state_path()?;
            if !path.exists() {
                tracing::info!(state = %path.display(), "no state file yet: no dead letters");
                return Ok(exit::code(exit::SUCCESS));
            }
            Box::new(SqliteStore::open(&path, &identity)?)
        }
    };
    if let Some(update_id) = args.retry.or(args.drop) {
        // A running poller keeps parked updates in memory: changing them
        // under it would be undone or, worse, half seen. Holding the
        // polling lease (the file's lock) says none runs.
        let _no_poller = store.claim_polling(None)?;
        let letter = store
            .dead_letters()?
            .into_iter()
            .find(|letter| letter.update_id == Some(update_id))
            .ok_or_else(|| {
                crate::exit::usage(format!("no dead letter or parked update {update_id}"))
            })?;
        if args.retry.is_some() {
            store.park(
                update_id,
                &letter.raw,
                "to be retried (fly dead-letters --retry)",
            )?;
            tracing::info!(
                update_id,
                "parked: poll-echo or forward tries it again when it next starts"
            );
        } else {
            if letter.parked {
                // Never answered: marked handled, so a poll cannot bring it back.
                store.mark_handled(update_id, "dropped")?;
            }
            store.forget_dead_letter(update_id)?;
            tracing::info!(update_id, "dropped");
        }
        return Ok(exit::code(exit::SUCCESS));
    }
    if args.purge {
        let purged = store.purge_dead_letters()?;
        tracing::info!(purged, state = %store.location(), "dead letters purged");
        return Ok(exit::code(exit::SUCCESS));
    }
    for letter in store.dead_letters()? {
        // The update's bytes as a JSON string: always valid JSON, even when
        // the update holds what only Python reads (NaN, a lone surrogate).
        let line = json!({
            "update_id": letter.update_id,
            "state": if letter.parked { "parked" } else { "dead" },
            "reason": letter.reason,
            "recorded_at": letter.recorded_at,
            "raw": letter.raw,
        });
        // A reader gone (`| head`) ends the listing quietly (see exit.rs).
        print_line(&line.to_string())?;
    }
    Ok(exit::code(exit::SUCCESS))
}
