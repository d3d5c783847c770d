//! The UI's errors: what a request can fail with, and the HTTP status each one answers with.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A job, node or page that is not in the cell (any more).
    #[error("{0} not found")]
    NotFound(String),
    /// A query or form the UI cannot use (an unknown state, a bad name).
    #[error("{0}")]
    BadRequest(String),
    /// A change asked for while the server runs read-only (no `--allow-actions`), or without the page's token.
    #[error("{0}")]
    Forbidden(String),
    /// The core library failed (etcd unreachable, a compare-and-swap that kept losing).
    #[error(transparent)]
    Omega(#[from] omega::Error),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

impl Error {
    pub fn status(&self) -> StatusCode {
        match self {
            Error::NotFound(_) => StatusCode::NOT_FOUND,
            Error::BadRequest(_) => StatusCode::BAD_REQUEST,
            Error::Forbidden(_) => StatusCode::FORBIDDEN,
            Error::Omega(omega::Error::NotFound(_)) => StatusCode::NOT_FOUND,
            Error::Omega(omega::Error::InvalidArgument(_)) => StatusCode::BAD_REQUEST,
            Error::Omega(_) | Error::Io(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// An error answers with a small page saying what went wrong (escaped: it may quote a name from the URL).
impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = crate::html::layout(
            &format!("{} {}", status.as_u16(), status.canonical_reason().unwrap_or("")),
            "",
            &format!("<p class=\"error\">{}</p>", crate::html::escape(&self.to_string())),
            &crate::html::Fixed::default(),
        );
        (status, axum::response::Html(body)).into_response()
    }
}
