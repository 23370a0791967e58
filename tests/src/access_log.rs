//! Reader of the proxy's JSON-lines access log (one object per line).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Map, Value};

/// One access-log entry.
pub type Entry = Map<String, Value>;

/// An access-log file written by the proxy.
#[derive(Clone, Debug)]
pub struct AccessLog {
    path: PathBuf,
}

impl AccessLog {
    /// Reader of the log at `path` (the file need not exist yet).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        AccessLog { path: path.into() }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The complete (newline-terminated) lines parsed so far; an empty list if
    /// the file does not exist. A line that is not a JSON object is returned
    /// as `{"_unparsed": <line>}` so tests can see it.
    pub fn lines(&self) -> Vec<Entry> {
        let Ok(data) = std::fs::read(&self.path) else {
            return Vec::new();
        };
        let complete = match data.iter().rposition(|&b| b == b'\n') {
            Some(i) => &data[..=i],
            None => return Vec::new(),
        };
        complete
            .split(|&b| b == b'\n')
            .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
            .map(|l| match serde_json::from_slice::<Value>(l) {
                Ok(Value::Object(m)) => m,
                _ => {
                    let mut m = Map::new();
                    m.insert(
                        "_unparsed".to_owned(),
                        Value::String(String::from_utf8_lossy(l).into_owned()),
                    );
                    m
                }
            })
            .collect()
    }

    /// Polls every 10 ms until at least `n` lines exist and returns them all;
    /// panics with the lines seen so far after `timeout`.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Entry> {
        let deadline = Instant::now() + timeout;
        loop {
            let lines = self.lines();
            if lines.len() >= n {
                return lines;
            }
            if Instant::now() >= deadline {
                panic!(
                    "access log {}: wanted {n} lines within {timeout:?}, got {}:\n{}",
                    self.path.display(),
                    lines.len(),
                    lines
                        .iter()
                        .map(|l| Value::Object(l.clone()).to_string())
                        .collect::<Vec<_>>()
                        .join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// A string field of an entry (`None` if absent or not a string).
pub fn field<'a>(entry: &'a Entry, key: &str) -> Option<&'a str> {
    entry.get(key).and_then(Value::as_str)
}
