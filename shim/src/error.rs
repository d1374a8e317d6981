//! Errors of the shim, each naming the object and the step that failed, and their mapping
//! to the ttrpc status codes containerd understands.

use containerd_shim_protos::ttrpc::{self, Code};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{kind} {id}: not found")]
    NotFound { kind: &'static str, id: String },
    #[error("{kind} {id}: already exists")]
    AlreadyExists { kind: &'static str, id: String },
    #[error("{id}: {reason}")]
    FailedPrecondition { id: String, reason: String },
    #[error("{id}: invalid argument: {reason}")]
    InvalidArgument { id: String, reason: String },
    /// The OCI runtime (or a tool it drives) failed; `message` is its own explanation.
    #[error("{id}: {step} failed: {message}")]
    Runtime {
        id: String,
        step: String,
        message: String,
    },
    #[error("{id}: {step}: {source}")]
    Io {
        id: String,
        step: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{id}: {step}: {message}")]
    Other {
        id: String,
        step: String,
        message: String,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn not_found(kind: &'static str, id: impl Into<String>) -> Self {
        Error::NotFound {
            kind,
            id: id.into(),
        }
    }

    pub fn precondition(id: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::FailedPrecondition {
            id: id.into(),
            reason: reason.into(),
        }
    }

    pub fn invalid(id: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidArgument {
            id: id.into(),
            reason: reason.into(),
        }
    }

    pub fn io(id: impl Into<String>, step: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            id: id.into(),
            step: step.into(),
            source,
        }
    }

    pub fn other(id: impl Into<String>, step: impl Into<String>, message: impl ToString) -> Self {
        Error::Other {
            id: id.into(),
            step: step.into(),
            message: message.to_string(),
        }
    }

    pub fn code(&self) -> Code {
        match self {
            Error::NotFound { .. } => Code::NOT_FOUND,
            Error::AlreadyExists { .. } => Code::ALREADY_EXISTS,
            Error::FailedPrecondition { .. } => Code::FAILED_PRECONDITION,
            Error::InvalidArgument { .. } => Code::INVALID_ARGUMENT,
            Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                Code::NOT_FOUND
            }
            _ => Code::UNKNOWN,
        }
    }
}

impl From<Error> for ttrpc::Error {
    fn from(e: Error) -> Self {
        ttrpc::Error::RpcStatus(ttrpc::get_status(e.code(), e.to_string()))
    }
}
