//! The examples' bot: text is echoed back (`echo: {text}`, `echo_{update_id}`);
//! with a media directory, media messages are downloaded through batch_access
//! and forwarded back (`fwd_{update_id}`), as the media round-trip example does.

use std::path::PathBuf;

use super::{HandleError, Handler, Outcome, send_reply_step};
use crate::api::media::{MediaUrl, is_media_type};
use crate::api::{ApiClient, Chat, Message, SendRequest, Update};
use crate::download::{DownloadError, Durability, download, safe_file_name, save_atomically};
use crate::observe::{Step, Steps};
use crate::retry::RetryPolicy;
use crate::shutdown::Shutdown;
use indicatif::ProgressBar;

/// Lifetime asked for the access URLs; the download starts right away.
const ACCESS_URL_SECONDS: u64 = 600;

pub struct EchoHandler {
    pub client: ApiClient,
    /// Where media messages are saved; `None` echoes them like any message.
    pub media_dir: Option<PathBuf>,
}

impl Handler for EchoHandler {
    fn is_instant(&self, update: &Update) -> bool {
        update.kind != "message"
    }

    fn handle(&self, update: &Update, steps: &mut Steps) -> Result<Outcome, HandleError> {
        if update.kind != "message" {
            // Callbacks and other kinds: the examples' bot answers only messages.
            return Ok(Outcome::Ignored);
        }
        let Some((message, chat)) = update
            .message
            .as_ref()
            .and_then(|message| Some((message, message.chat.as_ref()?)))
        else {
            return Err(HandleError::DeadLetter(
                "a message without a chat (type and id) to reply to".into(),
            ));
        };
        if let Some(dir) = &self.media_dir
            && is_media_type(&message.msg_type)
        {
            return self.media_round_trip(update.update_id, message, chat, dir, steps);
        }
        // As the example: any message gets an echo, non-text ones an empty one.
        let mut echo = b"echo: ".to_vec();
        echo.extend_from_slice(update.text().unwrap_or_default());
        let reply = SendRequest::text(
            chat.reply_target(),
            echo,
            steps.client_msg_id("echo", update.update_id),
        );
        send_reply_step(&self.client, &reply, steps, Outcome::Replied)
    }
}

impl EchoHandler {
    /// Exchange every media URL in one batch_access call, download each file
    /// that got an access URL, then forward the message back unchanged.
    fn media_round_trip(
        &self,
        update_id: i64,
        message: &Message,
        chat: &Chat,
        dir: &std::path::Path,
        steps: &mut Steps,
    ) -> Result<Outcome, HandleError> {
        let saved = steps.time(Step::Media, || self.fetch_media(update_id, message, dir))?;
        if saved == 0 {
            return Ok(Outcome::Ignored);
        }
        let forward = SendRequest::new(
            chat.reply_target(),
            message.msg_type.clone(),
            message.data.clone(),
            steps.client_msg_id("fwd", update_id),
        );
        send_reply_step(&self.client, &forward, steps, Outcome::Forwarded)
    }

    /// Saves the media of `message` into `dir`: how many files were saved.
    fn fetch_media(
        &self,
        update_id: i64,
        message: &Message,
        dir: &std::path::Path,
    ) -> Result<usize, HandleError> {
        let urls = &message.media;
        if urls.is_empty() {
            tracing::warn!(update_id, "media message without media URLs; not forwarded");
            return Ok(0);
        }
        let wanted: Vec<String> = urls.iter().map(|media| media.url.clone()).collect();
        let access = match self.client.batch_access(&wanted, ACCESS_URL_SECONDS) {
            Ok(access) => access,
            Err(error) => return HandleError::from_api(error).map(|_| 0),
        };
        let mut saved = 0;
        for media in urls {
            let Some(access_url) = access.get(&media.url) else {
                tracing::warn!(update_id, url = %media.url, "the platform returned no access URL");
                continue;
            };
            let destination = dir.join(media_file_name(update_id, media));
            save_atomically(&destination, true, Durability::Synced, |file| {
                let progress = ProgressBar::hidden();
                Ok(download(
                    self.client.agent(),
                    access_url,
                    file,
                    RetryPolicy::ONE_SHOT,
                    &progress,
                    // A stop lets the update in hand finish, its media included.
                    &Shutdown::new(),
                )?)
            })
            .map_err(|error| {
                let gone = matches!(
                    error.downcast_ref::<DownloadError>(),
                    Some(DownloadError::Gone(_))
                );
                let error = error.context(format!("downloading {}", media.url));
                if gone {
                    HandleError::Park(error)
                } else {
                    HandleError::Retry(error)
                }
            })?;
            tracing::debug!(update_id, path = %destination.display(), "saved media");
            saved += 1;
        }
        if saved == 0 {
            // As the example: nothing to forward. Retrying would not change
            // the platform's answer, so the update must not block the chat.
            tracing::warn!(update_id, "no media could be fetched; not forwarded");
        }
        Ok(saved)
    }
}

/// `{update_id}-{name}` for the media, `{update_id}-thumb-{name}` for its
/// preview: a message has at most one of each, so no file of an update
/// overwrites another even when both URLs end in the same name.
fn media_file_name(update_id: i64, media: &MediaUrl) -> String {
    let name = safe_file_name(&media.url);
    if media.is_thumbnail {
        format!("{update_id}-thumb-{name}")
    } else {
        format!("{update_id}-{name}")
    }
}
