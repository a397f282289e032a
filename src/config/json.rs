//! The JSON format of the simpler forwarders, accepted unchanged:
//! `{"Apps": [{"Name": "...", "Ports": [5001, 5200], "Targets": ["host:port", ...]}]}`.
//! Only those keys exist; any other key is an error. serde_json reports lines for syntax and
//! type errors; for the later, semantic errors a small scanner of the source text finds the
//! line of each app, key and list element. This module never resolves or validates values.

use serde::Deserialize;

use super::error::ConfigError;
use super::raw::{At, RawApp, RawDoc, RawListen, RawListenAt, RawTarget};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonFile {
    #[serde(rename = "Apps")]
    apps: Vec<JsonApp>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonApp {
    #[serde(rename = "Name")]
    name: Option<String>,
    #[serde(rename = "Ports", default)]
    ports: Vec<i64>,
    #[serde(rename = "Targets", default)]
    targets: Vec<String>,
}

/// Parse JSON text into the format-neutral document.
pub fn parse(text: &str) -> Result<RawDoc, ConfigError> {
    let map = scan(text);
    let file: JsonFile = serde_json::from_str(text).map_err(|e| json_error(text, &map, &e))?;
    let mut doc = RawDoc {
        apps_key: Some("Apps"),
        ..RawDoc::default()
    };
    for (i, app) in file.apps.into_iter().enumerate() {
        // The scan lines up with the parsed apps whenever serde_json accepted the text.
        let lines = map.apps.get(i);
        let app_line = lines.map(|l| l.line);
        let key_line = |k: &str| lines.and_then(|l| l.key_line(k)).or(app_line);
        let elem_line =
            |v: Option<&Vec<usize>>, j: usize| v.and_then(|v| v.get(j).copied()).or(app_line);
        let listen = app
            .ports
            .iter()
            .enumerate()
            .map(|(j, &p)| RawListenAt {
                listen: RawListen::Port(p),
                key: "Ports",
                line: elem_line(lines.map(|l| &l.ports), j),
            })
            .collect();
        let targets = app
            .targets
            .iter()
            .enumerate()
            .map(|(j, t)| RawTarget {
                spec: t.clone(),
                weight: None,
                key: "Targets",
                line: elem_line(lines.map(|l| &l.targets), j),
            })
            .collect();
        doc.apps.push(RawApp {
            line: app_line,
            name_key: "Name",
            name: app.name.map(|n| At::new(n, key_line("Name"))),
            listen_key: "Ports",
            listen_line: key_line("Ports"),
            listen,
            targets_key: "Targets",
            targets_line: key_line("Targets"),
            targets,
            ..RawApp::default()
        });
    }
    Ok(doc)
}

fn json_error(text: &str, map: &SourceMap, e: &serde_json::Error) -> ConfigError {
    let full = e.to_string();
    // serde_json appends " at line L column C"; the line goes into its own field.
    let message = match full.rfind(" at line ") {
        Some(i) => full[..i].to_string(),
        None => full,
    };
    if e.line() == 0 {
        return ConfigError::new(None, None, None, message);
    }
    let offset = offset_of(text, e.line(), e.column());
    let key = if let Some(rest) = message.strip_prefix("unknown field `") {
        rest.split('`').next().map(str::to_string)
    } else if let Some(rest) = message.strip_prefix("missing field `") {
        rest.split('`').next().map(str::to_string)
    } else if e.classify() != serde_json::error::Category::Data {
        // A syntax error or a truncated file: no key is to blame.
        None
    } else {
        map.keys
            .iter()
            .rev()
            .find(|(_, at)| *at < offset)
            .map(|(k, _)| k.clone())
    };
    let app = map
        .apps
        .iter()
        .find(|a| a.start <= offset && offset <= a.end)
        .and_then(|a| a.name.clone());
    ConfigError::new(Some(e.line()), app.as_deref(), key.as_deref(), message)
}

/// Byte offset of 1-based `line` and `column` (serde_json's position).
fn offset_of(text: &str, line: usize, column: usize) -> usize {
    let mut start = 0;
    for (i, l) in text.split_inclusive('\n').enumerate() {
        if i + 1 == line {
            return (start + column.saturating_sub(1)).min(text.len());
        }
        start += l.len();
    }
    text.len()
}

/// Where things are in the source text of an `{"Apps": [...]}` document.
#[derive(Debug, Default)]
struct SourceMap {
    apps: Vec<AppLines>,
    /// Every object key in the document with its byte offset, in order.
    keys: Vec<(String, usize)>,
}

#[derive(Debug, Default)]
struct AppLines {
    start: usize,
    end: usize,
    line: usize,
    name: Option<String>,
    keys: Vec<(String, usize)>,
    ports: Vec<usize>,
    targets: Vec<usize>,
}

impl AppLines {
    fn key_line(&self, k: &str) -> Option<usize> {
        self.keys.iter().find(|(key, _)| key == k).map(|(_, l)| *l)
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Root,
    AppsArray,
    App(usize),
    Ports(usize),
    Targets(usize),
    Other,
}

struct Frame {
    role: Role,
    is_object: bool,
    key: Option<String>,
}

/// A tolerant single pass over JSON text (it may be invalid) that records where the apps,
/// their keys and their list elements are. It never fails; what it cannot place it skips.
fn scan(text: &str) -> SourceMap {
    let bytes = text.as_bytes();
    let mut map = SourceMap::default();
    let mut stack: Vec<Frame> = Vec::new();
    let mut line = 1;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'\n' => {
                line += 1;
                i += 1;
            }
            b'"' => {
                let start = i;
                i += 1;
                while i < bytes.len() && bytes[i] != b'"' {
                    if bytes[i] == b'\\' {
                        i += 1;
                    } else if bytes[i] == b'\n' {
                        line += 1;
                    }
                    i += 1;
                }
                let end = (i + 1).min(bytes.len());
                i = end;
                let s: String = text
                    .get(start..end)
                    .and_then(|raw| serde_json::from_str(raw).ok())
                    .unwrap_or_default();
                let mut j = i;
                while j < bytes.len() && bytes[j].is_ascii_whitespace() {
                    j += 1;
                }
                let is_key = j < bytes.len() && bytes[j] == b':';
                let Some(top) = stack.last_mut() else {
                    continue;
                };
                if is_key && top.is_object {
                    map.keys.push((s.clone(), start));
                    if let Role::App(a) = top.role
                        && let Some(app) = map.apps.get_mut(a)
                    {
                        app.keys.push((s.clone(), line));
                    }
                    top.key = Some(s);
                } else {
                    match top.role {
                        Role::App(a) if top.key.as_deref() == Some("Name") => {
                            if let Some(app) = map.apps.get_mut(a) {
                                app.name = Some(s);
                            }
                        }
                        Role::Targets(a) => {
                            if let Some(app) = map.apps.get_mut(a) {
                                app.targets.push(line);
                            }
                        }
                        Role::Ports(a) => {
                            if let Some(app) = map.apps.get_mut(a) {
                                app.ports.push(line);
                            }
                        }
                        _ => {}
                    }
                }
            }
            b'{' | b'[' => {
                let is_object = b == b'{';
                let role = match stack.last() {
                    None => Role::Root,
                    Some(top) => match (top.role, top.key.as_deref(), is_object) {
                        (Role::Root, Some("Apps"), false) if top.is_object => Role::AppsArray,
                        (Role::AppsArray, _, true) => {
                            map.apps.push(AppLines {
                                start: i,
                                end: text.len(),
                                line,
                                ..AppLines::default()
                            });
                            Role::App(map.apps.len() - 1)
                        }
                        (Role::App(a), Some("Ports"), false) => Role::Ports(a),
                        (Role::App(a), Some("Targets"), false) => Role::Targets(a),
                        _ => Role::Other,
                    },
                };
                stack.push(Frame {
                    role,
                    is_object,
                    key: None,
                });
                i += 1;
            }
            b'}' | b']' => {
                if let Some(f) = stack.pop()
                    && let Role::App(a) = f.role
                    && let Some(app) = map.apps.get_mut(a)
                {
                    app.end = i;
                }
                i += 1;
            }
            b',' | b':' | b' ' | b'\t' | b'\r' => i += 1,
            _ => {
                // A scalar (number, true, false, null): record list elements, then skip it.
                if let Some(top) = stack.last() {
                    match top.role {
                        Role::Ports(a) => {
                            if let Some(app) = map.apps.get_mut(a) {
                                app.ports.push(line);
                            }
                        }
                        Role::Targets(a) => {
                            if let Some(app) = map.apps.get_mut(a) {
                                app.targets.push(line);
                            }
                        }
                        _ => {}
                    }
                }
                while i < bytes.len() && !b",]}: \t\r\n\"".contains(&bytes[i]) {
                    i += 1;
                }
                if i < bytes.len() && bytes[i] == b'"' {
                    // Garbage glued to a string: let the string branch take it.
                    continue;
                }
            }
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::super::{Overrides, load_str};

    fn err(text: &str) -> String {
        match load_str(text, "a.json", &Overrides::default()) {
            Ok(c) => panic!("expected an error, got {c:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn seed_shape_loads() {
        let text = r#"{"Apps": [
  {"Name": "five-thousand", "Ports": [15001, 15200], "Targets": ["127.0.0.1:5001", "localhost:5002"]},
  {"Name": "six", "Ports": [16001], "Targets": ["[::1]:6001"]}
]}"#;
        let c = load_str(text, "a.json", &Overrides::default()).expect("loads");
        assert_eq!(c.apps.len(), 2);
        let a = &c.apps[0];
        assert_eq!(a.name, "five-thousand");
        assert_eq!(
            a.listen,
            vec![
                "0.0.0.0:15001".parse().unwrap(),
                "0.0.0.0:15200".parse().unwrap()
            ]
        );
        assert_eq!(a.targets.len(), 2);
        assert_eq!(a.targets[1].name, "localhost:5002");
        assert!(a.targets[1].addr.ip().is_loopback());
        assert_eq!(c.apps[1].targets[0].addr, "[::1]:6001".parse().unwrap());
    }

    #[test]
    fn unknown_key_is_an_error_with_line_and_app() {
        let e = err(
            "{\"Apps\": [\n {\"Name\": \"x\",\n  \"Ports\": [1],\n  \"Target\": [\"127.0.0.1:2\"]}\n]}",
        );
        assert!(
            e.starts_with("a.json:4: app 'x': key 'Target': unknown field"),
            "{e}"
        );
    }

    #[test]
    fn type_error_names_key() {
        let e = err(
            "{\"Apps\": [\n {\"Name\": \"x\",\n  \"Ports\": [\"80\"],\n  \"Targets\": [\"127.0.0.1:2\"]}\n]}",
        );
        assert!(e.starts_with("a.json:3: app 'x': key 'Ports': "), "{e}");
    }

    #[test]
    fn semantic_errors_point_at_the_element() {
        let e = err(
            "{\"Apps\": [\n {\"Name\": \"x\",\n  \"Ports\": [1,\n 70000],\n  \"Targets\": [\"127.0.0.1:2\"]}\n]}",
        );
        assert!(e.starts_with("a.json:4: app 'x': key 'Ports': "), "{e}");
        let e = err("{\"Apps\": [\n {\"Name\": \"x\",\n  \"Ports\": [1],\n  \"Targets\": []}\n]}");
        assert_eq!(e, "a.json:4: app 'x': key 'Targets': must not be empty");
        let e = err(
            "{\"Apps\": [\n {\"Name\": \"x\", \"Ports\": [1], \"Targets\": [\"127.0.0.1:2\"]},\n {\"Name\": \"x\", \"Ports\": [3], \"Targets\": [\"127.0.0.1:2\"]}\n]}",
        );
        assert!(
            e.starts_with("a.json:3: app 'x': key 'Name': duplicate"),
            "{e}"
        );
        let e = err("{\"Apps\": [\n {\"Ports\": [1], \"Targets\": [\"127.0.0.1:2\"]}\n]}");
        assert!(e.starts_with("a.json:2: key 'Name': "), "{e}");
        let e = err("{\"Apps\": []}");
        assert!(e.starts_with("a.json: key 'Apps': "), "{e}");
    }

    #[test]
    fn syntax_error_has_line() {
        let e = err("{\"Apps\": [\n {\"Name\": \"x\",\n  \"Ports\": [1,,],\n]}");
        assert!(e.starts_with("a.json:3"), "{e}");
        assert!(!e.contains('\n'));
    }

    #[test]
    fn bad_names_are_refused() {
        let e = err(
            "{\"Apps\": [\n {\"Name\": \"a\\nb\",\n  \"Ports\": [1],\n  \"Targets\": [\"127.0.0.1:2\"]}\n]}",
        );
        assert!(
            e.starts_with("a.json:2: key 'Name': app name 'a\\nb' may only"),
            "{e}"
        );
        let e = err(
            "{\"Apps\": [\n {\"Name\": \"x\",\n  \"Ports\": [1],\n  \"Targets\": [\"127.0.0.1:2\",\n  \"<b>:3\"]}\n]}",
        );
        assert!(
            e.starts_with("a.json:5: app 'x': key 'Targets': target '<b>:3' may only"),
            "{e}"
        );
    }

    #[test]
    fn port_zero_is_any_free_port() {
        let text =
            "{\"Apps\": [{\"Name\": \"x\", \"Ports\": [0, 0], \"Targets\": [\"127.0.0.1:2\"]}]}";
        let c = load_str(text, "a.json", &Overrides::default()).expect("loads");
        assert_eq!(c.apps[0].listen, vec!["0.0.0.0:0".parse().unwrap(); 2]);
    }
}
