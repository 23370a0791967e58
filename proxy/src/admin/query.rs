//! Query strings of admin requests: `key=value` pairs, percent-decoded (`+`
//! stays a plus: it is common in `filter` regexes, as in Envoy).

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};

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
    percent_decode_str(s).decode_utf8_lossy().into_owned()
}

/// Everything but unreserved characters (RFC 3986) and `/` is encoded.
const QUERY_VALUE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b'/');

/// Encodes a query value for the admin API.
pub fn percent_encode(s: &str) -> String {
    utf8_percent_encode(s, QUERY_VALUE).to_string()
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
