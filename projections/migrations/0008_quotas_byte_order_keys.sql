-- Quota keys compare byte by byte, like the metering keys they name (0007 says why): a
-- comparison between a "C" column and a column of the database's collation is an error.
ALTER TABLE quotas
    ALTER COLUMN tenant TYPE text COLLATE "C",
    ALTER COLUMN subscription_id TYPE text COLLATE "C",
    ALTER COLUMN event_type TYPE text COLLATE "C";

ALTER TABLE quota_thresholds_reached
    ALTER COLUMN tenant TYPE text COLLATE "C",
    ALTER COLUMN subscription_id TYPE text COLLATE "C",
    ALTER COLUMN event_type TYPE text COLLATE "C";
