//! What the server's own paths look like to clients: absolute paths in messages (a failed
//! store's file, a model directory) are cut to their last component, so an unauthenticated
//! caller of /health/ready, /info or any 503 does not learn the host's layout. The log keeps
//! the whole message.

/// `msg` with every absolute path replaced by its last component
/// (`/srv/polyrank/store/wal.log: damaged record` → `wal.log: damaged record`).
pub(crate) fn paths(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    let mut rest = msg;
    while let Some(at) = rest.find('/') {
        let starts_token = rest[..at].chars().next_back().is_none_or(|c| c.is_whitespace() || "\"'`([{=,".contains(c));
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        let end = tail.find(|c: char| c.is_whitespace() || "\"'`)]},;:".contains(c)).unwrap_or(tail.len());
        let path = &tail[..end];
        if starts_token && path.len() > 1 {
            out.push_str(path.trim_end_matches('/').rsplit('/').next().unwrap_or(""));
        } else {
            out.push_str(path);
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::paths;

    #[test]
    fn absolute_paths_keep_their_last_component() {
        assert_eq!(paths("/tmp/a/store/wal.log: damaged record at byte 12"), "wal.log: damaged record at byte 12");
        assert_eq!(paths("reading candidates /data/x/pool.jsonl (No such file)"), "reading candidates pool.jsonl (No such file)");
        assert_eq!(paths("store `/srv/s/` is in use"), "store `s` is in use");
        assert_eq!(paths("a/b relative and 3/4 and / alone"), "a/b relative and 3/4 and / alone");
        assert_eq!(paths("no paths here"), "no paths here");
    }
}
