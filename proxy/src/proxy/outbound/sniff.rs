//! Protocol detection from the first bytes of a connection, without consuming them.

use std::time::Duration;

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

/// Peeks until the prefix decides, the client goes quiet, or it closes.
pub async fn sniff(stream: &TcpStream, timeout: Duration) -> Sniffed {
    let mut buf = [0u8; 32];
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last_len = 0;
    loop {
        let peeked = tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await;
        let n = match peeked {
            Err(_) => return Sniffed::Other,
            Ok(Err(_)) | Ok(Ok(0)) => return Sniffed::Closed,
            Ok(Ok(n)) => n,
        };
        if let Some(kind) = classify(&buf[..n]) {
            return kind;
        }
        if n == last_len {
            // peek returns at once while bytes are buffered; wait for more.
            if tokio::time::timeout_at(deadline, stream.readable())
                .await
                .is_err()
            {
                return Sniffed::Other;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        last_len = n;
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
