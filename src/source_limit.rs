//! `max_conns_per_source`: live pairs per client IP, shared by all workers of an app. A fixed
//! open-addressing table (linear probing, backward-shift deletion, so no tombstones pile up)
//! sized at start to twice the global `max_conns`, behind one mutex taken only on accept and
//! close of apps that set the limit. Never allocates after construction; a full table refuses
//! (it cannot fill while the global limit holds, since every entry is a live pair).

use std::net::IpAddr;
use std::sync::Mutex;

/// One slot: the source (IPv4 as v4-mapped IPv6) and its live pairs; `count == 0` = empty.
#[derive(Debug, Clone, Copy, Default)]
struct Entry {
    key: u128,
    count: u32,
}

/// Live pairs per source address.
#[derive(Debug)]
pub struct SourceTable {
    slots: Mutex<Vec<Entry>>,
    mask: usize,
    seed: u64,
}

/// An IP as one 128-bit key: IPv4 and its v4-mapped IPv6 form are the same source.
fn key(ip: IpAddr) -> u128 {
    let v6 = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    u128::from(v6)
}

impl SourceTable {
    /// A table for up to `capacity` distinct live sources.
    pub fn new(capacity: usize) -> SourceTable {
        let size = capacity.max(8).saturating_mul(2).next_power_of_two();
        let seed = std::process::id() as u64 ^ 0x9E37_79B9_7F4A_7C15;
        SourceTable {
            slots: Mutex::new(vec![Entry::default(); size]),
            mask: size - 1,
            seed,
        }
    }

    fn home(&self, k: u128) -> usize {
        let mut h = (k as u64) ^ ((k >> 64) as u64) ^ self.seed;
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        (h as usize) & self.mask
    }

    /// Count one more pair from `ip` unless it already has `limit`. `false` = refused.
    pub fn try_add(&self, ip: IpAddr, limit: usize) -> bool {
        let k = key(ip);
        let Ok(mut slots) = self.slots.lock() else {
            return false;
        };
        let mut i = self.home(k);
        for _ in 0..=self.mask {
            let e = &mut slots[i];
            if e.count == 0 {
                if limit == 0 {
                    return false;
                }
                *e = Entry { key: k, count: 1 };
                return true;
            }
            if e.key == k {
                if e.count as usize >= limit {
                    return false;
                }
                e.count += 1;
                return true;
            }
            i = (i + 1) & self.mask;
        }
        false
    }

    /// One pair from `ip` (counted by `try_add`) closed.
    pub fn remove(&self, ip: IpAddr) {
        let k = key(ip);
        let Ok(mut slots) = self.slots.lock() else {
            return;
        };
        let mut i = self.home(k);
        for _ in 0..=self.mask {
            if slots[i].count == 0 {
                return;
            }
            if slots[i].key == k {
                slots[i].count -= 1;
                if slots[i].count == 0 {
                    self.shift_back(&mut slots, i);
                }
                return;
            }
            i = (i + 1) & self.mask;
        }
    }

    /// Backward-shift deletion: close the hole at `hole` so every entry stays reachable from
    /// its home slot without tombstones.
    fn shift_back(&self, slots: &mut [Entry], mut hole: usize) {
        let mut j = hole;
        loop {
            j = (j + 1) & self.mask;
            if slots[j].count == 0 {
                break;
            }
            let home = self.home(slots[j].key);
            // Move j into the hole unless its home lies cyclically in (hole, j].
            let dist_home = j.wrapping_sub(home) & self.mask;
            let dist_hole = j.wrapping_sub(hole) & self.mask;
            if dist_home >= dist_hole {
                slots[hole] = slots[j];
                hole = j;
            }
        }
        slots[hole] = Entry::default();
    }

    /// Live pairs of `ip` (for tests and the admin).
    pub fn count(&self, ip: IpAddr) -> usize {
        let k = key(ip);
        let Ok(slots) = self.slots.lock() else {
            return 0;
        };
        let mut i = self.home(k);
        for _ in 0..=self.mask {
            let e = slots[i];
            if e.count == 0 {
                return 0;
            }
            if e.key == k {
                return e.count as usize;
            }
            i = (i + 1) & self.mask;
        }
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    #[test]
    fn caps_each_source_and_frees_on_remove() {
        let t = SourceTable::new(16);
        let a = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
        let b = IpAddr::V6(Ipv6Addr::LOCALHOST);
        assert!(t.try_add(a, 2) && t.try_add(a, 2));
        assert!(!t.try_add(a, 2), "third from one source");
        assert!(t.try_add(b, 2), "another source still connects");
        // The v4-mapped form is the same source.
        assert!(!t.try_add(IpAddr::V6(Ipv4Addr::new(127, 0, 0, 2).to_ipv6_mapped()), 2));
        t.remove(a);
        assert_eq!(t.count(a), 1);
        assert!(t.try_add(a, 2));
    }

    #[test]
    fn many_sources_churn_without_losing_entries() {
        let t = SourceTable::new(1000);
        let ip = |i: u32| IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i));
        for round in 0..20u32 {
            for i in 0..1000 {
                assert!(t.try_add(ip(i * 7 + round), 1), "round {round} source {i}");
            }
            for i in 0..1000 {
                assert_eq!(t.count(ip(i * 7 + round)), 1);
            }
            for i in 0..1000 {
                t.remove(ip(i * 7 + round));
            }
            for i in 0..1000 {
                assert_eq!(t.count(ip(i * 7 + round)), 0);
            }
        }
    }
}
