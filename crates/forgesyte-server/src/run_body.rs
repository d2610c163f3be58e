//! The run route's body, read once: a large `application/octet-stream`
//! body goes straight into a sealed memory file
//! ([`forgesyte_loader::process::body_writer`]), so that it reaches a
//! plugin's runner as that file, without the copy into a new one (and the
//! join of its chunks into one buffer is that write); any other body is
//! read into memory by axum's `Bytes` extractor, under the same limit and
//! read timeout.
//!
//! It knows HTTP bodies and the run route's limits, nothing of plugins.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use futures_util::StreamExt as _;

use crate::body;
use crate::error::RunError;
use crate::state::AppState;

/// Bodies from this size go into a memory file (when the shared-memory
/// threshold allows): below it, a copy costs less than a file.
pub(crate) const SHARED_BODY_MIN: usize = 1 << 20;

/// The run route's body, or why it could not be read.
#[derive(Debug)]
pub(crate) struct RunBody(pub(crate) Result<Bytes, RunError>);

impl FromRequest<AppState> for RunBody {
    type Rejection = std::convert::Infallible;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let limit = state.body_limit();
        if let Some(len) = shared_length(&request, limit) {
            return Ok(RunBody(read_shared(request, len).await));
        }
        let bytes = Bytes::from_request(request, state).await;
        Ok(RunBody(body::received(bytes, limit)))
    }
}

/// The length of a body that goes into a memory file: an
/// `application/octet-stream` body of a stated length within the limit,
/// at least [`SHARED_BODY_MIN`] and the shared-memory threshold (`0`: never).
fn shared_length(request: &Request, limit: usize) -> Option<usize> {
    let headers = request.headers();
    let essence = headers
        .get(CONTENT_TYPE)?
        .to_str()
        .ok()?
        .split(';')
        .next()?
        .trim();
    if !essence.eq_ignore_ascii_case("application/octet-stream") {
        return None;
    }
    let len: usize = headers.get(CONTENT_LENGTH)?.to_str().ok()?.parse().ok()?;
    let threshold = forgesyte_loader::process::shm_threshold();
    let threshold = usize::try_from(threshold).unwrap_or(usize::MAX);
    (threshold > 0 && len >= SHARED_BODY_MIN.max(threshold) && len <= limit).then_some(len)
}

/// Reads a body of `len` bytes into a memory file. Without one (no memory
/// file can be made), the body is read into memory instead.
async fn read_shared(request: Request, len: usize) -> Result<Bytes, RunError> {
    let Ok(mut writer) = forgesyte_loader::process::body_writer(len) else {
        let bytes = axum::body::to_bytes(request.into_body(), len)
            .await
            .map_err(body_error)?;
        return complete(bytes.len(), len).map(|()| bytes);
    };
    let mut chunks = request.into_body().into_data_stream();
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.map_err(body_error)?;
        if !writer.write(&chunk) {
            return Err(longer(len));
        }
    }
    complete(writer.len(), len)?;
    let shared = writer.finish().map_err(|e| RunError::Internal {
        message: format!("sealing a received body: {e}"),
    })?;
    Ok(Bytes::from_owner(shared))
}

/// The body ended at `got` bytes: it must be the `len` it stated.
fn complete(got: usize, len: usize) -> Result<(), RunError> {
    if got == len {
        Ok(())
    } else {
        Err(RunError::MalformedBody {
            message: format!("the body ended after {got} of the {len} bytes it stated"),
        })
    }
}

fn longer(len: usize) -> RunError {
    RunError::MalformedBody {
        message: format!("the body is longer than the {len} bytes it stated"),
    }
}

/// A body that failed to arrive: the read timeout (408), longer than it
/// stated, or broken.
fn body_error(error: axum::Error) -> RunError {
    if body::timed_out(&error) {
        return RunError::BodyTimedOut;
    }
    RunError::MalformedBody {
        message: format!("the body could not be read: {error}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;

    fn request(content_type: &str, len: Option<usize>) -> Request {
        let mut builder = Request::builder().header(CONTENT_TYPE, content_type);
        if let Some(len) = len {
            builder = builder.header(CONTENT_LENGTH, len);
        }
        builder.body(Body::empty()).unwrap()
    }

    #[test]
    fn only_large_octet_stream_bodies_of_a_stated_length_go_to_a_file() {
        let big = 8 << 20;
        let limit = 64 << 20;
        let octet = "application/octet-stream";
        assert_eq!(shared_length(&request(octet, Some(big)), limit), Some(big));
        assert_eq!(
            shared_length(&request("Application/Octet-Stream; x=1", Some(big)), limit),
            Some(big)
        );
        // Too small, unknown length, over the limit, or another type.
        assert_eq!(
            shared_length(&request(octet, Some(SHARED_BODY_MIN - 1)), limit),
            None
        );
        assert_eq!(shared_length(&request(octet, None), limit), None);
        assert_eq!(shared_length(&request(octet, Some(big)), big - 1), None);
        assert_eq!(
            shared_length(&request("application/json", Some(big)), limit),
            None
        );
        assert_eq!(
            shared_length(
                &request("multipart/form-data; boundary=x", Some(big)),
                limit
            ),
            None
        );
    }
}
