-- Metering and billing keys compare byte by byte (COLLATE "C"). Unqualified names on purpose:
-- a rebuild runs this file inside the side schema after 0002 and 0005.
--
-- Why: these columns are identifiers (tenants, subscriptions, event ids and types, slugs),
-- never text a person sorts by language. Under a libc locale PostgreSQL compares them with
-- strcoll and without abbreviated keys, which makes every B-tree insert of the projector and
-- every index build of a rebuild dearer than a memcmp (figures in the README).
-- For UTF-8 text, byte order is code point order, which is also what C.UTF-8 sorts by, so
-- the order of answers does not change on such databases.
--
-- Changing only the collation rewrites no table; PostgreSQL rebuilds the indexes on these
-- columns. The daily view reads usage_hourly's columns, so it is dropped and made again.
DROP MATERIALIZED VIEW usage_daily;

ALTER TABLE metering_events
    ALTER COLUMN tenant TYPE text COLLATE "C",
    ALTER COLUMN subscription_id TYPE text COLLATE "C",
    ALTER COLUMN event_id TYPE text COLLATE "C",
    ALTER COLUMN event_type TYPE text COLLATE "C";

ALTER TABLE usage_hourly
    ALTER COLUMN tenant TYPE text COLLATE "C",
    ALTER COLUMN subscription_id TYPE text COLLATE "C",
    ALTER COLUMN event_type TYPE text COLLATE "C";

ALTER TABLE meters
    ALTER COLUMN tenant TYPE text COLLATE "C",
    ALTER COLUMN slug TYPE text COLLATE "C",
    ALTER COLUMN event_type TYPE text COLLATE "C";

ALTER TABLE metering_corrections
    ALTER COLUMN tenant TYPE text COLLATE "C",
    ALTER COLUMN correction_id TYPE text COLLATE "C",
    ALTER COLUMN subscription_id TYPE text COLLATE "C",
    ALTER COLUMN event_id TYPE text COLLATE "C";

ALTER TABLE metering_event_corrections
    ALTER COLUMN tenant TYPE text COLLATE "C",
    ALTER COLUMN subscription_id TYPE text COLLATE "C",
    ALTER COLUMN event_id TYPE text COLLATE "C";

ALTER TABLE plans
    ALTER COLUMN tenant TYPE text COLLATE "C",
    ALTER COLUMN plan_id TYPE text COLLATE "C";

ALTER TABLE plan_assignments
    ALTER COLUMN tenant TYPE text COLLATE "C",
    ALTER COLUMN subscription_id TYPE text COLLATE "C",
    ALTER COLUMN plan_id TYPE text COLLATE "C";

ALTER TABLE invoices
    ALTER COLUMN tenant TYPE text COLLATE "C",
    ALTER COLUMN number TYPE text COLLATE "C",
    ALTER COLUMN subscription_id TYPE text COLLATE "C";

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
