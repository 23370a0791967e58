//! Protocol detection from the first bytes of a connection; the bytes are
//! replayed to whoever serves it next.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sniffed {
    Http1,
    Http2,
    /// Anything else, including a silent client (server-first protocols).
    Other,
    /// The client closed before sending anything.
    Closed,
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Longest method token we wait for before deciding.
const MAX_METHOD: usize = 16;

/// Classifies a byte prefix; `None` means "need more bytes".
pub fn classify(buf: &[u8]) -> Option<Sniffed> {
    if buf.is_empty() {
        return None;
    }
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return if n == H2_PREFACE.len() {
            Some(Sniffed::Http2)
        } else {
            None
        };
    }
    // HTTP/1.x: an uppercase method token followed by a space. Anything
    // else after the token is still HTTP: malformed requests get their 400.
    for (i, &b) in buf.iter().enumerate().take(MAX_METHOD + 1) {
        if b == b' ' {
            return Some(if i > 0 {
                Sniffed::Http1
            } else {
                Sniffed::Other
            });
        }
        if !b.is_ascii_uppercase() && !(i > 0 && (b == b'-' || b == b'_')) {
            return Some(Sniffed::Other);
        }
    }
    if buf.len() > MAX_METHOD {
        Some(Sniffed::Other)
    } else {
        None
    }
}

/// Largest prefix read before deciding (the HTTP/2 preface is 24 bytes).
const SNIFF_BUFFER: usize = 64;

/// Reads until the prefix decides, the client goes quiet (`timeout`), or it
/// closes. The bytes read are replayed by the returned stream. Reading, not
/// peeking: a peek is ready at once while bytes are buffered, so a client
/// that sends one byte and stalls (or closes) would keep the task spinning.
pub async fn sniff(stream: TcpStream, timeout: Duration) -> (Sniffed, PrefixedStream) {
    let mut stream = stream;
    let mut buf = BytesMut::with_capacity(SNIFF_BUFFER);
    let deadline = tokio::time::Instant::now() + timeout;
    let kind = loop {
        if buf.len() == buf.capacity() {
            break Sniffed::Other;
        }
        match tokio::time::timeout_at(deadline, stream.read_buf(&mut buf)).await {
            Err(_) => break Sniffed::Other,
            Ok(Err(_)) => break Sniffed::Closed,
            Ok(Ok(0)) if buf.is_empty() => break Sniffed::Closed,
            // Half-closed after a few bytes: not HTTP we could parse.
            Ok(Ok(0)) => break Sniffed::Other,
            Ok(Ok(_)) => {
                if let Some(kind) = classify(&buf) {
                    break kind;
                }
            }
        }
    };
    (kind, PrefixedStream::new(buf.freeze(), stream))
}

/// A connection whose first bytes were already read (for protocol
/// detection): reads return them first, then the socket's.
pub struct PrefixedStream {
    prefix: Bytes,
    inner: TcpStream,
}

impl PrefixedStream {
    pub fn new(prefix: Bytes, inner: TcpStream) -> Self {
        PrefixedStream { prefix, inner }
    }

    /// Bytes read ahead and not yet replayed.
    pub fn prefix_len(&self) -> usize {
        self.prefix.len()
    }
}

impl AsyncRead for PrefixedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(out.remaining());
            let head = self.prefix.split_to(n);
            out.put_slice(&head);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, out)
    }
}

impl AsyncWrite for PrefixedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_prefixes() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Sniffed::Http1));
        assert_eq!(classify(b"GE"), None);
        assert_eq!(
            classify(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
            Some(Sniffed::Http2)
        );
        assert_eq!(classify(b"PRI * HT"), None);
        assert_eq!(classify(b"\x16\x03\x01"), Some(Sniffed::Other));
        assert_eq!(classify(b"*1\r\n$4\r\nPING"), Some(Sniffed::Other));
        assert_eq!(classify(b"M-SEARCH * HTTP/1.1"), Some(Sniffed::Http1));
        assert_eq!(classify(b"ABCDEFGHIJKLMNOPQRSTUV"), Some(Sniffed::Other));
    }
}
