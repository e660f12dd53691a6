-- Metering read models. Unqualified names on purpose: a rebuild runs this same file inside
-- a fresh schema (blue/green read models), then swaps the schemas' tables.

-- Every accepted usage event, once: the primary key is the idempotency key.
CREATE TABLE metering_events (
    tenant           text NOT NULL,
    subscription_id  text NOT NULL,
    event_id         text NOT NULL,
    event_type       text NOT NULL,
    source           text NOT NULL,
    occurred_at      timestamptz NOT NULL,
    recorded_at      timestamptz NOT NULL,
    quantity         numeric NOT NULL,
    data             jsonb NOT NULL,
    stream_sequence  bigint NOT NULL,
    PRIMARY KEY (tenant, subscription_id, event_id)
);
CREATE INDEX metering_events_usage_idx ON metering_events (tenant, subscription_id, event_type, occurred_at);
-- Meter queries across subscriptions filter on time: a BRIN index costs almost nothing to
-- maintain on an append-mostly table, unlike a second B-tree.
CREATE INDEX metering_events_time_brin ON metering_events USING brin (occurred_at);

-- The runbook's table and columns (section 9.3), plus the summed quantity.
CREATE TABLE usage_hourly (
    tenant           text NOT NULL,
    subscription_id  text NOT NULL,
    event_type       text NOT NULL,
    hour             timestamptz NOT NULL,
    event_count      bigint NOT NULL,
    quantity_sum     numeric NOT NULL,
    PRIMARY KEY (tenant, subscription_id, event_type, hour)
) WITH (fillfactor = 70); -- room on each page so counter updates are HOT (no index churn)
CREATE INDEX idx_usage_hourly_subscription_hour ON usage_hourly (subscription_id, hour DESC);
CREATE INDEX idx_usage_hourly_event_hour ON usage_hourly (event_type, hour DESC);
CREATE INDEX usage_hourly_subscription_idx ON usage_hourly (subscription_id);

-- The runbook refreshes usage_daily as a materialized view; the unique index lets
-- `REFRESH MATERIALIZED VIEW CONCURRENTLY usage_daily` run without blocking readers.
CREATE MATERIALIZED VIEW usage_daily AS
SELECT tenant,
       subscription_id,
       event_type,
       date_trunc('day', hour, 'UTC') AS day,
       SUM(event_count) AS total_count,
       SUM(quantity_sum) AS quantity_sum
FROM usage_hourly
GROUP BY tenant, subscription_id, event_type, date_trunc('day', hour, 'UTC');
CREATE UNIQUE INDEX usage_daily_key ON usage_daily (tenant, subscription_id, event_type, day);

-- Slugs are per tenant: two tenants may each define `tokens`.
CREATE TABLE meters (
    slug              text NOT NULL,
    tenant            text NOT NULL,
    event_type        text NOT NULL,
    aggregation       text NOT NULL,
    value_property    text NOT NULL,
    group_by          text[] NOT NULL,
    description       text NOT NULL,
    defined_sequence  bigint NOT NULL,
    PRIMARY KEY (tenant, slug)
);
