//! Errors of the data crate: each names the file or directory it is about and, where there is
//! one, the command that fixes it.

use std::path::PathBuf;

/// Anything that goes wrong while finding, reading, decoding or batching data.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A dataset directory or file is not there.
    #[error("{what} not found at {path}: {hint}")]
    Missing {
        /// What was looked for, e.g. "CIFAR-10 binary batches".
        what: String,
        /// Where.
        path: PathBuf,
        /// How to get it, e.g. the download command.
        hint: String,
    },
    /// A file is shorter (or longer) than its format says.
    #[error("{path}: expected {expected} bytes, found {actual} (truncated or not this format?)")]
    Size {
        /// The file.
        path: PathBuf,
        /// The size its format requires.
        expected: u64,
        /// Its size.
        actual: u64,
    },
    /// A label outside `0..classes`.
    #[error("{path}: label {value} of item {index} is outside 0..{classes}")]
    BadLabel {
        /// The file holding the label.
        path: PathBuf,
        /// The item's index.
        index: usize,
        /// The label read.
        value: i64,
        /// The number of classes.
        classes: usize,
    },
    /// A file whose content is not what its format says.
    #[error("{path}: {message}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// An I/O error on a file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// An image that does not decode.
    #[error("{path}: cannot decode image: {source}")]
    Image {
        /// The image file, or the container and item it came from.
        path: PathBuf,
        /// The decoder's error.
        source: image::ImageError,
    },
    /// An error from the tensor library while building a batch.
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
    /// A failure of the Hugging Face Hub download.
    #[error("{0}")]
    Hub(String),
}

/// The result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// A [`Error::Format`] for `path`.
    pub fn format(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Self::Format { path: path.into(), message: message.into() }
    }

    /// An [`Error::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io { path: path.into(), source }
    }
}

/// Reads a whole file, naming it in the error.
pub(crate) fn read(path: &std::path::Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::io(path, e))
}
