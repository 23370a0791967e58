//! Downstream HTTP/1.1 timeouts: Envoy's `request_headers_timeout` for a
//! request being sent, and its connection `idle_timeout` between requests.
//!
//! hyper has one timer, its header-read timeout, and starts it as soon as
//! it waits for a request head, also while a keep-alive connection sits idle
//! between requests: idle connections would be closed after the (short)
//! header timeout, racing clients that reuse them. So the timer given to
//! hyper counts from the first byte of the next request: until that byte
//! arrives the connection is idle and gets the idle timeout.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::rt::{Sleep, Timer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes read so far on one downstream connection.
#[derive(Debug, Default)]
pub struct ReadCount(AtomicU64);

impl ReadCount {
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A downstream stream that counts the bytes read from it.
pub struct CountingIo<T> {
    inner: T,
    count: Arc<ReadCount>,
}

impl<T> CountingIo<T> {
    pub fn new(inner: T, count: Arc<ReadCount>) -> Self {
        CountingIo { inner, count }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for CountingIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        if read > 0 {
            self.count.0.fetch_add(read as u64, Ordering::Relaxed);
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for CountingIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The timer of one downstream HTTP/1.1 connection (hyper uses it for its
/// header-read timeout only, set to `header_timeout`).
#[derive(Clone)]
pub struct HeaderTimer {
    count: Arc<ReadCount>,
    header_timeout: Duration,
    idle_timeout: Duration,
}

impl HeaderTimer {
    pub fn new(count: Arc<ReadCount>, header_timeout: Duration, idle_timeout: Duration) -> Self {
        HeaderTimer {
            count,
            header_timeout,
            idle_timeout,
        }
    }

    fn arm(&self, deadline: Instant) -> HeaderSleep {
        // hyper asks for `now + header_timeout`.
        let armed = deadline
            .checked_sub(self.header_timeout)
            .unwrap_or(deadline);
        HeaderSleep {
            count: self.count.clone(),
            bytes_when_armed: self.count.get(),
            header_timeout: self.header_timeout,
            request_started: false,
            sleep: Box::pin(tokio::time::sleep_until((armed + self.idle_timeout).into())),
        }
    }
}

impl Timer for HeaderTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn Sleep>> {
        self.sleep_until(Instant::now() + duration)
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn Sleep>> {
        Box::pin(self.arm(deadline))
    }

    fn reset(&self, sleep: &mut Pin<Box<dyn Sleep>>, new_deadline: Instant) {
        // Re-armed for every request of the connection: reuse the allocation.
        match sleep.as_mut().downcast_mut_pin::<HeaderSleep>() {
            Some(mut existing) => existing.set(self.arm(new_deadline)),
            None => *sleep = self.sleep_until(new_deadline),
        }
    }
}

/// Fires `idle_timeout` after hyper started waiting for a request head if
/// no byte of it came, else `header_timeout` after its first byte.
pub struct HeaderSleep {
    count: Arc<ReadCount>,
    bytes_when_armed: u64,
    header_timeout: Duration,
    request_started: bool,
    sleep: Pin<Box<tokio::time::Sleep>>,
}

impl Sleep for HeaderSleep {}

impl Future for HeaderSleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        // hyper polls this whenever it read and still lacks a complete head.
        if !self.request_started && self.count.get() != self.bytes_when_armed {
            self.request_started = true;
            let deadline = tokio::time::Instant::now() + self.header_timeout;
            self.sleep.as_mut().reset(deadline);
        }
        self.sleep.as_mut().poll(cx)
    }
}
