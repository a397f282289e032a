//! The last five minutes of each app's traffic for the stats page's charts: a fixed ring of
//! per-second rates (new connections per second, bytes per second both ways) per app, sampled
//! by the admin thread from the app counters once a second. Never touches a worker: it reads
//! the same shared counters `/metrics` reads. Bounded: [`SAMPLES`] points per app, and the
//! rings of apps that a reload removed are dropped.

use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::view::ProxyView;

/// Points kept per app: five minutes at one per second.
pub const SAMPLES: usize = 300;
/// How often the admin thread samples.
pub const INTERVAL: Duration = Duration::from_secs(1);

/// A fixed ring of `(connections/s, bytes/s)` points.
struct Ring {
    /// Always `SAMPLES` long; `points[(head + i) % SAMPLES]` for `i < len` is the i-th oldest.
    points: Box<[(f64, f64)]>,
    head: usize,
    /// Always `<= SAMPLES`.
    len: usize,
}

impl Ring {
    fn new() -> Ring {
        Ring {
            points: vec![(0.0, 0.0); SAMPLES].into_boxed_slice(),
            head: 0,
            len: 0,
        }
    }

    fn push(&mut self, p: (f64, f64)) {
        let at = (self.head + self.len) % SAMPLES;
        self.points[at] = p;
        if self.len < SAMPLES {
            self.len += 1;
        } else {
            self.head = (self.head + 1) % SAMPLES;
        }
    }

    /// Oldest first.
    fn iter(&self) -> impl Iterator<Item = (f64, f64)> + '_ {
        (0..self.len).map(move |i| self.points[(self.head + i) % SAMPLES])
    }
}

/// One app's ring and the counter values of the previous sample.
struct AppHistory {
    name: String,
    last_total: u64,
    last_bytes: u64,
    ring: Ring,
}

/// Every app's ring.
#[derive(Default)]
pub struct History {
    apps: Vec<AppHistory>,
    last_at: Option<Instant>,
}

impl History {
    /// Sample every app's counters at `now`: one point per app (the rates since the previous
    /// sample). An app seen for the first time only sets its baseline.
    pub fn sample(&mut self, view: &ProxyView, now: Instant) {
        let secs = self
            .last_at
            .map_or(0.0, |t| now.saturating_duration_since(t).as_secs_f64());
        self.last_at = Some(now);
        let apps = view.apps();
        self.apps
            .retain(|h| apps.iter().any(|a| a.cfg.name == h.name));
        for a in &apps {
            let total = a.counters.total.load(Relaxed);
            let bytes = a
                .counters
                .bytes_to_upstream()
                .wrapping_add(a.counters.bytes_to_client());
            match self.apps.iter_mut().find(|h| h.name == a.cfg.name) {
                Some(h) => {
                    if secs > 0.0 {
                        let rate = |now: u64, then: u64| now.saturating_sub(then) as f64 / secs;
                        h.ring
                            .push((rate(total, h.last_total), rate(bytes, h.last_bytes)));
                    }
                    h.last_total = total;
                    h.last_bytes = bytes;
                }
                None => self.apps.push(AppHistory {
                    name: a.cfg.name.clone(),
                    last_total: total,
                    last_bytes: bytes,
                    ring: Ring::new(),
                }),
            }
        }
    }

    /// The series of app `name`, oldest first, as JSON.
    pub fn json(&self, name: &str) -> Value {
        let (conns, bytes): (Vec<f64>, Vec<f64>) = self
            .apps
            .iter()
            .find(|h| h.name == name)
            .map(|h| h.ring.iter().unzip())
            .unwrap_or_default();
        let round = |v: Vec<f64>| -> Vec<f64> {
            v.into_iter().map(|x| (x * 10.0).round() / 10.0).collect()
        };
        json!({
            "interval_seconds": INTERVAL.as_secs_f64(),
            "connections_per_second": round(conns),
            "bytes_per_second": round(bytes),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_keeps_the_newest_points() {
        let mut r = Ring::new();
        for i in 0..(SAMPLES + 5) {
            r.push((i as f64, 0.0));
        }
        let v: Vec<f64> = r.iter().map(|p| p.0).collect();
        assert_eq!(v.len(), SAMPLES);
        assert_eq!(v[0], 5.0);
        assert_eq!(v[SAMPLES - 1], (SAMPLES + 4) as f64);
    }
}
