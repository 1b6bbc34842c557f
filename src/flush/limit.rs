//! How many requests the pump keeps in flight, and how long it pauses after
//! a failure: the adaptive concurrency limit and the backoffs.

use super::*;

pub(crate) fn pause_backoff(cfg: &FlushConfig) -> ExponentialBackoff {
    ExponentialBuilder::default()
        .with_min_delay(cfg.retry_initial_backoff)
        .with_max_delay(cfg.retry_max_backoff)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
}

/// The concurrency limit. It starts at `start` (8, or less if that is the
/// maximum) and grows, Vegas-style, while round trips stay near the fastest
/// seen, up to `max`; queueing at the server stops the growth and brings it
/// back towards `start`, never below. Only push-back (429, 5xx, timeouts)
/// halves it, down to `min`, and it climbs back from there.
pub(crate) struct Limit {
    pub(crate) current: f64,
    pub(crate) start: f64,
    pub(crate) min: f64,
    pub(crate) max: f64,
    pub(crate) adaptive: bool,
    /// The fastest round trip of the current and the previous window.
    pub(crate) base_rtt: Option<Duration>,
    pub(crate) window_min: Option<Duration>,
    pub(crate) samples: u32,
    /// No second decrease until this: one per round trip.
    pub(crate) calm_until: Option<Instant>,
}

/// Requests queued at the server below which the limit grows, and above
/// which it shrinks.
pub(crate) const QUEUE_LOW: f64 = 2.0;
pub(crate) const QUEUE_HIGH: f64 = 5.0;
/// Samples per window of the fastest round trip: the base follows a server
/// that got slower (a bigger store) within about this many requests.
pub(crate) const RTT_WINDOW: u32 = 200;

impl Limit {
    pub(crate) fn new(cfg: &FlushConfig) -> Limit {
        let max = cfg.max_parallel_requests.max(1) as f64;
        let min = cfg
            .min_parallel_requests
            .clamp(1, cfg.max_parallel_requests.max(1)) as f64;
        let adaptive = cfg.adaptive_parallelism && min < max;
        let start = if adaptive { max.min(8.0).max(min) } else { max };
        Limit {
            current: start,
            start,
            min,
            max,
            adaptive,
            base_rtt: None,
            window_min: None,
            samples: 0,
            calm_until: None,
        }
    }

    pub(crate) fn get(&self) -> usize {
        self.current as usize
    }

    /// Takes a chunk's requests: the round trips of its full-size ones
    /// that landed, how many landed in all, and whether the server pushed
    /// back.
    pub(crate) fn observe(&mut self, rtts: &[Duration], landed: usize, congested: bool) {
        if !self.adaptive {
            return;
        }
        let now = Instant::now();
        if congested {
            if self.calm_until.is_none_or(|c| now >= c) {
                self.current = (self.current / 2.0).max(self.min);
                self.calm_until =
                    Some(now + self.base_rtt.unwrap_or(Duration::from_millis(100)) * 2);
            }
            return;
        }
        // Below `start`, after push-back, every request that lands climbs
        // back, whatever its size: chunks under half a batch (objects of a
        // few dozen ops each) give no round trip, and with only round
        // trips counting the limit stayed at its minimum for good.
        for _ in rtts.len()..landed {
            if self.current >= self.start {
                break;
            }
            self.current = (self.current + 1.0 / self.current).min(self.start);
        }
        for &rtt in rtts {
            self.window_min = Some(self.window_min.map_or(rtt, |m| m.min(rtt)));
            self.samples += 1;
            if self.samples >= RTT_WINDOW {
                self.base_rtt = self.window_min.take();
                self.samples = 0;
            }
            let base = match (self.base_rtt, self.window_min) {
                (Some(b), Some(w)) => b.min(w),
                (b, w) => b.or(w).unwrap_or(rtt),
            };
            let queued = self.current * (1.0 - base.as_secs_f64() / rtt.as_secs_f64().max(1e-9));
            let step = 1.0 / self.current;
            if queued < QUEUE_LOW || self.current < self.start {
                self.current = (self.current + step).min(self.max);
            } else if queued > QUEUE_HIGH && self.current > self.start {
                self.current = (self.current - step).max(self.start);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Halved to its minimum by push-back, the limit climbs back to where
    /// it starts on requests that land, also when none is full-size
    /// enough to give a round trip.
    #[test]
    fn the_limit_climbs_back_on_small_requests_too() {
        let mut limit = Limit::new(&FlushConfig::default());
        let start = limit.get();
        for _ in 0..8 {
            limit.calm_until = None;
            limit.observe(&[], 0, true);
        }
        assert_eq!(limit.get(), limit.min as usize);
        for _ in 0..100 {
            limit.observe(&[], 1, false);
        }
        assert_eq!(limit.get(), start);
    }
}
