//! The shared store's statements: schema migration, opening under the fleet's lock, one
//! write's transaction, and reading changes after a `seq`.

use crate::pool::live::LivePool;
use crate::pool::store::{changed_in_files, flat, from_files, Candidate, Change, Encoder, Op};
use crate::pool::Pool;
use anyhow::{Context, Result};
use std::path::PathBuf;
use tokio_postgres::{Client, GenericClient};

refinery::embed_migrations!("src/pool/store/postgres/migrations");

/// Advisory lock keys (any two bigints of our own): schema migration, and seeding /
/// encoding what a model lacks.
const MIGRATE_LOCK: i64 = 0x706f_6c79_7261_6e01;
const SEED_LOCK: i64 = 0x706f_6c79_7261_6e02;
/// Changes read per query by a follower.
const PAGE: i64 = 256;
/// Rows per INSERT: a statement's parameters travel in one message, which PostgreSQL caps at
/// 1 GB; 5,000 vectors of d = 384 are 7.7 MB.
const ROWS_PER_STATEMENT: usize = 5_000;

/// Creates or migrates the schema; replicas starting together take turns.
pub(super) async fn migrate(client: &mut Client) -> Result<()> {
    client.execute("SELECT pg_advisory_lock($1)", &[&MIGRATE_LOCK]).await?;
    let report = migrations::runner().run_async(client).await;
    client.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATE_LOCK]).await?;
    let report = report?;
    for m in report.applied_migrations() {
        tracing::info!(migration = %m, "store schema migrated");
    }
    Ok(())
}

fn to_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn to_floats(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect()
}

/// The pool under the fleet's seeding lock: seeded from the files when the fleet never was,
/// loaded (vectors this model lacks encoded and kept for peers), the pool files' new or
/// changed candidates written when the files changed, and every change since applied.
pub(super) async fn open_locked(client: &mut Client, files: &[PathBuf], key: &str, enc: &mut dyn Encoder) -> Result<(LivePool, u64)> {
    let got: bool = client.query_one("SELECT pg_try_advisory_lock($1)", &[&SEED_LOCK]).await?.get(0);
    if !got {
        enc.phase("waiting for another replica that is seeding the shared store or encoding what its model lacks");
        client.execute("SELECT pg_advisory_lock($1)", &[&SEED_LOCK]).await?;
    }
    let opened = open(client, files, key, enc).await;
    // Released whatever happened (also by the session's end, should this connection die).
    let _ = client.execute("SELECT pg_advisory_unlock($1)", &[&SEED_LOCK]).await;
    opened
}

async fn open(client: &mut Client, files: &[PathBuf], key: &str, enc: &mut dyn Encoder) -> Result<(LivePool, u64)> {
    let files_hash = crate::pool::store::seed_hash(files)?;
    let seeded: Option<String> =
        client.query_opt("SELECT value FROM polyrank_fleet WHERE key = 'seed_hash'", &[]).await?.map(|r| r.get(0));
    if seeded.is_none() {
        enc.phase("seeding the shared store from the pool files");
        let seed = Pool::load(files)?;
        let v = enc.seed(&seed)?;
        let cands = from_files(seed);
        tracing::info!(candidates = cands.len(), "seeding the shared store from the pool files");
        // No replica can be behind this change (the others wait for the lock, then load the
        // candidates table), so its record carries no copy of the pool: a 1M pool's vectors
        // would pass PostgreSQL's 1 GB limit on one value.
        commit_as(client, key, &Op::Upsert(cands, flat(&v)), "seed", Some(&files_hash), false).await?;
    }
    enc.phase("loading the pool from the shared store");
    let t0 = std::time::Instant::now();
    let (mut pool, seq, missing) = load(client, key, enc).await?;
    tracing::info!(candidates = pool.len(), seq, ms = t0.elapsed().as_millis() as u64, "pool loaded from the shared store");
    if !missing.is_empty() {
        enc.phase("encoding the candidates this model has no vectors for");
        tracing::info!(candidates = missing.len(), "the shared store has no vectors of this model for some candidates: encoding them");
        let texts: Vec<String> = missing.iter().map(|&(r, _)| pool.candidate(r).text.clone()).collect();
        let v = enc.encode(&texts)?;
        let ids: Vec<String> = missing.iter().map(|&(r, _)| pool.candidate(r).id.clone()).collect();
        let seqs: Vec<u64> = missing.iter().map(|&(_, s)| s).collect();
        keep_vectors(client, key, None, &ids, &seqs, &flat(&v)).await?;
        let rows: Vec<Candidate> = missing.iter().map(|&(r, _)| pool.candidate(r).clone()).collect();
        pool.upsert(rows, &v);
    }
    if seeded.as_deref().is_some_and(|h| h != files_hash) {
        let (upserts, v) = changed_in_files(files, &pool, enc)?;
        commit(client, key, &Op::Upsert(upserts, flat(&v)), "seed", Some(&files_hash)).await?;
    }
    // Whatever was written since the load (by this start or by other replicas) is applied
    // before the pool serves.
    let mut seq = seq;
    loop {
        let (changes, whole) = changes_after(client, key, seq, "").await?;
        for c in changes {
            let op = match c.op {
                Op::Upsert(cands, v) if v.is_empty() && !cands.is_empty() => {
                    let texts: Vec<String> = cands.iter().map(|c| c.text.clone()).collect();
                    Op::Upsert(cands, flat(&enc.encode(&texts)?))
                }
                op => op,
            };
            op.apply(&mut pool);
            seq = c.seq;
        }
        if whole {
            break;
        }
    }
    Ok((pool, seq))
}

/// The pool as of the head, in one consistent snapshot: the candidates, their vectors for
/// `key` (zeros where there are none), those rows with their seq, and the head's seq.
async fn load(client: &mut Client, key: &str, enc: &dyn Encoder) -> Result<(LivePool, u64, Vec<(usize, u64)>)> {
    let d = enc.dim();
    let tx = client.build_transaction().isolation_level(tokio_postgres::IsolationLevel::RepeatableRead).read_only(true).start().await?;
    let seq: i64 = tx.query_one("SELECT seq FROM polyrank_head", &[]).await?.get(0);
    let rows = tx
        .query(
            "SELECT c.id, c.text, c.meta_json, c.seq, v.vector FROM polyrank_candidates c \
             LEFT JOIN polyrank_candidate_vectors v ON v.vectors_key = $1 AND v.id = c.id AND v.seq = c.seq \
             WHERE NOT c.deleted ORDER BY c.seq, c.pos",
            &[&key],
        )
        .await?;
    tx.commit().await?;
    let mut cands = Vec::with_capacity(rows.len());
    let mut flat: Vec<f32> = Vec::with_capacity(rows.len() * d as usize);
    let mut missing = Vec::new();
    for (r, row) in rows.iter().enumerate() {
        let meta: Option<String> = row.get(2);
        let meta = meta.map(|m| serde_json::from_str(&m)).transpose().context("a stored candidate's meta")?;
        cands.push(Candidate { id: row.get(0), text: row.get(1), meta });
        match row.get::<_, Option<&[u8]>>(4) {
            Some(b) if b.len() == d as usize * 4 => flat.extend(to_floats(b)),
            _ => {
                missing.push((r, row.get::<_, i64>(3) as u64));
                flat.extend(std::iter::repeat_n(0.0, d as usize));
            }
        }
    }
    let n = cands.len() as i64;
    Ok((enc.pool(cands, tch::Tensor::from_slice(&flat).view([n, d])), seq as u64, missing))
}

/// One write, all or nothing: the counter row first (so commits serialise in seq order),
/// the change record and this model's vectors, the candidates table, and a NOTIFY that
/// PostgreSQL sends at commit. With `seed_hash`, also records what the files hashed to.
pub(super) async fn commit(client: &mut Client, key: &str, op: &Op, origin: &str, seed_hash: Option<&str>) -> Result<u64, tokio_postgres::Error> {
    commit_as(client, key, op, origin, seed_hash, true).await
}

/// `commit`; with `log: false` the change record holds no candidates (the first seed).
async fn commit_as(client: &mut Client, key: &str, op: &Op, origin: &str, seed_hash: Option<&str>, log: bool) -> Result<u64, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    let seq: i64 = tx.query_one("UPDATE polyrank_head SET seq = seq + 1 RETURNING seq", &[]).await?.get(0);
    match op {
        Op::Upsert(cands, v) => {
            let payload = if log { serde_json::to_string(cands).expect("candidates serialise") } else { "[]".into() };
            tx.execute("INSERT INTO polyrank_changes (seq, kind, payload, origin) VALUES ($1, 'upsert', $2, $3)", &[&seq, &payload, &origin]).await?;
            if log && !v.is_empty() {
                tx.execute("INSERT INTO polyrank_change_vectors (seq, vectors_key, vectors) VALUES ($1, $2, $3)", &[&seq, &key, &to_bytes(v)])
                    .await?;
            }
            let d = v.len() / cands.len().max(1);
            for (part, start) in cands.chunks(ROWS_PER_STATEMENT).zip((0..).step_by(ROWS_PER_STATEMENT)) {
                let ids: Vec<&str> = part.iter().map(|c| c.id.as_str()).collect();
                let texts: Vec<&str> = part.iter().map(|c| c.text.as_str()).collect();
                let metas: Vec<Option<String>> = part.iter().map(|c| c.meta.as_ref().map(|m| m.to_string())).collect();
                let pos: Vec<i32> = (start..start + part.len() as i32).collect();
                tx.execute(
                    "INSERT INTO polyrank_candidates (id, text, meta_json, seq, pos, deleted) \
                     SELECT u.id, u.text, u.meta, $4, u.pos, false FROM UNNEST($1::text[], $2::text[], $3::text[], $5::int4[]) AS u(id, text, meta, pos) \
                     ON CONFLICT (id) DO UPDATE SET text = EXCLUDED.text, meta_json = EXCLUDED.meta_json, seq = EXCLUDED.seq, pos = EXCLUDED.pos, deleted = false",
                    &[&ids, &texts, &metas, &seq, &pos],
                )
                .await?;
                // Vectors of other models were computed from the old text.
                tx.execute("DELETE FROM polyrank_candidate_vectors WHERE id = ANY($1)", &[&ids]).await?;
                if !v.is_empty() {
                    let rows: Vec<Vec<u8>> = v[start as usize * d..(start as usize + part.len()) * d].chunks(d.max(1)).map(to_bytes).collect();
                    tx.execute(
                        "INSERT INTO polyrank_candidate_vectors (vectors_key, id, seq, vector) \
                         SELECT $1, u.id, $2, u.vector FROM UNNEST($3::text[], $4::bytea[]) AS u(id, vector)",
                        &[&key, &seq, &ids, &rows],
                    )
                    .await?;
                }
            }
        }
        Op::Delete(ids) => {
            let payload = serde_json::to_string(ids).expect("ids serialise");
            tx.execute("INSERT INTO polyrank_changes (seq, kind, payload, origin) VALUES ($1, 'delete', $2, $3)", &[&seq, &payload, &origin]).await?;
            tx.execute(
                "UPDATE polyrank_candidates SET deleted = true, text = '', meta_json = NULL, seq = $1 WHERE id = ANY($2) AND NOT deleted",
                &[&seq, ids],
            )
            .await?;
            tx.execute("DELETE FROM polyrank_candidate_vectors WHERE id = ANY($1)", &[ids]).await?;
        }
    }
    if let Some(h) = seed_hash {
        tx.execute(
            "INSERT INTO polyrank_fleet (key, value) VALUES ('seed_hash', $1) ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
            &[&h],
        )
        .await?;
    }
    tx.execute("SELECT pg_notify('polyrank_changes', $1)", &[&seq.to_string()]).await?;
    tx.commit().await?;
    Ok(seq as u64)
}

/// Vectors this replica encoded, kept for peers running the same model: per candidate while
/// it is still as written at its `seq`, and (with `change`) for that change record.
pub(super) async fn keep_vectors(
    client: &impl GenericClient,
    key: &str,
    change: Option<u64>,
    ids: &[String],
    seqs: &[u64],
    vectors: &[f32],
) -> Result<(), tokio_postgres::Error> {
    if ids.is_empty() {
        return Ok(());
    }
    let d = vectors.len() / ids.len();
    if let Some(seq) = change {
        client
            .execute(
                "INSERT INTO polyrank_change_vectors (seq, vectors_key, vectors) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                &[&(seq as i64), &key, &to_bytes(vectors)],
            )
            .await?;
    }
    let rows: Vec<Vec<u8>> = vectors.chunks(d.max(1)).map(to_bytes).collect();
    let seqs: Vec<i64> = seqs.iter().map(|&s| s as i64).collect();
    client
        .execute(
            "INSERT INTO polyrank_candidate_vectors (vectors_key, id, seq, vector) \
             SELECT $1, u.id, u.seq, u.vector FROM UNNEST($2::text[], $3::int8[], $4::bytea[]) AS u(id, seq, vector) \
             JOIN polyrank_candidates c ON c.id = u.id AND c.seq = u.seq AND NOT c.deleted \
             ON CONFLICT (vectors_key, id) DO UPDATE SET seq = EXCLUDED.seq, vector = EXCLUDED.vector",
            &[&key, &ids, &seqs, &rows],
        )
        .await?;
    Ok(())
}

/// Up to `PAGE` changes after `after`, in order, and whether that was all of them. This
/// replica's own writes (`origin` starting with `instance:`) come with their ticket.
pub(super) async fn changes_after(client: &Client, key: &str, after: u64, instance: &str) -> Result<(Vec<Change>, bool), tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT c.seq, c.kind, c.payload, v.vectors, c.origin FROM polyrank_changes c \
             LEFT JOIN polyrank_change_vectors v ON v.seq = c.seq AND v.vectors_key = $2 \
             WHERE c.seq > $1 ORDER BY c.seq LIMIT $3",
            &[&(after as i64), &key, &PAGE],
        )
        .await?;
    let whole = (rows.len() as i64) < PAGE;
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let seq = row.get::<_, i64>(0) as u64;
        let origin: &str = row.get(4);
        let ticket = origin
            .split_once(':')
            .filter(|(i, _)| !instance.is_empty() && *i == instance)
            .and_then(|(_, t)| t.parse::<u64>().ok());
        let kind: &str = row.get(1);
        let payload: &str = row.get(2);
        let op = match kind {
            "upsert" => serde_json::from_str::<Vec<Candidate>>(payload)
                .map(|cands| Op::Upsert(cands, row.get::<_, Option<&[u8]>>(3).map(to_floats).unwrap_or_default()))
                .map_err(|e| e.to_string()),
            _ => serde_json::from_str::<Vec<String>>(payload).map(Op::Delete).map_err(|e| e.to_string()),
        };
        let op = op.unwrap_or_else(|e| {
            // Never skipped silently, never stuck on: the seq still advances.
            tracing::error!(seq, "an unreadable change in the shared store, not applied: {e}");
            Op::Delete(Vec::new())
        });
        out.push(Change { seq, op, ticket });
    }
    Ok((out, whole))
}
