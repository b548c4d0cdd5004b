//! Everything the emulator remembers, as plain data with no I/O: the update
//! queues, the sent messages and their idempotency keys, media and access
//! grants, the webhook configuration and its deliveries, the fault config.
//!
//! The server and the webhook worker hold it behind one mutex and never across
//! a wait, so each method here is one atomic step of the protocol. Time comes
//! in as an argument to keep expiry testable.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{Value, json};

use super::faults::FaultConfig;
use super::media_content::MediaContent;
use super::requests::SendCall;

/// `GET /_emulator/webhook` shows the outcomes of this many deliveries, the
/// latest ones: a long run must not grow without bound.
pub const DELIVERY_RECORDS_KEPT: usize = 1000;

/// Expired access grants are remembered this long so that a late download
/// gets 403 ("expired") rather than 404 ("never existed").
const EXPIRED_GRANT_MEMORY: Duration = Duration::from_secs(3600);

/// Where the webhook worker delivers to, and how it signs.
#[derive(Debug, Clone, PartialEq)]
pub struct WebhookTarget {
    pub url: String,
    pub secret: String,
    pub bot_id: String,
}

/// An update waiting for (re)delivery to the webhook.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingDelivery {
    pub update_id: u64,
    /// The update's JSON text (see [`Platform::push_update`]).
    pub update: String,
    /// Chosen once per update and kept across redeliveries, as the platform does.
    pub nonce: String,
    /// Failed attempts so far.
    pub failed_attempts: u32,
    /// Why the last attempt failed, while it is retried.
    pub last_error: Option<String>,
}

/// The outcome of one update's delivery, for `GET /_emulator/webhook`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeliveryRecord {
    pub update_id: u64,
    /// The receiver's answer; 0 when the delivery was given up (see `error`).
    pub status: u16,
    pub attempts: u32,
    /// Why the delivery was given up, when it was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The webhook worker's next job.
#[derive(Debug, Clone, PartialEq)]
pub struct DeliveryJob {
    pub target: WebhookTarget,
    pub delivery: PendingDelivery,
    /// The webhook configuration this job was taken under (see [`Platform::webhook_generation`]).
    pub generation: u64,
}

/// Where a new update went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routed {
    Polling,
    Webhook,
}

/// Why an access URL does not download.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessRefused {
    Unknown,
    Expired,
}

#[derive(Debug)]
struct AccessGrant {
    content: MediaContent,
    expires_at: Instant,
}

#[derive(Debug)]
pub struct Platform {
    next_update_id: u64,
    /// Updates for `getUpdates`, by id, as JSON text served byte for byte;
    /// removed only when confirmed by a later offset.
    polling_queue: BTreeMap<u64, String>,
    webhook: Option<WebhookTarget>,
    webhook_generation: u64,
    webhook_queue: VecDeque<PendingDelivery>,
    /// The last [`DELIVERY_RECORDS_KEPT`] finished deliveries, oldest first.
    delivered: VecDeque<DeliveryRecord>,
    /// Accepted send bodies, as the bot sent them.
    sent: Vec<String>,
    /// Send requests received, each retry and repeat included, accepted or not.
    send_attempts: u64,
    send_results: HashMap<String, Value>,
    next_message_id: u64,
    media: HashMap<String, MediaContent>,
    access_grants: HashMap<String, AccessGrant>,
    pub faults: FaultConfig,
}

impl Platform {
    /// An empty emulator whose first update gets `first_update_id`.
    pub fn new(first_update_id: u64) -> Platform {
        Platform {
            next_update_id: first_update_id,
            polling_queue: BTreeMap::new(),
            webhook: None,
            webhook_generation: 0,
            webhook_queue: VecDeque::new(),
            delivered: VecDeque::new(),
            sent: Vec::new(),
            send_attempts: 0,
            send_results: HashMap::new(),
            next_message_id: 1,
            media: HashMap::new(),
            access_grants: HashMap::new(),
            faults: FaultConfig::default(),
        }
    }

    /// Numbers a new update and queues it for polling, or for the webhook while
    /// one is set (`nonce` is used only then). `update` is the JSON text of an
    /// object without `update_id`: it is kept as written, with `"update_id":N`
    /// put first, so odd updates reach the bot byte for byte.
    pub fn push_update(&mut self, update: &str, nonce: String) -> (u64, Routed) {
        let update_id = self.next_update_id;
        self.next_update_id += 1;
        let update = with_update_id(update, update_id);
        if self.webhook.is_some() {
            self.webhook_queue.push_back(PendingDelivery {
                update_id,
                update,
                nonce,
                failed_attempts: 0,
                last_error: None,
            });
            (update_id, Routed::Webhook)
        } else {
            self.polling_queue.insert(update_id, update);
            (update_id, Routed::Polling)
        }
    }

    /// One `getUpdates` step: an `offset` above 0 confirms (forgets) every
    /// update below it; returns up to `limit` queued updates from `offset` on.
    pub fn take_updates(&mut self, offset: i64, limit: usize) -> Vec<String> {
        let from = u64::try_from(offset).unwrap_or(0);
        if from > 0 {
            self.polling_queue = self.polling_queue.split_off(&from);
        }
        self.polling_queue
            .range(from..)
            .take(limit)
            .map(|(_, update)| update.clone())
            .collect()
    }

    /// Records an accepted send and returns its answer. A `client_msg_id` seen
    /// before returns the first answer and records nothing: the request is a
    /// retry of one that took effect.
    pub fn record_send(&mut self, request: &SendCall, body: &str) -> Value {
        if let Some(id) = &request.client_msg_id
            && let Some(first) = self.send_results.get(id)
        {
            return first.clone();
        }
        let message_id = format!("m_{}", self.next_message_id);
        self.next_message_id += 1;
        let mut result = json!({"message_id": message_id, "msg_type": request.msg_type});
        result[request.target_field] = request.target.clone();
        if let Some(id) = &request.client_msg_id {
            result["client_msg_id"] = id.as_str().into();
            self.send_results.insert(id.clone(), result.clone());
        }
        self.sent.push(body.trim().to_string());
        result
    }

    pub fn sent(&self) -> &[String] {
        &self.sent
    }

    /// A send request arrived (before faults, the token check or parsing).
    pub fn count_send_attempt(&mut self) {
        self.send_attempts += 1;
    }

    /// Send requests received so far, retries and repeats included.
    pub fn send_attempts(&self) -> u64 {
        self.send_attempts
    }

    /// Makes `url` downloadable through batch_access (replacing earlier content).
    pub fn register_media(&mut self, url: String, content: MediaContent) {
        self.media.insert(url, content);
    }

    /// Grants a fresh access token per registered URL, valid for `lifetime`;
    /// unregistered URLs get none. Also forgets grants long expired.
    pub fn grant_access(
        &mut self,
        urls: &[String],
        now: Instant,
        lifetime: Duration,
        mut new_token: impl FnMut() -> String,
    ) -> Vec<(String, String)> {
        self.access_grants
            .retain(|_, grant| grant.expires_at + EXPIRED_GRANT_MEMORY > now);
        let mut granted = Vec::new();
        for url in urls {
            let Some(content) = self.media.get(url) else {
                continue;
            };
            let token = new_token();
            self.access_grants.insert(
                token.clone(),
                AccessGrant {
                    content: content.clone(),
                    expires_at: now + lifetime,
                },
            );
            granted.push((url.clone(), token));
        }
        granted
    }

    /// The content behind an access token, if it is known and not expired.
    pub fn open_access(&self, token: &str, now: Instant) -> Result<MediaContent, AccessRefused> {
        match self.access_grants.get(token) {
            None => Err(AccessRefused::Unknown),
            Some(grant) if now >= grant.expires_at => Err(AccessRefused::Expired),
            Some(grant) => Ok(grant.content.clone()),
        }
    }

    /// Whether a webhook is set: the updates call is refused meanwhile, as
    /// real bot platforms refuse polling while a webhook is set.
    pub fn webhook_is_set(&self) -> bool {
        self.webhook.is_some()
    }

    /// Sets or clears the webhook; no update is lost either way. Turning it
    /// on hands the updates waiting for polling (unconfirmed) to the webhook,
    /// ahead of new ones, each with a nonce from `new_nonce`: polling is
    /// refused from now on, so they would wait for nobody. Turning it off
    /// hands the undelivered updates to the polling queue. Returns whether
    /// pollers must be woken (to be refused, or to get updates).
    pub fn set_webhook(
        &mut self,
        target: Option<WebhookTarget>,
        mut new_nonce: impl FnMut() -> String,
    ) -> bool {
        self.webhook_generation += 1;
        let was_set = self.webhook.is_some();
        let turned_on = target.is_some();
        self.webhook = target;
        if turned_on {
            let waiting = std::mem::take(&mut self.polling_queue);
            for (update_id, update) in waiting.into_iter().rev() {
                self.webhook_queue.push_front(PendingDelivery {
                    update_id,
                    update,
                    nonce: new_nonce(),
                    failed_attempts: 0,
                    last_error: None,
                });
            }
            return !was_set;
        }
        for pending in self.webhook_queue.drain(..) {
            self.polling_queue.insert(pending.update_id, pending.update);
        }
        was_set
    }

    /// Changes whenever the webhook configuration does, so that a worker
    /// waiting to retry knows to try again at once with the new one.
    pub fn webhook_generation(&self) -> u64 {
        self.webhook_generation
    }

    /// The oldest undelivered update and where it goes; deliveries are in order.
    pub fn next_delivery(&self) -> Option<DeliveryJob> {
        let target = self.webhook.as_ref()?;
        let delivery = self.webhook_queue.front()?;
        Some(DeliveryJob {
            target: target.clone(),
            delivery: delivery.clone(),
            generation: self.webhook_generation,
        })
    }

    /// Counts a failed attempt and why it failed; returns the failures so
    /// far (0 if the update is no longer waiting, e.g. webhook mode was
    /// turned off meanwhile).
    pub fn note_failed_delivery(&mut self, update_id: u64, reason: &str) -> u32 {
        match self.webhook_queue.front_mut() {
            Some(front) if front.update_id == update_id => {
                front.failed_attempts += 1;
                front.last_error = Some(reason.to_string());
                front.failed_attempts
            }
            _ => 0,
        }
    }

    /// Records a finished delivery (with the attempts it took, counted by
    /// [`note_failed_delivery`](Self::note_failed_delivery)) and moves on to
    /// the next update. `error` says why a delivery was given up.
    pub fn finish_delivery(&mut self, update_id: u64, status: u16, error: Option<String>) {
        let attempts = match self.webhook_queue.front() {
            Some(front) if front.update_id == update_id => {
                let attempts = front.failed_attempts + 1;
                self.webhook_queue.pop_front();
                attempts
            }
            // The queue was replaced meanwhile (a new webhook) and its
            // counts with it: this attempt is the one known.
            _ => 1,
        };
        if self.delivered.len() == DELIVERY_RECORDS_KEPT {
            self.delivered.pop_front();
        }
        self.delivered.push_back(DeliveryRecord {
            update_id,
            status,
            attempts,
            error,
        });
    }

    /// `GET /_emulator/webhook`: where deliveries go, the outcome of the
    /// last [`DELIVERY_RECORDS_KEPT`] ones, and the one being retried (its
    /// failed attempts so far and the last error). The secret is not shown:
    /// by default it is derived from the bot token.
    pub fn webhook_report(&self) -> Value {
        let retrying = self
            .webhook
            .as_ref()
            .and_then(|_| self.webhook_queue.front())
            .filter(|front| front.failed_attempts > 0)
            .map(|front| {
                json!({
                    "update_id": front.update_id,
                    "attempts": front.failed_attempts,
                    "error": front.last_error,
                })
            });
        json!({
            "url": self.webhook.as_ref().map(|target| target.url.as_str()),
            "bot_id": self.webhook.as_ref().map(|target| target.bot_id.as_str()),
            "delivered": self.delivered,
            "pending": self.webhook_queue.len(),
            "retrying": retrying,
        })
    }
}

/// `{"update_id":N,…}` from the text of an object without it: the members
/// follow as written. (The caller has checked that `object` is an object.)
fn with_update_id(object: &str, update_id: u64) -> String {
    let members = object.trim().strip_prefix('{').unwrap_or("}");
    let separator = if members.trim_start().starts_with('}') {
        ""
    } else {
        ","
    };
    format!("{{\"update_id\":{update_id}{separator}{members}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(text: &str) -> String {
        json!({"type": "message", "message": {"msgType": "text", "data": {"content": text}}})
            .to_string()
    }

    fn ids(updates: &[String]) -> Vec<u64> {
        updates
            .iter()
            .map(|update| {
                serde_json::from_str::<Value>(update).unwrap()["update_id"]
                    .as_u64()
                    .unwrap()
            })
            .collect()
    }

    fn push_texts(state: &mut Platform, count: usize) {
        for index in 0..count {
            state.push_update(&message(&index.to_string()), String::new());
        }
    }

    fn send_request(client_msg_id: Option<&str>) -> (SendCall, String) {
        let mut body = json!({"msg_type": "text", "data": {"content": "x"}, "to_user_id": "u_1"});
        if let Some(id) = client_msg_id {
            body["client_msg_id"] = id.into();
        }
        (SendCall::parse(&body).unwrap(), body.to_string())
    }

    fn webhook() -> WebhookTarget {
        WebhookTarget {
            url: "http://127.0.0.1:9/hook".into(),
            secret: "s".into(),
            bot_id: "b".into(),
        }
    }

    #[test]
    fn update_ids_start_at_1_and_increase() {
        let mut state = Platform::new(1);
        assert_eq!(
            state.push_update(&message("a"), String::new()),
            (1, Routed::Polling)
        );
        assert_eq!(
            state.push_update(&message("b"), String::new()),
            (2, Routed::Polling)
        );
        let updates = state.take_updates(0, 100);
        assert_eq!(ids(&updates), [1, 2]);
        assert!(updates[0].starts_with(r#"{"update_id":1,"message":"#));
    }

    #[test]
    fn raw_updates_keep_their_text_after_the_id() {
        let mut state = Platform::new(1);
        state.push_update(" {\n \"n\": 1E2, \"b\":\"\\/\"} ", String::new());
        state.push_update("{ }", String::new());
        assert_eq!(
            state.take_updates(0, 100),
            [
                "{\"update_id\":1,\n \"n\": 1E2, \"b\":\"\\/\"}",
                "{\"update_id\":2 }"
            ]
        );
    }

    #[test]
    fn offset_confirms_everything_below_it_and_limit_caps() {
        let mut state = Platform::new(1);
        push_texts(&mut state, 5);
        assert_eq!(ids(&state.take_updates(0, 2)), [1, 2]);
        // Unconfirmed updates come again.
        assert_eq!(ids(&state.take_updates(0, 2)), [1, 2]);
        assert_eq!(ids(&state.take_updates(3, 100)), [3, 4, 5]);
        // Confirmed ones are gone even for a client that goes back.
        assert_eq!(ids(&state.take_updates(0, 100)), [3, 4, 5]);
        assert_eq!(ids(&state.take_updates(6, 100)), Vec::<u64>::new());
        push_texts(&mut state, 1);
        assert_eq!(ids(&state.take_updates(-5, 100)), [6]);
    }

    #[test]
    fn a_repeated_client_msg_id_returns_the_first_answer_and_records_once() {
        let mut state = Platform::new(1);
        let (request, body) = send_request(Some("c1"));
        let first = state.record_send(&request, &body);
        assert_eq!(
            first,
            json!({"message_id": "m_1", "msg_type": "text", "to_user_id": "u_1", "client_msg_id": "c1"})
        );
        assert_eq!(state.record_send(&request, &body), first);
        assert_eq!(state.sent().len(), 1);

        let (anonymous, body) = send_request(None);
        let second = state.record_send(&anonymous, &body);
        let third = state.record_send(&anonymous, &body);
        assert_eq!(second["message_id"], "m_2");
        assert_eq!(third["message_id"], "m_3");
        assert!(second.get("client_msg_id").is_none());
        assert_eq!(state.sent().len(), 3);
    }

    #[test]
    fn access_grants_cover_registered_urls_and_expire() {
        let mut state = Platform::new(1);
        state.register_media("media://a".into(), MediaContent::Pattern { size: 3 });
        let now = Instant::now();
        let mut counter = 0;
        let granted = state.grant_access(
            &["media://a".into(), "media://unknown".into()],
            now,
            Duration::from_secs(10),
            || {
                counter += 1;
                format!("t{counter}")
            },
        );
        assert_eq!(granted, [("media://a".to_string(), "t1".to_string())]);
        assert_eq!(
            state.open_access("t1", now + Duration::from_secs(9)),
            Ok(MediaContent::Pattern { size: 3 })
        );
        assert_eq!(
            state.open_access("t1", now + Duration::from_secs(10)),
            Err(AccessRefused::Expired)
        );
        assert_eq!(state.open_access("nope", now), Err(AccessRefused::Unknown));
        // Long-expired grants are eventually forgotten.
        let later = now + Duration::from_secs(10) + EXPIRED_GRANT_MEMORY;
        state.grant_access(&[], later, Duration::from_secs(1), String::new);
        assert_eq!(state.open_access("t1", later), Err(AccessRefused::Unknown));
    }

    #[test]
    fn webhook_mode_routes_new_updates_in_order() {
        let mut state = Platform::new(1);
        push_texts(&mut state, 1);
        assert!(!state.webhook_is_set());
        // Newly set: pollers are woken, to be refused.
        assert!(state.set_webhook(Some(webhook()), || "n1".into()));
        assert!(state.webhook_is_set());
        assert_eq!(
            state.push_update(&message("a"), "n2".into()),
            (2, Routed::Webhook)
        );
        assert_eq!(
            state.push_update(&message("b"), "n3".into()),
            (3, Routed::Webhook)
        );
        // The update that waited for polling goes to the webhook first.
        assert!(state.take_updates(0, 100).is_empty());
        let job = state.next_delivery().unwrap();
        assert_eq!(
            (job.delivery.update_id, job.delivery.nonce.as_str()),
            (1, "n1")
        );
        state.finish_delivery(1, 200, None);

        let job = state.next_delivery().unwrap();
        assert_eq!(
            (job.delivery.update_id, job.delivery.nonce.as_str()),
            (2, "n2")
        );
        assert_eq!(job.target, webhook());
        assert_eq!(state.note_failed_delivery(2, "HTTP 500"), 1);
        assert_eq!(
            state.webhook_report()["retrying"],
            json!({"update_id": 2, "attempts": 1, "error": "HTTP 500"})
        );
        assert_eq!(state.note_failed_delivery(2, "HTTP 502"), 2);
        state.finish_delivery(2, 200, None);
        assert_eq!(state.next_delivery().unwrap().delivery.update_id, 3);
        let report = state.webhook_report();
        assert_eq!(report["pending"], 1);
        assert_eq!(
            report["delivered"],
            json!([
                {"update_id": 1, "status": 200, "attempts": 1},
                {"update_id": 2, "status": 200, "attempts": 3}
            ])
        );
        assert!(report.get("secret").is_none());
        // Another URL: nothing changes for pollers.
        assert!(!state.set_webhook(Some(webhook()), String::new));
    }

    #[test]
    fn turning_webhook_off_hands_pending_updates_to_polling() {
        let mut state = Platform::new(1);
        state.set_webhook(Some(webhook()), String::new);
        let generation = state.webhook_generation();
        push_texts(&mut state, 2);
        assert!(state.set_webhook(None, String::new));
        assert!(!state.webhook_is_set());
        assert_ne!(state.webhook_generation(), generation);
        assert!(state.next_delivery().is_none());
        assert_eq!(state.note_failed_delivery(1, "x"), 0);
        assert_eq!(ids(&state.take_updates(0, 100)), [1, 2]);
        assert_eq!(
            state.push_update(&message("c"), String::new()),
            (3, Routed::Polling)
        );
        assert!(!state.set_webhook(None, String::new));
        assert_eq!(state.webhook_report()["url"], Value::Null);
    }

    #[test]
    fn only_the_latest_delivery_records_are_kept() {
        let mut state = Platform::new(1);
        state.set_webhook(Some(webhook()), String::new);
        let total = DELIVERY_RECORDS_KEPT as u64 + 5;
        for update_id in 1..=total {
            state.push_update(&message("a"), String::new());
            state.finish_delivery(update_id, 200, None);
        }
        let report = state.webhook_report();
        let delivered = report["delivered"].as_array().unwrap();
        assert_eq!(delivered.len(), DELIVERY_RECORDS_KEPT);
        assert_eq!(delivered[0]["update_id"], 6);
        assert_eq!(delivered.last().unwrap()["update_id"], total);
        assert_eq!(report["retrying"], Value::Null);
    }

    #[test]
    fn update_ids_start_where_told() {
        let mut state = Platform::new(1_700_000_000_000);
        push_texts(&mut state, 2);
        assert_eq!(
            ids(&state.take_updates(0, 100)),
            [1_700_000_000_000, 1_700_000_000_001]
        );
    }
}
