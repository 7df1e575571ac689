-- History of every change memsync syncs from MongoDB: one row per event (event_id), never updated.
--
-- Applied by app.history.HistoryStore.ensure_schema() with two placeholders filled in:
--   {table}     the database-qualified table name (Settings.history_table)
--   {settings}  "" on servers without insert deduplication for plain MergeTree (18.16), or
--               "SETTINGS non_replicated_deduplication_window = N" where it exists (21.x+, chdb)
-- The statement must run unchanged on ClickHouse 18.16 and 26.x: no DateTime64, TTL, Map,
-- LowCardinality or CODEC here.
--
-- event_time and ingested_at are DEFAULT columns computed by the server, so inserts send ten columns and
-- both paths (real-time, batch) derive event_time the same way. DateTime('UTC') pins toYYYYMM() and the
-- partition boundaries to UTC whatever the server's time zone is.
--
-- PARTITION BY (data_type, month): retention drops whole partitions of one data type.
-- ORDER BY ends with event_id: rows of the same event share the whole sorting key, so
-- ReplacingMergeTree collapses them on merge; entity_id first makes entity lookups use the primary key.
CREATE TABLE IF NOT EXISTS {table}
(
    event_id     String,
    entity_id    String,
    data_type    String,
    operation    Enum8('INSERT' = 1, 'UPDATE' = 2, 'DELETE' = 3),
    collection   String,
    event_ts_ms  Int64,
    event_time   DateTime('UTC') DEFAULT toDateTime(intDiv(event_ts_ms, 1000), 'UTC'),
    version      UInt64,
    data         String,
    metadata     Nullable(String),
    source       Enum8('realtime' = 1, 'batch' = 2, 'replay' = 3),
    ingested_at  DateTime('UTC') DEFAULT now()
)
ENGINE = ReplacingMergeTree()
PARTITION BY (data_type, toYYYYMM(event_time))
ORDER BY (entity_id, collection, version, event_id)
{settings}
