//! Istio's syntax rules for names, labels and regexes, as its admission
//! webhook checks them (`pkg/config/validation`, `pkg/config/labels`).

use regex_syntax::ast::{self, Ast, ClassSetItem, HexLiteralKind, LiteralKind};

/// Istio's rule for hosts (`ValidateWildcardDomain`): DNS labels, a `*`
/// only as the whole first label, and a last label that is not all digits
/// (so not an IP address).
pub(super) fn is_valid_domain(host: &str) -> bool {
    let rest = host.strip_prefix("*.").unwrap_or(host);
    if host == "*" {
        return true;
    }
    host.len() <= 255
        && rest.split('.').all(is_dns1123_label)
        && rest
            .rsplit('.')
            .next()
            .is_some_and(|last| !last.bytes().all(|b| b.is_ascii_digit()))
}

/// `labels.IsDNS1123Label`: subset, namespace and gateway names.
pub(super) fn is_dns1123_label(name: &str) -> bool {
    let bytes = name.as_bytes();
    let edge = |b: &u8| b.is_ascii_alphanumeric();
    (1..=63).contains(&bytes.len())
        && bytes.first().is_some_and(edge)
        && bytes.last().is_some_and(edge)
        && bytes.iter().all(|b| edge(b) || *b == b'-')
}

/// A Kubernetes "qualified name" as Istio checks it (no length limit):
/// alphanumerics at both ends, `-`, `_` and `.` inside.
fn is_qualified_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    let edge = |b: &u8| b.is_ascii_alphanumeric();
    bytes.first().is_some_and(edge)
        && bytes.last().is_some_and(edge)
        && bytes
            .iter()
            .all(|b| edge(b) || matches!(b, b'-' | b'_' | b'.'))
}

/// Why a label in `labels`, `sourceLabels` or a workload selector is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(super) enum BadLabel {
    #[error(
        "invalid label key {0:?}: [prefix/]name, where name is letters, digits, '-', '_' and '.' starting and ending with a letter or digit"
    )]
    Key(String),
    #[error("invalid label key {0:?}: its DNS prefix is longer than 253 characters")]
    PrefixTooLong(String),
    #[error(
        "invalid label value {0:?}: empty, or letters, digits, '-', '_' and '.' starting and ending with a letter or digit"
    )]
    Value(String),
}

/// `labels.Instance.Validate`: every key and value of a label map.
pub(super) fn check_labels<'a>(
    labels: impl IntoIterator<Item = (&'a String, &'a String)>,
) -> Vec<BadLabel> {
    let mut problems = Vec::new();
    for (key, value) in labels {
        let (prefix, name) = match key.rsplit_once('/') {
            Some((prefix, name)) => (Some(prefix), name),
            None => (None, key.as_str()),
        };
        let prefix_ok = prefix.is_none_or(|p| p.split('.').all(is_dns1123_label));
        if !prefix_ok || !is_qualified_name(name) {
            problems.push(BadLabel::Key(key.clone()));
        } else if prefix.is_some_and(|p| p.len() > 253) {
            problems.push(BadLabel::PrefixTooLong(key.clone()));
        }
        if !value.is_empty() && !is_qualified_name(value) {
            problems.push(BadLabel::Value(value.clone()));
        }
    }
    problems
}

/// Why an `exportTo` list is refused (`validateExportTo`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(super) enum BadExportTo {
    #[error("only . or * or a namespace name is allowed as exportTo entry, got {0:?}")]
    Entry(String),
    #[error("duplicate entries in exportTo: {0}")]
    Duplicate(String),
    #[error("cannot have both public (*) and non-public exportTo values for a resource")]
    PublicAndOthers,
    #[error(
        "a destination rule with a workload selector cannot be exported beyond its own namespace"
    )]
    SelectorBeyondNamespace,
}

/// `namespace` is the object's own, which `.` stands for.
pub(super) fn check_export_to(
    export_to: &[String],
    namespace: &str,
    has_workload_selector: bool,
) -> Vec<BadExportTo> {
    let mut problems = Vec::new();
    let mut seen: Vec<&str> = Vec::new();
    for entry in export_to {
        let key = if entry == "." { namespace } else { entry };
        if seen.contains(&key) {
            problems.push(BadExportTo::Duplicate(if key == entry {
                entry.clone()
            } else {
                format!(". and the object's own namespace {namespace}")
            }));
        } else if entry == "*" || entry == "." || is_dns1123_label(entry) {
            seen.push(key);
        } else {
            problems.push(BadExportTo::Entry(entry.clone()));
        }
    }
    if seen.contains(&"*") && export_to.len() > 1 {
        problems.push(BadExportTo::PublicAndOthers);
    }
    if has_workload_selector && seen.iter().any(|key| *key != namespace) {
        problems.push(BadExportTo::SelectorBeyondNamespace);
    }
    problems
}

/// `validateGatewayNames` for a mesh VirtualService: `mesh`, a gateway's
/// `namespace/name`, or a legacy FQDN-style name.
pub(super) fn is_valid_gateway_name(name: &str) -> bool {
    match name.split_once('/') {
        Some((namespace, gateway)) => is_dns1123_label(namespace) && is_dns1123_label(gateway),
        None => name.len() <= 255 && name.split('.').all(is_dns1123_label),
    }
}

/// RE2 (Go's `regexp`, which Istio compiles with) lacks some syntax Rust's
/// `regex` has; returns what the pattern uses that RE2 would refuse.
pub(super) fn re2_incompatibility(pattern: &str) -> Option<String> {
    // A pattern Rust cannot parse is reported by the compiler instead.
    let parsed = ast::parse::Parser::new().parse(pattern).ok()?;
    ast::visit(&parsed, Re2Check).err()
}

/// RE2's limit on `{n}`, `{n,}` and `{n,m}`.
const RE2_MAX_REPEAT: u32 = 1000;

struct Re2Check;

impl Re2Check {
    fn literal(literal: &ast::Literal) -> Result<(), String> {
        match literal.kind {
            LiteralKind::HexFixed(HexLiteralKind::UnicodeShort | HexLiteralKind::UnicodeLong)
            | LiteralKind::HexBrace(HexLiteralKind::UnicodeShort | HexLiteralKind::UnicodeLong) => {
                Err("\\u and \\U escapes (RE2 has \\x{…})".to_string())
            }
            _ => Ok(()),
        }
    }

    fn flags(flags: &ast::Flags) -> Result<(), String> {
        for item in &flags.items {
            if let ast::FlagsItemKind::Flag(flag) = item.kind {
                let letter = match flag {
                    ast::Flag::IgnoreWhitespace => 'x',
                    ast::Flag::CRLF => 'R',
                    ast::Flag::Unicode => 'u',
                    _ => continue,
                };
                return Err(format!("the {letter} flag (RE2 has i, m, s and U)"));
            }
        }
        Ok(())
    }
}

impl ast::Visitor for Re2Check {
    type Output = ();
    type Err = String;

    fn finish(self) -> Result<(), String> {
        Ok(())
    }

    fn visit_pre(&mut self, ast: &Ast) -> Result<(), String> {
        use ast::AssertionKind as A;
        match ast {
            Ast::Assertion(assertion) => match assertion.kind {
                A::WordBoundaryStart
                | A::WordBoundaryEnd
                | A::WordBoundaryStartAngle
                | A::WordBoundaryEndAngle
                | A::WordBoundaryStartHalf
                | A::WordBoundaryEndHalf => {
                    Err("\\<, \\> and \\b{…} word boundaries (RE2 has \\b and \\B)".to_string())
                }
                _ => Ok(()),
            },
            Ast::Flags(set) => Self::flags(&set.flags),
            Ast::Group(group) => match &group.kind {
                ast::GroupKind::NonCapturing(flags) => Self::flags(flags),
                _ => Ok(()),
            },
            Ast::Repetition(repetition) => {
                let ast::RepetitionKind::Range(
                    ast::RepetitionRange::Exactly(n)
                    | ast::RepetitionRange::AtLeast(n)
                    | ast::RepetitionRange::Bounded(_, n),
                ) = repetition.op.kind
                else {
                    return Ok(());
                };
                if n > RE2_MAX_REPEAT {
                    Err(format!(
                        "a repeat count of {n} (RE2 allows at most {RE2_MAX_REPEAT})"
                    ))
                } else {
                    Ok(())
                }
            }
            Ast::Literal(literal) => Self::literal(literal),
            _ => Ok(()),
        }
    }

    fn visit_class_set_item_pre(&mut self, item: &ClassSetItem) -> Result<(), String> {
        match item {
            ClassSetItem::Bracketed(_) => Err("nested character classes".to_string()),
            ClassSetItem::Literal(literal) => Self::literal(literal),
            _ => Ok(()),
        }
    }

    fn visit_class_set_binary_op_pre(&mut self, _: &ast::ClassSetBinaryOp) -> Result<(), String> {
        Err("character class set operations (&&, --, ~~)".to_string())
    }
}

/// RE2 quotes literal text with `\Q…\E` (to the end if `\E` is missing);
/// Rust's `regex` does not, so such text is escaped instead.
pub(super) fn expand_re2_quotes(pattern: &str) -> std::borrow::Cow<'_, str> {
    if !pattern.contains("\\Q") {
        return pattern.into();
    }
    let mut out = String::with_capacity(pattern.len() + 8);
    let mut rest = pattern;
    while let Some(backslash) = rest.find('\\') {
        out.push_str(&rest[..backslash]);
        let after = &rest[backslash + 1..];
        match after.chars().next() {
            Some('Q') => {
                let quoted = &after[1..];
                let (text, next) = match quoted.find("\\E") {
                    Some(end) => (&quoted[..end], &quoted[end + 2..]),
                    None => (quoted, ""),
                };
                out.push_str(&regex_syntax::escape(text));
                rest = next;
            }
            Some(c) => {
                // Any other escape stays as it is, with the character it escapes.
                out.push('\\');
                out.push(c);
                rest = &after[c.len_utf8()..];
            }
            None => {
                out.push('\\');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn re2_refuses_what_only_rust_regex_has() {
        for (pattern, what) in [
            ("(?x) a b", "x flag"),
            ("a(?xi:b)", "x flag"),
            ("(?R)a$", "R flag"),
            ("\\<word\\>", "word boundaries"),
            ("\\b{start}a", "word boundaries"),
            ("a{1001}", "1001"),
            ("a{2,5000}", "5000"),
            ("[a-z&&[^aeiou]]", "set operations"),
            ("[[a-c][x-z]]", "nested"),
            ("\\u0041", "\\u"),
            ("[\\U00000041]", "\\u"),
        ] {
            let problem = re2_incompatibility(pattern)
                .unwrap_or_else(|| panic!("{pattern} should be refused"));
            assert!(problem.contains(what), "{pattern}: {problem}");
        }
        for pattern in [
            "(?i)abc",
            "(?sm-U:a.*b)",
            "a{1000}",
            "\\bword\\B",
            "[[:alpha:]\\d]+",
            "\\x{41}\\x41",
            "(?P<v>[0-9]+)",
            "\\pL\\p{Greek}",
            "/api/.*",
        ] {
            assert_eq!(re2_incompatibility(pattern), None, "{pattern}");
        }
    }

    #[test]
    fn re2_quotes_become_escapes() {
        assert_eq!(expand_re2_quotes("/v1"), "/v1");
        assert_eq!(expand_re2_quotes("\\Qa.b\\E+"), "a\\.b+");
        assert_eq!(expand_re2_quotes("x\\Q(*)"), "x\\(\\*\\)");
        // An escaped backslash followed by Q is not a quote.
        assert_eq!(expand_re2_quotes("\\\\Q\\Qé.\\E"), "\\\\Qé\\.");
        assert_eq!(expand_re2_quotes("a\\"), "a\\");
    }

    #[test]
    fn labels_follow_kubernetes_syntax() {
        let map = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<std::collections::BTreeMap<_, _>>()
        };
        let good = map(&[
            ("app", "reviews"),
            ("app.kubernetes.io/name", "v1.2_beta-3"),
            ("version", ""),
        ]);
        assert_eq!(check_labels(&good), []);
        let bad = map(&[
            ("", "x"),
            ("-app", "v"),
            ("a/b/c", "v"),
            ("app", "v 1"),
            ("x", "-v"),
        ]);
        assert_eq!(
            check_labels(&bad),
            [
                BadLabel::Key(String::new()),
                BadLabel::Key("-app".into()),
                BadLabel::Key("a/b/c".into()),
                BadLabel::Value("v 1".into()),
                BadLabel::Value("-v".into()),
            ]
        );
    }

    #[test]
    fn export_to_follows_istio() {
        let list = |items: &[&str]| items.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(check_export_to(&list(&[".", "other"]), "shop", false), []);
        assert_eq!(check_export_to(&list(&["*"]), "shop", false), []);
        assert_eq!(
            check_export_to(&list(&["*", "."]), "shop", false),
            [BadExportTo::PublicAndOthers]
        );
        assert_eq!(
            check_export_to(&list(&["shop", "."]), "shop", false),
            [BadExportTo::Duplicate(
                ". and the object's own namespace shop".into()
            )]
        );
        assert_eq!(
            check_export_to(&list(&[".", "shop"]), "shop", false),
            [BadExportTo::Duplicate("shop".into())]
        );
        assert_eq!(
            check_export_to(&list(&["a", "a", "~", "B_c"]), "shop", false),
            [
                BadExportTo::Duplicate("a".into()),
                BadExportTo::Entry("~".into()),
                BadExportTo::Entry("B_c".into())
            ]
        );
        assert_eq!(check_export_to(&list(&["."]), "shop", true), []);
        assert_eq!(
            check_export_to(&list(&["*"]), "shop", true),
            [BadExportTo::SelectorBeyondNamespace]
        );
    }

    #[test]
    fn gateway_names() {
        for good in ["mesh", "istio-system/ingress", "ingress.istio-system"] {
            assert!(is_valid_gateway_name(good), "{good}");
        }
        for bad in ["", "ns/", "/gw", "ns/gw/x", "Ns_1/gw", "my gateway"] {
            assert!(!is_valid_gateway_name(bad), "{bad}");
        }
    }
}
