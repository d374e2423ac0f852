//! Typed errors. Every message names the file, and where it applies the node and op, so a
//! user can act on it without reading our code.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },

    #[error("{}: not a valid ONNX model: {msg}", path.display())]
    Parse { path: PathBuf, msg: String },

    #[error("{}: tensor '{name}': {msg}", path.display())]
    Tensor { path: PathBuf, name: String, msg: String },

    #[error("{}: node '{node}' ({op}): {msg}", path.display())]
    Node { path: PathBuf, node: String, op: String, msg: String },

    #[error("{}: {msg}", path.display())]
    Calibration { path: PathBuf, msg: String },

    /// The model has no unit of the asked-for kinds that can be removed safely.
    #[error("{}: nothing to prune: {msg}", path.display())]
    NothingToPrune { path: PathBuf, msg: String },

    #[error("invalid option: {0}")]
    Option(String),

    #[error("after pass {pass}: {msg}")]
    Pass { pass: String, msg: String },

    #[error("the pruned model does not match the masked dense model: {0}")]
    Verify(String),

    #[error("{0}")]
    Other(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Error {
        Error::Io { path: path.into(), source }
    }

    /// Exit code for the CLI: 2 for bad input (files, options), 3 for a failed
    /// verification, 1 for anything else.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Io { .. }
            | Error::Parse { .. }
            | Error::Tensor { .. }
            | Error::Node { .. }
            | Error::Calibration { .. }
            | Error::NothingToPrune { .. }
            | Error::Option(_) => 2,
            Error::Verify(_) => 3,
            Error::Pass { .. } | Error::Other(_) => 1,
        }
    }
}
