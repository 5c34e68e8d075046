//! The store in files: a snapshot and a write-ahead log in `store_dir`.
//!
//! Log record: magic `PRWL` | payload length u32 | CRC-32 of payload u32 | CRC-32 of the 12
//! bytes before u32 | payload = seq u64 | op u8 (1 upsert, 2 delete) | JSON length u32 |
//! JSON (candidates, or ids) | for upserts k·d f32. Little-endian.
//! A record cut short at the end of the file (a crash mid-write: its header is whole but its
//! payload is not, or not even the header is) never reached its client as acknowledged: it
//! is dropped and the file truncated, with a warning. Any other damage (a header or payload
//! checksum that fails) stops the start with the offset: it is never served.
//!
//! Snapshot: magic `PRSNAP01` | header JSON length u32 | header JSON (version, vectors key,
//! seed hash, last seq, n, d) | candidates JSON length u64 | candidates JSON | n·d f32 |
//! CRC-32 of everything before u32. Written to a temp file, fsynced, renamed, and the
//! directory fsynced.
//!
//! Compaction: the log is renamed to `wal.old` (a new `wal.log` takes the next writes), a
//! background thread writes the snapshot and then removes `wal.old`; a crash at any point
//! leaves a snapshot plus logs that replay to the same pool (records at or below the
//! snapshot's sequence number are skipped).

use anyhow::{bail, ensure, Context, Result};
use super::{Candidate, Op, Snapshot, SnapshotHeader};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

const WAL_MAGIC: &[u8; 4] = b"PRWL";
const WAL_HEADER: usize = 16;
const SNAP_MAGIC: &[u8; 8] = b"PRSNAP01";
const WAL_FILE: &str = "wal.log";
const OLD_WAL_FILE: &str = "wal.old";
const SNAPSHOT_FILE: &str = "snapshot.bin";

fn encode_record(seq: u64, op: &Op) -> Result<Vec<u8>> {
    let (kind, json, floats): (u8, Vec<u8>, &[f32]) = match op {
        Op::Upsert(c, v) => (1, serde_json::to_vec(c)?, v),
        Op::Delete(ids) => (2, serde_json::to_vec(ids)?, &[]),
    };
    let mut payload = Vec::with_capacity(13 + json.len() + floats.len() * 4);
    payload.extend_from_slice(&seq.to_le_bytes());
    payload.push(kind);
    payload.extend_from_slice(&(json.len() as u32).to_le_bytes());
    payload.extend_from_slice(&json);
    for x in floats {
        payload.extend_from_slice(&x.to_le_bytes());
    }
    let mut rec = Vec::with_capacity(WAL_HEADER + payload.len());
    rec.extend_from_slice(WAL_MAGIC);
    rec.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    rec.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    let header_crc = crc32fast::hash(&rec);
    rec.extend_from_slice(&header_crc.to_le_bytes());
    rec.extend_from_slice(&payload);
    Ok(rec)
}

fn decode_payload(p: &[u8]) -> Result<(u64, Op)> {
    ensure!(p.len() >= 13, "record too short");
    let seq = u64::from_le_bytes(p[0..8].try_into()?);
    let json_len = u32::from_le_bytes(p[9..13].try_into()?) as usize;
    ensure!(p.len() >= 13 + json_len, "record's JSON runs past its end");
    let json = &p[13..13 + json_len];
    let rest = &p[13 + json_len..];
    let op = match p[8] {
        1 => {
            ensure!(rest.len() % 4 == 0, "vector bytes not a multiple of 4");
            Op::Upsert(serde_json::from_slice(json)?, rest.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect())
        }
        2 => Op::Delete(serde_json::from_slice(json)?),
        k => bail!("unknown op {k}"),
    };
    Ok((seq, op))
}

/// Reads every whole record of a log. A cut-short last record is dropped and the file
/// truncated to the last whole one; any checksum failure is an error naming the offset.
fn read_log(path: &Path) -> Result<Vec<(u64, Op)>> {
    let mut bytes = Vec::new();
    match File::open(path) {
        Ok(mut f) => f.read_to_end(&mut bytes).with_context(|| format!("reading {}", path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("opening {}", path.display())),
    };
    let mut out = Vec::new();
    let mut at = 0usize;
    while at < bytes.len() {
        let rest = &bytes[at..];
        if rest.len() < WAL_HEADER {
            truncate_torn(path, at, rest.len())?;
            break;
        }
        let header_ok = &rest[0..4] == WAL_MAGIC && crc32fast::hash(&rest[0..12]) == u32::from_le_bytes(rest[12..16].try_into()?);
        ensure!(header_ok, "{}: damaged record header at byte {at} (checksum mismatch): not served; restore the store or remove the log from this offset", path.display());
        let len = u32::from_le_bytes(rest[4..8].try_into()?) as usize;
        if rest.len() < WAL_HEADER + len {
            truncate_torn(path, at, rest.len())?;
            break;
        }
        let payload = &rest[WAL_HEADER..WAL_HEADER + len];
        ensure!(
            crc32fast::hash(payload) == u32::from_le_bytes(rest[8..12].try_into()?),
            "{}: damaged record at byte {at} (payload checksum mismatch): not served; restore the store or remove the log from this offset",
            path.display()
        );
        out.push(decode_payload(payload).with_context(|| format!("{}: record at byte {at}", path.display()))?);
        at += WAL_HEADER + len;
    }
    Ok(out)
}

fn truncate_torn(path: &Path, at: usize, len: usize) -> Result<()> {
    tracing::warn!(path = %path.display(), offset = at, bytes = len, "dropping a record cut short by a crash (it was never acknowledged)");
    let f = OpenOptions::new().write(true).open(path)?;
    f.set_len(at as u64)?;
    f.sync_all()?;
    Ok(())
}

/// The open log: appends are durable when `append` returns.
struct Wal {
    file: File,
    path: PathBuf,
    bytes: u64,
}

impl Wal {
    fn open(dir: &Path) -> Result<Wal> {
        let path = dir.join(WAL_FILE);
        let mut file = OpenOptions::new().create(true).append(true).read(true).open(&path).with_context(|| format!("opening {}", path.display()))?;
        let bytes = file.seek(SeekFrom::End(0))?;
        Ok(Wal { file, path, bytes })
    }

    /// Appends one record and syncs it to disk.
    pub fn append(&mut self, seq: u64, op: &Op) -> Result<()> {
        let rec = encode_record(seq, op)?;
        crash_mid_write_if_asked(&mut self.file, &rec)?;
        self.file.write_all(&rec).with_context(|| format!("appending to {}", self.path.display()))?;
        self.file.sync_data().with_context(|| format!("syncing {}", self.path.display()))?;
        self.bytes += rec.len() as u64;
        Ok(())
    }

    /// Starts a new log: the current one becomes `wal.old` until a snapshot covers it.
    /// Refused while an older `wal.old` still waits for its snapshot.
    fn rotate(&mut self, dir: &Path) -> Result<()> {
        let old = dir.join(OLD_WAL_FILE);
        ensure!(!old.exists(), "a compaction is still running");
        std::fs::rename(&self.path, &old)?;
        *self = Wal::open(dir)?;
        File::open(dir)?.sync_all()?;
        Ok(())
    }
}

/// `POLYRANK_TEST_CRASH_MID_WAL_WRITE=K`: the K-th append of this process writes half its
/// record and ends the process without cleanup, as a kill -9 in the middle of that write
/// would; for the durability tests only.
fn crash_mid_write_if_asked(f: &mut File, rec: &[u8]) -> Result<()> {
    static APPENDS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let Some(k) = std::env::var("POLYRANK_TEST_CRASH_MID_WAL_WRITE").ok().and_then(|v| v.parse::<usize>().ok()) else {
        return Ok(());
    };
    if APPENDS.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1 == k {
        f.write_all(&rec[..rec.len() / 2])?;
        f.sync_data()?;
        std::process::abort();
    }
    Ok(())
}

/// Public for tools and tests that lay out a store (e.g. a large one) without a server.
pub fn write_snapshot(dir: &Path, snap: &Snapshot) -> Result<()> {
    let h = &snap.header;
    ensure!(snap.candidates.len() == h.n && snap.vectors.len() == h.n * h.d, "snapshot shape does not match its header");
    let header = serde_json::to_vec(h)?;
    let cands = serde_json::to_vec(&snap.candidates)?;
    let mut body = Vec::with_capacity(8 + 4 + header.len() + 8 + cands.len() + snap.vectors.len() * 4 + 4);
    body.extend_from_slice(SNAP_MAGIC);
    body.extend_from_slice(&(header.len() as u32).to_le_bytes());
    body.extend_from_slice(&header);
    body.extend_from_slice(&(cands.len() as u64).to_le_bytes());
    body.extend_from_slice(&cands);
    for x in &snap.vectors {
        body.extend_from_slice(&x.to_le_bytes());
    }
    let crc = crc32fast::hash(&body);
    body.extend_from_slice(&crc.to_le_bytes());
    let path = dir.join(SNAPSHOT_FILE);
    let tmp = dir.join(format!("{SNAPSHOT_FILE}.tmp.{}", std::process::id()));
    {
        let mut f = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(&body)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, &path).with_context(|| format!("renaming into {}", path.display()))?;
    File::open(dir)?.sync_all()?;
    Ok(())
}

/// The snapshot, if there is one; a damaged one is an error (never served).
fn read_snapshot(dir: &Path) -> Result<Option<Snapshot>> {
    let path = dir.join(SNAPSHOT_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let damaged = || format!("{}: damaged snapshot (length or checksum): not served; restore it from a backup or remove the store to re-seed", path.display());
    ensure!(bytes.len() >= 8 + 4 + 8 + 4 && &bytes[..8] == SNAP_MAGIC, damaged());
    let (body, crc) = bytes.split_at(bytes.len() - 4);
    ensure!(crc32fast::hash(body) == u32::from_le_bytes(crc.try_into()?), damaged());
    let hl = u32::from_le_bytes(body[8..12].try_into()?) as usize;
    let header: SnapshotHeader = serde_json::from_slice(body.get(12..12 + hl).with_context(damaged)?).with_context(damaged)?;
    let at = 12 + hl;
    let cl = u64::from_le_bytes(body.get(at..at + 8).with_context(damaged)?.try_into()?) as usize;
    let candidates: Vec<Candidate> = serde_json::from_slice(body.get(at + 8..at + 8 + cl).with_context(damaged)?).with_context(damaged)?;
    let floats = &body[at + 8 + cl..];
    ensure!(candidates.len() == header.n && floats.len() == header.n * header.d * 4, damaged());
    let vectors = floats.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
    Ok(Some(Snapshot { header, candidates, vectors }))
}

/// The files in `store_dir`: one process's own (see the module docs).
pub struct Files {
    dir: PathBuf,
    wal: Option<Wal>,
    compaction: Option<std::thread::JoinHandle<Result<()>>>,
    /// Held for the store's life: a second process on the same directory would interleave
    /// its log records with ours.
    _lock: File,
}

impl Files {
    pub fn open(dir: &Path) -> Result<Files> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating the store directory {}", dir.display()))?;
        let lock = File::create(dir.join("lock"))?;
        lock.try_lock().map_err(|_| {
            anyhow::anyhow!("the store {} is in use by another polyrank process (each replica needs a store_dir of its own)", dir.display())
        })?;
        Ok(Files { dir: dir.to_path_buf(), wal: None, compaction: None, _lock: lock })
    }

    fn wal(&mut self) -> Result<&mut Wal> {
        if self.wal.is_none() {
            self.wal = Some(Wal::open(&self.dir)?);
        }
        Ok(self.wal.as_mut().expect("just opened"))
    }
}

impl Files {
    /// What was stored: the last snapshot, and the writes since (sequence numbers at or below
    /// the snapshot's `last_seq` may appear; they are already in it). Damage is an error.
    pub fn recover(&mut self) -> Result<(Option<Snapshot>, Vec<(u64, Op)>)> {
        let snapshot = read_snapshot(&self.dir)?;
        let mut ops = read_log(&self.dir.join(OLD_WAL_FILE))?;
        ops.extend(read_log(&self.dir.join(WAL_FILE))?);
        Ok((snapshot, ops))
    }

    pub fn append(&mut self, seq: u64, op: &Op) -> Result<()> {
        self.wal()?.append(seq, op)
    }

    pub fn log_bytes(&self) -> u64 {
        self.wal.as_ref().map_or(0, |w| w.bytes)
    }

    pub fn reset(&mut self, snap: &Snapshot) -> Result<()> {
        self.finish();
        write_snapshot(&self.dir, snap)?;
        for f in [OLD_WAL_FILE, WAL_FILE] {
            let _ = std::fs::remove_file(self.dir.join(f));
        }
        self.wal = Some(Wal::open(&self.dir)?);
        Ok(())
    }

    pub fn compact(&mut self, snap: Snapshot, done: Box<dyn FnOnce() + Send>) -> Result<()> {
        if self.compaction.as_ref().is_some_and(|c| !c.is_finished()) {
            return Ok(());
        }
        self.finish();
        // A wal.old left by a failed compaction is covered by this snapshot as well.
        if !self.dir.join(OLD_WAL_FILE).exists() {
            let dir = self.dir.clone();
            self.wal()?.rotate(&dir)?;
        }
        let dir = self.dir.clone();
        self.compaction = Some(std::thread::Builder::new().name("compaction".into()).spawn(move || {
            let t0 = std::time::Instant::now();
            write_snapshot(&dir, &snap)?;
            std::fs::remove_file(dir.join(OLD_WAL_FILE))?;
            tracing::info!(candidates = snap.header.n, secs = format!("{:.2}", t0.elapsed().as_secs_f64()), "store compacted");
            done();
            Ok(())
        })?);
        Ok(())
    }

    pub fn finish(&mut self) {
        if let Some(c) = self.compaction.take() {
            if let Ok(Err(e)) = c.join() {
                tracing::warn!("store compaction failed: {e:#}");
            }
        }
    }
}
