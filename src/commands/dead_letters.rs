//! `fly dead-letters`: the updates poll-echo, forward and serve-webhook could
//! never handle (dead) or keep failing (parked), as NDJSON on stdout;
//! `--retry ID` and `--drop ID` act on one, `--purge` forgets the dead ones.
//!
//! Without `--state`, the bot's default files are read, those that exist:
//! the pollers' and serve-webhook's (each role has its own, see
//! `fly_state::Role`). Each line says which store it comes from.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use serde_json::json;

use crate::cli::DeadLettersArgs;
use crate::commands::credentials::required_token;
use crate::exit;
use crate::output::print_line;
use fly_state::{
    BotIdentity, DeadLetter, PollState, PollStore, PollingLease, RedisStore, Role, SqliteStore,
    StateLocation,
};

/// What a retried update's record says until it is tried.
const RETRY_REASON: &str = "to be retried (fly dead-letters --retry)";

pub fn run(args: DeadLettersArgs) -> anyhow::Result<ExitCode> {
    let place = Place::open(&args)?;
    if place.stores.is_empty() {
        tracing::info!(state = %place.looked_in, "no state file yet: no dead letters");
        return Ok(exit::code(exit::SUCCESS));
    }
    if let Some(update_id) = args.retry {
        retry(&place, update_id)?;
    } else if let Some(update_id) = args.drop {
        drop_letter(&place, update_id)?;
    } else if args.purge {
        for (_, store) in &place.stores {
            let purged = store.letters().purge_dead_letters()?;
            let state = store.letters().location();
            tracing::info!(purged, %state, "dead letters purged");
        }
    } else {
        list(&place)?;
    }
    Ok(exit::code(exit::SUCCESS))
}

/// Where the dead letters are: the store given, or the bot's default files
/// that exist.
struct Place {
    /// Each with its role when it is a default file (`None`: given by
    /// `--state`), the pollers' first.
    stores: Vec<(Option<Role>, Opened)>,
    /// Without `--state`: the pollers' default file and the bot, where an
    /// update of serve-webhook's file is parked to be retried.
    pollers: Option<(PathBuf, BotIdentity)>,
    /// The files looked for, for the line that says there is none.
    looked_in: String,
}

impl Place {
    fn open(args: &DeadLettersArgs) -> anyhow::Result<Place> {
        // A bot's keys (and default files) are found from its base URL and token.
        let bot = || -> anyhow::Result<BotIdentity> {
            let token = required_token(&args.api)?;
            Ok(BotIdentity::new(&args.api.base_url, token.expose()))
        };
        let given = |store: Opened| Place {
            looked_in: store.letters().location(),
            stores: vec![(None, store)],
            pollers: None,
        };
        Ok(match args.state.clone().location() {
            StateLocation::Redis(url) => given(Opened::Redis(RedisStore::open(&url, &bot()?)?)),
            StateLocation::File(Some(path)) => {
                given(Opened::File(SqliteStore::open_existing(&path)?))
            }
            StateLocation::File(None) => {
                let identity = bot()?;
                let mut stores = Vec::new();
                let mut looked_in = Vec::new();
                for role in Role::ALL {
                    let path = identity.default_state_path(role)?;
                    looked_in.push(path.display().to_string());
                    // Looking never creates one.
                    if path.exists() {
                        let store = SqliteStore::open(&path, &identity)?;
                        stores.push((Some(role), Opened::File(store)));
                    }
                }
                let pollers = identity.default_state_path(Role::Polling)?;
                Place {
                    stores,
                    pollers: Some((pollers, identity)),
                    looked_in: looked_in.join(", "),
                }
            }
        })
    }

    /// Every store holding `update_id` (by its index), with its record;
    /// none is bad input.
    fn holding(&self, update_id: i64) -> anyhow::Result<Vec<(usize, DeadLetter)>> {
        let mut found = Vec::new();
        for (index, (_, store)) in self.stores.iter().enumerate() {
            if let Some(letter) = store
                .letters()
                .dead_letters()?
                .into_iter()
                .find(|letter| letter.update_id == Some(update_id))
            {
                found.push((index, letter));
            }
        }
        if found.is_empty() {
            return Err(exit::usage(format!(
                "no dead letter or parked update {update_id}"
            )));
        }
        Ok(found)
    }
}

/// A store this command reads or changes.
enum Opened {
    File(SqliteStore),
    Redis(RedisStore),
}

impl Opened {
    fn letters(&self) -> &dyn PollStore {
        match self {
            Opened::File(store) => store,
            Opened::Redis(store) => store,
        }
    }

    /// Takes the store from the bots before a change: a running poller keeps
    /// parked updates in memory, a running serve-webhook its handled ids, and
    /// changing them under it would be undone or, worse, half seen. Holding
    /// the file's lock (a Redis store's polling lease) says none runs; it is
    /// held until the store (or the lease returned) is dropped.
    fn hold(&self) -> anyhow::Result<Option<PollingLease>> {
        match self {
            Opened::File(store) => {
                store.claim_exclusive("changing dead letters")?;
                Ok(None)
            }
            Opened::Redis(store) => store.claim_polling(None),
        }
    }
}

/// Every dead and parked update, oldest first, each line naming its store.
fn list(place: &Place) -> anyhow::Result<()> {
    let mut letters = Vec::new();
    for (_, store) in &place.stores {
        let location = store.letters().location();
        for letter in store.letters().dead_letters()? {
            letters.push((location.clone(), letter));
        }
    }
    // Each store's are oldest first already: a stable sort merges them.
    letters.sort_by_key(|(_, letter)| letter.recorded_at);
    for (location, letter) in letters {
        // The update's bytes as a JSON string: always valid JSON, even when
        // the update holds what only Python reads (NaN, a lone surrogate).
        let line = json!({
            "update_id": letter.update_id,
            "state": if letter.parked { "parked" } else { "dead" },
            "reason": letter.reason,
            "recorded_at": letter.recorded_at,
            "raw": letter.raw,
            "store": location,
        });
        // A reader gone (`| head`) ends the listing quietly (see exit.rs).
        print_line(&line.to_string())?;
    }
    Ok(())
}

/// Parks `update_id` to be tried again, where poll-echo and forward look:
/// the store given, else the pollers' default file (made if need be). An
/// update of serve-webhook's file moves there, since serve-webhook cannot
/// try an update again by itself (the platform's redeliveries do).
fn retry(place: &Place, update_id: i64) -> anyhow::Result<()> {
    let found = place.holding(update_id)?;
    let target = place
        .stores
        .iter()
        .position(|(role, _)| *role != Some(Role::Webhook));
    let made;
    let parked_in = match target {
        Some(index) => &place.stores[index].1,
        None => {
            // Only serve-webhook's default file exists (a store given by
            // --state has no role, and is the target).
            let (path, identity) = place
                .pollers
                .as_ref()
                .context("no state store to park the update in")?;
            made = Opened::File(SqliteStore::open(path, identity)?);
            &made
        }
    };
    let moved_from: Vec<&Opened> = found
        .iter()
        .filter(|(index, _)| Some(*index) != target)
        .map(|(index, _)| &place.stores[*index].1)
        .collect();
    // Every store to change is held before any is: a refusal changes nothing.
    let _held = parked_in.hold()?;
    let _also_held = moved_from
        .iter()
        .map(|store| store.hold())
        .collect::<anyhow::Result<Vec<_>>>()?;
    let raw = &found[0].1.raw;
    parked_in.letters().park(update_id, raw, RETRY_REASON)?;
    for store in moved_from {
        store.letters().forget_dead_letter(update_id)?;
    }
    tracing::info!(
        update_id,
        state = %parked_in.letters().location(),
        "parked: poll-echo or forward tries it again when it next starts"
    );
    Ok(())
}

/// Forgets `update_id` in every store that holds it; a parked one is marked
/// handled there, never to be answered.
fn drop_letter(place: &Place, update_id: i64) -> anyhow::Result<()> {
    let found = place.holding(update_id)?;
    let _held = found
        .iter()
        .map(|(index, _)| place.stores[*index].1.hold())
        .collect::<anyhow::Result<Vec<_>>>()?;
    for (index, letter) in found {
        let store = place.stores[index].1.letters();
        if letter.parked {
            // Never answered: marked handled, so a poll cannot bring it back.
            store.mark_handled(update_id, "dropped")?;
        }
        store.forget_dead_letter(update_id)?;
        tracing::info!(update_id, state = %store.location(), "dropped");
    }
    Ok(())
}
