//! Errors of the setup and control paths: a kind (which maps to an exit code) and a context
//! naming the failed step and object ("bind 0.0.0.0:8080: Address in use"). The relay hot path
//! never uses this type; it has its own small `Copy` enums.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Bad flags or configuration: exit status 2.
    Config,
    /// Failure at runtime (bind, spawn, poll): exit status 1.
    Runtime,
}

#[derive(Debug)]
pub struct Error {
    pub kind: ErrorKind,
    pub context: String,
}

impl Error {
    pub fn config(context: impl Into<String>) -> Error {
        Error {
            kind: ErrorKind::Config,
            context: context.into(),
        }
    }
    pub fn runtime(context: impl Into<String>) -> Error {
        Error {
            kind: ErrorKind::Runtime,
            context: context.into(),
        }
    }
    /// "step: os error" for an io::Error.
    pub fn io(step: impl fmt::Display, err: std::io::Error) -> Error {
        Error::runtime(format!("{step}: {err}"))
    }
    pub fn exit_code(&self) -> i32 {
        match self.kind {
            ErrorKind::Config => 2,
            ErrorKind::Runtime => 1,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.context)
    }
}

impl std::error::Error for Error {}

impl From<crate::config::ConfigError> for Error {
    fn from(e: crate::config::ConfigError) -> Error {
        Error::config(e.to_string())
    }
}
