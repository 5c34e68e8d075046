#![allow(dead_code)]
//! Checks real responses against openapi.yaml, so the document cannot drift from the server.

use serde_json::Value;

pub struct Contract {
    doc: Value,
}

fn escape(s: &str) -> String {
    s.replace('~', "~0").replace('/', "~1")
}

/// A JSON pointer as a URI fragment: braces of path templates (`/candidates/{id}`) are not
/// allowed there unencoded.
fn fragment(pointer: &str) -> String {
    pointer.replace('{', "%7B").replace('}', "%7D")
}

impl Contract {
    pub fn load() -> Contract {
        let text = std::fs::read_to_string(super::root().join("openapi.yaml")).unwrap();
        let doc: Value = serde_yaml::from_str(&text).expect("openapi.yaml parses");
        Contract { doc }
    }

    pub fn paths(&self) -> Vec<String> {
        let mut p: Vec<String> = self.doc["paths"].as_object().unwrap().keys().cloned().collect();
        p.sort();
        p
    }

    /// Panics unless `body` is what the document promises for this route and status.
    pub fn check(&self, path: &str, method: &str, status: u16, content_type: &str, body: &Value) {
        let op = format!("/paths/{}/{method}", escape(path));
        let mut resp_ptr = format!("{op}/responses/{status}");
        let resp = self.doc.pointer(&resp_ptr).unwrap_or_else(|| panic!("{method} {path}: status {status} is not documented"));
        if let Some(r) = resp.get("$ref").and_then(Value::as_str) {
            resp_ptr = r.trim_start_matches('#').to_string();
        }
        let schema_ptr = format!("{resp_ptr}/content/{}/schema", escape(content_type));
        assert!(
            self.doc.pointer(&schema_ptr).is_some(),
            "{method} {path} {status}: content type {content_type} is not documented"
        );
        let mut schema = self.doc.clone();
        schema["$ref"] = Value::String(format!("#{}", fragment(&schema_ptr)));
        let validator = jsonschema::draft202012::new(&schema).expect("schema compiles");
        let errors: Vec<String> = validator.iter_errors(body).map(|e| format!("{e} at {}", e.instance_path)).collect();
        assert!(errors.is_empty(), "{method} {path} {status} breaks the contract: {errors:?}\nbody: {body}");
    }
}
