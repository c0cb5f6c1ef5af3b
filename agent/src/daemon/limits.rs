//! The agent's descriptor budget and the small helpers that keep a resource shortage from
//! turning into a busy loop or a log flood (docs/operations.md §Limits).

use std::time::{Duration, Instant};

/// The descriptor limit (`RLIMIT_NOFILE`) the agent runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Nofile {
    /// The soft limit found at start-up.
    pub before: Option<u64>,
    /// The soft limit now (raised to the hard limit when that was possible).
    pub soft: Option<u64>,
    /// The hard limit.
    pub hard: Option<u64>,
}

/// Raise the soft descriptor limit to the hard one. The agent never uses `select(2)`, so a
/// large limit costs nothing, and systemd's default soft limit (1024) is easily reached by a
/// few hundred control clients plus the store's files. `None` means unlimited.
pub fn raise_nofile() -> (Nofile, Option<std::io::Error>) {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let old = getrlimit(Resource::Nofile);
    let mut now = Nofile {
        before: old.current,
        soft: old.current,
        hard: old.maximum,
    };
    if old.current == old.maximum {
        return (now, None);
    }
    let new = rustix::process::Rlimit {
        current: old.maximum,
        maximum: old.maximum,
    };
    match setrlimit(Resource::Nofile, new) {
        Ok(()) => {
            now.soft = getrlimit(Resource::Nofile).current;
            (now, None)
        }
        Err(e) => (now, Some(e.into())),
    }
}

/// Descriptors kept back from control connections for everything else the agent opens: store
/// commits and loads (a temporary file and the directory per commit), rebuild jobs (the live
/// image and the reference), QMP and NBD sockets, the metrics endpoint, QUIC's socket, and the
/// runtime's own (epoll, eventfd, log, lock file).
pub fn reserved_descriptors(limit: u64) -> u64 {
    (limit / 8).max(64)
}

/// How many control connections fit next to [`reserved_descriptors`] under `limit`: the
/// configured number, or fewer (at least 1) when the limit is low.
pub fn control_connections(limit: Option<u64>, configured: usize) -> usize {
    match limit {
        None => configured,
        Some(l) => {
            let room = l.saturating_sub(reserved_descriptors(l)).max(1);
            configured.min(usize::try_from(room).unwrap_or(usize::MAX))
        }
    }
}

/// Let an event be logged at most once per interval; counts the ones held back.
#[derive(Debug)]
pub struct Throttle {
    every: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl Throttle {
    /// At most one event per `every`.
    pub fn new(every: Duration) -> Throttle {
        Throttle {
            every,
            last: None,
            suppressed: 0,
        }
    }

    /// An event happened at `now`: `Some(n)` if it should be logged (`n` events were held back
    /// since the last one logged), `None` if it is held back.
    pub fn hit(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(l) if now.saturating_duration_since(l) < self.every => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

/// Exponential backoff between retries of a failing operation.
#[derive(Debug)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// Start at `first`, double up to `max`.
    pub fn new(first: Duration, max: Duration) -> Backoff {
        Backoff {
            first,
            max,
            next: first,
        }
    }

    /// The delay before the next retry.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }

    /// The operation succeeded: start from `first` again.
    pub fn reset(&mut self) {
        self.next = self.first;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_control_cap_leaves_a_reserve_of_descriptors() {
        assert_eq!(control_connections(None, 256), 256);
        assert_eq!(control_connections(Some(65536), 256), 256);
        assert_eq!(control_connections(Some(1024), 256), 256);
        assert_eq!(control_connections(Some(1024), 5000), 1024 - 128);
        assert_eq!(control_connections(Some(128), 256), 64);
        assert_eq!(control_connections(Some(10), 256), 1);
        for l in [0, 1, 64, 100, 128, 1000, 1024, 4096, 1 << 20] {
            let c = control_connections(Some(l), usize::MAX) as u64;
            assert!(c >= 1);
            assert!(l < 65 || c + reserved_descriptors(l) <= l, "{l}: {c}");
        }
    }

    #[test]
    fn raising_the_limit_never_lowers_it() {
        let (n, err) = raise_nofile();
        assert!(err.is_none(), "{err:?}");
        assert_eq!(n.soft, n.hard);
        assert!(n.soft >= n.before || n.soft.is_none());
    }

    #[test]
    fn the_throttle_logs_once_per_interval_and_counts_the_rest() {
        let t0 = Instant::now();
        let mut t = Throttle::new(Duration::from_secs(5));
        assert_eq!(t.hit(t0), Some(0));
        for i in 1..1000 {
            assert_eq!(t.hit(t0 + Duration::from_millis(i)), None);
        }
        assert_eq!(t.hit(t0 + Duration::from_secs(5)), Some(999));
        assert_eq!(t.hit(t0 + Duration::from_secs(6)), None);
        assert_eq!(t.hit(t0 + Duration::from_secs(11)), Some(1));
    }

    #[test]
    fn backoff_doubles_to_its_maximum_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(10), Duration::from_secs(1));
        let d: Vec<u128> = (0..9).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(d, [10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(10));
    }
}
