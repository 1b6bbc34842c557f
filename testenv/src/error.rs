use std::fmt;

/// Why a server could not be started or driven; the message says what to do.
#[derive(Debug, Clone)]
pub struct Error(String);

/// A result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn new(msg: impl Into<String>) -> Self {
        Error(msg.into())
    }

    pub(crate) fn io(what: impl fmt::Display, e: std::io::Error) -> Self {
        Error(format!("{what}: {e}"))
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}
