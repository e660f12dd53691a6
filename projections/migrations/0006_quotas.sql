-- Quotas (entitlements), projected from metering.quotas.* by the metering-quotas projector.
-- Usage is not here: current-period usage lives in the gateways' in-memory books and in the
-- cache counters. Rebuilt by emptying both tables and the projector's checkpoint, then replay.
CREATE TABLE quotas (
    tenant           text NOT NULL,
    subscription_id  text NOT NULL,
    event_type       text NOT NULL,          -- the event type (metered) or the feature
    kind             text NOT NULL,          -- 'metered' | 'boolean' | 'static'
    quota_limit      numeric,                -- metered
    period_kind      text,                   -- 'hour' | 'day' | 'month' | 'calendar_month'
    period_anchor    timestamptz,
    time_zone        text,
    hard             boolean,
    thresholds_pct   smallint[],
    enabled          boolean,                -- boolean
    config           jsonb,                  -- static
    grants           jsonb NOT NULL DEFAULT '[]',
    updated_at       timestamptz NOT NULL,
    stream_sequence  bigint NOT NULL,
    PRIMARY KEY (tenant, subscription_id, event_type)
);

-- Every QuotaThresholdReached, once per (quota, period, percentage).
CREATE TABLE quota_thresholds_reached (
    tenant           text NOT NULL,
    subscription_id  text NOT NULL,
    event_type       text NOT NULL,
    period_start     timestamptz NOT NULL,
    pct              smallint NOT NULL,
    used             numeric NOT NULL,
    allowance        numeric NOT NULL,
    recorded_at      timestamptz NOT NULL,
    stream_sequence  bigint NOT NULL,
    PRIMARY KEY (tenant, subscription_id, event_type, period_start, pct)
);
