-- Oversight read models, projected from the OVERSIGHT stream by `OversightProjector`.
-- Unqualified names, as in 0002. `enablement replay oversight --rebuild` empties these tables
-- and re-applies the whole stream (`oversight::rebuild`). Enumerations are stored by name
-- (`pending`, `high`, `approve`, `slack`), as `creto_domain::oversight::request::state_name`
-- and `creto_projections::oversight` spell them.

-- One row per approval request: its current state, for listing, plus the folded aggregate
-- (`view`: the encoded `ApprovalRequest` the API returns; `policy`: the encoded `Policy` as it
-- was when the request came) so the projector can fold the next event without replaying.
CREATE TABLE oversight_requests (
    tenant          text NOT NULL,
    request_id      text NOT NULL,
    agent_id        text NOT NULL,
    action_name     text NOT NULL,
    parameters      jsonb NOT NULL,
    context         text NOT NULL,
    priority        text NOT NULL,
    -- For ordering: low 1, normal 2, high 3, critical 4 (the protobuf values).
    priority_rank   smallint NOT NULL,
    -- Empty: no policy matched (auto-approved).
    policy_id       text NOT NULL,
    state           text NOT NULL,
    -- For timed_out: what the policy's default decided (approve, deny).
    resolution      text,
    level           integer NOT NULL,
    approvers       text[] NOT NULL,
    quorum          integer NOT NULL,
    created_at      timestamptz NOT NULL,
    deadline        timestamptz,
    decided_at      timestamptz,
    cancelled_by    text,
    cancel_reason   text,
    -- Stream sequence of the request's last event: an event at or below it is already in.
    version         bigint NOT NULL,
    view            bytea NOT NULL,
    policy          bytea NOT NULL,
    PRIMARY KEY (tenant, request_id)
);
-- The approvers' queue: pending first by priority, oldest first; any state by time.
CREATE INDEX oversight_requests_list_idx
    ON oversight_requests (tenant, state, priority_rank DESC, created_at);
CREATE INDEX oversight_requests_agent_idx ON oversight_requests (tenant, agent_id, created_at);

-- Who decided what, when, through which channel and why: one row per request event.
CREATE TABLE oversight_audit (
    tenant      text NOT NULL,
    request_id  text NOT NULL,
    sequence    bigint NOT NULL,
    at          timestamptz NOT NULL,
    -- requested, responded, timed_out, escalated, cancelled
    event_type  text NOT NULL,
    -- The agent (requested), the approver (responded), 'timer' (timed_out, escalated), the
    -- canceller (cancelled).
    actor       text NOT NULL,
    -- approve, deny: the response, the timeout's resolution, or an auto-approval.
    decision    text,
    -- slack, email, webhook, web: where a response came from.
    channel     text,
    level       integer NOT NULL,
    reason      text,
    -- The state transition this event made (for an escalation: pending → escalated, the
    -- request being pending again at the next level); equal when it made none (a response
    -- short of the quorum). from_state is NULL for the request's first event.
    from_state  text,
    to_state    text NOT NULL,
    PRIMARY KEY (tenant, request_id, sequence)
);

-- The current definition of each policy.
CREATE TABLE oversight_policies (
    tenant            text NOT NULL,
    policy_id         text NOT NULL,
    precedence        integer NOT NULL,
    action            text NOT NULL,
    agents            text[] NOT NULL,
    require_approval  boolean NOT NULL,
    -- The encoded `Policy`.
    definition        bytea NOT NULL,
    -- Stream sequence of the `PolicyDefined` event.
    version           bigint NOT NULL,
    updated_at        timestamptz NOT NULL,
    PRIMARY KEY (tenant, policy_id)
);

-- The outcome of every notification delivery.
CREATE TABLE oversight_notifications (
    tenant            text NOT NULL,
    request_id        text NOT NULL,
    sequence          bigint NOT NULL,
    -- When the log recorded the outcome.
    at                timestamptz NOT NULL,
    channel           text,
    level             integer NOT NULL,
    ok                boolean NOT NULL,
    attempts          integer NOT NULL,
    detail            text NOT NULL,
    duration_seconds  double precision NOT NULL,
    PRIMARY KEY (tenant, request_id, sequence)
);
