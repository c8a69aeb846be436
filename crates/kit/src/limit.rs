//! What every service checks of a request body before decoding it: each gRPC message is at most
//! [`MAX_MESSAGE_BYTES`] long (refused with RESOURCE_EXHAUSTED as soon as its 5-byte frame
//! header arrives, before any of it is read), well framed, uncompressed (nothing here
//! negotiates compression) and, for the suite's own methods, well-formed protobuf whose text
//! fields are text ([`crate::wire`]): faults are INVALID_ARGUMENT with a `google.rpc.BadRequest`,
//! never INTERNAL. A body the gRPC-Web translation could not read (bad base64, bad framing) is
//! INVALID_ARGUMENT too.
//!
//! The gateway uses the same body in [`Guard::Frames`] mode: frame headers only, messages
//! passed on as they come and never decoded.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::Request;
use http_body::{Body as HttpBody, Frame};
use tonic::{Code, Status};

use crate::ApiError;
use crate::wire::{Fault, Schema};

/// The longest request message a service accepts (tonic's own default receive limit).
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// The longest request message by method: a default, and for the methods whose path starts
/// with a prefix (`/crm.auth.v1.AuthService/`, or one method's whole path) their own; the
/// longest matching prefix wins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SizeLimits {
    default: usize,
    routes: Vec<(String, usize)>,
}

impl SizeLimits {
    /// `default` for every method.
    pub fn new(default: usize) -> SizeLimits {
        SizeLimits { default, routes: Vec::new() }
    }

    /// Methods under `prefix` take messages of at most `max` bytes.
    pub fn route(mut self, prefix: &str, max: usize) -> SizeLimits {
        self.routes.retain(|(p, _)| p != prefix);
        self.routes.push((prefix.to_string(), max));
        self
    }

    /// The limit of the method at `path`.
    pub fn for_path(&self, path: &str) -> usize {
        self.routes
            .iter()
            .filter(|(prefix, _)| path.starts_with(prefix.as_str()))
            .max_by_key(|(prefix, _)| prefix.len())
            .map_or(self.default, |(_, max)| *max)
    }

    /// Adds `PREFIX=SIZE` entries (`/crm.auth.v1.AuthService/=64KiB`); a size is bytes, or with
    /// KiB or MiB, and at most the default.
    pub fn parse_routes(mut self, entries: &[String]) -> Result<SizeLimits, String> {
        for entry in entries.iter().map(|e| e.trim()).filter(|e| !e.is_empty()) {
            let (prefix, size) = entry
                .split_once('=')
                .ok_or_else(|| format!("{entry:?} is not PREFIX=SIZE, e.g. /crm.auth.v1.AuthService/=64KiB"))?;
            if !prefix.starts_with('/') {
                return Err(format!("{prefix:?} is not a method path prefix (it starts with '/')"));
            }
            let max = parse_size(size)?;
            if max > self.default {
                return Err(format!("{entry:?}: at most {} bytes, what the services accept", self.default));
            }
            self = self.route(prefix, max);
        }
        Ok(self)
    }
}

/// "64KiB", "4MiB", "1000" (bytes).
pub fn parse_size(text: &str) -> Result<usize, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let bad = || format!("{text:?} is not a size such as 4096, 64KiB or 1MiB");
    let n: usize = digits.parse().map_err(|_| bad())?;
    let scale = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1024,
        "MiB" => 1024 * 1024,
        _ => return Err(bad()),
    };
    n.checked_mul(scale).filter(|n| *n > 0).ok_or_else(bad)
}

/// How long a request body may take to deliver each message (from the request's start, or from
/// the previous message) and then its end, unless the server is told otherwise.
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// How much a request body is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guard {
    /// Frame headers only: the size limit and the framing.
    Frames,
    /// Frames, and each message of a suite method checked on the wire before it is decoded.
    Messages,
}

/// Wraps every request body in a [`Limited`] body.
#[derive(Debug, Clone)]
pub struct MessageLimitLayer {
    limits: Arc<SizeLimits>,
    guard: Guard,
    read_timeout: Duration,
}

impl MessageLimitLayer {
    pub fn new(max: usize, guard: Guard) -> MessageLimitLayer {
        MessageLimitLayer::by_method(SizeLimits::new(max), guard)
    }

    /// A limit per method.
    pub fn by_method(limits: SizeLimits, guard: Guard) -> MessageLimitLayer {
        MessageLimitLayer { limits: Arc::new(limits), guard, read_timeout: DEFAULT_READ_TIMEOUT }
    }

    /// How long each message (and the body's end) may take to arrive; zero: no limit.
    pub fn read_timeout(mut self, read_timeout: Duration) -> MessageLimitLayer {
        self.read_timeout = read_timeout;
        self
    }
}

impl<S> tower::Layer<S> for MessageLimitLayer {
    type Service = MessageLimit<S>;

    fn layer(&self, inner: S) -> MessageLimit<S> {
        MessageLimit { inner, limits: self.limits.clone(), guard: self.guard, read_timeout: self.read_timeout }
    }
}

/// See [`MessageLimitLayer`].
#[derive(Debug, Clone)]
pub struct MessageLimit<S> {
    inner: S,
    limits: Arc<SizeLimits>,
    guard: Guard,
    read_timeout: Duration,
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
        let (max, guard, read_timeout) = (self.limits.for_path(request.uri().path()), self.guard, self.read_timeout);
        let grpc = request
            .headers()
            .get(http::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
        if !grpc {
            // Not gRPC (REST/JSON, a feed): not framed as messages; whoever reads such a body
            // limits its size.
            return self.inner.call(request);
        }
        let (mut parts, body) = request.into_parts();
        let limited = Limited::new(body, max, guard, parts.uri.path()).read_timeout(read_timeout);
        // Whoever forwards the body (the gateway) can tell the client why it was refused.
        parts.extensions.insert(limited.refusal());
        self.inner.call(Request::from_parts(parts, axum::body::Body::new(limited)))
    }
}

/// Why a request body was refused, kept for whoever forwards the body (the gateway answers the
/// client with it rather than with what the failed forwarding says).
#[derive(Debug, Clone, Default)]
pub struct Refusal(Arc<OnceLock<(Code, String)>>);

impl Refusal {
    /// The status the body was refused with, if it was.
    pub fn status(&self) -> Option<Status> {
        self.0.get().map(|(code, message)| Status::new(*code, message.clone()))
    }

    /// A body is refused once: it ends there.
    fn set(&self, status: &Status) {
        let _ = self.0.set((status.code(), status.message().to_string()));
    }
}

/// A gRPC request body whose messages are checked as described in the module's docs.
pub struct Limited<B> {
    inner: B,
    max: usize,
    /// The request message's shape, when its messages are checked.
    request: Option<crate::wire::Request<'static>>,
    /// The frame header read so far (compression flag and 4-byte length).
    header: [u8; 5],
    header_read: usize,
    /// Message bytes still to come before the next frame header.
    remaining: usize,
    /// The message being gathered for its check (header included).
    message: BytesMut,
    /// Checked messages to hand on.
    ready: VecDeque<Bytes>,
    finished: bool,
    refusal: Refusal,
    /// Each message, then the end, must arrive within this (zero: no limit).
    read_timeout: Duration,
    /// When the next message (or the end) is due; armed at the first poll, pushed back as each
    /// message completes.
    due: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<B> Limited<B> {
    /// `path` (`/package.Service/Method`) says which message to expect.
    pub fn new(inner: B, max: usize, guard: Guard, path: &str) -> Limited<B> {
        let request = match guard {
            Guard::Messages => Schema::suite().request(path),
            Guard::Frames => None,
        };
        Limited {
            inner,
            max,
            request,
            header: [0; 5],
            header_read: 0,
            remaining: 0,
            message: BytesMut::new(),
            ready: VecDeque::new(),
            finished: false,
            refusal: Refusal::default(),
            read_timeout: DEFAULT_READ_TIMEOUT,
            due: None,
        }
    }

    /// How long each message (and the body's end) may take to arrive; zero: no limit.
    pub fn read_timeout(mut self, read_timeout: Duration) -> Limited<B> {
        self.read_timeout = read_timeout;
        self
    }

    /// Shares why the body was refused, once it is.
    pub fn refusal(&self) -> Refusal {
        self.refusal.clone()
    }

    /// Follows the framing through `data`: in frames mode only the headers are looked at; in
    /// messages mode whole messages are gathered, checked and queued in `ready`.
    fn scan(&mut self, mut data: Bytes) -> Result<(), Status> {
        while !data.is_empty() {
            if self.remaining > 0 {
                let take = self.remaining.min(data.len());
                if self.request.is_some() {
                    self.message.extend_from_slice(&data[..take]);
                }
                self.remaining -= take;
                data.advance(take);
                if self.remaining == 0 {
                    self.message_done()?;
                }
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
                    return Err(Status::resource_exhausted(format!(
                        "the request message is {len} bytes; the limit is {} bytes",
                        self.max
                    )));
                }
                match self.header[0] {
                    0 => {}
                    1 => return Err(Status::unimplemented("compressed request messages are not accepted")),
                    _ => return Err(invalid("has a gRPC frame with an unknown flag")),
                }
                if self.request.is_some() {
                    self.message.clear();
                    self.message.reserve(5 + len);
                    self.message.extend_from_slice(&self.header);
                }
                self.remaining = len;
                if len == 0 {
                    self.message_done()?;
                }
            }
        }
        Ok(())
    }

    fn message_done(&mut self) -> Result<(), Status> {
        if let Some(due) = self.due.as_mut() {
            due.as_mut().reset(tokio::time::Instant::now() + self.read_timeout);
        }
        let Some(request) = self.request else { return Ok(()) };
        match request.check(&self.message[5..]) {
            Ok(()) => {
                self.ready.push_back(self.message.split().freeze());
                Ok(())
            }
            Err(Fault::Text(violations)) => Err(ApiError::InvalidArgument(violations).into()),
            Err(Fault::Malformed(why)) => Err(invalid(&format!("is not a valid {why}"))),
        }
    }

    /// Whether the body stopped inside a frame.
    fn unfinished(&self) -> bool {
        self.header_read > 0 || self.remaining > 0
    }

    fn refuse(&mut self, status: Status) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.finished = true;
        self.refusal.set(&status);
        Poll::Ready(Some(Err(Box::new(status))))
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The status somewhere in an error's chain of sources (bodies wrap each other's errors).
fn status_in<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a Status> {
    let mut next = Some(err);
    while let Some(err) = next {
        if let Some(status) = err.downcast_ref::<Status>() {
            return Some(status);
        }
        next = err.source();
    }
    None
}

fn invalid(description: &str) -> Status {
    ApiError::invalid("request", description).into()
}

impl<B> HttpBody for Limited<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        loop {
            if let Some(message) = this.ready.pop_front() {
                return Poll::Ready(Some(Ok(Frame::data(message))));
            }
            if this.finished {
                return Poll::Ready(None);
            }
            if this.due.is_none() && !this.read_timeout.is_zero() {
                this.due = Some(Box::pin(tokio::time::sleep(this.read_timeout)));
            }
            let polled = Pin::new(&mut this.inner).poll_frame(cx);
            if polled.is_pending()
                && let Some(due) = this.due.as_mut()
                && due.as_mut().poll(cx).is_ready()
            {
                let waited = this.read_timeout;
                return this.refuse(Status::deadline_exceeded(format!(
                    "the request body did not arrive within {waited:?}; send each message, and the end, promptly"
                )));
            }
            match polled {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        let passed = this.request.is_none().then(|| data.clone());
                        if let Err(status) = this.scan(data) {
                            return this.refuse(status);
                        }
                        if let Some(data) = passed {
                            return Poll::Ready(Some(Ok(Frame::data(data))));
                        }
                    }
                    Err(frame) => {
                        if this.unfinished() {
                            return this.refuse(invalid("ends inside a message"));
                        }
                        return Poll::Ready(Some(Ok(frame)));
                    }
                },
                Poll::Ready(Some(Err(err))) => {
                    let err: BoxError = err.into();
                    // What the gRPC-Web translation could not read is the client's fault.
                    let unreadable = status_in(&*err)
                        .filter(|status| status.code() == Code::Internal)
                        .map(|status| status.message().trim_start_matches("tonic-web: ").to_string());
                    return match unreadable {
                        Some(why) => this.refuse(invalid(&format!("is not valid gRPC-Web: {why}"))),
                        None => Poll::Ready(Some(Err(err))),
                    };
                }
                Poll::Ready(None) => {
                    if this.unfinished() {
                        return this.refuse(invalid("ends inside a message"));
                    }
                    this.finished = true;
                    return Poll::Ready(None);
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ready.is_empty() && (self.finished || (self.inner.is_end_stream() && !self.unfinished()))
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self.request {
            None => self.inner.size_hint(),
            Some(_) => http_body::SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crm_proto::contacts::v1::GetPersonRequest;
    use prost::Message;

    fn frame(len: u32) -> Vec<u8> {
        let mut out = vec![0];
        out.extend(len.to_be_bytes());
        out.extend(std::iter::repeat_n(7u8, len.min(64) as usize));
        out
    }

    fn framed(message: &[u8]) -> Vec<u8> {
        let mut out = vec![0];
        out.extend((message.len() as u32).to_be_bytes());
        out.extend(message);
        out
    }

    #[test]
    fn follows_frames_across_chunks() {
        let mut limited = Limited::new((), 10, Guard::Frames, "/any.Service/Method");
        let mut stream = frame(3);
        stream.extend(frame(10));
        // Split everywhere, header bytes included: nothing is over the limit.
        for chunk in stream.chunks(2) {
            assert!(limited.scan(Bytes::copy_from_slice(chunk)).is_ok());
        }
        assert!(!limited.unfinished());
        let mut over = frame(11);
        over.truncate(5);
        assert!(limited.scan(Bytes::copy_from_slice(&over[..3])).is_ok());
        let refused = limited.scan(Bytes::copy_from_slice(&over[3..])).unwrap_err();
        assert_eq!(refused.code(), Code::ResourceExhausted);
        let mut compressed = frame(1);
        compressed[0] = 1;
        assert_eq!(limited.scan(Bytes::from(compressed)).unwrap_err().code(), Code::Unimplemented);
    }

    #[test]
    fn gathers_and_checks_whole_messages() {
        let path = "/crm.contacts.v1.ContactsService/GetPerson";
        let good = framed(&GetPersonRequest { id: "0190b8a2-0000-7000-8000-000000000001".into() }.encode_to_vec());
        let mut limited = Limited::new((), 1000, Guard::Messages, path);
        let mut two = good.clone();
        two.extend(&good);
        for chunk in two.chunks(3) {
            limited.scan(Bytes::copy_from_slice(chunk)).unwrap();
        }
        // Handed on whole, once checked.
        assert_eq!(limited.ready.iter().map(|m| m.to_vec()).collect::<Vec<_>>(), [good.clone(), good.clone()]);

        let nul = framed(&GetPersonRequest { id: "a\0b".into() }.encode_to_vec());
        let mut limited = Limited::new((), 1000, Guard::Messages, path);
        let refused = limited.scan(Bytes::from(nul)).unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument);
        assert!(refused.message().contains("id: must not contain control characters"), "{}", refused.message());
        assert!(limited.ready.is_empty());

        let mut limited = Limited::new((), 1000, Guard::Messages, path);
        let refused = limited.scan(Bytes::from(framed(&[0x0a, 0x05, b'a']))).unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument);
        assert!(refused.message().contains("not a valid crm.contacts.v1.GetPersonRequest"), "{}", refused.message());

        let mut limited = Limited::new((), 1000, Guard::Messages, path);
        limited.scan(Bytes::copy_from_slice(&good[..4])).unwrap();
        assert!(limited.unfinished(), "a body that stops here ends inside a message");
    }
}
