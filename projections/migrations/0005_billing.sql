-- Metering corrections, plans and invoices. Unqualified names on purpose: a rebuild runs this
-- same file inside the side schema, next to 0002, and swaps these tables in with the others.

-- The audit trail: every correction command that reached the log, applied or not (an amend
-- of an event voided earlier is recorded and ignored). The original event stays in
-- metering_events untouched.
CREATE TABLE metering_corrections (
    tenant           text NOT NULL,
    correction_id    text NOT NULL,
    subscription_id  text NOT NULL,
    event_id         text NOT NULL,
    kind             text NOT NULL,          -- 'void' | 'amend'
    quantity         numeric,                -- amend: the new quantity, if given
    data             jsonb,                  -- amend: the new dimensions, if given
    reason           text NOT NULL,
    applied          boolean NOT NULL,
    recorded_at      timestamptz NOT NULL,
    stream_sequence  bigint NOT NULL,
    PRIMARY KEY (tenant, correction_id)
);
CREATE INDEX metering_corrections_event_idx ON metering_corrections (tenant, subscription_id, event_id);

-- The current correction of each corrected event: usage queries and usage_hourly read
-- metering_events through it (voided rows drop out, amended values replace the originals).
CREATE TABLE metering_event_corrections (
    tenant           text NOT NULL,
    subscription_id  text NOT NULL,
    event_id         text NOT NULL,
    voided           boolean NOT NULL,
    quantity         numeric,
    data             jsonb,
    stream_sequence  bigint NOT NULL,
    PRIMARY KEY (tenant, subscription_id, event_id)
);

-- Plan versions, immutable once defined (the definition is the domain's JSON).
CREATE TABLE plans (
    tenant            text NOT NULL,
    plan_id           text NOT NULL,
    version           integer NOT NULL,
    currency          text NOT NULL,
    definition        text NOT NULL,
    defined_sequence  bigint NOT NULL,
    PRIMARY KEY (tenant, plan_id, version)
);

-- Which plan version a subscription is billed on from when.
CREATE TABLE plan_assignments (
    tenant            text NOT NULL,
    subscription_id   text NOT NULL,
    effective_from    timestamptz NOT NULL,
    plan_id           text NOT NULL,
    version           integer NOT NULL,
    stream_sequence   bigint NOT NULL,
    PRIMARY KEY (tenant, subscription_id, effective_from)
);

-- Issued invoices (the runbook's table): immutable, numbered without gaps per tenant. The
-- document is the JSON stored in the log, byte for byte.
CREATE TABLE invoices (
    tenant            text NOT NULL,
    number            text NOT NULL,
    number_seq        bigint NOT NULL,
    subscription_id   text NOT NULL,
    period_start      timestamptz NOT NULL,
    period_end        timestamptz NOT NULL,
    status            text NOT NULL,
    currency          text NOT NULL,
    total             numeric NOT NULL,
    issued_at         timestamptz NOT NULL,
    document          text NOT NULL,
    stream_sequence   bigint NOT NULL,
    PRIMARY KEY (tenant, number),
    UNIQUE (tenant, subscription_id, period_start, period_end),
    UNIQUE (tenant, number_seq)
);
