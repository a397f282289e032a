//! Fixed-size relay buffers and their cursor. A `BufPool` owns one arena of
//! `count x size` bytes, allocated (zeroed, so untouched pages stay unmapped) once at worker
//! start, and a LIFO free list of slot numbers. A pair holds a slot only while that direction
//! has bytes in flight, so idle pairs cost no buffer memory and recently used (hot) slots are
//! reused first. Pure: no sockets, no clock; never allocates after `new`.

use crate::sys::ZeroedRegion;

/// Pool of fixed-size buffers carved out of one arena.
pub struct BufPool {
    /// `count * size` bytes; slot `i` is `arena[i*size .. (i+1)*size]`.
    arena: ZeroedRegion,
    size: usize,
    /// Free slots; LIFO. Capacity `count`, so pushes never allocate.
    free: Vec<u32>,
}

impl BufPool {
    /// Reserve `count` buffers of `size` bytes. Fails (rather than aborting) when the address
    /// space cannot be reserved.
    pub fn new(count: usize, size: usize) -> std::io::Result<BufPool> {
        let count = count.min(u32::MAX as usize);
        let bytes = count
            .checked_mul(size)
            .ok_or_else(|| std::io::Error::other("buffer pool size overflows"))?;
        let arena = ZeroedRegion::new(bytes)?;
        let mut free = Vec::with_capacity(count);
        // Highest first so that slot 0 is handed out first (the arena fills from its start).
        free.extend((0..count as u32).rev());
        Ok(BufPool { arena, size, free })
    }

    /// Bytes per buffer.
    pub fn buffer_size(&self) -> usize {
        self.size
    }

    /// Slots currently handed out.
    pub fn in_use(&self) -> usize {
        self.arena.len() / self.size.max(1) - self.free.len()
    }

    fn take(&mut self) -> Option<u32> {
        self.free.pop()
    }

    fn give(&mut self, slot: u32) {
        debug_assert!(self.free.len() < self.free.capacity());
        self.free.push(slot);
    }

    fn slot(&mut self, slot: u32) -> &mut [u8] {
        let start = slot as usize * self.size;
        &mut self.arena.as_mut_slice()[start..start + self.size]
    }
}

/// One direction's buffer: a pool slot (only while bytes are in flight) and a cursor.
/// Invariant: `start <= end <= pool.size`; `slot.is_none()` implies `start == end == 0`.
#[derive(Debug, Default, Clone, Copy)]
pub struct Buffer {
    slot: Option<u32>,
    start: u32,
    end: u32,
}

impl Buffer {
    /// Bytes waiting to be written.
    #[inline]
    pub fn pending(&self) -> usize {
        (self.end - self.start) as usize
    }

    #[inline]
    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    pub fn holds_slot(&self) -> bool {
        self.slot.is_some()
    }

    /// Space to read into, taking a slot from the pool if needed. `None` when the buffer still
    /// has unflushed bytes (we only refill an empty buffer) or the pool is exhausted.
    #[inline]
    pub fn space<'a>(&mut self, pool: &'a mut BufPool) -> Option<&'a mut [u8]> {
        if !self.is_empty() {
            return None;
        }
        let slot = match self.slot {
            Some(s) => s,
            None => {
                let s = pool.take()?;
                self.slot = Some(s);
                s
            }
        };
        self.start = 0;
        self.end = 0;
        Some(pool.slot(slot))
    }

    /// Record `n` bytes read into the space returned by `space`.
    #[inline]
    pub fn filled(&mut self, n: usize) {
        self.start = 0;
        self.end = n as u32;
    }

    /// The unflushed bytes.
    #[inline]
    pub fn data<'a>(&self, pool: &'a mut BufPool) -> &'a [u8] {
        match self.slot {
            Some(s) => &pool.slot(s)[self.start as usize..self.end as usize],
            None => &[],
        }
    }

    /// Mark `n` bytes as written.
    #[inline]
    pub fn consumed(&mut self, n: usize) {
        self.start += n as u32;
        debug_assert!(self.start <= self.end);
    }

    /// Space after the unflushed bytes, taking a slot if needed: used while a pair peeks at
    /// its client's first bytes (PROXY header, TLS ClientHello), which accumulate. `None` when
    /// the pool is exhausted; empty when the buffer is full.
    pub fn tail_space<'a>(&mut self, pool: &'a mut BufPool) -> Option<&'a mut [u8]> {
        let slot = match self.slot {
            Some(s) => s,
            None => {
                let s = pool.take()?;
                self.slot = Some(s);
                s
            }
        };
        let end = self.end as usize;
        Some(&mut pool.slot(slot)[end..])
    }

    /// Record `n` bytes read into the space returned by `tail_space`.
    pub fn appended(&mut self, n: usize) {
        self.end += n as u32;
    }

    /// Put `bytes` in front of the unflushed bytes (moving them if the room is behind them).
    /// `false` (nothing changed) when they do not fit or the pool is exhausted.
    pub fn prepend(&mut self, pool: &mut BufPool, bytes: &[u8]) -> bool {
        let size = pool.size;
        if self.pending() + bytes.len() > size {
            return false;
        }
        if self.tail_space(pool).is_none() {
            return false;
        }
        let Some(slot) = self.slot else {
            return false;
        };
        let (start, end, n) = (self.start as usize, self.end as usize, bytes.len());
        let buf = pool.slot(slot);
        let new_start = if start >= n {
            start - n
        } else {
            // Shift the data right so the header fits in front of it.
            buf.copy_within(start..end, n);
            self.end = (end - start + n) as u32;
            0
        };
        buf[new_start..new_start + n].copy_from_slice(bytes);
        self.start = new_start as u32;
        true
    }

    /// Give the slot back if the buffer is empty (or unconditionally with `force`, dropping
    /// unflushed bytes: used when the pair closes).
    #[inline]
    pub fn release(&mut self, pool: &mut BufPool, force: bool) {
        if let Some(s) = self.slot
            && (force || self.is_empty())
        {
            pool.give(s);
            *self = Buffer::default();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peeked_bytes_accumulate_and_a_header_goes_in_front() {
        let mut pool = BufPool::new(1, 16).expect("pool");
        let mut b = Buffer::default();
        let space = b.tail_space(&mut pool).expect("slot");
        space[..3].copy_from_slice(b"abc");
        b.appended(3);
        let space = b.tail_space(&mut pool).expect("slot");
        space[..2].copy_from_slice(b"de");
        b.appended(2);
        assert_eq!(b.data(&mut pool), b"abcde");
        b.consumed(2); // a PROXY header of 2 bytes read from the client
        assert!(b.prepend(&mut pool, b"H"), "room behind the data");
        assert_eq!(b.data(&mut pool), b"Hcde");
        assert!(b.prepend(&mut pool, b"1234"), "moves the data right");
        assert_eq!(b.data(&mut pool), b"1234Hcde");
        assert!(!b.prepend(&mut pool, b"123456789"), "does not fit");
        assert_eq!(b.data(&mut pool), b"1234Hcde");
    }

    #[test]
    fn slots_are_lifo_and_bounded() {
        let mut pool = BufPool::new(2, 16).expect("pool");
        let mut a = Buffer::default();
        let mut b = Buffer::default();
        let mut c = Buffer::default();
        assert!(a.space(&mut pool).is_some());
        a.filled(3);
        assert!(b.space(&mut pool).is_some());
        b.filled(1);
        assert!(
            c.space(&mut pool).is_none(),
            "pool of 2 must refuse a third"
        );
        assert_eq!(pool.in_use(), 2);
        b.consumed(1);
        b.release(&mut pool, false);
        assert_eq!(pool.in_use(), 1);
        assert!(c.space(&mut pool).is_some());
    }

    #[test]
    fn cursor_tracks_pending_and_refuses_refill_until_flushed() {
        let mut pool = BufPool::new(1, 8).expect("pool");
        let mut a = Buffer::default();
        let s = a.space(&mut pool).map(|s| {
            s[..4].copy_from_slice(b"abcd");
            s.len()
        });
        assert_eq!(s, Some(8));
        a.filled(4);
        assert_eq!(a.data(&mut pool), b"abcd");
        a.consumed(1);
        assert_eq!(a.data(&mut pool), b"bcd");
        assert!(a.space(&mut pool).is_none());
        a.release(&mut pool, false);
        assert!(a.holds_slot(), "non-empty buffer keeps its slot");
        a.consumed(3);
        a.release(&mut pool, false);
        assert!(!a.holds_slot());
        assert_eq!(pool.in_use(), 0);
    }
}
