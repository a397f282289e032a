//! Token encoding, and the only place that knows it: pair sockets are `index << 1 | side`;
//! listeners and the waker live in a reserved range at the top of the token space. Decoding
//! never panics: anything unknown is `Decoded::Unknown` and is ignored by the loop.

use mio::Token;

pub use crate::outcome::Side;

pub const WAKER: Token = Token(usize::MAX);
/// Listener `i` is `Token(LISTENER_BASE + i)`.
const MAX_LISTENERS: usize = 1 << 20;
const LISTENER_BASE: usize = usize::MAX - 1 - MAX_LISTENERS;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoded {
    Pair(usize, Side),
    Listener(usize),
    Waker,
    Unknown,
}

#[inline]
pub fn pair(index: usize, side: Side) -> Token {
    Token(index << 1 | side as usize)
}

pub fn listener(i: usize) -> Token {
    Token(LISTENER_BASE + i.min(MAX_LISTENERS - 1))
}

#[inline]
pub fn decode(t: Token) -> Decoded {
    let v = t.0;
    if v == WAKER.0 {
        Decoded::Waker
    } else if v >= LISTENER_BASE {
        if v - LISTENER_BASE < MAX_LISTENERS {
            Decoded::Listener(v - LISTENER_BASE)
        } else {
            Decoded::Unknown
        }
    } else {
        let side = if v & 1 == 0 {
            Side::Client
        } else {
            Side::Upstream
        };
        Decoded::Pair(v >> 1, side)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        for i in [0usize, 1, 7, 9999, 1 << 30] {
            assert_eq!(
                decode(pair(i, Side::Client)),
                Decoded::Pair(i, Side::Client)
            );
            assert_eq!(
                decode(pair(i, Side::Upstream)),
                Decoded::Pair(i, Side::Upstream)
            );
        }
        assert_eq!(decode(listener(3)), Decoded::Listener(3));
        assert_eq!(decode(WAKER), Decoded::Waker);
        assert_eq!(decode(Token(usize::MAX - 1)), Decoded::Unknown);
    }
}
