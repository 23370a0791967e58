//! Request and response bodies of proxied HTTP exchanges.
//!
//! [`RequestBody`] streams the client's body upstream while keeping a bounded
//! copy, so a retry can replay it; past the limit the request simply stops
//! being retryable (Envoy does the same with its request buffer).
//! [`ResponseBody`] streams the upstream body downstream, counts bytes, and
//! writes the access log line exactly once when the exchange ends.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::Sleep;

use super::PrematureResets;
use super::clients::UpstreamHold;
use crate::resilience::overload::Admission;
use crate::telemetry::ResponseFlag;
use crate::telemetry::access_log::{AccessLogEntry, AccessLogger};
use crate::telemetry::stats::RequestTelemetry;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Largest request body kept for replay on retry.
pub const REPLAY_BUFFER_LIMIT: usize = 64 * 1024;

/// How the client's request body ended in an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientBodyFailure {
    /// The client went away (or reset the stream) before the body ended:
    /// Envoy's `DC`.
    Disconnected,
    /// The body was malformed (a bad chunk): Envoy's `DPE`.
    Malformed,
}

/// Why an attempt's copy of the request body stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RequestBodyError {
    /// A retry took over: the abandoned attempt must not send the body on
    /// (its upstream connection is closed, not left waiting for the rest).
    #[error("request body abandoned: a retry replaced this attempt")]
    Abandoned,
    /// The client's body failed; no attempt may send it as if it had ended.
    #[error("the client's request body failed: {0:?}")]
    Client(ClientBodyFailure),
}

struct ReplayState {
    source: Incoming,
    buffered: Vec<Bytes>,
    buffered_len: usize,
    overflowed: bool,
    source_done: bool,
    trailers: Option<HeaderMap>,
    bytes_received: u64,
    completed_at: Option<Instant>,
    /// When the latest body bytes arrived (stream idle timeout).
    last_read: Option<Instant>,
    /// The only reader that may read: the latest attempt's.
    active_reader: u64,
    /// Wakes the active reader when a newer one replaces it.
    waiting_reader: Option<Waker>,
    failed: Option<ClientBodyFailure>,
}

/// The request body as seen by one upstream attempt.
pub struct RequestBody {
    proxy: Option<Arc<Mutex<ReplayState>>>,
    exact_len: Option<u64>,
    next_buffered: usize,
    sent_trailers: bool,
    reader: u64,
}

/// What the access log needs of a request body: its progress, read-only.
pub struct BodyProgress(Arc<Mutex<ReplayState>>);

impl BodyProgress {
    /// How the client's body failed, if it did.
    pub fn client_failure(&self) -> Option<ClientBodyFailure> {
        self.0.lock().expect("body lock").failed
    }

    /// When body bytes last arrived from the client.
    pub fn last_read(&self) -> Option<Instant> {
        self.0.lock().expect("body lock").last_read
    }

    /// Body bytes read from the client so far, and when the last one came.
    pub fn received(&self) -> (u64, Option<Instant>) {
        let s = self.0.lock().expect("body lock");
        (s.bytes_received, s.completed_at)
    }
}

impl RequestBody {
    pub fn empty() -> Self {
        RequestBody {
            proxy: None,
            exact_len: Some(0),
            next_buffered: 0,
            sent_trailers: false,
            reader: 0,
        }
    }

    /// Wraps the client's body; bodiless requests cost nothing.
    pub fn new(incoming: Incoming) -> Self {
        if incoming.is_end_stream() {
            return Self::empty();
        }
        let exact_len = incoming.size_hint().exact();
        RequestBody {
            proxy: Some(Arc::new(Mutex::new(ReplayState {
                source: incoming,
                buffered: Vec::new(),
                buffered_len: 0,
                overflowed: false,
                source_done: false,
                trailers: None,
                bytes_received: 0,
                completed_at: None,
                last_read: None,
                active_reader: 0,
                waiting_reader: None,
                failed: None,
            }))),
            exact_len,
            next_buffered: 0,
            sent_trailers: false,
            reader: 0,
        }
    }

    /// A fresh body for another attempt: what was read so far, then the
    /// rest. It becomes the only reader: earlier attempts' copies fail with
    /// [`RequestBodyError::Abandoned`] from their next read on.
    pub fn replay(&self) -> Self {
        let reader = match &self.proxy {
            None => 0,
            Some(state) => {
                let mut st = state.lock().expect("body lock");
                st.active_reader += 1;
                if let Some(waker) = st.waiting_reader.take() {
                    waker.wake();
                }
                st.active_reader
            }
        };
        RequestBody {
            proxy: self.proxy.clone(),
            exact_len: self.exact_len,
            next_buffered: 0,
            sent_trailers: false,
            reader,
        }
    }

    /// The body's progress, for the access log.
    pub fn progress(&self) -> Option<BodyProgress> {
        self.proxy.clone().map(BodyProgress)
    }

    /// Whether a retry can still send the complete body.
    pub fn can_replay(&self) -> bool {
        self.proxy.as_ref().is_none_or(|s| {
            let st = s.lock().expect("body lock");
            !st.overflowed && st.failed.is_none()
        })
    }

    /// How the client's body failed, if it did.
    pub fn client_failure(&self) -> Option<ClientBodyFailure> {
        self.proxy
            .as_ref()
            .and_then(|s| s.lock().expect("body lock").failed)
    }

    /// When body bytes last arrived from the client.
    pub fn last_read(&self) -> Option<Instant> {
        self.proxy
            .as_ref()
            .and_then(|s| s.lock().expect("body lock").last_read)
    }

    /// Reads whatever body bytes have already arrived (up to the replay limit)
    /// without waiting for more; used before a local reply.
    pub async fn drain_available(&self) {
        use http_body_util::BodyExt;
        let mut body = self.replay();
        let mut read = 0;
        while read < REPLAY_BUFFER_LIMIT {
            match tokio::time::timeout(std::time::Duration::ZERO, body.frame()).await {
                Ok(Some(Ok(frame))) => read += frame.data_ref().map_or(0, |d| d.len()),
                _ => break,
            }
        }
    }
}

/// A client body error as Envoy names it: a malformed body (bad chunk
/// framing) or the client going away.
fn client_body_failure(err: &hyper::Error) -> ClientBodyFailure {
    let malformed = crate::proxy::upstream::find_source::<std::io::Error>(err).is_some_and(|io| {
        matches!(
            io.kind(),
            std::io::ErrorKind::InvalidData | std::io::ErrorKind::InvalidInput
        )
    });
    if malformed && !err.is_incomplete_message() {
        ClientBodyFailure::Malformed
    } else {
        ClientBodyFailure::Disconnected
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = RequestBodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, RequestBodyError>>> {
        let this = &mut *self;
        let Some(proxy) = &this.proxy else {
            return Poll::Ready(None);
        };
        let mut st = proxy.lock().expect("body lock");
        if this.reader != st.active_reader {
            return Poll::Ready(Some(Err(RequestBodyError::Abandoned)));
        }
        if this.next_buffered < st.buffered.len() {
            let chunk = st.buffered[this.next_buffered].clone();
            this.next_buffered += 1;
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        if let Some(failure) = st.failed {
            // Never end a body cleanly that the client did not finish.
            return Poll::Ready(Some(Err(RequestBodyError::Client(failure))));
        }
        if st.source_done {
            if !this.sent_trailers {
                this.sent_trailers = true;
                if let Some(t) = &st.trailers {
                    return Poll::Ready(Some(Ok(Frame::trailers(t.clone()))));
                }
            }
            return Poll::Ready(None);
        }
        let frame = match Pin::new(&mut st.source).poll_frame(cx) {
            Poll::Ready(frame) => frame,
            Poll::Pending => {
                if !st
                    .waiting_reader
                    .as_ref()
                    .is_some_and(|w| w.will_wake(cx.waker()))
                {
                    st.waiting_reader = Some(cx.waker().clone());
                }
                return Poll::Pending;
            }
        };
        match frame {
            None => {
                st.source_done = true;
                st.completed_at = Some(Instant::now());
                this.sent_trailers = true;
                Poll::Ready(None)
            }
            Some(Err(err)) => {
                let failure = client_body_failure(&err);
                tracing::debug!(%err, ?failure, "client request body failed");
                st.failed = Some(failure);
                Poll::Ready(Some(Err(RequestBodyError::Client(failure))))
            }
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    st.bytes_received += data.len() as u64;
                    st.last_read = Some(Instant::now());
                    if !st.overflowed {
                        if st.buffered_len + data.len() <= REPLAY_BUFFER_LIMIT {
                            st.buffered_len += data.len();
                            st.buffered.push(data.clone());
                        } else {
                            st.overflowed = true;
                            st.buffered = Vec::new();
                        }
                    }
                    this.next_buffered = st.buffered.len();
                } else if let Some(trailers) = frame.trailers_ref() {
                    st.trailers = Some(trailers.clone());
                    st.source_done = true;
                    st.completed_at = Some(Instant::now());
                    this.sent_trailers = true;
                }
                if st.source.is_end_stream() && !st.source_done {
                    st.source_done = true;
                    st.completed_at = Some(Instant::now());
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.proxy.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        self.exact_len.map(SizeHint::with_exact).unwrap_or_default()
    }
}

/// Finishes the access log line and the Istio request metrics of one
/// exchange; logs `DC` if dropped early.
pub struct Exchange {
    pub entry: AccessLogEntry,
    pub started: Instant,
    pub logger: AccessLogger,
    pub request_body: Option<BodyProgress>,
    pub done: bool,
    /// The downstream connection's premature-reset tally (HTTP/2 abuse).
    pub resets: Option<Arc<PrematureResets>>,
    /// Where `istio_requests_total` and friends are recorded when it ends.
    pub telemetry: RequestTelemetry,
    /// The request's slot under the downstream caps, given back when it ends.
    pub admission: Option<Admission>,
}

impl Exchange {
    pub fn finish(&mut self) {
        if self.done {
            return;
        }
        self.done = true;
        self.admission = None;
        if let Some(resets) = self.resets.take() {
            resets.stream_ended(self.started.elapsed(), false);
        }
        let now = Instant::now();
        self.entry.duration = now - self.started;
        if let Some(body) = &self.request_body {
            let (bytes, completed) = body.received();
            self.entry.bytes_received = bytes;
            self.entry.request_duration = completed.map(|t| t - self.started);
        }
        if self.entry.request_duration.is_none() {
            self.entry.request_duration = Some(std::time::Duration::ZERO);
        }
        self.telemetry.record(&self.entry);
        self.logger.log(self.entry.clone());
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        if !self.done {
            if let Some(resets) = self.resets.take() {
                resets.stream_ended(self.started.elapsed(), true);
            }
            // The client went away before the exchange completed.
            self.entry
                .response_flags
                .set(ResponseFlag::DownstreamConnectionTermination);
            if self.entry.response_code_details.is_none() || self.entry.response_code == 0 {
                self.entry.response_code_details = Some("downstream_remote_disconnect".into());
            }
            self.finish();
        }
    }
}

enum Source {
    Upstream(Incoming),
    Local(Option<Bytes>),
}

/// The response body sent downstream.
pub struct ResponseBody {
    source: Source,
    exchange: Option<Box<Exchange>>,
    deadline: Option<Pin<Box<Sleep>>>,
    hold: Option<UpstreamHold>,
    idle: Option<StreamIdle>,
}

/// Envoy's stream idle timeout while a response streams: no body bytes in
/// either direction for `timeout` ends the stream (`SI`). The timer exists
/// only once the upstream body has kept the client waiting.
struct StreamIdle {
    timeout: Duration,
    last_activity: Instant,
    timer: Option<Pin<Box<Sleep>>>,
}

impl ResponseBody {
    /// `stream_idle`: Envoy's stream idle timeout (`None`: disabled).
    pub fn upstream(
        body: Incoming,
        exchange: Box<Exchange>,
        deadline: Option<Pin<Box<Sleep>>>,
        hold: Option<UpstreamHold>,
        stream_idle: Option<Duration>,
    ) -> Self {
        let mut this = ResponseBody {
            source: Source::Upstream(body),
            exchange: Some(exchange),
            deadline,
            hold,
            idle: stream_idle.map(|timeout| StreamIdle {
                timeout,
                last_activity: Instant::now(),
                timer: None,
            }),
        };
        if let Source::Upstream(b) = &this.source
            && b.is_end_stream()
        {
            this.complete();
        }
        this
    }

    /// A body generated by the proxy; logs when sent.
    pub fn local(bytes: Bytes, exchange: Option<Box<Exchange>>) -> Self {
        let mut this = ResponseBody {
            source: Source::Local((!bytes.is_empty()).then_some(bytes)),
            exchange,
            deadline: None,
            hold: None,
            idle: None,
        };
        if matches!(this.source, Source::Local(None)) {
            this.complete();
        }
        this
    }

    /// A body for a response whose logging happens elsewhere (upgrades).
    pub fn empty() -> Self {
        ResponseBody {
            source: Source::Local(None),
            exchange: None,
            deadline: None,
            hold: None,
            idle: None,
        }
    }

    fn complete(&mut self) {
        let grpc_status = self.exchange.as_ref().and_then(|ex| ex.entry.grpc_status);
        if let Some(mut ex) = self.exchange.take() {
            ex.finish();
        }
        if let Some(hold) = self.hold.take() {
            hold.complete(grpc_status);
        }
    }

    fn fail(&mut self, flag: ResponseFlag, details: &str) {
        if let Some(hold) = self.hold.take() {
            hold.failed();
        }
        if let Some(mut ex) = self.exchange.take() {
            ex.entry.response_flags.set(flag);
            ex.entry.response_code_details = Some(details.to_string());
            ex.finish();
        }
    }

    /// The stream went idle: `SI`, not the upstream's failure (outlier
    /// detection does not hear of it).
    fn fail_idle(&mut self) {
        drop(self.hold.take());
        if let Some(mut ex) = self.exchange.take() {
            ex.entry.response_flags.set(ResponseFlag::StreamIdleTimeout);
            ex.entry.response_code_details = Some("stream_idle_timeout".into());
            ex.finish();
        }
    }

    /// Whether the stream idle timeout has run out; arms its timer while
    /// the upstream keeps the client waiting.
    fn idle_expired(&mut self, cx: &mut Context<'_>) -> bool {
        let request_activity = self
            .exchange
            .as_ref()
            .and_then(|ex| ex.request_body.as_ref())
            .and_then(BodyProgress::last_read);
        let Some(idle) = self.idle.as_mut() else {
            return false;
        };
        if idle.timer.is_none() {
            // Until now every poll found a frame ready: the stream was active.
            idle.last_activity = Instant::now();
        }
        loop {
            let last = request_activity.map_or(idle.last_activity, |r| r.max(idle.last_activity));
            let due = tokio::time::Instant::from_std(last + idle.timeout);
            let timer = idle
                .timer
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
            if timer.deadline() != due {
                timer.as_mut().reset(due);
            }
            if timer.as_mut().poll(cx).is_pending() {
                return false;
            }
            if tokio::time::Instant::now() >= due {
                return true;
            }
        }
    }

    fn client_failure(&self) -> Option<ClientBodyFailure> {
        self.exchange
            .as_ref()
            .and_then(|ex| ex.request_body.as_ref())
            .and_then(BodyProgress::client_failure)
    }

    /// Ends the exchange for a failure of the client's request body; outlier
    /// detection does not hear of it.
    fn fail_by_client(&mut self, failure: ClientBodyFailure) {
        drop(self.hold.take());
        if let Some(mut ex) = self.exchange.take() {
            let (flag, details) = match failure {
                ClientBodyFailure::Disconnected => (
                    ResponseFlag::DownstreamConnectionTermination,
                    "downstream_remote_disconnect",
                ),
                ClientBodyFailure::Malformed => {
                    (ResponseFlag::DownstreamProtocolError, "http1.codec_error")
                }
            };
            ex.entry.response_flags.set(flag);
            ex.entry.response_code_details = Some(details.to_string());
            ex.finish();
        }
    }

    fn count(&mut self, frame: &Frame<Bytes>) {
        if let Some(ex) = self.exchange.as_mut() {
            if let Some(data) = frame.data_ref() {
                ex.entry.bytes_sent += data.len() as u64;
            } else if let Some(trailers) = frame.trailers_ref()
                && let Some(code) = grpc_status(trailers)
            {
                ex.entry.grpc_status = Some(code);
            }
        }
    }
}

/// `grpc-status` of a header or trailer block.
pub fn grpc_status(headers: &HeaderMap) -> Option<u32> {
    headers
        .get("grpc-status")?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct BodyAbort(&'static str);

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Some(deadline) = this.deadline.as_mut()
            && deadline.as_mut().poll(cx).is_ready()
        {
            this.deadline = None;
            this.fail(ResponseFlag::UpstreamRequestTimeout, "response_timeout");
            return Poll::Ready(Some(Err(Box::new(BodyAbort("upstream response timeout")))));
        }
        match &mut this.source {
            Source::Local(bytes) => {
                let Some(b) = bytes.take() else {
                    return Poll::Ready(None);
                };
                if let Some(ex) = this.exchange.as_mut() {
                    ex.entry.bytes_sent += b.len() as u64;
                }
                this.complete();
                Poll::Ready(Some(Ok(Frame::data(b))))
            }
            Source::Upstream(body) => {
                let polled = match Pin::new(&mut *body).poll_frame(cx) {
                    Poll::Ready(polled) => polled,
                    Poll::Pending => {
                        if this.idle_expired(cx) {
                            this.idle = None;
                            this.fail_idle();
                            return Poll::Ready(Some(Err(Box::new(BodyAbort("stream timeout")))));
                        }
                        return Poll::Pending;
                    }
                };
                if let Some(idle) = this.idle.as_mut()
                    && idle.timer.is_some()
                {
                    idle.last_activity = Instant::now();
                }
                let ended = body.is_end_stream();
                match polled {
                    None => {
                        this.complete();
                        Poll::Ready(None)
                    }
                    Some(Ok(frame)) => {
                        this.count(&frame);
                        if ended || frame.is_trailers() {
                            this.complete();
                        }
                        Poll::Ready(Some(Ok(frame)))
                    }
                    Some(Err(err)) => {
                        tracing::debug!(%err, "upstream response body failed");
                        match this.client_failure() {
                            // The exchange broke because the client's own
                            // body did: not the upstream's fault.
                            Some(failure) => this.fail_by_client(failure),
                            None => this.fail(
                                ResponseFlag::UpstreamProtocolError,
                                "upstream_reset_after_response_started{protocol_error}",
                            ),
                        }
                        Poll::Ready(Some(Err(Box::new(err))))
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.source {
            Source::Local(b) => b.is_none(),
            Source::Upstream(_) => self.exchange.is_none() && self.hold.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.source {
            Source::Local(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Source::Upstream(body) => body.size_hint(),
        }
    }
}
