//! Errors shared by every surface. Each kind has a stable numeric code
//! ([`ErrorCode`]) that the C ABI and the Python exceptions carry unchanged.

/// Stable numeric error codes. Values never change once released; new kinds get new values.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// An argument has a value outside what the call accepts.
    InvalidArgument = 1,
    /// A tensor has the wrong shape or strides.
    Shape = 2,
    /// A tensor has a dtype the call does not accept.
    DType = 3,
    /// A required pointer was NULL.
    NullPointer = 4,
    /// A sequence id that the cache does not hold.
    UnknownSequence = 5,
    /// An index (token, slot, page, layer, head) is out of range.
    OutOfRange = 6,
    /// The page pool has too few free pages for the request.
    OutOfPages = 7,
    /// A configuration the library does not support (for example a head_dim).
    Unsupported = 8,
    /// The CUDA driver or device is not available.
    CudaUnavailable = 9,
    /// Reading or writing a file failed, or its contents are malformed.
    Io = 10,
    /// Text (such as a policy) could not be parsed.
    Parse = 11,
    /// A bug inside kvsieve (including a caught panic). Please report it.
    Internal = 12,
    /// Memory for a buffer the call needs could not be allocated.
    OutOfMemory = 13,
}

impl ErrorCode {
    /// Every code, in numeric order.
    pub const ALL: [ErrorCode; 13] = [
        ErrorCode::InvalidArgument,
        ErrorCode::Shape,
        ErrorCode::DType,
        ErrorCode::NullPointer,
        ErrorCode::UnknownSequence,
        ErrorCode::OutOfRange,
        ErrorCode::OutOfPages,
        ErrorCode::Unsupported,
        ErrorCode::CudaUnavailable,
        ErrorCode::Io,
        ErrorCode::Parse,
        ErrorCode::Internal,
        ErrorCode::OutOfMemory,
    ];

    /// Short lowercase name, as used in messages and by the Python exception classes.
    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::InvalidArgument => "invalid_argument",
            ErrorCode::Shape => "shape",
            ErrorCode::DType => "dtype",
            ErrorCode::NullPointer => "null_pointer",
            ErrorCode::UnknownSequence => "unknown_sequence",
            ErrorCode::OutOfRange => "out_of_range",
            ErrorCode::OutOfPages => "out_of_pages",
            ErrorCode::Unsupported => "unsupported",
            ErrorCode::CudaUnavailable => "cuda_unavailable",
            ErrorCode::Io => "io",
            ErrorCode::Parse => "parse",
            ErrorCode::Internal => "internal",
            ErrorCode::OutOfMemory => "out_of_memory",
        }
    }
}

/// The error type of every fallible kvsieve call. Messages name the parameter at fault
/// and what was expected. A call that returns an error has changed nothing.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    #[error("invalid argument `{param}`: expected {expected}")]
    InvalidArgument { param: String, expected: String },
    #[error("bad shape for `{param}`: expected {expected}, got {got}")]
    Shape { param: String, expected: String, got: String },
    #[error("bad dtype for `{param}`: expected {expected}, got {got}")]
    DType { param: String, expected: String, got: String },
    #[error("`{param}` is a null pointer")]
    NullPointer { param: String },
    #[error("unknown sequence id {0}")]
    UnknownSequence(u64),
    #[error("`{param}` out of range: {value} is not in {range}")]
    OutOfRange { param: String, value: i64, range: String },
    #[error("out of pages: the request needs {needed} free pages, the pool has {free}")]
    OutOfPages { needed: usize, free: usize },
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("CUDA unavailable: {0}")]
    CudaUnavailable(String),
    #[error("I/O or format error: {0}")]
    Io(String),
    #[error("parse error at byte {offset}: {message}")]
    Parse { offset: usize, message: String },
    #[error("internal error: {0}")]
    Internal(String),
    #[error("out of memory: {what} needs {bytes} bytes")]
    OutOfMemory { what: String, bytes: usize },
}

impl Error {
    /// The stable numeric code of this error's kind.
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::InvalidArgument { .. } => ErrorCode::InvalidArgument,
            Error::Shape { .. } => ErrorCode::Shape,
            Error::DType { .. } => ErrorCode::DType,
            Error::NullPointer { .. } => ErrorCode::NullPointer,
            Error::UnknownSequence(_) => ErrorCode::UnknownSequence,
            Error::OutOfRange { .. } => ErrorCode::OutOfRange,
            Error::OutOfPages { .. } => ErrorCode::OutOfPages,
            Error::Unsupported(_) => ErrorCode::Unsupported,
            Error::CudaUnavailable(_) => ErrorCode::CudaUnavailable,
            Error::Io(_) => ErrorCode::Io,
            Error::Parse { .. } => ErrorCode::Parse,
            Error::Internal(_) => ErrorCode::Internal,
            Error::OutOfMemory { .. } => ErrorCode::OutOfMemory,
        }
    }

    /// An [`Error::InvalidArgument`]: `param` should have been `expected`.
    pub fn invalid(param: impl Into<String>, expected: impl Into<String>) -> Self {
        Error::InvalidArgument { param: param.into(), expected: expected.into() }
    }

    /// An [`Error::Shape`]: `param` should have had the shape `expected`, and had `got`.
    pub fn shape(param: impl Into<String>, expected: impl Into<String>, got: impl Into<String>) -> Self {
        Error::Shape { param: param.into(), expected: expected.into(), got: got.into() }
    }

    /// An [`Error::OutOfRange`]: `param` is `value`, outside `range`.
    pub fn out_of_range(param: impl Into<String>, value: i64, range: impl Into<String>) -> Self {
        Error::OutOfRange { param: param.into(), value, range: range.into() }
    }
}

/// Result alias used throughout kvsieve.
pub type Result<T, E = Error> = std::result::Result<T, E>;
