//! The request message limit of every service: a gRPC message longer than
//! [`MAX_MESSAGE_BYTES`] is refused with RESOURCE_EXHAUSTED (gRPC's code for a message over a
//! limit) as soon as its 5-byte frame header arrives, before any of it is buffered.
//!
//! Only frame headers are read; messages are never decoded here.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use http::Request;
use http_body::{Body as HttpBody, Frame};

/// The longest request message a service accepts (tonic's own default receive limit).
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// Wraps every request body in a [`Limited`] body.
#[derive(Debug, Clone, Copy)]
pub struct MessageLimitLayer {
    max: usize,
}

impl MessageLimitLayer {
    pub fn new(max: usize) -> MessageLimitLayer {
        MessageLimitLayer { max }
    }
}

impl<S> tower::Layer<S> for MessageLimitLayer {
    type Service = MessageLimit<S>;

    fn layer(&self, inner: S) -> MessageLimit<S> {
        MessageLimit { inner, max: self.max }
    }
}

/// See [`MessageLimitLayer`].
#[derive(Debug, Clone)]
pub struct MessageLimit<S> {
    inner: S,
    max: usize,
}

impl<S> tower::Service<Request<axum::body::Body>> for MessageLimit<S>
where
    S: tower::Service<Request<axum::body::Body>, Error = Infallible>,
{
    type Response = S::Response;
    type Error = Infallible;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<axum::body::Body>) -> Self::Future {
        let max = self.max;
        self.inner.call(request.map(|body| axum::body::Body::new(Limited::new(body, max))))
    }
}

/// A gRPC request body whose messages may be at most `max` bytes each.
pub struct Limited<B> {
    inner: B,
    max: usize,
    /// The frame header read so far (compression flag and 4-byte length).
    header: [u8; 5],
    header_read: usize,
    /// Message bytes still to pass before the next frame header.
    remaining: usize,
    refused: bool,
}

impl<B> Limited<B> {
    pub fn new(inner: B, max: usize) -> Limited<B> {
        Limited { inner, max, header: [0; 5], header_read: 0, remaining: 0, refused: false }
    }

    /// Follows the framing through `data`; the length of the first message over the limit.
    fn scan(&mut self, mut data: &[u8]) -> Option<usize> {
        while !data.is_empty() {
            if self.remaining > 0 {
                let skip = self.remaining.min(data.len());
                self.remaining -= skip;
                data.advance(skip);
                continue;
            }
            let take = (5 - self.header_read).min(data.len());
            self.header[self.header_read..self.header_read + take].copy_from_slice(&data[..take]);
            self.header_read += take;
            data.advance(take);
            if self.header_read == 5 {
                self.header_read = 0;
                let len = u32::from_be_bytes([self.header[1], self.header[2], self.header[3], self.header[4]]) as usize;
                if len > self.max {
                    return Some(len);
                }
                self.remaining = len;
            }
        }
        None
    }
}

impl<B> HttpBody for Limited<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if this.refused {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref()
                    && let Some(len) = this.scan(data)
                {
                    this.refused = true;
                    let status = tonic::Status::resource_exhausted(format!(
                        "the request message is {len} bytes; the limit is {} bytes",
                        this.max
                    ));
                    return Poll::Ready(Some(Err(Box::new(status))));
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(err))) => Poll::Ready(Some(Err(err.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.refused || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(len: u32) -> Vec<u8> {
        let mut out = vec![0];
        out.extend(len.to_be_bytes());
        out.extend(std::iter::repeat_n(7u8, len.min(64) as usize));
        out
    }

    #[test]
    fn follows_frames_across_chunks() {
        let mut limited = Limited::new((), 10);
        let mut stream = frame(3);
        stream.extend(frame(10));
        // Split everywhere, header bytes included: nothing is over the limit.
        for chunk in stream.chunks(2) {
            assert_eq!(limited.scan(chunk), None);
        }
        assert_eq!(limited.remaining, 0);
        let mut over = frame(11);
        over.truncate(5);
        assert_eq!(limited.scan(&over[..3]), None);
        assert_eq!(limited.scan(&over[3..]), Some(11));
    }
}
