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
    /// The process to signal has already ended (the backend recognised its runtime saying so).
    #[error("process {id}: already finished")]
    ProcessFinished { id: String },
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
            // NOT_FOUND tells containerd an object is gone: only for unknown ids and processes
            // that already ended, never for a file some step could not find.
            Error::NotFound { .. } | Error::ProcessFinished { .. } => Code::NOT_FOUND,
            Error::AlreadyExists { .. } => Code::ALREADY_EXISTS,
            Error::FailedPrecondition { .. } => Code::FAILED_PRECONDITION,
            Error::InvalidArgument { .. } => Code::INVALID_ARGUMENT,
            Error::Runtime { .. } | Error::Io { .. } | Error::Other { .. } => Code::UNKNOWN,
        }
    }
}

impl From<stasis_api::layout::LayoutError> for Error {
    fn from(e: stasis_api::layout::LayoutError) -> Self {
        Error::invalid("checkpoint", e.to_string())
    }
}

impl From<Error> for ttrpc::Error {
    fn from(e: Error) -> Self {
        ttrpc::Error::RpcStatus(ttrpc::get_status(e.code(), e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_unknown_objects_are_not_found() {
        let missing_file = std::io::Error::from(std::io::ErrorKind::NotFound);
        assert_eq!(
            Error::io("c1", "read x", missing_file).code(),
            Code::UNKNOWN
        );
        assert_eq!(Error::not_found("container", "c1").code(), Code::NOT_FOUND);
        assert_eq!(
            Error::ProcessFinished { id: "c1".into() }.code(),
            Code::NOT_FOUND
        );
        assert_eq!(
            Error::precondition("c1", "busy").code(),
            Code::FAILED_PRECONDITION
        );
    }
}
