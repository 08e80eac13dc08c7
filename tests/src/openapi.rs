//! Validates homeserver responses against the Matrix client-server OpenAPI definitions vendored in
//! `tests/matrix-spec/data/`.
//!
//! # How the definitions are loaded
//! Every `api/client-server/*.yaml` file is read once ([`Validator::get`]). Its base path comes
//! from `servers[0].url` with the `{variables}` replaced by their defaults (e.g.
//! `/_matrix/client/v3`, `/_matrix/client/v1`, `/_matrix`, `/.well-known`); each operation is the
//! base path joined with its path template.
//!
//! For every documented response with an `application/json` schema, the schema's `$ref`s are
//! inlined recursively: a reference (`file.yaml`, `file.yaml#/pointer` or `#/pointer`) is
//! resolved relative to the file that contains it, loaded as YAML, and its own references are
//! resolved relative to *its* file. A reference that would recurse into itself is replaced by
//! `{}` (accept anything); a reference to a file that is not vendored is also `{}` and listed in
//! [`Validator::unresolved_refs`]. Sibling keywords next to a `$ref` are kept (as `allOf` with the
//! target) unless they are only annotations. The result is a self-contained JSON Schema 2020-12
//! document, compiled with `jsonschema`; formats (`mx-user-id`, `uri`, ...) are annotations only.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde_json::{Map, Value};

/// At most this many violations are listed per response.
const MAX_REPORTED: usize = 20;
/// Each violation's message is cut to this many characters (a failed `oneOf` prints the instance).
const MAX_MESSAGE: usize = 300;
/// HTTP methods an OpenAPI path item may hold.
const METHODS: [&str; 8] = ["get", "put", "post", "delete", "options", "head", "patch", "trace"];

/// The client-server API definitions, compiled for validating responses.
pub struct Validator {
    operations: Vec<Operation>,
    error_schema: jsonschema::Validator,
    /// `definitions/auth_response.yaml`: a user-interactive authentication challenge.
    uia_schema: jsonschema::Validator,
    schema_count: usize,
    compile_errors: Vec<String>,
    unresolved_refs: Vec<String>,
    cycles_cut: usize,
}

struct Operation {
    method: String,
    /// Full path template, base path included.
    template: String,
    segments: Vec<Segment>,
    literal_segments: usize,
    id: String,
    file: String,
    responses: Vec<Response>,
    /// The description says the operation uses user-interactive authentication.
    uses_uia: bool,
}

enum Segment {
    Literal(String),
    Param,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum StatusKey {
    Exact(u16),
    /// `4XX`: the hundreds digit.
    Class(u16),
    Default,
}

impl StatusKey {
    fn parse(key: &str) -> Option<StatusKey> {
        if key == "default" {
            return Some(StatusKey::Default);
        }
        if let Ok(code) = key.parse::<u16>() {
            return Some(StatusKey::Exact(code));
        }
        match key.as_bytes() {
            [digit, rest @ ..] if digit.is_ascii_digit() && rest.eq_ignore_ascii_case(b"XX") => {
                Some(StatusKey::Class(u16::from(digit - b'0')))
            }
            _ => None,
        }
    }
}

struct Response {
    status: StatusKey,
    /// The key as written in the definition (`"200"`, `"4XX"`, `"default"`).
    key: String,
    body: Body,
}

enum Body {
    /// The entry documents no JSON body (no content, or only non-JSON media types).
    None,
    Schema(Box<jsonschema::Validator>),
    /// The schema did not compile; validating against it reports this.
    Broken(String),
}

impl Validator {
    /// Loads every client-server OpenAPI file once (cached in a static; loading takes a while).
    pub fn get() -> &'static Validator {
        static VALIDATOR: OnceLock<Validator> = OnceLock::new();
        VALIDATOR.get_or_init(|| {
            Validator::load(&spec_dir())
                .unwrap_or_else(|e| panic!("loading the Matrix OpenAPI definitions: {e}"))
        })
    }

    /// Loads the definitions under `data_dir` (the folder holding `api/`, `schemas/`, ...).
    /// Prefer [`Validator::get`], which loads them once per process.
    pub fn load(data_dir: &Path) -> Result<Validator, String> {
        let api_dir = data_dir.join("api/client-server");
        let mut files: Vec<PathBuf> = std::fs::read_dir(&api_dir)
            .map_err(|e| format!("{}: {e}", api_dir.display()))?
            .filter_map(|entry| entry.ok().map(|entry| entry.path()))
            .filter(|path| path.extension().is_some_and(|ext| ext == "yaml") && path.is_file())
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(format!("no OpenAPI files in {}", api_dir.display()));
        }

        let mut loader = Loader::default();
        let mut operations = Vec::new();
        let mut schema_count = 0;
        let mut compile_errors = Vec::new();
        for file in &files {
            let file = canonical(file)?;
            let doc = loader
                .doc(&file)
                .cloned()
                .ok_or_else(|| format!("{}: cannot be read or parsed", file.display()))?;
            let file_name = file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let base_path = base_path(&doc).map_err(|e| format!("{file_name}: {e}"))?;
            let Some(paths) = doc.get("paths").and_then(Value::as_object) else { continue };
            for (template, item) in paths {
                let Some(item) = item.as_object() else { continue };
                for method in METHODS {
                    let Some(op) = item.get(method) else { continue };
                    let full = format!("{}{template}", base_path.trim_end_matches('/'));
                    let id = op.get("operationId").and_then(Value::as_str).unwrap_or("(no operationId)");
                    let what = format!("{} {full} ({id} in {file_name})", method.to_uppercase());
                    let mut responses = Vec::new();
                    let entries = op.get("responses").and_then(Value::as_object).cloned().unwrap_or_default();
                    for (key, response) in &entries {
                        let Some(status) = StatusKey::parse(key) else {
                            compile_errors.push(format!("{what}: unknown response key {key:?}"));
                            continue;
                        };
                        let body = match loader.response_schema(&file, response) {
                            Err(e) => {
                                compile_errors.push(format!("{what} {key}: {e}"));
                                Body::Broken(e)
                            }
                            Ok(None) => Body::None,
                            Ok(Some(schema)) => {
                                schema_count += 1;
                                match compile(&schema) {
                                    Ok(v) => Body::Schema(Box::new(v)),
                                    Err(e) => {
                                        compile_errors.push(format!("{what} {key}: {e}"));
                                        Body::Broken(e)
                                    }
                                }
                            }
                        };
                        responses.push(Response { status, key: key.clone(), body });
                    }
                    let segments: Vec<Segment> = full
                        .split('/')
                        .map(|s| {
                            if s.starts_with('{') && s.ends_with('}') {
                                Segment::Param
                            } else {
                                Segment::Literal(s.to_owned())
                            }
                        })
                        .collect();
                    let literal_segments =
                        segments.iter().filter(|s| matches!(s, Segment::Literal(_))).count();
                    let uses_uia = op
                        .get("description")
                        .and_then(Value::as_str)
                        .is_some_and(|d| d.contains("User-Interactive Authentication API"));
                    operations.push(Operation {
                        uses_uia,
                        method: method.to_uppercase(),
                        template: full,
                        segments,
                        literal_segments,
                        id: id.to_owned(),
                        file: file_name.clone(),
                        responses,
                    });
                }
            }
        }

        let error_file = canonical(&api_dir.join("definitions/errors/error.yaml"))?;
        let error_doc =
            loader.doc(&error_file).cloned().ok_or("definitions/errors/error.yaml cannot be read")?;
        let error_schema = loader.inline(&error_file, &error_doc, &mut Vec::new(), false);
        let error_schema = compile(&error_schema).map_err(|e| format!("the error schema: {e}"))?;

        let uia_file = canonical(&api_dir.join("definitions/auth_response.yaml"))?;
        let uia_doc =
            loader.doc(&uia_file).cloned().ok_or("definitions/auth_response.yaml cannot be read")?;
        let uia_schema = loader.inline(&uia_file, &uia_doc, &mut Vec::new(), false);
        let uia_schema = compile(&uia_schema).map_err(|e| format!("the UIA response schema: {e}"))?;

        let mut unresolved_refs = loader.unresolved;
        unresolved_refs.sort();
        unresolved_refs.dedup();
        Ok(Validator {
            operations,
            error_schema,
            uia_schema,
            schema_count,
            compile_errors,
            unresolved_refs,
            cycles_cut: loader.cycles_cut,
        })
    }

    /// Validates one response. `path` is the request path without query string, e.g.
    /// `/_matrix/client/v3/rooms/!abc:hs/send/m.room.message/t1` (percent-encoded as sent).
    ///
    /// `Ok(true)`: an operation matched and the body conforms. `Ok(false)`: no operation in the
    /// spec matches this method and path. `Err`: says which operation, which status, and the
    /// JSON-pointer location and reason of each violation.
    ///
    /// The schema is the documented response for `status`, else a `4XX`-style entry, else
    /// `default`. An undocumented 2xx status is a violation; an undocumented 401 of an operation
    /// whose description says it uses user-interactive authentication is checked as a UIA
    /// challenge (`definitions/auth_response.yaml`); any other error status (≥ 400) that is
    /// undocumented, or documented without a JSON body, is checked against the standard error
    /// shape (`definitions/errors/error.yaml`: `errcode` string required, `error` string).
    pub fn validate(&self, method: &str, path: &str, status: u16, body: &Value) -> Result<bool, String> {
        let Some(op) = self.find(method, path) else { return Ok(false) };
        let describe = || format!("{} {} ({} in {})", op.method, op.template, op.id, op.file);
        let (validator, which) = match op.response(status) {
            Some(Response { body: Body::Schema(v), key, .. }) => (&**v, format!("response {key:?}")),
            Some(Response { body: Body::Broken(e), key, .. }) => {
                return Err(format!(
                    "{}, status {status}: the schema of response {key:?} is broken: {e}",
                    describe()
                ));
            }
            Some(Response { body: Body::None, key, .. }) if status >= 400 => (
                &self.error_schema,
                format!("response {key:?} documents no JSON body; checked as a standard error"),
            ),
            Some(Response { body: Body::None, .. }) => return Ok(true),
            None if (200..300).contains(&status) => {
                let documented: Vec<&str> = op.responses.iter().map(|r| r.key.as_str()).collect();
                return Err(format!(
                    "{}, status {status}: not a documented response (documented: {})",
                    describe(),
                    documented.join(", ")
                ));
            }
            // Some operations that use UIA (their description says so) do not list its 401.
            None if status == 401 && op.uses_uia => (
                &self.uia_schema,
                "undocumented 401 of an operation using user-interactive authentication; checked as a UIA challenge"
                    .to_owned(),
            ),
            None if status >= 400 => {
                (&self.error_schema, "undocumented; checked as a standard error".to_owned())
            }
            None => return Ok(true),
        };
        let errors: Vec<_> = validator.iter_errors(body).collect();
        if errors.is_empty() {
            return Ok(true);
        }
        let mut message = format!("{}, status {status} ({which}): {} violation(s)", describe(), errors.len());
        for error in errors.iter().take(MAX_REPORTED) {
            let location = match error.instance_path.as_str() {
                "" => "(root)",
                pointer => pointer,
            };
            let mut reason = error.to_string();
            if reason.chars().count() > MAX_MESSAGE {
                reason = reason.chars().take(MAX_MESSAGE).collect::<String>() + "…";
            }
            let _ = write!(message, "\n  - at {location}: {reason} [schema {}]", error.schema_path.as_str());
        }
        if errors.len() > MAX_REPORTED {
            let _ = write!(message, "\n  - … and {} more", errors.len() - MAX_REPORTED);
        }
        Err(message)
    }

    /// Whether the documented response for this method, path and status has a JSON body:
    /// `None` if no operation matches, `Some(false)` if the status is undocumented or documented
    /// without an `application/json` schema.
    pub fn documents_json(&self, method: &str, path: &str, status: u16) -> Option<bool> {
        let op = self.find(method, path)?;
        Some(op.response(status).is_some_and(|r| !matches!(r.body, Body::None)))
    }

    /// The operation a request matches, as `"GET /_matrix/client/v3/sync (sync in sync.yaml)"`.
    pub fn operation(&self, method: &str, path: &str) -> Option<String> {
        self.find(method, path).map(|op| format!("{} {} ({} in {})", op.method, op.template, op.id, op.file))
    }

    /// How many operations (method + path) the definitions hold.
    pub fn operation_count(&self) -> usize {
        self.operations.len()
    }

    /// How many response bodies have a JSON schema (compiled or broken).
    pub fn schema_count(&self) -> usize {
        self.schema_count
    }

    /// Schemas that did not compile, and response keys that are not status codes. Empty when the
    /// definitions are sound.
    pub fn compile_errors(&self) -> &[String] {
        &self.compile_errors
    }

    /// `$ref`s whose target is not vendored (each was replaced by `{}`), as `file: ref: reason`.
    pub fn unresolved_refs(&self) -> &[String] {
        &self.unresolved_refs
    }

    /// How many recursive `$ref`s were cut (replaced by `{}`) while inlining.
    pub fn cycles_cut(&self) -> usize {
        self.cycles_cut
    }

    fn find(&self, method: &str, path: &str) -> Option<&Operation> {
        let path = path.split(['?', '#']).next().unwrap_or(path);
        let segments: Vec<&str> = path.split('/').collect();
        self.operations
            .iter()
            .filter(|op| op.method.eq_ignore_ascii_case(method) && op.matches(&segments))
            // The most specific template wins (`/profile/{userId}/displayname` over `/{keyName}`).
            .max_by_key(|op| (op.literal_segments, std::cmp::Reverse(op.template.len())))
    }
}

impl Operation {
    fn matches(&self, segments: &[&str]) -> bool {
        self.segments.len() == segments.len()
            && self.segments.iter().zip(segments).all(|(template, actual)| match template {
                // A parameter is one percent-encoded segment; it may be empty (an empty state key).
                Segment::Param => true,
                Segment::Literal(literal) => literal == actual,
            })
    }

    fn response(&self, status: u16) -> Option<&Response> {
        let find = |key: StatusKey| self.responses.iter().find(|r| r.status == key);
        find(StatusKey::Exact(status))
            .or_else(|| find(StatusKey::Class(status / 100)))
            .or_else(|| find(StatusKey::Default))
    }
}

/// `tests/matrix-spec/data`.
fn spec_dir() -> PathBuf {
    crate::manifest_dir().join("matrix-spec/data")
}

fn canonical(path: &Path) -> Result<PathBuf, String> {
    std::fs::canonicalize(path).map_err(|e| format!("{}: {e}", path.display()))
}

/// The path part of `servers[0].url`, with every `{variable}` replaced by its default.
fn base_path(doc: &Value) -> Result<String, String> {
    let server = doc.pointer("/servers/0").ok_or("no servers")?;
    let mut url = server.get("url").and_then(Value::as_str).ok_or("servers[0] has no url")?.to_owned();
    if let Some(vars) = server.get("variables").and_then(Value::as_object) {
        for (name, var) in vars {
            let default = var.get("default").and_then(Value::as_str).unwrap_or_default();
            url = url.replace(&format!("{{{name}}}"), default);
        }
    }
    if url.contains('{') {
        return Err(format!("server url {url:?} has a variable without default"));
    }
    let without_scheme = url.split_once("://").map_or(url.as_str(), |(_, rest)| rest);
    Ok(without_scheme.find('/').map_or(String::new(), |i| without_scheme[i..].to_owned()))
}

fn compile(schema: &Value) -> Result<jsonschema::Validator, String> {
    jsonschema::draft202012::options().build(schema).map_err(|e| e.to_string())
}

/// Keywords that only annotate: a `$ref` with only these beside it is replaced by its target.
fn is_annotation(keyword: &str) -> bool {
    keyword.starts_with("x-")
        || matches!(
            keyword,
            "description"
                | "title"
                | "example"
                | "examples"
                | "$comment"
                | "deprecated"
                | "readOnly"
                | "writeOnly"
                | "default"
                | "$schema"
        )
}

/// Reads YAML files once and inlines `$ref`s.
#[derive(Default)]
struct Loader {
    /// Canonical path → parsed document (`None`: unreadable or not YAML).
    docs: HashMap<PathBuf, Option<Value>>,
    unresolved: Vec<String>,
    cycles_cut: usize,
}

impl Loader {
    fn doc(&mut self, path: &Path) -> Option<&Value> {
        self.docs
            .entry(path.to_path_buf())
            .or_insert_with(|| {
                let text = std::fs::read_to_string(path).ok()?;
                serde_yaml::from_str::<Value>(&text).ok()
            })
            .as_ref()
    }

    /// Resolves `reference` found in `file`: the target's file, its JSON pointer and its value.
    fn resolve(&mut self, file: &Path, reference: &str) -> Result<(PathBuf, String, Value), String> {
        let (target, pointer) = reference.split_once('#').unwrap_or((reference, ""));
        let target = if target.is_empty() {
            file.to_path_buf()
        } else {
            let dir = file.parent().ok_or("a file without a folder")?;
            canonical(&dir.join(target)).map_err(|_| "no such file".to_owned())?
        };
        let doc = self.doc(&target).ok_or("cannot be read or parsed")?;
        let value = doc.pointer(pointer).ok_or_else(|| format!("no {pointer:?} in the target"))?.clone();
        Ok((target, pointer.to_owned(), value))
    }

    /// Follows a response object's own `$ref` (e.g. `#/components/responses/rateLimited`), then
    /// returns its inlined `application/json` schema, if any.
    fn response_schema(&mut self, file: &Path, response: &Value) -> Result<Option<Value>, String> {
        let mut file = file.to_path_buf();
        let mut response = response.clone();
        for _ in 0..16 {
            let Some(reference) = response.get("$ref").and_then(Value::as_str).map(str::to_owned) else {
                break;
            };
            let (target, _, value) =
                self.resolve(&file, &reference).map_err(|e| format!("response $ref {reference:?}: {e}"))?;
            file = target;
            response = value;
        }
        let Some(content) = response.get("content").and_then(Value::as_object) else { return Ok(None) };
        let json = content.iter().find(|(media_type, _)| {
            media_type.split(';').next().is_some_and(|m| m.trim() == "application/json")
        });
        let Some(schema) = json.and_then(|(_, media)| media.get("schema")) else { return Ok(None) };
        Ok(Some(self.inline(&file, schema, &mut Vec::new(), false)))
    }

    /// Returns `value` (found in `file`) with every `$ref` replaced by its target, recursively.
    /// `stack` holds the references being expanded (for cycle detection); `names` is true when
    /// `value` is a map from property names to schemas (where `$ref` would be a property name).
    fn inline(
        &mut self,
        file: &Path,
        value: &Value,
        stack: &mut Vec<(PathBuf, String)>,
        names: bool,
    ) -> Value {
        match value {
            Value::Array(items) => {
                Value::Array(items.iter().map(|v| self.inline(file, v, stack, false)).collect())
            }
            Value::Object(map) => {
                if !names && let Some(reference) = map.get("$ref").and_then(Value::as_str) {
                    let target = self.expand_ref(file, reference, stack);
                    let siblings: Map<String, Value> = map
                        .iter()
                        .filter(|(k, _)| k.as_str() != "$ref")
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect();
                    if siblings.keys().all(|k| is_annotation(k)) {
                        return target;
                    }
                    let mut rest = match self.inline(file, &Value::Object(siblings), stack, false) {
                        Value::Object(rest) => rest,
                        _ => Map::new(),
                    };
                    let mut all_of = vec![target];
                    if let Some(Value::Array(existing)) = rest.remove("allOf") {
                        all_of.extend(existing);
                    }
                    rest.insert("allOf".to_owned(), Value::Array(all_of));
                    return Value::Object(rest);
                }
                let mut out = Map::new();
                for (key, child) in map {
                    if names {
                        out.insert(key.clone(), self.inline(file, child, stack, false));
                        continue;
                    }
                    match key.as_str() {
                        // Only meaningful at a resource root; everything here is 2020-12 anyway.
                        "$schema" => {}
                        // Sample instances, not schemas: nothing to resolve in them.
                        "example" | "examples" => {
                            out.insert(key.clone(), child.clone());
                        }
                        "properties" | "patternProperties" | "$defs" | "definitions" | "dependentSchemas" => {
                            out.insert(key.clone(), self.inline(file, child, stack, true));
                        }
                        _ => {
                            out.insert(key.clone(), self.inline(file, child, stack, false));
                        }
                    }
                }
                Value::Object(out)
            }
            other => other.clone(),
        }
    }

    fn expand_ref(&mut self, file: &Path, reference: &str, stack: &mut Vec<(PathBuf, String)>) -> Value {
        match self.resolve(file, reference) {
            Err(e) => {
                let name = file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                self.unresolved.push(format!("{name}: {reference}: {e}"));
                Value::Object(Map::new())
            }
            Ok((target, pointer, value)) => {
                let key = (target, pointer);
                if stack.contains(&key) {
                    self.cycles_cut += 1;
                    return Value::Object(Map::new());
                }
                stack.push(key);
                let file = stack.last().map(|(f, _)| f.clone()).unwrap_or_default();
                let inlined = self.inline(&file, &value, stack, false);
                stack.pop();
                inlined
            }
        }
    }
}
