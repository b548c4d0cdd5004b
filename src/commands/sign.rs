//! `fly sign`: turns an update into a signed update (v1), for fixtures and for
//! testing a webhook receiver.

use std::process::ExitCode;

use crate::cli::SignArgs;
use crate::commands::credentials::{offline_token, signing_secret};
use crate::commands::input::{read_input, unix_time_now};
use crate::exit::{self, usage_because};
use crate::output::print_line;
use fly_base::random;
use fly_signature::sign_update_text;

pub fn run(args: SignArgs) -> anyhow::Result<ExitCode> {
    let secret = signing_secret(
        &args.secret,
        || offline_token(args.token_file.as_deref()),
        "fly sign",
    )?
    .value;
    let update = read_input(&args.input)?;
    let timestamp = unix_time_now(args.now);
    let nonce = args.nonce.unwrap_or_else(|| random::hex_id(16));
    let signed = sign_update_text(&update, &secret, &args.bot_id, timestamp, &nonce)
        .map_err(|error| usage_because("cannot sign this update", error))?;
    print_line(&signed)?;
    Ok(exit::code(exit::SUCCESS))
}
