"""The vault's tables. Records are content-addressed blobs; a dataset version is a list of blob hashes."""

SCHEMA_VERSION = 2

DDL = [
    "CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value VARCHAR)",
    # Each distinct record text once, keyed by sha256 of its UTF-8 bytes.
    "CREATE TABLE IF NOT EXISTS blobs (hash VARCHAR PRIMARY KEY, text VARCHAR NOT NULL, bytes BIGINT NOT NULL)",
    "CREATE SEQUENCE IF NOT EXISTS version_vid START 1",
    """CREATE TABLE IF NOT EXISTS versions (
        vid INTEGER PRIMARY KEY, name VARCHAR NOT NULL, n INTEGER, status VARCHAR NOT NULL,
        created TIMESTAMP NOT NULL, committed TIMESTAMP, actor VARCHAR, pii_mode VARCHAR,
        content_hash VARCHAR, records BIGINT, bytes BIGINT, duplicates BIGINT, skipped BIGINT,
        validation_fraction DOUBLE, parents VARCHAR, note VARCHAR)""",
    """CREATE TABLE IF NOT EXISTS version_records (
        vid INTEGER NOT NULL, ord BIGINT NOT NULL, hash VARCHAR NOT NULL, kind VARCHAR NOT NULL,
        source VARCHAR, path VARCHAR, language VARCHAR, title VARCHAR, meta VARCHAR,
        split VARCHAR NOT NULL, bytes BIGINT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS version_sources (
        vid INTEGER NOT NULL, path VARCHAR NOT NULL, kind VARCHAR, bytes BIGINT, sha256 VARCHAR,
        records BIGINT, duplicates BIGINT, status VARCHAR NOT NULL, reason VARCHAR)""",
    """CREATE TABLE IF NOT EXISTS version_pii (
        vid INTEGER NOT NULL, path VARCHAR NOT NULL, type VARCHAR NOT NULL, count BIGINT NOT NULL)""",
    # The PII report counts by detector and confidence band too (NULL in versions made before they were kept).
    "ALTER TABLE version_pii ADD COLUMN IF NOT EXISTS detector VARCHAR",
    "ALTER TABLE version_pii ADD COLUMN IF NOT EXISTS band VARCHAR",
    # Findings kept for review (`vault pii-review`): where each placeholder sits in a record's scrubbed field
    # (`field`: text, title, path, source, meta.KEY), its type, detector and score. Never the value.
    """CREATE TABLE IF NOT EXISTS version_pii_findings (
        vid INTEGER NOT NULL, ord BIGINT, source VARCHAR NOT NULL, field VARCHAR NOT NULL, type VARCHAR NOT NULL,
        detector VARCHAR, score DOUBLE NOT NULL, pos BIGINT NOT NULL, len BIGINT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS version_tables (
        vid INTEGER NOT NULL, table_name VARCHAR NOT NULL, source VARCHAR, rows BIGINT, columns VARCHAR)""",
    "CREATE SCHEMA IF NOT EXISTS data",
    """CREATE TABLE IF NOT EXISTS lineage_nodes (
        id VARCHAR PRIMARY KEY, kind VARCHAR NOT NULL, created TIMESTAMP NOT NULL,
        content_hash VARCHAR, attrs VARCHAR)""",
    """CREATE TABLE IF NOT EXISTS lineage_edges (
        child VARCHAR NOT NULL, parent VARCHAR NOT NULL, role VARCHAR NOT NULL)""",
    # Packed training rows (int32 token ids), cached per (data versions, tokenizer, packing settings).
    """CREATE TABLE IF NOT EXISTS token_cache (
        key VARCHAR NOT NULL, part INTEGER NOT NULL, rows INTEGER NOT NULL, tokens BLOB NOT NULL,
        labels BLOB, PRIMARY KEY (key, part))""",
    "CREATE TABLE IF NOT EXISTS token_cache_meta (key VARCHAR PRIMARY KEY, created TIMESTAMP, stats VARCHAR)",
    # Training runs (id NAME@K, shared with the model they make) and their per-step metrics.
    """CREATE TABLE IF NOT EXISTS train_runs (
        id VARCHAR PRIMARY KEY, name VARCHAR NOT NULL, stage VARCHAR NOT NULL, method VARCHAR NOT NULL,
        status VARCHAR NOT NULL, recipe VARCHAR NOT NULL, data VARCHAR, created TIMESTAMP NOT NULL,
        updated TIMESTAMP NOT NULL, step INTEGER NOT NULL, max_steps INTEGER NOT NULL, checkpoint VARCHAR,
        model_path VARCHAR, world INTEGER, error VARCHAR)""",
    """CREATE TABLE IF NOT EXISTS train_metrics (
        run VARCHAR NOT NULL, step INTEGER NOT NULL, loss DOUBLE, lr DOUBLE, grad_norm DOUBLE,
        tokens BIGINT, tokens_per_s DOUBLE, elapsed DOUBLE)""",
    "ALTER TABLE train_metrics ADD COLUMN IF NOT EXISTS val_loss DOUBLE",
    "ALTER TABLE train_metrics ADD COLUMN IF NOT EXISTS reward DOUBLE",  # grpo: mean reward of the step's samples
    # Bundles sent and received: versions per bundle name (rollback checks) and where they landed.
    """CREATE TABLE IF NOT EXISTS bundles_out (
        name VARCHAR NOT NULL, version INTEGER NOT NULL, id VARCHAR NOT NULL, kind VARCHAR NOT NULL,
        file VARCHAR NOT NULL, signer VARCHAR NOT NULL, created TIMESTAMP NOT NULL, PRIMARY KEY (name, version))""",
    """CREATE TABLE IF NOT EXISTS bundles_in (
        name VARCHAR NOT NULL, version INTEGER NOT NULL, id VARCHAR NOT NULL, kind VARCHAR NOT NULL,
        signer VARCHAR NOT NULL, sha256 VARCHAR NOT NULL, created TIMESTAMP NOT NULL)""",
    # Evaluation runs (id eval-SUITE@K, also a lineage node) and their per-case results.
    """CREATE TABLE IF NOT EXISTS eval_runs (
        id VARCHAR PRIMARY KEY, suite VARCHAR NOT NULL, model VARCHAR NOT NULL, backend VARCHAR NOT NULL,
        created TIMESTAMP NOT NULL, summary VARCHAR NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS eval_cases (
        run VARCHAR NOT NULL, case_id VARCHAR NOT NULL, passed BOOLEAN NOT NULL, output VARCHAR NOT NULL,
        ttft_ms DOUBLE, total_ms DOUBLE, tokens INTEGER, scores VARCHAR)""",
    """CREATE TABLE IF NOT EXISTS eval_drift (
        name VARCHAR PRIMARY KEY, model VARCHAR NOT NULL, dataset VARCHAR NOT NULL, probes VARCHAR NOT NULL,
        snapshot VARCHAR NOT NULL, created TIMESTAMP NOT NULL)""",
    # Jobs (id job-N): queued work and what became of it; see appliance/jobs.
    """CREATE TABLE IF NOT EXISTS jobs (
        id VARCHAR PRIMARY KEY, seq INTEGER NOT NULL, kind VARCHAR NOT NULL, spec VARCHAR NOT NULL,
        status VARCHAR NOT NULL, priority INTEGER NOT NULL, gpus INTEGER NOT NULL, devices VARCHAR, pid INTEGER,
        attempts INTEGER NOT NULL, cancel BOOLEAN NOT NULL, submitted_by VARCHAR NOT NULL,
        created TIMESTAMP NOT NULL, started TIMESTAMP, finished TIMESTAMP, ref VARCHAR, result VARCHAR,
        error VARCHAR)""",
    # Grants to agents (see appliance/grants.py): only a hash of each token is kept.
    """CREATE TABLE IF NOT EXISTS grants (
        id VARCHAR PRIMARY KEY, agent VARCHAR NOT NULL, caps VARCHAR NOT NULL, secret_sha256 VARCHAR NOT NULL,
        created TIMESTAMP NOT NULL, expires TIMESTAMP NOT NULL, revoked TIMESTAMP)""",
    # What an agent's jobs may ask for (NULL in grants made before the bounds: 0, the safe default).
    "ALTER TABLE grants ADD COLUMN IF NOT EXISTS max_gpus INTEGER",
    "ALTER TABLE grants ADD COLUMN IF NOT EXISTS max_priority INTEGER",
    # Models in service (appliance/serving): deployments, what they served (scrubbed) and the feedback on it.
    # The key of each sealed artifact under HOME/artifacts (`appliance/sealed.py`): a file key per artifact
    # directory, kept here so that only the data key's holder can open the artifacts and a rekey costs nothing.
    # `manifested`: the artifact is written with manifests, so one missing is an attack, not an older artifact
    # (NULL for keys made before schema 2: set once `vault seal` writes such an artifact again, or `vault check`
    # finds it whole under its manifests).
    """CREATE TABLE IF NOT EXISTS artifact_keys (
        artifact VARCHAR PRIMARY KEY, key BLOB NOT NULL, created TIMESTAMP NOT NULL, manifested BOOLEAN)""",
    """CREATE TABLE IF NOT EXISTS deployments (
        name VARCHAR PRIMARY KEY, model VARCHAR NOT NULL, candidate VARCHAR, split DOUBLE NOT NULL,
        record BOOLEAN NOT NULL, sample_rate DOUBLE NOT NULL, retention_days INTEGER NOT NULL,
        created TIMESTAMP NOT NULL, updated TIMESTAMP NOT NULL, verdict VARCHAR)""",
    """CREATE TABLE IF NOT EXISTS serving_records (
        id VARCHAR PRIMARY KEY, deployment VARCHAR NOT NULL, arm VARCHAR NOT NULL, model VARCHAR NOT NULL,
        created TIMESTAMP NOT NULL, messages VARCHAR NOT NULL, answer VARCHAR NOT NULL, input_chars INTEGER,
        prompt_tokens INTEGER, completion_tokens INTEGER, latency_ms DOUBLE, status VARCHAR NOT NULL,
        finish_reason VARCHAR, pii VARCHAR)""",
    """CREATE TABLE IF NOT EXISTS serving_feedback (
        record VARCHAR NOT NULL, created TIMESTAMP NOT NULL, rating INTEGER, correction VARCHAR, actor VARCHAR)""",
    """CREATE TABLE IF NOT EXISTS audit (
        seq BIGINT PRIMARY KEY, ts VARCHAR NOT NULL, actor VARCHAR NOT NULL, action VARCHAR NOT NULL,
        ids VARCHAR NOT NULL, details VARCHAR NOT NULL, mac VARCHAR NOT NULL)""",
]
