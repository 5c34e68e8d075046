//! A missing or malformed file in a model directory gives an error naming the file and the fault.

use polyrank::model::format::*;
use polyrank::infer::ranker::Ranker;
use polyrank::testkit::{tiny_settings, write_tiny_model};
use std::path::Path;
use tch::Device;

fn tiny() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_model(dir.path(), &tiny_settings(4), 5).unwrap();
    dir
}

fn load_error(dir: &Path) -> String {
    match Ranker::load(dir, Device::Cpu) {
        Ok(_) => panic!("loading {dir:?} should fail"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn a_complete_tiny_model_loads() {
    let dir = tiny();
    let r = Ranker::load(dir.path(), Device::Cpu).unwrap();
    assert_eq!(r.model.dim(), 32);
    assert_eq!(r.model.settings.n_codes, 4);
}

#[test]
fn each_missing_file_is_named() {
    for name in [SETTINGS_FILE, CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE, HEAD_FILE] {
        let dir = tiny();
        std::fs::remove_file(dir.path().join(name)).unwrap();
        let e = load_error(dir.path());
        assert!(e.contains(name) && e.contains("missing"), "{name}: {e}");
    }
}

#[test]
fn malformed_settings_are_explained() {
    let dir = tiny();
    let p = dir.path().join(SETTINGS_FILE);
    let good = std::fs::read_to_string(&p).unwrap();
    std::fs::write(&p, good.replace("\"n_codes\": 4", "\"n_codes\": 0")).unwrap();
    let e = load_error(dir.path());
    assert!(e.contains(SETTINGS_FILE) && e.contains("n_codes"), "{e}");
    std::fs::write(&p, good.replace("\"basic\"", "\"cosine\"")).unwrap();
    let e = load_error(dir.path());
    assert!(e.contains(SETTINGS_FILE) && e.contains("cosine"), "{e}");
    std::fs::write(&p, "{not json").unwrap();
    assert!(load_error(dir.path()).contains(SETTINGS_FILE));
}

#[test]
fn weights_with_a_missing_tensor_or_bad_bytes_are_explained() {
    let dir = tiny();
    // A head file for m=4 cannot serve settings asking for m=8.
    let p = dir.path().join(SETTINGS_FILE);
    let s = std::fs::read_to_string(&p).unwrap();
    std::fs::write(&p, s.replace("\"n_codes\": 4", "\"n_codes\": 8")).unwrap();
    let e = load_error(dir.path());
    assert!(e.contains(HEAD_FILE) && e.contains("codes") && e.contains("shape"), "{e}");
    std::fs::write(&p, s.replace("\"candidate_attention\": {\n    \"kind\": \"basic\"", "\"candidate_attention\": {\n    \"kind\": \"multihead\"")).unwrap();
    let e = load_error(dir.path());
    assert!(e.contains(HEAD_FILE) && e.contains("`candidate_attention.k_lin.bias`") && e.contains("missing"), "{e}");
    std::fs::write(&p, &s).unwrap();
    let w = dir.path().join(WEIGHTS_FILE);
    let bytes = std::fs::read(&w).unwrap();
    std::fs::write(&w, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_error(dir.path());
    assert!(e.contains(WEIGHTS_FILE), "{e}");
}

#[test]
fn malformed_config_and_tokenizer_are_named() {
    let dir = tiny();
    std::fs::write(dir.path().join(CONFIG_FILE), "{\"hidden_size\": 32}").unwrap();
    let e = load_error(dir.path());
    assert!(e.contains(CONFIG_FILE) && e.contains("missing field"), "{e}");
    let dir = tiny();
    std::fs::write(dir.path().join(TOKENIZER_FILE), "[]").unwrap();
    assert!(load_error(dir.path()).contains(TOKENIZER_FILE));
}
