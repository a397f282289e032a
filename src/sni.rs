//! TLS ClientHello server name (interim; replaced by the full incremental reader).

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sni {
    Incomplete,
    NotTls,
    NoSni,
    Name(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SniError {
    Malformed,
}

pub fn peek_sni(buf: &[u8], _out: &mut [u8]) -> Result<Sni, SniError> {
    if buf.is_empty() {
        return Ok(Sni::Incomplete);
    }
    Ok(Sni::NotTls)
}
