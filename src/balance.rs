//! Load-balancing policies: for each new connection, the ordered list of targets to try.
//!
//! A [`Balancer`] is built once per app per worker and owns all the memory it will ever need;
//! [`Balancer::candidates`] then fills a caller-provided list without allocating. The order is
//! the failover order: targets that are up come first, in the policy's order, then the down ones
//! (fail-open: a target marked down is still tried last, and when none is up the policy orders
//! all of them). This module is pure: it must never touch sockets, read the clock or allocate
//! after construction.

use std::net::IpAddr;

use crate::config::Balance;

/// Ring points per unit of weight for source-hash (fewer when the total would exceed
/// [`MAX_RING`]).
const POINTS_PER_WEIGHT: u64 = 100;
/// Upper bound on ring size, whatever the weights.
const MAX_RING: u64 = 1 << 16;
/// Targets beyond this many are ignored (indices are `u16`).
const MAX_TARGETS: usize = u16::MAX as usize + 1;

/// Per-app, per-worker balancing state.
#[derive(Debug, Clone)]
pub struct Balancer {
    policy: Balance,
    /// Relative weight of each target; always `>= 1`. Its length is the number of targets.
    weights: Vec<u32>,
    /// Smooth weighted round-robin: current weight of each target (same length as `weights`).
    current: Vec<i64>,
    /// Index picked by the last call (least-conn ties rotate from here).
    last: usize,
    /// xorshift64* state, never 0.
    rng: u64,
    /// Consistent-hash ring for source-hash: `(point, target)` sorted by point. Built from
    /// target indices and weights only (never from `seed`), so every worker maps a client IP
    /// to the same target.
    ring: Vec<(u64, u16)>,
    /// Scratch, same length as `weights`: whether target `i` counts as up in this call.
    up: Vec<bool>,
    /// Scratch, same length as `weights`: target already placed in the output (source-hash).
    seen: Vec<bool>,
    /// Scratch, same length as `weights`: active pairs of target `i` sampled in this call.
    active: Vec<u32>,
}

/// splitmix64's finalizer: a cheap, well-mixed 64-bit hash.
fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Hash of a client address; an IPv4-mapped IPv6 address hashes like its IPv4 form.
fn hash_ip(ip: IpAddr) -> u64 {
    let v4 = |v4: std::net::Ipv4Addr| mix64(u64::from(u32::from(v4)) ^ 0x5A5A_0000_0000_0000);
    match ip {
        IpAddr::V4(a) => v4(a),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(a) => v4(a),
            None => {
                let bits = u128::from(v6);
                mix64((bits >> 64) as u64 ^ mix64(bits as u64))
            }
        },
    }
}

impl Balancer {
    /// Built once per app per worker (allocation allowed here). `weights[i] >= 1` for target
    /// `i` (0 counts as 1). `seed` seeds the random policy.
    pub fn new(policy: Balance, weights: &[u32], seed: u64) -> Balancer {
        let keys: Vec<u64> = (0..weights.len() as u64).collect();
        Balancer::with_keys(policy, weights, &keys, seed)
    }

    /// Like `new`, with a stable identity per target (e.g. a hash of its name) that places
    /// its source-hash ring points: then adding or removing a target elsewhere in the list
    /// (a reload) moves only that target's clients. `keys.len()` must equal `weights.len()`.
    pub fn with_keys(policy: Balance, weights: &[u32], keys: &[u64], seed: u64) -> Balancer {
        let weights: Vec<u32> = weights
            .iter()
            .take(MAX_TARGETS)
            .map(|&w| w.max(1))
            .collect();
        let n = weights.len();
        let ring = if policy == Balance::SourceHash {
            build_ring(&weights, keys)
        } else {
            Vec::new()
        };
        let mut rng = mix64(seed);
        if rng == 0 {
            rng = 0x2545_F491_4F6C_DD1D;
        }
        Balancer {
            policy,
            current: vec![0; n],
            last: n.saturating_sub(1),
            rng,
            ring,
            up: vec![false; n],
            seen: vec![false; n],
            active: vec![0; n],
            weights,
        }
    }

    /// Number of targets.
    pub fn len(&self) -> usize {
        self.weights.len()
    }

    /// Whether there are no targets at all.
    pub fn is_empty(&self) -> bool {
        self.weights.is_empty()
    }

    /// Fill `out` (cleared first) with ALL target indices in the order to try them: targets
    /// for which `up(i)` is true first, in policy order, then the down ones (fail-open: if
    /// every target is down the policy orders all of them). Returns true if no target was up.
    /// `active(i)` = live pairs on target i (least-conn). `client` = client IP (source-hash).
    /// Does not allocate when `out.capacity() >= self.len()`.
    pub fn candidates(
        &mut self,
        client: IpAddr,
        up: &dyn Fn(usize) -> bool,
        active: &dyn Fn(usize) -> u32,
        out: &mut Vec<u16>,
    ) -> bool {
        out.clear();
        let n = self.len();
        if n == 0 {
            return true;
        }
        let mut up_count = 0;
        for (i, slot) in self.up.iter_mut().enumerate() {
            *slot = up(i);
            up_count += usize::from(*slot);
        }
        let none_up = up_count == 0;
        if none_up {
            // Fail open: order every target as if all were up.
            self.up.iter_mut().for_each(|u| *u = true);
            up_count = n;
        }
        match self.policy {
            Balance::RoundRobin => self.order_round_robin(out),
            Balance::Random => self.order_random(out),
            Balance::LeastConn => self.order_least_conn(active, out),
            Balance::SourceHash => self.order_source_hash(client, up_count, out),
        }
        if let Some(&first) = out.first() {
            self.last = usize::from(first);
        }
        // Then the down ones, in index order.
        for (i, &is_up) in self.up.iter().enumerate() {
            if !is_up {
                out.push(i as u16);
            }
        }
        none_up
    }

    /// Up targets after `first`, cyclically, appended to `out` (`first` itself is already in).
    fn push_rest_cyclic(&self, first: usize, out: &mut Vec<u16>) {
        let n = self.len();
        for k in 1..n {
            let i = (first + k) % n;
            if self.up[i] {
                out.push(i as u16);
            }
        }
    }

    /// Smooth weighted round-robin (as in nginx) over the up targets: every target gains its
    /// weight, the largest current value wins (lowest index on ties) and pays the total back.
    /// Equal weights give an exact rotation; with weights, counts stay within 1 of the ideal.
    fn order_round_robin(&mut self, out: &mut Vec<u16>) {
        let mut total: i64 = 0;
        let mut best: Option<usize> = None;
        for i in 0..self.len() {
            if !self.up[i] {
                continue;
            }
            let w = i64::from(self.weights[i]);
            self.current[i] += w;
            total += w;
            if best.is_none_or(|b| self.current[i] > self.current[b]) {
                best = Some(i);
            }
        }
        if let Some(b) = best {
            self.current[b] -= total;
            out.push(b as u16);
            self.push_rest_cyclic(b, out);
        }
    }

    fn next_random(&mut self) -> u64 {
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A weighted random pick among the up targets, then the others cyclically.
    fn order_random(&mut self, out: &mut Vec<u16>) {
        let total: u64 = (0..self.len())
            .filter(|&i| self.up[i])
            .map(|i| u64::from(self.weights[i]))
            .sum();
        if total == 0 {
            return;
        }
        let mut r = self.next_random() % total;
        let mut pick = 0;
        for i in 0..self.len() {
            if !self.up[i] {
                continue;
            }
            let w = u64::from(self.weights[i]);
            if r < w {
                pick = i;
                break;
            }
            r -= w;
        }
        out.push(pick as u16);
        self.push_rest_cyclic(pick, out);
    }

    /// Up targets sorted by `active / weight` (fewest first). Ties keep a rotation that starts
    /// after the last pick, so equal targets take turns.
    fn order_least_conn(&mut self, active: &dyn Fn(usize) -> u32, out: &mut Vec<u16>) {
        let n = self.len();
        for i in 0..n {
            if self.up[i] {
                self.active[i] = active(i);
            }
        }
        let start = (self.last + 1) % n;
        for k in 0..n {
            let i = (start + k) % n;
            if self.up[i] {
                out.push(i as u16);
            }
        }
        // Stable insertion sort (no allocation): a before b when a/wa < b/wb.
        let less = |a: u16, b: u16| {
            let (a, b) = (usize::from(a), usize::from(b));
            u64::from(self.active[a]) * u64::from(self.weights[b])
                < u64::from(self.active[b]) * u64::from(self.weights[a])
        };
        for j in 1..out.len() {
            let mut k = j;
            while k > 0 && less(out[k], out[k - 1]) {
                out.swap(k, k - 1);
                k -= 1;
            }
        }
    }

    /// Consistent hashing: the first up target clockwise from the client's hash, then the next
    /// distinct up targets along the ring. A target going down moves only the clients it had.
    fn order_source_hash(&mut self, client: IpAddr, up_count: usize, out: &mut Vec<u16>) {
        if self.ring.is_empty() {
            return;
        }
        let h = hash_ip(client);
        let start = self.ring.partition_point(|&(p, _)| p < h);
        let len = self.ring.len();
        for k in 0..len {
            if out.len() == up_count {
                break;
            }
            let t = usize::from(self.ring[(start + k) % len].1);
            if self.up[t] && !self.seen[t] {
                self.seen[t] = true;
                out.push(t as u16);
            }
        }
        for &t in out.iter() {
            self.seen[usize::from(t)] = false;
        }
    }
}

/// Ring points: `weight * per` points per target, each the hash of (target key, replica).
fn build_ring(weights: &[u32], keys: &[u64]) -> Vec<(u64, u16)> {
    let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
    let per = (MAX_RING / total.max(1)).clamp(1, POINTS_PER_WEIGHT);
    let mut ring = Vec::with_capacity((total * per) as usize);
    for (i, &w) in weights.iter().enumerate() {
        for r in 0..u64::from(w) * per {
            let key = keys.get(i).copied().unwrap_or(i as u64);
            let point = mix64(mix64(key) ^ mix64(r) ^ 0xC0FF_EE00_D15E_A5E5);
            ring.push((point, i as u16));
        }
    }
    ring.sort_unstable();
    ring
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

    fn all_up(_: usize) -> bool {
        true
    }
    fn idle(_: usize) -> u32 {
        0
    }

    /// First pick of one call.
    fn pick(b: &mut Balancer, up: &dyn Fn(usize) -> bool, out: &mut Vec<u16>) -> usize {
        b.candidates(CLIENT, up, &idle, out);
        usize::from(out[0])
    }

    fn assert_permutation(out: &[u16], n: usize) {
        let mut seen = vec![false; n];
        assert_eq!(out.len(), n, "{out:?}");
        for &i in out {
            assert!(!seen[usize::from(i)], "duplicate in {out:?}");
            seen[usize::from(i)] = true;
        }
    }

    #[test]
    fn round_robin_rotates_exactly() {
        let mut b = Balancer::new(Balance::RoundRobin, &[1, 1, 1], 7);
        let mut out = Vec::with_capacity(3);
        let seq: Vec<usize> = (0..9).map(|_| pick(&mut b, &all_up, &mut out)).collect();
        assert_eq!(seq, vec![0, 1, 2, 0, 1, 2, 0, 1, 2]);
        let mut counts = [0; 3];
        for _ in 0..300 {
            counts[pick(&mut b, &all_up, &mut out)] += 1;
        }
        assert_eq!(counts, [100, 100, 100]);
    }

    #[test]
    fn round_robin_failover_order_is_the_rest_of_the_rotation() {
        let mut b = Balancer::new(Balance::RoundRobin, &[1, 1, 1, 1], 0);
        let mut out = Vec::with_capacity(4);
        b.candidates(CLIENT, &all_up, &idle, &mut out);
        assert_eq!(out, vec![0, 1, 2, 3]);
        b.candidates(CLIENT, &all_up, &idle, &mut out);
        assert_eq!(out, vec![1, 2, 3, 0]);
    }

    #[test]
    fn round_robin_weights_are_smooth_and_exact() {
        let weights = [5, 1, 1];
        let mut b = Balancer::new(Balance::RoundRobin, &weights, 0);
        let mut out = Vec::with_capacity(3);
        let seq: Vec<usize> = (0..7).map(|_| pick(&mut b, &all_up, &mut out)).collect();
        // nginx's classic example: a a b a c a a.
        assert_eq!(seq, vec![0, 0, 1, 0, 2, 0, 0]);

        let weights = [1, 2, 3, 4];
        let total: u32 = weights.iter().sum();
        let mut b = Balancer::new(Balance::RoundRobin, &weights, 0);
        let mut counts = [0u32; 4];
        for k in 1..=(total * 50) {
            counts[pick(&mut b, &all_up, &mut out)] += 1;
            for (i, &w) in weights.iter().enumerate() {
                let ideal = f64::from(k) * f64::from(w) / f64::from(total);
                assert!(
                    (f64::from(counts[i]) - ideal).abs() <= 1.0,
                    "after {k}: {counts:?}"
                );
            }
            if k % total == 0 {
                let r = k / total;
                assert_eq!(counts, [r, 2 * r, 3 * r, 4 * r]);
            }
        }
    }

    #[test]
    fn down_targets_are_skipped_then_listed_last() {
        let mut b = Balancer::new(Balance::RoundRobin, &[1, 1, 1], 0);
        let mut out = Vec::with_capacity(3);
        let up = |i: usize| i != 1;
        let mut counts = [0; 3];
        for _ in 0..100 {
            let none = b.candidates(CLIENT, &up, &idle, &mut out);
            assert!(!none);
            assert_permutation(&out, 3);
            assert_eq!(out[2], 1, "the down target comes last: {out:?}");
            counts[usize::from(out[0])] += 1;
        }
        assert_eq!(counts, [50, 0, 50]);
    }

    #[test]
    fn every_policy_fails_open_when_all_are_down() {
        for policy in [
            Balance::RoundRobin,
            Balance::Random,
            Balance::LeastConn,
            Balance::SourceHash,
        ] {
            let mut b = Balancer::new(policy, &[1, 2, 1], 3);
            let mut out = Vec::with_capacity(3);
            let mut firsts = [0; 3];
            for k in 0..60u8 {
                let client = IpAddr::V4(Ipv4Addr::new(10, 0, 0, k));
                let none = b.candidates(client, &|_| false, &idle, &mut out);
                assert!(none, "{policy:?}");
                assert_permutation(&out, 3);
                firsts[usize::from(out[0])] += 1;
            }
            if policy != Balance::SourceHash {
                assert!(firsts.iter().all(|&c| c > 0), "{policy:?} {firsts:?}");
            }
            let none = b.candidates(CLIENT, &|i| i == 2, &idle, &mut out);
            assert!(!none);
            assert_eq!(out[0], 2, "{policy:?}");
            assert_permutation(&out, 3);
        }
    }

    #[test]
    fn candidates_do_not_reallocate() {
        for policy in [
            Balance::RoundRobin,
            Balance::Random,
            Balance::LeastConn,
            Balance::SourceHash,
        ] {
            let mut b = Balancer::new(policy, &[1, 3, 2, 1, 1], 11);
            let mut out: Vec<u16> = Vec::with_capacity(b.len());
            let ptr = out.as_ptr();
            let cap = out.capacity();
            for k in 0..500u32 {
                let client = IpAddr::V4(Ipv4Addr::from(k.wrapping_mul(2_654_435_761)));
                let up = move |i: usize| !(i as u32 + k).is_multiple_of(4);
                let active = move |i: usize| (i as u32 * 7 + k) % 5;
                b.candidates(client, &up, &active, &mut out);
                assert_permutation(&out, 5);
            }
            assert_eq!((out.as_ptr(), out.capacity()), (ptr, cap), "{policy:?}");
        }
    }

    #[test]
    fn random_respects_weights() {
        let weights = [1, 2, 3, 4];
        let mut b = Balancer::new(Balance::Random, &weights, 42);
        let mut out = Vec::with_capacity(4);
        let mut counts = [0u32; 4];
        let n = 100_000;
        for _ in 0..n {
            let p = pick(&mut b, &all_up, &mut out);
            assert_permutation(&out, 4);
            counts[p] += 1;
        }
        for (i, &w) in weights.iter().enumerate() {
            let expected = f64::from(n) * f64::from(w) / 10.0;
            let err = (f64::from(counts[i]) - expected).abs() / expected;
            assert!(err < 0.05, "{counts:?}");
        }
        // Down targets are never picked first.
        for _ in 0..1000 {
            assert_ne!(pick(&mut b, &|i| i != 3, &mut out), 3);
        }
    }

    #[test]
    fn random_is_deterministic_per_seed() {
        let run = |seed| {
            let mut b = Balancer::new(Balance::Random, &[1, 1, 1, 1], seed);
            let mut out = Vec::with_capacity(4);
            (0..32)
                .map(|_| pick(&mut b, &all_up, &mut out))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(1), run(1));
        assert_ne!(run(1), run(2));
        assert_eq!(run(0).len(), 32);
    }

    #[test]
    fn least_conn_picks_fewest_active() {
        let mut b = Balancer::new(Balance::LeastConn, &[1, 1, 1], 0);
        let mut out = Vec::with_capacity(3);
        let active = |i: usize| [5, 2, 9][i];
        for _ in 0..5 {
            b.candidates(CLIENT, &all_up, &active, &mut out);
            assert_eq!(out, vec![1, 0, 2]);
        }
        // Down targets are skipped even when idle.
        let active = |i: usize| [5, 0, 9][i];
        b.candidates(CLIENT, &|i| i != 1, &active, &mut out);
        assert_eq!(out, vec![0, 2, 1]);
    }

    #[test]
    fn least_conn_ties_rotate() {
        let mut b = Balancer::new(Balance::LeastConn, &[1, 1, 1], 0);
        let mut out = Vec::with_capacity(3);
        let seq: Vec<usize> = (0..6)
            .map(|_| {
                b.candidates(CLIENT, &all_up, &idle, &mut out);
                usize::from(out[0])
            })
            .collect();
        assert_eq!(seq, vec![0, 1, 2, 0, 1, 2]);
        // Only 0 and 2 tie at the minimum: they alternate.
        let active = |i: usize| [1, 4, 1][i];
        let seq: Vec<usize> = (0..4)
            .map(|_| {
                b.candidates(CLIENT, &all_up, &active, &mut out);
                usize::from(out[0])
            })
            .collect();
        assert!(
            seq == vec![0, 2, 0, 2] || seq == vec![2, 0, 2, 0],
            "{seq:?}"
        );
    }

    #[test]
    fn least_conn_divides_by_weight() {
        let mut b = Balancer::new(Balance::LeastConn, &[1, 4], 0);
        let mut out = Vec::with_capacity(2);
        // 3/1 > 8/4: target 1 has fewer per weight.
        b.candidates(CLIENT, &all_up, &|i| [3, 8][i], &mut out);
        assert_eq!(out, vec![1, 0]);
        // 1/1 < 8/4.
        b.candidates(CLIENT, &all_up, &|i| [1, 8][i], &mut out);
        assert_eq!(out, vec![0, 1]);
        // Simulate filling: each pick adds a live pair; the split follows the weights.
        let mut live = [0u32; 2];
        for _ in 0..100 {
            let l = live;
            b.candidates(CLIENT, &all_up, &move |i| l[i], &mut out);
            live[usize::from(out[0])] += 1;
        }
        assert_eq!(live, [20, 80]);
    }

    fn ip(k: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(127, 0, (k >> 8) as u8, k as u8))
    }

    #[test]
    fn source_hash_is_stable_and_spread() {
        let mut b = Balancer::new(Balance::SourceHash, &[1, 1, 1, 1], 5);
        let mut other = Balancer::new(Balance::SourceHash, &[1, 1, 1, 1], 99);
        let mut out = Vec::with_capacity(4);
        let mut counts = [0u32; 4];
        for k in 0..1000 {
            b.candidates(ip(k), &all_up, &idle, &mut out);
            assert_permutation(&out, 4);
            let first = out[0];
            counts[usize::from(first)] += 1;
            for _ in 0..3 {
                b.candidates(ip(k), &all_up, &idle, &mut out);
                assert_eq!(out[0], first);
            }
            // Another worker (another seed) agrees.
            other.candidates(ip(k), &all_up, &idle, &mut out);
            assert_eq!(out[0], first);
        }
        for &c in &counts {
            assert!((150..=350).contains(&c), "{counts:?}");
        }
    }

    #[test]
    fn source_hash_moves_only_the_removed_share() {
        let mut b = Balancer::new(Balance::SourceHash, &[1, 1, 1, 1], 0);
        let mut out = Vec::with_capacity(4);
        let before: Vec<u16> = (0..1000)
            .map(|k| {
                b.candidates(ip(k), &all_up, &idle, &mut out);
                out[0]
            })
            .collect();
        let up = |i: usize| i != 2;
        let mut moved = 0;
        for k in 0..1000u32 {
            b.candidates(ip(k), &up, &idle, &mut out);
            assert_permutation(&out, 4);
            assert_eq!(out[3], 2);
            let was = before[k as usize];
            if out[0] != was {
                moved += 1;
                assert_eq!(was, 2, "client {k} moved off a live target");
            }
        }
        assert!(moved > 0 && moved < 350, "moved {moved}");
        // When it comes back, everyone returns home.
        for k in 0..1000u32 {
            b.candidates(ip(k), &all_up, &idle, &mut out);
            assert_eq!(out[0], before[k as usize]);
        }
    }

    #[test]
    fn source_hash_follows_weights() {
        let mut b = Balancer::new(Balance::SourceHash, &[1, 3], 0);
        let mut out = Vec::with_capacity(2);
        let mut counts = [0u32; 2];
        for k in 0..4000 {
            b.candidates(ip(k), &all_up, &idle, &mut out);
            counts[usize::from(out[0])] += 1;
        }
        let share = f64::from(counts[1]) / 4000.0;
        assert!((0.65..0.85).contains(&share), "{counts:?}");
    }

    #[test]
    fn ipv6_and_mapped_clients() {
        let mut b = Balancer::new(Balance::SourceHash, &[1, 1, 1], 0);
        let mut out = Vec::with_capacity(3);
        let v4: IpAddr = "10.1.2.3".parse().unwrap();
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        b.candidates(v4, &all_up, &idle, &mut out);
        let a = out[0];
        b.candidates(mapped, &all_up, &idle, &mut out);
        assert_eq!(out[0], a);
        b.candidates("2001:db8::1".parse().unwrap(), &all_up, &idle, &mut out);
        assert_permutation(&out, 3);
    }

    #[test]
    fn empty_and_single() {
        let mut b = Balancer::new(Balance::RoundRobin, &[], 0);
        let mut out = Vec::new();
        assert!(b.is_empty());
        assert!(b.candidates(CLIENT, &all_up, &idle, &mut out));
        assert!(out.is_empty());
        let mut b = Balancer::new(Balance::SourceHash, &[0], 0);
        assert_eq!(b.len(), 1);
        assert!(!b.candidates(CLIENT, &all_up, &idle, &mut out));
        assert_eq!(out, vec![0]);
    }
}
