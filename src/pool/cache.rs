//! The encoded pool on disk, so a restart skips re-encoding.
//!
//! File name: `<key>.pool`, where the key is a SHA-256 over everything that decides the
//! vectors (encoder weights, head, tokenizer, settings, candidate files). Layout:
//! magic `PRKPOOL1` | key (32 bytes) | n: u64 | d: u64 | n·d f32 | CRC-32 of all before (u32),
//! little-endian. Written to a temp file and renamed, so a reader sees a whole file or none;
//! a truncated or corrupted file fails its length or checksum and is never served.

use crate::fingerprint;
use crate::model::format::*;
use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

const MAGIC: &[u8; 8] = b"PRKPOOL1";
const HEADER: usize = 8 + 32 + 8 + 8;

pub struct PoolCache {
    pub path: PathBuf,
    key: [u8; 32],
}

impl PoolCache {
    /// `dtype`: the encoders' compute precision, which changes the vectors (float32 adds
    /// nothing to the key, so caches written before it was part of it stay valid).
    pub fn new(cache_dir: &Path, model_dir: &Path, settings: &PolySettings, candidate_files: &[PathBuf], dtype: crate::config::Dtype) -> Result<Self> {
        let mut h = Sha256::new();
        h.update(MAGIC);
        // The order of the first files is part of the key: keep it, so existing caches stay valid.
        let mut files = fingerprint::encoder_files(model_dir, settings);
        let candidate_side = files.split_off(3);
        files.push(model_dir.join(SETTINGS_FILE));
        if model_dir.join(HEAD_FILE).exists() {
            files.push(model_dir.join(HEAD_FILE));
        }
        files.extend(candidate_side);
        files.extend(candidate_files.iter().cloned());
        for f in &files {
            fingerprint::hash_file(&mut h, f)?;
        }
        h.update(dtype.key_bytes());
        let key: [u8; 32] = h.finalize().into();
        Ok(PoolCache { path: cache_dir.join(format!("{}.pool", hex::encode(key))), key })
    }

    /// The same cache file in another directory (the install's baked caches).
    pub fn in_dir(&self, dir: &Path) -> PoolCache {
        let name = self.path.file_name().expect("a cache path has a file name");
        PoolCache { path: dir.join(name), key: self.key }
    }

    /// The cached `[n, d]` vectors, or why the file cannot be used (missing, truncated, corrupt).
    pub fn load(&self, n: usize, d: usize) -> Result<Tensor> {
        let bytes = std::fs::read(&self.path).with_context(|| format!("reading {}", self.path.display()))?;
        let expected = HEADER + n * d * 4 + 4;
        if bytes.len() != expected {
            bail!("{}: {} bytes, expected {expected} (truncated or foreign)", self.path.display(), bytes.len());
        }
        let (body, crc) = bytes.split_at(bytes.len() - 4);
        if crc32fast::hash(body).to_le_bytes() != crc {
            bail!("{}: checksum mismatch (corrupted)", self.path.display());
        }
        if &body[..8] != MAGIC || body[8..40] != self.key {
            bail!("{}: header does not match this model and pool", self.path.display());
        }
        let fn_ = u64::from_le_bytes(body[40..48].try_into().unwrap()) as usize;
        let fd = u64::from_le_bytes(body[48..56].try_into().unwrap()) as usize;
        if (fn_, fd) != (n, d) {
            bail!("{}: holds [{fn_}, {fd}], expected [{n}, {d}]", self.path.display());
        }
        Ok(Tensor::from_data_size(&body[HEADER..], &[n as i64, d as i64], Kind::Float))
    }

    /// Writes atomically: temp file, fsync, rename, fsync of the directory.
    pub fn store(&self, vectors: &Tensor) -> Result<()> {
        let dir = self.path.parent().expect("cache path has a directory");
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let v = vectors.to_device(tch::Device::Cpu).to_kind(Kind::Float).contiguous();
        let (n, d) = v.size2()?;
        let floats: Vec<f32> = Vec::try_from(v.view([-1]))?;
        let mut body = Vec::with_capacity(HEADER + floats.len() * 4 + 4);
        body.extend_from_slice(MAGIC);
        body.extend_from_slice(&self.key);
        body.extend_from_slice(&(n as u64).to_le_bytes());
        body.extend_from_slice(&(d as u64).to_le_bytes());
        for x in &floats {
            body.extend_from_slice(&x.to_le_bytes());
        }
        let crc = crc32fast::hash(&body);
        body.extend_from_slice(&crc.to_le_bytes());
        let tmp = self.path.with_extension(format!("pool.tmp.{}.{}", host(), std::process::id()));
        {
            let mut f = std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
            write_slowly_if_asked(&mut f, &body)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &self.path).with_context(|| format!("renaming into {}", self.path.display()))?;
        std::fs::File::open(dir)?.sync_all()?;
        Ok(())
    }
}

/// A temp file (`<key>.pool.tmp.<host>.<pid>`) of an interrupted write is removed when it is
/// this host's and its process is gone, or when nobody has written to it for this long (a
/// writer on another host that shares the volume).
const STALE_TEMP: std::time::Duration = std::time::Duration::from_secs(600);

impl PoolCache {
    /// Removes temp files of interrupted writes and all but the newest `keep` pool files
    /// (this pool's own file always stays), so a shared cache volume does not only grow.
    pub fn clean(&self, keep: usize) {
        let Some(dir) = self.path.parent() else { return };
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        let mut pools: Vec<(std::time::SystemTime, PathBuf)> = Vec::new();
        for e in entries.flatten() {
            let (path, name) = (e.path(), e.file_name().to_string_lossy().into_owned());
            let modified = e.metadata().and_then(|m| m.modified()).unwrap_or(std::time::UNIX_EPOCH);
            if let Some((_, writer)) = name.split_once(".pool.tmp.") {
                // `<host>.<pid>`: a pid is only checked against this host's processes.
                let writer_gone = writer.rsplit_once('.').is_some_and(|(h, pid)| {
                    h == host() && pid.parse::<u32>().is_ok_and(|p| p != std::process::id() && !Path::new(&format!("/proc/{p}")).exists())
                });
                let idle = modified.elapsed().is_ok_and(|d| d > STALE_TEMP);
                if writer_gone || idle {
                    remove(&path, "temp file of an interrupted cache write");
                }
            } else if name.ends_with(".pool") && path != self.path {
                pools.push((modified, path));
            }
        }
        pools.sort_by(|a, b| b.0.cmp(&a.0));
        for (_, path) in pools.into_iter().skip(keep.saturating_sub(1)) {
            remove(&path, "superseded pool cache file");
        }
    }
}

/// This host's name, in temp file names so that hosts sharing a cache volume tell their own
/// interrupted writes from another host's live ones.
fn host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().replace(['/', '.'], "_")).unwrap_or_else(|_| "host".into())
}

fn remove(path: &Path, what: &str) {
    match std::fs::remove_file(path) {
        Ok(()) => tracing::info!(path = %path.display(), "removed {what}"),
        Err(e) => tracing::warn!(path = %path.display(), "could not remove {what}: {e}"),
    }
}

/// `POLYRANK_TEST_SLOW_CACHE_WRITE_MS` stretches the write over that many milliseconds so the
/// crash-safety test can kill the process mid-write. Unset in normal use.
fn write_slowly_if_asked(f: &mut std::fs::File, body: &[u8]) -> Result<()> {
    let delay = std::env::var("POLYRANK_TEST_SLOW_CACHE_WRITE_MS").ok().and_then(|v| v.parse::<u64>().ok());
    match delay {
        None => f.write_all(body)?,
        Some(ms) => {
            let parts = 20;
            for chunk in body.chunks(body.len().div_ceil(parts).max(1)) {
                f.write_all(chunk)?;
                f.flush()?;
                std::thread::sleep(std::time::Duration::from_millis(ms / parts as u64));
            }
        }
    }
    Ok(())
}
