//! The server's settings are defined once, in `Config` (its fields: flag, `POLYRANK_*`
//! variable, default and `--help` text); `config/default.toml` (the shipped file, with its
//! comments) and the configuration table in README.md are written from it by hand. These
//! tests fail, naming the key and the place, when either drifts from the definition, or when
//! a field breaks the flag/variable naming rule.

use clap::{CommandFactory, Parser};
use polyrank::config::{Config, ServeArgs};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use toml::Value;

/// `ServeArgs` is an `Args` struct; wrap it to get a `Command` to introspect.
#[derive(Parser)]
struct W {
    #[command(flatten)]
    a: ServeArgs,
}

const DEFAULT_TOML: &str = "config/default.toml";
/// The header row that identifies the configuration table in README.md.
const README_HEADER: &[&str] = &["key", "default", "meaning"];
/// Serialising a `Config` skips this one (it must never be logged or echoed).
const SKIPPED_KEY: &str = "api_key";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("reading {rel}: {e}"))
}

fn parse(flags: &[&str]) -> Result<ServeArgs, clap::Error> {
    let file = root().join(DEFAULT_TOML);
    let mut argv = vec!["polyrank", "--config", file.to_str().expect("utf-8 path")];
    argv.extend_from_slice(flags);
    W::try_parse_from(argv).map(|w| w.a)
}

fn resolved() -> Config {
    Config::resolve(&parse(&[]).expect("no flags parse")).unwrap_or_else(|e| panic!("Config::resolve({DEFAULT_TOML}): {e:#}"))
}

/// Every `Config` key with its resolved default value, as serialised (no `api_key`).
fn serialised_config() -> toml::Table {
    toml::Table::try_from(resolved()).expect("serialising the resolved Config")
}

/// Every `Config` key, `api_key` included.
fn config_keys() -> BTreeSet<String> {
    let mut keys: BTreeSet<String> = serialised_config().keys().cloned().collect();
    assert!(
        !keys.contains(SKIPPED_KEY),
        "Config: `{SKIPPED_KEY}` is serialised (it should be skipped so it is never echoed)"
    );
    keys.insert(SKIPPED_KEY.to_string());
    keys
}

/// `config/default.toml` parsed as a table.
fn default_toml() -> toml::Table {
    toml::from_str(&read(DEFAULT_TOML)).unwrap_or_else(|e| panic!("parsing {DEFAULT_TOML}: {e}"))
}

fn report(what: &str, problems: &[String]) {
    assert!(
        problems.is_empty(),
        "{what}:\n  - {}",
        problems.join("\n  - ")
    );
}

// ---- ServeArgs (flags, env vars, help) against Config ----------------------------------------

struct Flag {
    id: String,
    long: Option<String>,
    env: Option<String>,
    help: String,
}

fn flags() -> Vec<Flag> {
    W::command()
        .get_arguments()
        .filter(|a| !matches!(a.get_id().as_str(), "help" | "version"))
        .map(|a| Flag {
            id: a.get_id().to_string(),
            long: a.get_long().map(str::to_string),
            env: a.get_env().map(|e| e.to_string_lossy().into_owned()),
            help: a.get_help().map(|h| h.to_string()).unwrap_or_default(),
        })
        .collect()
}

#[test]
fn every_config_key_has_a_flag_and_env_var_and_every_flag_is_a_key() {
    let keys = config_keys();
    let flags = flags();
    let mut problems = Vec::new();

    for key in &keys {
        let long = key.replace('_', "-");
        let env = format!("POLYRANK_{}", key.to_uppercase());
        match flags
            .iter()
            .find(|f| f.long.as_deref() == Some(long.as_str()))
        {
            None => problems.push(format!(
                "Config key `{key}`: ServeArgs has no flag --{long}"
            )),
            Some(f) if f.env.as_deref() != Some(env.as_str()) => problems.push(format!(
                "Config key `{key}`: ServeArgs flag --{long} reads env var {:?}, expected {env}",
                f.env
            )),
            Some(_) => {}
        }
    }

    for f in &flags {
        let Some(long) = &f.long else {
            problems.push(format!("ServeArgs argument `{}` has no --long flag", f.id));
            continue;
        };
        if long == "config" {
            if f.env.as_deref() != Some("POLYRANK_CONFIG") {
                problems.push(format!(
                    "ServeArgs flag --config reads env var {:?}, expected POLYRANK_CONFIG",
                    f.env
                ));
            }
            continue;
        }
        let key = long.replace('-', "_");
        if !keys.contains(&key) {
            problems.push(format!("ServeArgs flag --{long} has no Config key `{key}`"));
        }
    }
    report("ServeArgs and Config disagree", &problems);
}

#[test]
fn config_flag_defaults_to_the_shipped_file() {
    let cmd = W::command();
    let arg = cmd
        .get_arguments()
        .find(|a| a.get_long() == Some("config"))
        .expect("ServeArgs has no --config flag");
    let defaults: Vec<_> = arg
        .get_default_values()
        .iter()
        .map(|v| v.to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        defaults,
        [DEFAULT_TOML],
        "ServeArgs --config: default is not {DEFAULT_TOML}"
    );
}

#[test]
fn every_flag_has_help_text() {
    let problems: Vec<String> = flags()
        .iter()
        .filter(|f| f.help.trim().is_empty())
        .map(|f| {
            format!(
                "ServeArgs flag --{}: no help text (field doc)",
                f.long.as_deref().unwrap_or(&f.id)
            )
        })
        .collect();
    report("ServeArgs --help is incomplete", &problems);
}

/// A value as it would be written on the command line (lists comma-separated, like the env).
fn as_flag_value(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Array(a) => a.iter().map(as_flag_value).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

/// A value that differs from `v` and has its type (so the flag cannot just echo the file).
fn changed(v: &Value) -> Value {
    match v {
        Value::Integer(i) => Value::Integer(i + 1),
        Value::Float(f) => Value::Float(f + 1.0),
        Value::Boolean(b) => Value::Boolean(!b),
        // An empty default (store_url) becomes a value that cannot pass for a flag.
        Value::String(s) if s.is_empty() => Value::String("drift".into()),
        Value::String(s) => Value::String(format!("{s}-drift")),
        Value::Array(a) => {
            let mut a = a.clone();
            a.push(Value::String("drift".into()));
            Value::Array(a)
        }
        other => panic!("no changed value for {other:?}"),
    }
}

/// A given flag beats the file for its own setting (through `Config::layered`, unchecked:
/// some changed values would not pass `validate`).
#[test]
fn every_flag_overrides_its_config_key() {
    let defaults = serialised_config();
    let mut problems = Vec::new();
    let cmd = W::command();
    let mut cases: Vec<(String, Value)> = defaults
        .iter()
        .map(|(k, v)| {
            // An enum setting (clap lists its values) changes to another of its values.
            let long = k.replace('_', "-");
            let choices: Vec<String> = cmd
                .get_arguments()
                .find(|a| a.get_long() == Some(long.as_str()))
                .map(|a| a.get_possible_values().iter().map(|p| p.get_name().to_string()).filter(|n| n != "true" && n != "false").collect())
                .unwrap_or_default();
            match (v, choices.is_empty()) {
                (Value::String(cur), false) => (k.clone(), Value::String(choices.into_iter().find(|c| c != cur).expect("another value"))),
                _ => (k.clone(), changed(v)),
            }
        })
        .collect();
    cases.push((SKIPPED_KEY.to_string(), Value::String("secret".into())));
    for (key, value) in cases {
        let flag = format!("--{}", key.replace('_', "-"));
        let args = match parse(&[flag.as_str(), &as_flag_value(&value)]) {
            Ok(a) => a,
            Err(e) => {
                problems.push(format!("flag {flag} {value}: does not parse: {e}"));
                continue;
            }
        };
        let layered = match Config::layered(&args) {
            Ok(c) => toml::Table::try_from(c).expect("serialising Config"),
            Err(e) => {
                problems.push(format!("flag {flag} {value}: settings do not layer: {e:#}"));
                continue;
            }
        };
        match layered.get(&key) {
            Some(got) if *got == value => {}
            got => problems.push(format!("flag {flag} {value}: Config key `{key}` is {got:?}")),
        }
    }
    report("flags do not reach their Config keys", &problems);
}

/// The shipped file says what the definition's defaults are: starting without it (every key
/// from `#[arg(default_value…)]`) and with it gives the same settings.
#[test]
fn default_toml_values_are_the_definitions_defaults() {
    let empty = std::env::temp_dir().join(format!("polyrank-empty-{}.toml", std::process::id()));
    std::fs::write(&empty, "").unwrap();
    let args = W::try_parse_from(["polyrank", "--config", empty.to_str().unwrap()]).expect("parse").a;
    let bare = toml::Table::try_from(Config::layered(&args).expect("defaults alone layer")).unwrap();
    std::fs::remove_file(&empty).ok();
    let file = default_toml();
    let mut problems = Vec::new();
    for (k, v) in &bare {
        match file.get(k) {
            Some(f) if same(f, v) => {}
            Some(f) => problems.push(format!("`{k}`: {DEFAULT_TOML} says {f}, the definition's default is {v}")),
            None => problems.push(format!("`{k}`: not in {DEFAULT_TOML} (default {v})")),
        }
    }
    report(&format!("{DEFAULT_TOML} and the defaults in Config's #[arg]s disagree"), &problems);
}

#[test]
fn api_key_is_a_config_field_unset_by_default() {
    assert_eq!(
        resolved().api_key,
        None,
        "Config `{SKIPPED_KEY}`: set by {DEFAULT_TOML}, but the shipped default is unset"
    );
    // Config denies unknown fields, so this only deserialises if the field exists.
    let mut table = serialised_config();
    table.insert(SKIPPED_KEY.into(), Value::String("secret".into()));
    let c: Config = table
        .try_into()
        .unwrap_or_else(|e| panic!("Config has no `{SKIPPED_KEY}` field: {e}"));
    assert_eq!(
        c.api_key.as_deref(),
        Some("secret"),
        "Config `{SKIPPED_KEY}` is not read"
    );
}

// ---- config/default.toml against Config --------------------------------------------------------

/// Keys written as `key = …` lines in default.toml, in order (no tables expected).
fn default_toml_line_keys(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once('=').map(|(k, _)| k.trim().to_string()))
        .collect()
}

#[test]
fn default_toml_has_every_key_but_api_key_and_no_other() {
    let text = read(DEFAULT_TOML);
    let keys = config_keys();
    let lines = default_toml_line_keys(&text);
    let mut problems = Vec::new();

    for l in text.lines().map(str::trim) {
        if l.starts_with('[') {
            problems.push(format!(
                "{DEFAULT_TOML}: table header `{l}` (settings are top-level keys)"
            ));
        }
    }
    for key in &keys {
        let n = lines.iter().filter(|k| *k == key).count();
        match (key.as_str(), n) {
            (SKIPPED_KEY, 0) | (_, 1) => {}
            (SKIPPED_KEY, _) => problems.push(format!(
                "{DEFAULT_TOML}: sets `{SKIPPED_KEY}` (a secret must not ship; default is unset)"
            )),
            (_, 0) => problems.push(format!(
                "{DEFAULT_TOML}: no `{key} = …` line for Config key `{key}`"
            )),
            (_, n) => problems.push(format!("{DEFAULT_TOML}: `{key}` is set {n} times")),
        }
    }
    for key in lines.iter().collect::<BTreeSet<_>>() {
        if !keys.contains(key) {
            problems.push(format!("{DEFAULT_TOML}: key `{key}` is not a Config field"));
        }
    }
    // The parsed file must have exactly the keys the line scan found.
    let parsed: BTreeSet<String> = default_toml().keys().cloned().collect();
    let scanned: BTreeSet<String> = lines.into_iter().collect();
    if parsed != scanned {
        problems.push(format!(
            "{DEFAULT_TOML}: parsed keys {parsed:?} differ from `key = …` lines {scanned:?}"
        ));
    }
    report(&format!("{DEFAULT_TOML} and Config disagree"), &problems);
}

// ---- README.md configuration table against default.toml ------------------------------------

/// Splits `s` at `sep` outside backticks, quotes and brackets.
fn split_top(s: &str, sep: char) -> Vec<String> {
    let (mut out, mut cur) = (Vec::new(), String::new());
    let (mut tick, mut quote, mut depth) = (false, false, 0i32);
    for c in s.chars() {
        match c {
            '`' => tick = !tick,
            '"' if !tick || quote => quote = !quote,
            '[' | '{' if !quote => depth += 1,
            ']' | '}' if !quote => depth -= 1,
            _ => {}
        }
        if c == sep && !tick && !quote && depth == 0 {
            out.push(std::mem::take(&mut cur));
        } else {
            cur.push(c);
        }
    }
    out.push(cur);
    out
}

/// The cells of a `| a | b | c |` row.
fn cells(line: &str) -> Vec<String> {
    let inner = line.trim().trim_start_matches('|').trim_end_matches('|');
    // Backticks delimit code spans in which `|` could appear; quotes and brackets do not
    // protect a `|` in Markdown, so split on backticks only.
    let (mut out, mut cur, mut tick) = (Vec::new(), String::new(), false);
    for c in inner.chars() {
        if c == '`' {
            tick = !tick;
        }
        if c == '|' && !tick {
            out.push(std::mem::take(&mut cur).trim().to_string());
        } else {
            cur.push(c);
        }
    }
    out.push(cur.trim().to_string());
    out
}

/// A README default, read leniently: `unset` is `None`; `N KiB/MiB/GiB` is bytes; numbers,
/// booleans, quoted strings and arrays as TOML; anything else is a bare string.
fn parse_readme_default(raw: &str) -> Result<Option<Value>, String> {
    let s = raw.trim().trim_matches('`').trim();
    if s.is_empty() {
        return Err("empty default".into());
    }
    if s.eq_ignore_ascii_case("unset") {
        return Ok(None);
    }
    for (unit, mult) in [("KiB", 1i64 << 10), ("MiB", 1 << 20), ("GiB", 1 << 30)] {
        if let Some(n) = s.strip_suffix(unit) {
            let n: f64 = n.trim().parse().map_err(|_| format!("`{s}`: not a size"))?;
            return Ok(Some(Value::Integer((n * mult as f64).round() as i64)));
        }
    }
    let number = s.replace('_', "");
    if let Ok(i) = number.parse::<i64>() {
        return Ok(Some(Value::Integer(i)));
    }
    if let Ok(f) = number.parse::<f64>() {
        return Ok(Some(Value::Float(f)));
    }
    match s {
        "true" => return Ok(Some(Value::Boolean(true))),
        "false" => return Ok(Some(Value::Boolean(false))),
        _ => {}
    }
    if s.starts_with('"') || s.starts_with('\'') || s.starts_with('[') {
        let t: toml::Table = toml::from_str(&format!("v = {s}"))
            .map_err(|e| format!("`{s}`: not a TOML value: {e}"))?;
        return Ok(t.get("v").cloned());
    }
    Ok(Some(Value::String(s.to_string())))
}

fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Integer(x), Value::Float(y)) | (Value::Float(y), Value::Integer(x)) => {
            *x as f64 == *y
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same(a, b))
        }
        _ => a == b,
    }
}

/// The configuration table's rows as (key, raw default) pairs, found by its header row.
fn readme_table(readme: &str) -> Result<Vec<(String, String)>, String> {
    let lines: Vec<&str> = readme.lines().collect();
    let start = lines
        .iter()
        .position(|l| l.trim_start().starts_with('|') && cells(l) == README_HEADER)
        .ok_or_else(|| {
            format!(
                "README.md: no table with header | {} |",
                README_HEADER.join(" | ")
            )
        })?;
    let mut rows = Vec::new();
    for (i, line) in lines.iter().enumerate().skip(start + 2) {
        if !line.trim_start().starts_with('|') {
            break;
        }
        let c = cells(line);
        if c.len() != README_HEADER.len() {
            return Err(format!(
                "README.md line {}: {} cells, expected {}",
                i + 1,
                c.len(),
                README_HEADER.len()
            ));
        }
        let keys: Vec<String> = split_top(&c[0], ',')
            .iter()
            .map(|k| k.trim().trim_matches('`').trim().to_string())
            .collect();
        let defaults = split_top(&c[1], ',');
        if keys.len() != defaults.len() {
            return Err(format!(
                "README.md line {}: {} keys ({}) but {} defaults ({})",
                i + 1,
                keys.len(),
                c[0],
                defaults.len(),
                c[1]
            ));
        }
        for (k, d) in keys.into_iter().zip(defaults) {
            if !c[0].contains(&format!("`{k}`")) {
                return Err(format!(
                    "README.md line {}: key `{k}` is not in backticks",
                    i + 1
                ));
            }
            rows.push((k, d.trim().to_string()));
        }
    }
    Ok(rows)
}

/// Problems between the README's configuration table and the defaults (the serialised config
/// keys plus `api_key`, valued as in default.toml; `None` for unset).
fn readme_problems(readme: &str, defaults: &BTreeMap<String, Option<Value>>) -> Vec<String> {
    let rows = match readme_table(readme) {
        Ok(rows) => rows,
        Err(e) => return vec![e],
    };
    let mut problems = Vec::new();
    let mut seen = BTreeSet::new();
    for (key, raw) in &rows {
        if !seen.insert(key.clone()) {
            problems.push(format!("README.md table: `{key}` is listed twice"));
        }
        let Some(want) = defaults.get(key) else {
            problems.push(format!("README.md table: `{key}` is not a Config key"));
            continue;
        };
        match parse_readme_default(raw) {
            Err(e) => problems.push(format!("README.md table: `{key}` default {e}")),
            Ok(got) => {
                let equal = match (&got, want) {
                    (None, None) => true,
                    (Some(a), Some(b)) => same(a, b),
                    _ => false,
                };
                if !equal {
                    let show = |v: &Option<Value>| {
                        v.as_ref().map_or("unset".to_string(), |v| v.to_string())
                    };
                    problems.push(format!(
                        "README.md table: `{key}` default is {raw} but {DEFAULT_TOML} has {}",
                        show(want)
                    ));
                }
            }
        }
    }
    for key in defaults.keys() {
        if !seen.contains(key) {
            problems.push(format!("README.md table: Config key `{key}` is missing"));
        }
    }
    problems
}

/// Config keys valued as in default.toml (`api_key`: as in the file, i.e. unset).
fn documented_defaults() -> BTreeMap<String, Option<Value>> {
    let file = default_toml();
    config_keys()
        .into_iter()
        .map(|k| {
            let v = file.get(&k).cloned();
            (k, v)
        })
        .collect()
}

#[test]
fn readme_table_matches_default_toml() {
    let defaults = documented_defaults();
    // Sanity: what default.toml says is what Config resolves to with no overrides.
    let serialised = serialised_config();
    let mut problems = Vec::new();
    for (k, v) in &serialised {
        if defaults
            .get(k)
            .cloned()
            .flatten()
            .as_ref()
            .is_some_and(|f| !same(f, v))
        {
            problems.push(format!(
                "{DEFAULT_TOML}: `{k}` resolves to {v}, not the file's value"
            ));
        }
    }
    problems.extend(readme_problems(&read("README.md"), &defaults));
    report(
        "README.md configuration table and the defaults disagree",
        &problems,
    );
}

/// The README check must be able to fail: change each default in memory, one at a time (which
/// is the same as the README showing a stale value), and expect a problem naming that key.
#[test]
fn readme_check_catches_each_changed_default() {
    let readme = read("README.md");
    let defaults = documented_defaults();
    assert!(
        readme_problems(&readme, &defaults).is_empty(),
        "see readme_table_matches_default_toml"
    );
    for key in defaults.keys() {
        let mut drifted = defaults.clone();
        let v = drifted.get_mut(key).unwrap();
        *v = match v {
            None => Some(Value::String("drift".into())),
            Some(x) => Some(changed(x)),
        };
        let problems = readme_problems(&readme, &drifted);
        assert!(
            problems.iter().any(|p| p.contains(&format!("`{key}`"))),
            "a changed default of `{key}` went unnoticed by the README check: {problems:?}"
        );
    }
    // And a README row dropped or altered in memory.
    let altered = readme.replacen("| `cache_keep` |", "| `cache_kept` |", 1);
    if altered != readme {
        let problems = readme_problems(&altered, &defaults);
        assert!(
            problems
                .iter()
                .any(|p| p.contains("`cache_keep` is missing")),
            "{problems:?}"
        );
        assert!(
            problems
                .iter()
                .any(|p| p.contains("`cache_kept` is not a Config key")),
            "{problems:?}"
        );
    }
}
