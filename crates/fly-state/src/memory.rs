//! The in-memory sets a [`Front`](super::Front) answers from: bounded, and
//! each able to say "I don't know" when the answer is only in the store.
//!
//! - [`RecentIds`]: the newest handled update ids, exactly. Platform update
//!   ids grow, so the set keeps the highest ones and remembers the floor
//!   below which it dropped some: above the floor a miss means "not
//!   handled"; below it only the store knows.
//! - [`RecentNonces`]: every nonce seen within the horizon (twice the replay
//!   window), in Bloom filters: "never seen" is certain, "maybe seen" is
//!   settled by the store. About 2.4 bytes per nonce, whatever their length.
//! - [`Claims`]: the updates being handled right now, as leases.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::hash::BuildHasher;
use std::time::{Duration, Instant};

/// The newest handled update ids, at most `capacity` of them.
pub struct RecentIds {
    ids: BTreeSet<i64>,
    /// Every handled id at or above this is in `ids`.
    floor: i64,
    capacity: usize,
}

impl RecentIds {
    /// `newest` are the highest handled ids the store holds; `complete` says
    /// whether they are all it holds.
    pub fn new(capacity: usize, newest: impl IntoIterator<Item = i64>, complete: bool) -> Self {
        let ids: BTreeSet<i64> = newest.into_iter().collect();
        let floor = match ids.first() {
            Some(&lowest) if !complete => lowest,
            _ => i64::MIN,
        };
        let mut recent = RecentIds {
            ids,
            floor,
            capacity: capacity.max(1),
        };
        recent.trim();
        recent
    }

    /// `Some(handled)` when this set knows, `None` when only the store does.
    pub fn lookup(&self, update_id: i64) -> Option<bool> {
        if self.ids.contains(&update_id) {
            Some(true)
        } else if update_id >= self.floor {
            Some(false)
        } else {
            None
        }
    }

    pub fn insert(&mut self, update_id: i64) {
        // Below the floor it would be the first to go: the store has it.
        if update_id >= self.floor {
            self.ids.insert(update_id);
            self.trim();
        }
    }

    fn trim(&mut self) {
        while self.ids.len() > self.capacity {
            if let Some(lowest) = self.ids.pop_first() {
                self.floor = lowest.saturating_add(1);
            }
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.ids.len()
    }
}

/// Bloom filters over the nonces seen within the horizon, one per generation.
/// A generation takes nonces for at most `span` seconds or `capacity`
/// nonces, whichever comes first, and is dropped once its newest nonce is
/// older than the horizon: memory follows the rate of deliveries, not their
/// total, and a nonce is never forgotten inside the horizon.
pub struct RecentNonces {
    hashers: (std::hash::RandomState, std::hash::RandomState),
    generations: VecDeque<Generation>,
    span_secs: i64,
    horizon_secs: i64,
    words_per_generation: usize,
    capacity_per_generation: usize,
    max_generations: usize,
}

struct Generation {
    bits: Vec<u64>,
    count: usize,
    opened_at: i64,
    newest_at: i64,
}

/// Bit probes per nonce. With 19.5 bits per nonce at capacity, a filter is
/// wrong about one nonce in ten thousand (each such one goes to the store).
const PROBES: u64 = 13;

impl RecentNonces {
    /// Filters of `bits_per_generation` bits (a power of two), each taking at
    /// most `capacity_per_generation` nonces; `max_generations` bounds memory
    /// under a flood (past it, the newest filter fills up and more lookups go
    /// to the store).
    pub fn new(
        window_secs: i64,
        bits_per_generation: usize,
        capacity_per_generation: usize,
        max_generations: usize,
    ) -> RecentNonces {
        let window = window_secs.max(1);
        RecentNonces {
            hashers: (std::hash::RandomState::new(), std::hash::RandomState::new()),
            generations: VecDeque::new(),
            span_secs: window,
            horizon_secs: window.saturating_mul(2),
            words_per_generation: (bits_per_generation.next_power_of_two() / 64).max(1),
            capacity_per_generation: capacity_per_generation.max(1),
            max_generations: max_generations.max(1),
        }
    }

    /// False when `nonce` was certainly not seen within the horizon.
    pub fn maybe_seen(&self, nonce: &str) -> bool {
        let probes = self.probes(nonce);
        self.generations
            .iter()
            .any(|generation| probes.clone().all(|bit| generation.get(bit)))
    }

    pub fn insert(&mut self, nonce: &str, now: i64) {
        self.expire(now);
        let needs_new = match self.generations.back() {
            None => true,
            Some(newest) => {
                (newest.count >= self.capacity_per_generation
                    || now.saturating_sub(newest.opened_at) >= self.span_secs)
                    && self.generations.len() < self.max_generations
            }
        };
        if needs_new {
            self.generations.push_back(Generation {
                bits: vec![0; self.words_per_generation],
                count: 0,
                opened_at: now,
                newest_at: now,
            });
        }
        let probes = self.probes(nonce);
        if let Some(newest) = self.generations.back_mut() {
            for bit in probes {
                newest.set(bit);
            }
            newest.count += 1;
            newest.newest_at = newest.newest_at.max(now);
        }
    }

    /// Drops the generations whose every nonce is older than the horizon.
    pub fn expire(&mut self, now: i64) {
        let oldest_kept = now.saturating_sub(self.horizon_secs);
        while self
            .generations
            .front()
            .is_some_and(|oldest| oldest.newest_at < oldest_kept)
        {
            self.generations.pop_front();
        }
    }

    /// Bit positions (Kirsch–Mitzenmacher double hashing, keyed per process
    /// so nobody can pick nonces that collide).
    fn probes(&self, nonce: &str) -> impl Iterator<Item = u64> + Clone + use<> {
        let first = self.hashers.0.hash_one(nonce);
        let step = self.hashers.1.hash_one(nonce) | 1;
        let mask = (self.words_per_generation as u64 * 64) - 1;
        (0..PROBES).map(move |probe| first.wrapping_add(probe.wrapping_mul(step)) & mask)
    }

    #[cfg(test)]
    pub fn generations(&self) -> usize {
        self.generations.len()
    }
}

impl Generation {
    fn get(&self, bit: u64) -> bool {
        self.bits[(bit / 64) as usize] & (1 << (bit % 64)) != 0
    }

    fn set(&mut self, bit: u64) {
        self.bits[(bit / 64) as usize] |= 1 << (bit % 64);
    }
}

/// Updates being handled right now, as leases that lapse by themselves.
#[derive(Default)]
pub struct Claims {
    held: HashMap<i64, Held>,
    next_token: u64,
}

struct Held {
    token: u64,
    until: Instant,
    /// The nonce of the delivery that holds it: a redelivery with the same
    /// nonce is the same delivery again, whatever the nonce cache says.
    nonce: String,
}

impl Claims {
    /// A token for a new claim on `update_id`, or `None` while another
    /// unexpired claim holds it.
    pub fn claim(&mut self, update_id: i64, nonce: &str, lease: Duration) -> Option<u64> {
        let now = Instant::now();
        if self
            .held
            .get(&update_id)
            .is_some_and(|held| held.until > now)
        {
            return None;
        }
        self.next_token = self.next_token.wrapping_add(1);
        let token = self.next_token;
        self.held.insert(
            update_id,
            Held {
                token,
                until: now
                    .checked_add(lease)
                    .unwrap_or(now + Duration::from_secs(86_400)),
                nonce: nonce.to_string(),
            },
        );
        Some(token)
    }

    /// Whether `update_id` is claimed (unexpired) by a delivery with `nonce`.
    pub fn held_with_nonce(&self, update_id: i64, nonce: &str) -> bool {
        self.held
            .get(&update_id)
            .is_some_and(|held| held.until > Instant::now() && held.nonce == nonce)
    }

    /// Releases the claim `token` on `update_id`, if it is still the one held.
    pub fn release(&mut self, update_id: i64, token: u64) {
        if self
            .held
            .get(&update_id)
            .is_some_and(|held| held.token == token)
        {
            self.held.remove(&update_id);
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.held.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_ids_know_everything_above_their_floor() {
        let mut recent = RecentIds::new(3, [], true);
        assert_eq!(recent.lookup(5), Some(false), "an empty store: all known");
        for id in [10, 11, 12] {
            recent.insert(id);
        }
        assert_eq!(recent.lookup(11), Some(true));
        assert_eq!(recent.lookup(9), Some(false));
        recent.insert(13); // 10 goes; below 11 only the store knows now
        assert_eq!(recent.len(), 3);
        assert_eq!(recent.lookup(10), None);
        assert_eq!(recent.lookup(9), None);
        assert_eq!(recent.lookup(11), Some(true));
        assert_eq!(recent.lookup(14), Some(false));
        recent.insert(5); // below the floor: left to the store
        assert_eq!(recent.lookup(5), None);
        assert_eq!(recent.len(), 3);
        // Out of order above the floor is fine.
        recent.insert(20);
        recent.insert(15);
        assert_eq!(recent.lookup(15), Some(true));
        assert_eq!(recent.lookup(14), Some(false));
        assert_eq!(recent.lookup(12), None);
    }

    #[test]
    fn recent_ids_loaded_from_a_bigger_store_know_only_above_the_lowest_loaded() {
        let recent = RecentIds::new(10, [50, 60, 70], false);
        assert_eq!(recent.lookup(60), Some(true));
        assert_eq!(recent.lookup(55), Some(false));
        assert_eq!(recent.lookup(49), None);
        let whole = RecentIds::new(10, [50, 60, 70], true);
        assert_eq!(whole.lookup(49), Some(false));
        let trimmed = RecentIds::new(2, [50, 60, 70], true);
        assert_eq!(trimmed.lookup(50), None);
        assert_eq!(trimmed.lookup(60), Some(true));
    }

    fn nonces(window: i64) -> RecentNonces {
        RecentNonces::new(window, 1 << 16, 2_000, 8)
    }

    #[test]
    fn a_nonce_seen_is_never_forgotten_inside_the_horizon() {
        let mut recent = nonces(300);
        assert!(!recent.maybe_seen("n-1"));
        for n in 0..5_000 {
            recent.insert(&format!("n-{n}"), 1_000 + n / 10);
        }
        assert!(recent.generations() > 1, "filled filters are rotated");
        for n in 0..5_000 {
            assert!(recent.maybe_seen(&format!("n-{n}")), "n-{n}");
        }
        let false_positives = (0..10_000)
            .filter(|n| recent.maybe_seen(&format!("other-{n}")))
            .count();
        assert!(false_positives < 100, "{false_positives} false positives");
    }

    #[test]
    fn nonces_go_once_older_than_twice_the_window() {
        let mut recent = nonces(10);
        recent.insert("old", 1_000);
        recent.insert("newer", 1_015);
        recent.expire(1_020);
        assert!(
            recent.maybe_seen("old"),
            "20 s is inside the 2 x 10 s horizon"
        );
        recent.insert("newest", 1_035);
        assert!(!recent.maybe_seen("old"));
        assert!(recent.maybe_seen("newer"));
        assert!(recent.maybe_seen("newest"));
        recent.expire(1_100);
        assert_eq!(recent.generations(), 0);
        assert!(!recent.maybe_seen("newest"));
    }

    #[test]
    fn a_flood_past_the_last_generation_fills_it_rather_than_forgetting() {
        let mut recent = RecentNonces::new(300, 1 << 12, 100, 2);
        for n in 0..1_000 {
            recent.insert(&format!("n-{n}"), 1_000);
        }
        assert_eq!(recent.generations(), 2);
        assert!((0..1_000).all(|n| recent.maybe_seen(&format!("n-{n}"))));
    }

    #[test]
    fn a_claim_is_exclusive_until_released_or_lapsed() {
        let mut claims = Claims::default();
        let first = claims.claim(7, "n1", Duration::from_secs(60)).unwrap();
        assert!(claims.claim(7, "n2", Duration::from_secs(60)).is_none());
        assert!(claims.held_with_nonce(7, "n1"));
        assert!(!claims.held_with_nonce(7, "n2"));
        assert!(claims.claim(8, "n3", Duration::from_secs(60)).is_some());
        claims.release(7, first);
        let second = claims.claim(7, "n2", Duration::ZERO).unwrap();
        // A lapsed lease can be taken over; the old holder's release then
        // leaves the new claim alone.
        let third = claims.claim(7, "n4", Duration::from_secs(60)).unwrap();
        claims.release(7, second);
        assert!(claims.held_with_nonce(7, "n4"));
        claims.release(7, third);
        assert!(!claims.held_with_nonce(7, "n4"));
        assert_eq!(claims.len(), 1);
    }
}
