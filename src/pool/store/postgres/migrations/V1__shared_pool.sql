-- polyrank's shared live pool (store_url = postgres://...). Owned by polyrank: created and
-- migrated at start (refinery, under an advisory lock), never edited by hand.

-- The change counter. Every write transaction updates this one row first, so write
-- transactions commit one at a time in seq order: seq N is visible before N+1 can commit,
-- and a follower that has seen N+1 has missed nothing.
CREATE TABLE polyrank_head (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    seq bigint NOT NULL
);
INSERT INTO polyrank_head (one, seq) VALUES (true, 0);

-- Facts about the whole fleet: `seed_hash`, the content hash of the pool files that seeded it.
CREATE TABLE polyrank_fleet (
    key text PRIMARY KEY,
    value text NOT NULL
);

-- Every change, in order: 'upsert' (payload: the candidates, JSON) or 'delete' (payload: the
-- ids, JSON). Followers apply them strictly by seq.
CREATE TABLE polyrank_changes (
    seq bigint PRIMARY KEY,
    kind text NOT NULL CHECK (kind IN ('upsert', 'delete')),
    payload text NOT NULL,
    -- Which replica wrote it and its ticket there ("<instance>:<ticket>"): that replica
    -- answers its client when it applies the change.
    origin text NOT NULL,
    committed_at timestamptz NOT NULL DEFAULT now()
);

-- An upsert's vectors for one model (vectors_key: the candidate encoder's fingerprint):
-- k x d little-endian float32. Replicas running other weights never read them.
CREATE TABLE polyrank_change_vectors (
    seq bigint NOT NULL REFERENCES polyrank_changes (seq) ON DELETE CASCADE,
    vectors_key text NOT NULL,
    vectors bytea NOT NULL,
    PRIMARY KEY (seq, vectors_key)
);

-- The pool as of the head, what a starting replica loads: one row per id ever written;
-- deleted ones stay as tombstones. meta_json is the meta exactly as the replicas hold it;
-- meta is the same as jsonb, for people querying the table.
CREATE TABLE polyrank_candidates (
    id text PRIMARY KEY,
    text text NOT NULL,
    meta_json text,
    meta jsonb GENERATED ALWAYS AS (meta_json::jsonb) STORED,
    seq bigint NOT NULL,
    pos integer NOT NULL,
    deleted boolean NOT NULL DEFAULT false
);

-- Candidate vectors per model, valid while their seq is the candidate's.
CREATE TABLE polyrank_candidate_vectors (
    vectors_key text NOT NULL,
    id text NOT NULL,
    seq bigint NOT NULL,
    vector bytea NOT NULL,
    PRIMARY KEY (vectors_key, id)
);
