//! Query strings of admin requests: `key=value` pairs, percent-decoded (`+`
//! stays a plus: it is common in `filter` regexes, as in Envoy).

/// Parsed `?a=b&c=d`; the first occurrence of a key wins.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Query(Vec<(String, String)>);

impl Query {
    pub fn parse(query: Option<&str>) -> Query {
        let Some(query) = query else {
            return Query::default();
        };
        Query(
            query
                .split('&')
                .filter(|pair| !pair.is_empty())
                .map(|pair| {
                    let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                    (percent_decode(k), percent_decode(v))
                })
                .collect(),
        )
    }

    /// The value of `key`; an empty value counts as absent.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.is_empty())
    }

    /// `key` compiled as a regex (searched anywhere in the stat name, as Envoy's `filter`).
    pub fn regex(&self, key: &str) -> Result<Option<regex::Regex>, String> {
        self.get(key)
            .map(|re| regex::Regex::new(re).map_err(|e| format!("invalid regex in {key}: {e}\n")))
            .transpose()
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && let (Some(hi), Some(lo)) = (
                bytes.get(i + 1).and_then(|&b| hex(b)),
                bytes.get(i + 2).and_then(|&b| hex(b)),
            )
        {
            out.push((hi * 16 + lo) as u8);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Encodes everything but unreserved characters and `/` (for query values).
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_pairs_and_keeps_plus() {
        let q = Query::parse(Some("filter=upstream_rq_%5B0-9%5D+&source=default/sleep&x"));
        assert_eq!(q.get("filter"), Some("upstream_rq_[0-9]+"));
        assert_eq!(q.get("source"), Some("default/sleep"));
        assert_eq!(q.get("x"), None);
        assert_eq!(q.get("missing"), None);
    }

    #[test]
    fn encode_then_decode_round_trips() {
        for s in [
            "outbound|8080||mock.default.svc.cluster.local",
            "^cluster\\..*(rq|cx)_overflow$",
            "a b&c=d%",
            "zoné",
        ] {
            let q = Query::parse(Some(&format!("v={}", percent_encode(s))));
            assert_eq!(q.get("v"), Some(s));
        }
    }

    #[test]
    fn a_stray_percent_is_kept() {
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
    }

    #[test]
    fn bad_regex_is_an_error() {
        assert!(Query::parse(Some("filter=(")).regex("filter").is_err());
        assert!(Query::parse(None).regex("filter").unwrap().is_none());
    }
}
