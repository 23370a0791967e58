//! Multi-document YAML → typed [`Objects`].
//!
//! Documents are split on `---`/`...` markers before parsing so that a syntax
//! error in one document does not hide the documents after it (the YAML
//! parser stops at the first syntax error of a stream).

use k8s_openapi::Metadata;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::de::DeserializeOwned;
use serde_yaml_ng::{Mapping, Value};

use super::istio::{self, DestinationRule, VirtualService};
use super::{Item, Objects, Origin, Problem, Problems};

/// Messages for problems found while reading documents.
#[derive(Debug, thiserror::Error)]
enum ParseError {
    #[error("YAML syntax error: {0}")]
    Syntax(serde_yaml_ng::Error),
    #[error("document is not a mapping (expected a Kubernetes object)")]
    NotAMapping,
    #[error("is required")]
    Required,
    #[error("must be a string")]
    NotAString,
    #[error("apiVersion {found:?} is not valid for kind {kind} (expected {expected})")]
    WrongApiVersion {
        kind: &'static str,
        found: String,
        expected: String,
    },
    #[error("{0}")]
    Invalid(String),
    #[error(
        "nested deeper than {MAX_FLOW_DEPTH} levels of [ ] or {{ }}; no Kubernetes or Istio object needs that"
    )]
    TooDeep,
}

/// Deepest nesting of flow collections (`[…]`, `{…}`) a document may have:
/// the YAML parser's time grows with the square of the depth (40 000
/// levels took 11 s), and no object Nodeway reads nests more than a few.
const MAX_FLOW_DEPTH: usize = 64;

/// Whether `text` nests flow collections deeper than [`MAX_FLOW_DEPTH`];
/// brackets inside quoted scalars and comments do not count. A quote opens
/// a scalar only where a token starts (so `don't` is no quote).
fn too_deep(text: &str) -> bool {
    let bytes = text.as_bytes();
    let mut depth = 0usize;
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        let token_start = i == 0
            || bytes
                .get(i - 1)
                .is_some_and(|p| p.is_ascii_whitespace() || b"[{,:-".contains(p));
        match b {
            b'"' | b'\'' if token_start => {
                // Skip to the closing quote ('' and \" are escaped quotes).
                i += 1;
                while let Some(&c) = bytes.get(i) {
                    if b == b'"' && c == b'\\' {
                        i += 1;
                    } else if c == b {
                        if b == b'\'' && bytes.get(i + 1) == Some(&b'\'') {
                            i += 1;
                        } else {
                            break;
                        }
                    }
                    i += 1;
                }
            }
            b'#' if token_start => {
                while bytes.get(i).is_some_and(|&c| c != b'\n') {
                    i += 1;
                }
            }
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_FLOW_DEPTH {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    false
}

/// Warnings found while reading documents.
#[derive(Debug, thiserror::Error)]
enum ParseWarning {
    #[error("kind {0} is not used by Nodeway; ignored")]
    UnusedKind(String),
    #[error("field is not supported by Nodeway and is ignored")]
    UnsupportedField,
}

/// The object kinds Nodeway reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Namespace,
    Node,
    Pod,
    Service,
    EndpointSlice,
    DestinationRule,
    VirtualService,
}

impl Kind {
    fn from_name(kind: &str) -> Option<Kind> {
        Some(match kind {
            "Namespace" => Kind::Namespace,
            "Node" => Kind::Node,
            "Pod" => Kind::Pod,
            "Service" => Kind::Service,
            "EndpointSlice" => Kind::EndpointSlice,
            "DestinationRule" => Kind::DestinationRule,
            "VirtualService" => Kind::VirtualService,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Namespace => "Namespace",
            Kind::Node => "Node",
            Kind::Pod => "Pod",
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::DestinationRule => "DestinationRule",
            Kind::VirtualService => "VirtualService",
        }
    }

    fn api_versions(self) -> &'static [&'static str] {
        match self {
            Kind::Namespace | Kind::Node | Kind::Pod | Kind::Service => &["v1"],
            Kind::EndpointSlice => &["discovery.k8s.io/v1"],
            Kind::DestinationRule | Kind::VirtualService => &istio::API_VERSIONS,
        }
    }

    fn namespaced(self) -> bool {
        !matches!(self, Kind::Namespace | Kind::Node)
    }
}

/// One document's location and how to label problems found in it.
struct DocumentContext<'a> {
    origin: Origin,
    kind: String,
    name: String,
    /// `items[i]` for objects inside a `List`, else empty.
    field_prefix: String,
    problems: &'a mut Problems,
}

impl DocumentContext<'_> {
    fn problem(&self, field: impl Into<String>, message: impl ToString) -> Problem {
        let field = field.into();
        let field = match (self.field_prefix.as_str(), field.as_str()) {
            ("", _) => field,
            (prefix, "-") => prefix.to_string(),
            (prefix, field) => format!("{prefix}.{field}"),
        };
        Problem {
            file: self.origin.file.clone(),
            document: self.origin.document,
            kind: self.kind.clone(),
            name: self.name.clone(),
            field,
            message: message.to_string(),
        }
    }

    fn error(&mut self, field: impl Into<String>, message: impl ToString) {
        let problem = self.problem(field, message);
        self.problems.errors.push(problem);
    }

    fn warn(&mut self, field: impl Into<String>, message: impl ToString) {
        let problem = self.problem(field, message);
        self.problems.warnings.push(problem);
    }
}

/// Parses every document of `yaml` into `objects`, recording problems.
/// Can be called for several files to merge them into one `Objects`.
pub fn parse_documents(
    source_name: &str,
    yaml: &str,
    objects: &mut Objects,
    problems: &mut Problems,
) {
    for document in split_documents(yaml) {
        let origin = Origin {
            file: source_name.to_string(),
            document: document.number,
        };
        let mut cx = DocumentContext {
            origin,
            kind: "-".into(),
            name: "-".into(),
            field_prefix: String::new(),
            problems,
        };
        if !document.has_content {
            continue;
        }
        if too_deep(&document.text) {
            cx.error("-", ParseError::TooDeep);
            continue;
        }
        let mut value: Value = match serde_yaml_ng::from_str(&document.text) {
            Ok(value) => value,
            Err(err) => {
                // Only now pay for leading newlines, which make the error's
                // line number count from the top of the file (prefixing every
                // document would make loading quadratic in the file's length).
                let text = "\n".repeat(document.first_line) + &document.text;
                let err = serde_yaml_ng::from_str::<Value>(&text).err().unwrap_or(err);
                cx.error("-", ParseError::Syntax(err));
                continue;
            }
        };
        if let Err(err) = value.apply_merge() {
            cx.error("-", ParseError::Syntax(err));
            continue;
        }
        match value {
            Value::Null => continue,
            Value::Mapping(map) => parse_object(map, &mut cx, objects),
            _ => cx.error("-", ParseError::NotAMapping),
        }
    }
}

fn parse_object(mut map: Mapping, cx: &mut DocumentContext<'_>, objects: &mut Objects) {
    let kind = required_string(&map, "kind", cx);
    let api_version = required_string(&map, "apiVersion", cx);
    let meta_string = |key: &str| {
        map.get("metadata")
            .and_then(|meta| meta.get(key))
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    let (name, namespace) = (meta_string("name"), meta_string("namespace"));
    let known = kind.as_deref().and_then(Kind::from_name);
    if let Some(kind) = &kind {
        cx.kind = kind.clone();
    }
    cx.name = match (&name, known) {
        (None, _) => "-".into(),
        (Some(name), Some(kind)) if !kind.namespaced() => name.clone(),
        // kubectl's default namespace; unknown kinds may be cluster-scoped.
        (Some(name), Some(_)) => format!("{}/{name}", namespace.as_deref().unwrap_or("default")),
        (Some(name), None) => match namespace {
            Some(namespace) => format!("{namespace}/{name}"),
            None => name.clone(),
        },
    };

    let (Some(kind_name), Some(api_version)) = (kind, api_version) else {
        return;
    };
    if kind_name == "List" && api_version == "v1" {
        parse_list(&mut map, cx, objects);
        return;
    }
    let Some(kind) = known else {
        cx.warn("-", ParseWarning::UnusedKind(kind_name));
        return;
    };
    if !kind.api_versions().contains(&api_version.as_str()) {
        let expected = kind.api_versions().join(", ");
        cx.error(
            "apiVersion",
            ParseError::WrongApiVersion {
                kind: kind.name(),
                found: api_version,
                expected,
            },
        );
        return;
    }
    if name.is_none() {
        // Also reports a non-string name.
        cx.error("metadata.name", ParseError::Required);
        return;
    }

    let origin = cx.origin.clone();
    match kind {
        Kind::Namespace => push_k8s(&mut objects.namespaces, map, false, origin, cx),
        Kind::Node => push_k8s(&mut objects.nodes, map, false, origin, cx),
        Kind::Pod => push_k8s(&mut objects.pods, map, true, origin, cx),
        Kind::Service => push_k8s(&mut objects.services, map, true, origin, cx),
        Kind::EndpointSlice => push_k8s(&mut objects.endpoint_slices, map, true, origin, cx),
        Kind::DestinationRule => {
            if let Some((metadata, spec)) = parse_istio(&mut map, cx) {
                objects
                    .destination_rules
                    .push(Item::new(origin, DestinationRule { metadata, spec }));
            }
        }
        Kind::VirtualService => {
            if let Some((metadata, spec)) = parse_istio(&mut map, cx) {
                objects
                    .virtual_services
                    .push(Item::new(origin, VirtualService { metadata, spec }));
            }
        }
    }
}

/// `kind: List` (as printed by `kubectl get -o yaml`): each item is an object
/// of the same document; problems name the item's path.
fn parse_list(map: &mut Mapping, cx: &mut DocumentContext<'_>, objects: &mut Objects) {
    let items = match map.remove("items") {
        None | Some(Value::Null) => return,
        Some(Value::Sequence(items)) => items,
        Some(_) => {
            cx.error("items", ParseError::Invalid("must be a list".into()));
            return;
        }
    };
    for (i, item) in items.into_iter().enumerate() {
        let mut item_cx = DocumentContext {
            origin: cx.origin.clone(),
            kind: "-".into(),
            name: "-".into(),
            field_prefix: format!("items[{i}]"),
            problems: &mut *cx.problems,
        };
        match item {
            Value::Mapping(item) => parse_object(item, &mut item_cx, objects),
            _ => item_cx.error("-", ParseError::NotAMapping),
        }
    }
}

/// A top-level string field that every object needs.
fn required_string(map: &Mapping, key: &str, cx: &mut DocumentContext<'_>) -> Option<String> {
    match map.get(key) {
        None | Some(Value::Null) => {
            cx.error(key, ParseError::Required);
            None
        }
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => {
            cx.error(key, ParseError::NotAString);
            None
        }
    }
}

fn push_k8s<T>(
    list: &mut Vec<Item<T>>,
    map: Mapping,
    namespaced: bool,
    origin: Origin,
    cx: &mut DocumentContext<'_>,
) where
    T: DeserializeOwned + Metadata<Ty = ObjectMeta>,
{
    match serde_path_to_error::deserialize::<_, T>(Value::Mapping(map)) {
        Ok(mut object) => {
            if namespaced {
                // kubectl puts objects without a namespace into `default`.
                object
                    .metadata_mut()
                    .namespace
                    .get_or_insert_with(|| "default".to_string());
            }
            list.push(Item::new(origin, object));
        }
        Err(err) => {
            let field = err.path().to_string();
            cx.error(field, ParseError::Invalid(err.into_inner().to_string()));
        }
    }
}

/// Istio object envelope: typed metadata and a spec whose unknown fields are
/// collected as warnings.
fn parse_istio<T>(map: &mut Mapping, cx: &mut DocumentContext<'_>) -> Option<(ObjectMeta, T)>
where
    T: DeserializeOwned + Default,
{
    for key in map.keys() {
        match key.as_str() {
            Some("apiVersion" | "kind" | "metadata" | "spec" | "status") => {}
            Some(other) => cx.warn(other, ParseWarning::UnsupportedField),
            None => cx.warn("-", ParseWarning::UnsupportedField),
        }
    }

    let metadata = map.remove("metadata").unwrap_or(Value::Null);
    let mut metadata: ObjectMeta = match serde_path_to_error::deserialize(metadata) {
        Ok(metadata) => metadata,
        Err(err) => {
            let field = prefixed("metadata", &err.path().to_string());
            cx.error(field, ParseError::Invalid(err.into_inner().to_string()));
            return None;
        }
    };
    metadata
        .namespace
        .get_or_insert_with(|| "default".to_string());

    let spec = match map.remove("spec") {
        None | Some(Value::Null) => T::default(),
        Some(spec) => match istio::deserialize_spec::<T, _>(spec) {
            Ok((spec, ignored)) => {
                for path in ignored {
                    cx.warn(prefixed("spec", &path), ParseWarning::UnsupportedField);
                }
                spec
            }
            Err(err) => {
                cx.error(
                    prefixed("spec", &err.path),
                    ParseError::Invalid(err.message),
                );
                return None;
            }
        },
    };
    Some((metadata, spec))
}

/// `spec` + `http[0].x` → `spec.http[0].x`; serde_path_to_error prints an empty path as ".".
fn prefixed(prefix: &str, path: &str) -> String {
    match path {
        "" | "." => prefix.to_string(),
        _ if path.starts_with('[') => format!("{prefix}{path}"),
        _ => format!("{prefix}.{path}"),
    }
}

/// One YAML document's text, cut out of the file.
#[derive(Debug)]
struct RawDocument {
    /// 1-based position in the file, counting empty documents.
    number: usize,
    /// 0-based line of the file where `text` starts.
    first_line: usize,
    text: String,
    /// Whether anything other than blank lines and comments is present.
    has_content: bool,
}

/// Splits a YAML stream at document markers. A `---` or `...` at the start of
/// a line followed by a blank or the line end is always a marker in YAML, so
/// this split agrees with the parser.
fn split_documents(yaml: &str) -> Vec<RawDocument> {
    struct Current {
        first_line: usize,
        text: String,
        /// Opened by `---`: counts as a document even when empty.
        explicit: bool,
        has_content: bool,
    }

    impl Current {
        fn new(first_line: usize, explicit: bool) -> Self {
            Current {
                first_line,
                text: String::new(),
                explicit,
                has_content: false,
            }
        }

        fn push_line(&mut self, line: &str) {
            let trimmed = line.trim();
            // `%` lines are directives, which only precede a `---`.
            self.has_content |=
                !(trimmed.is_empty() || trimmed.starts_with('#') || line.starts_with('%'));
            self.text.push_str(line);
            self.text.push('\n');
        }

        fn flush(self, out: &mut Vec<RawDocument>) {
            if self.explicit || self.has_content {
                out.push(RawDocument {
                    number: out.len() + 1,
                    first_line: self.first_line,
                    text: self.text,
                    has_content: self.has_content,
                });
            }
        }
    }

    fn is_marker(line: &str, marker: &str) -> bool {
        line.strip_prefix(marker)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t', '\r']))
    }

    let mut out = Vec::new();
    let mut current = Current::new(0, false);
    for (index, line) in yaml.split('\n').enumerate() {
        if is_marker(line, "---") {
            std::mem::replace(&mut current, Current::new(index, true)).flush(&mut out);
            // Content may follow the marker on the same line; blank the marker
            // so that columns stay right.
            current.push_line(&format!("   {}", &line[3..]));
        } else if is_marker(line, "...") {
            std::mem::replace(&mut current, Current::new(index + 1, false)).flush(&mut out);
        } else {
            current.push_line(line);
        }
    }
    current.flush(&mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flow_depth_counts_brackets_outside_quotes_and_comments() {
        assert!(!too_deep("a: [1, {b: [2]}]"));
        let deep = format!("a: {}{}", "[".repeat(65), "]".repeat(65));
        assert!(too_deep(&deep));
        let shallow = format!("a: {}{}", "[".repeat(64), "]".repeat(64));
        assert!(!too_deep(&shallow));
        // Brackets in quoted scalars and comments are text.
        let quoted = format!(
            "a: \"{}\"\nb: '{}'\n# {}\n",
            "[".repeat(100),
            "{".repeat(100),
            "[".repeat(100)
        );
        assert!(!too_deep(&quoted));
        // An apostrophe inside a word opens no quote.
        let words = "d: [it's]\n".repeat(100);
        assert!(!too_deep(&words));
        // Escaped quotes stay inside their scalar.
        assert!(!too_deep("a: 'it''s [' \nb: \"say \\\"[\\\"\""));
    }

    fn numbers_and_lines(yaml: &str) -> Vec<(usize, usize, bool)> {
        split_documents(yaml)
            .iter()
            .map(|d| (d.number, d.first_line, d.has_content))
            .collect()
    }

    #[test]
    fn splits_on_markers() {
        assert_eq!(
            numbers_and_lines("a: 1\n---\nb: 2\n"),
            [(1, 0, true), (2, 1, true)]
        );
        // A leading `---` does not create an empty first document.
        assert_eq!(
            numbers_and_lines("---\na: 1\n---\n---\nb: 2\n"),
            [(1, 0, true), (2, 2, false), (3, 3, true)]
        );
        // Comments before the first marker are not a document.
        assert_eq!(numbers_and_lines("# header\n---\na: 1\n"), [(1, 1, true)]);
        assert_eq!(
            numbers_and_lines("a: 1\n...\n---\nb: 1\n"),
            [(1, 0, true), (2, 2, true)]
        );
        assert_eq!(
            numbers_and_lines("a: 1\n...\nb: 1\n"),
            [(1, 0, true), (2, 2, true)]
        );
        // Indented or longer dashes are content, not markers.
        assert_eq!(numbers_and_lines("a: |\n  ---\nb: ----\n"), [(1, 0, true)]);
    }

    #[test]
    fn content_on_the_marker_line_keeps_its_column() {
        let docs = split_documents("--- {a: 1}\n");
        assert_eq!(docs[0].text, "    {a: 1}\n\n");
        assert!(docs[0].has_content);
    }
}
