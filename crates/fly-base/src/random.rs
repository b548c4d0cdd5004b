//! Randomness for ids, nonces and jitter, from the operating system.

/// A random 64-bit number. The OS source only fails on exotic platforms; a
/// time-based fallback keeps ids unique enough there rather than aborting.
pub fn u64() -> u64 {
    getrandom::u64().unwrap_or_else(|_| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        now.as_nanos() as u64 ^ u64::from(std::process::id()).rotate_left(32)
    })
}

/// A random number in [0, 1), for jitter.
pub fn unit() -> f64 {
    (u64() >> 11) as f64 / (1u64 << 53) as f64
}

/// `bytes` random bytes as lowercase hex, for ids and nonces.
pub fn hex_id(bytes: usize) -> String {
    let mut out = String::with_capacity(bytes * 2);
    while out.len() < bytes * 2 {
        out.push_str(&format!("{:016x}", u64()));
    }
    out.truncate(bytes * 2);
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn hex_ids_have_the_asked_length_and_differ() {
        let a = super::hex_id(12);
        let b = super::hex_id(12);
        assert_eq!(a.len(), 24);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
