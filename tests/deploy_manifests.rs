//! deploy/kubernetes.yaml: valid against Kubernetes' own schemas (kubernetes-validate, strict:
//! an unknown field is an error), and in the shared-store shape the README describes — every
//! replica reads the database URL from a Secret, an autoscaler scales the Deployment on CPU,
//! readiness gates traffic, and nothing is per-replica state.

mod common;

use serde_yaml::Value;
use std::process::Command;

fn docs() -> Vec<Value> {
    let text = std::fs::read_to_string(common::root().join("deploy/kubernetes.yaml")).unwrap();
    serde_yaml::Deserializer::from_str(&text).map(|d| serde::Deserialize::deserialize(d).unwrap()).collect()
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"].as_str() == Some(kind) && d["metadata"]["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no {kind} {name} in deploy/kubernetes.yaml"))
}

#[test]
fn the_manifests_pass_strict_schema_validation() {
    let tool = common::python().parent().unwrap().join("kubernetes-validate");
    let out = Command::new(&tool).args(["--strict", "--no-warn"]).arg(common::root().join("deploy/kubernetes.yaml")).output().expect("kubernetes-validate (requirements.txt)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{text}");
    assert_eq!(text.matches("passed for resource").count(), docs().len(), "every document validated: {text}");

    // The validator does refuse what it should (so a pass means something).
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    let text = std::fs::read_to_string(common::root().join("deploy/kubernetes.yaml")).unwrap();
    std::fs::write(&bad, text.replacen("  replicas: 2\n", "  replicas: 2\n  replica: 3\n", 1)).unwrap();
    assert!(!Command::new(&tool).arg("--strict").arg(&bad).output().unwrap().status.success());
}

#[test]
fn replicas_share_the_store_through_a_secret_and_scale_on_cpu_behind_readiness() {
    let docs = docs();
    let deploy = find(&docs, "Deployment", "polyrank");
    let container = &deploy["spec"]["template"]["spec"]["containers"][0];
    let env = container["env"].as_sequence().unwrap();
    let url = env.iter().find(|e| e["name"].as_str() == Some("POLYRANK_STORE_URL")).expect("POLYRANK_STORE_URL");
    assert!(url.get("value").is_none(), "the database URL holds a password: from a Secret, not inline");
    let secret = url["valueFrom"]["secretKeyRef"]["name"].as_str().unwrap();
    find(&docs, "Secret", secret);
    assert!(env.iter().all(|e| e["name"].as_str() != Some("POLYRANK_STORE_DIR")), "no per-replica store with a shared one");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"].as_str(), Some("/health/ready"));
    assert_eq!(container["livenessProbe"]["httpGet"]["path"].as_str(), Some("/health/live"));
    assert!(deploy["spec"]["replicas"].as_u64().unwrap() >= 2);

    let hpa = find(&docs, "HorizontalPodAutoscaler", "polyrank");
    assert_eq!(hpa["spec"]["scaleTargetRef"]["kind"].as_str(), Some("Deployment"));
    assert_eq!(hpa["spec"]["scaleTargetRef"]["name"].as_str(), Some("polyrank"));
    assert_eq!(hpa["spec"]["metrics"][0]["resource"]["name"].as_str(), Some("cpu"));
    assert!(hpa["spec"]["minReplicas"].as_u64().unwrap() >= 2);

    // The demo database is what the Secret's URL names.
    find(&docs, "StatefulSet", "polyrank-postgres");
    find(&docs, "Service", "polyrank-postgres");
    let s = find(&docs, "Secret", secret);
    assert!(s["stringData"]["url"].as_str().unwrap().contains("@polyrank-postgres:5432/"));
}
