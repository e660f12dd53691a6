-- Month-to-date usage per subscription and event type, kept by the metering projector in the
-- same statement as usage_hourly (and recomputed with it after a correction).
--
-- Why: the usage counters (`quota:{subscription_id}:{event_type}`) are refreshed from the read
-- model for every key a second's batches touched. Summed from usage_hourly, that read grows
-- with the month: up to 744 rows per key on its last day. Measured at day 27 with 10,000 keys,
-- 0.67 ms of PostgreSQL per key, so about 1,500 active keys kept a core busy all the time.
-- Here it is one row per key.
--
-- A rebuild runs this file in its side schema (rebuild.rs): the INSERT then copies whatever
-- the side schema's usage_hourly holds, and the finishing phase fills the table from it.
CREATE TABLE usage_monthly (
    tenant           text COLLATE "C" NOT NULL,
    subscription_id  text COLLATE "C" NOT NULL,
    event_type       text COLLATE "C" NOT NULL,
    month            timestamptz NOT NULL, -- the first instant of the UTC month
    event_count      bigint NOT NULL,
    quantity_sum     numeric NOT NULL,
    PRIMARY KEY (subscription_id, event_type, tenant, month)
) WITH (fillfactor = 70); -- room on each page so counter updates are HOT

INSERT INTO usage_monthly (tenant, subscription_id, event_type, month, event_count, quantity_sum)
SELECT tenant, subscription_id, event_type, date_trunc('month', hour, 'UTC'), sum(event_count), sum(quantity_sum)
FROM usage_hourly
GROUP BY 1, 2, 3, 4;
