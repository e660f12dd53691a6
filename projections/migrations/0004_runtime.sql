-- Runtime read models, projected from the RUNTIME stream by `RuntimeProjector`. Unqualified
-- names, as in 0002 and 0003. `enablement replay runtime --rebuild` empties these tables and
-- re-applies the whole stream (`runtime::rebuild`). States are stored by name (`requested`,
-- `provisioning`, `ready`, `terminated`, `failed`, `expired`), as
-- `creto_domain::runtime::sandbox::state_name` spells them. Text that holds a NUL (which
-- PostgreSQL refuses) is stored with U+FFFD in its place; the exact value stays in `view`.

-- One row per sandbox: its current state, for listing and the gauges, plus the folded
-- aggregate (`view`: the encoded `Sandbox` the API returns, with what the view does not show
-- in `pooled`, `request_id`, `restore_checkpoint_id` and `timeout_ns`) so the projector can
-- fold the next event without replaying.
CREATE TABLE sandboxes (
    sandbox_id             text PRIMARY KEY,
    -- '' for a warm-pool sandbox not claimed yet.
    tenant                 text NOT NULL,
    template               text NOT NULL,
    template_digest        text NOT NULL,
    backend                text NOT NULL,
    node                   text NOT NULL,
    state                  text NOT NULL,
    -- Claimed from the warm pool.
    warm                   boolean NOT NULL,
    -- In the warm pool: provisioned without a tenant, not claimed yet.
    pooled                 boolean NOT NULL,
    memory_mb              bigint NOT NULL,
    pids                   integer NOT NULL,
    cpu_millis             integer NOT NULL,
    -- {"key": "value", ...}
    metadata               jsonb NOT NULL,
    -- The egress allowlist: ["api.example.com:443", ...].
    egress                 jsonb NOT NULL,
    -- Only the names of the environment variables, never their values.
    env_names              text[] NOT NULL,
    -- Requested (cold) or Claimed (warm).
    created_at             timestamptz NOT NULL,
    expires_at             timestamptz,
    -- When it became terminated, failed or expired.
    ended_at               timestamptz,
    failure_reason         text,
    execs                  bigint NOT NULL,
    -- Of the last finished Exec; NULL when it was killed by a signal (or none finished).
    last_exit_code         integer,
    request_id             text NOT NULL,
    restore_checkpoint_id  text NOT NULL,
    -- The lifetime asked for, in nanoseconds: Ready (cold) counts the expiry from it.
    timeout_ns             bigint NOT NULL,
    -- Stream sequence of the sandbox's last event: an event at or below it is already in.
    version                bigint NOT NULL,
    view                   bytea NOT NULL
);
-- ListSandboxes: a tenant's sandboxes by state, newest first.
CREATE INDEX sandboxes_list_idx ON sandboxes (tenant, state, created_at DESC, sandbox_id);
-- ListSandboxes by metadata (`metadata @> '{"k": "v"}'`).
CREATE INDEX sandboxes_metadata_idx ON sandboxes USING gin (metadata jsonb_path_ops);
-- The gauges: live and warm-pool sandboxes by backend.
CREATE INDEX sandboxes_state_idx ON sandboxes (state, backend);

-- Every Exec: started, then finished with its outcome (the finish columns are NULL while it
-- runs).
CREATE TABLE sandbox_execs (
    sandbox_id    text NOT NULL,
    exec_id       text NOT NULL,
    -- Empty when the start was never seen.
    argv          text[] NOT NULL,
    started_at    timestamptz,
    finished_at   timestamptz,
    -- NULL when killed by a signal.
    exit_code     integer,
    signal        integer,
    timed_out     boolean,
    oom_killed    boolean,
    pids_limited  boolean,
    duration_ms   double precision,
    PRIMARY KEY (sandbox_id, exec_id)
);

-- Checkpoints of writable layers in object storage (CreateSandbox restores from them).
CREATE TABLE sandbox_checkpoints (
    checkpoint_id  text PRIMARY KEY,
    sandbox_id     text NOT NULL,
    tenant         text NOT NULL,
    object_key     text NOT NULL,
    size_bytes     bigint NOT NULL,
    sha256         text NOT NULL,
    at             timestamptz NOT NULL
);
CREATE INDEX sandbox_checkpoints_sandbox_idx ON sandbox_checkpoints (tenant, sandbox_id, at);

-- The audit of egress decisions: every connection attempt, allowed or denied, keyed by the
-- stream sequence of its `EgressDecided`.
CREATE TABLE sandbox_egress (
    sequence     bigint PRIMARY KEY,
    sandbox_id   text NOT NULL,
    -- From the event, else the sandbox's tenant when it was decided ('' for an unclaimed one).
    tenant       text NOT NULL,
    destination  text NOT NULL,
    allowed      boolean NOT NULL,
    -- The rule that allowed it; '' when denied.
    rule         text NOT NULL,
    at           timestamptz NOT NULL
);
CREATE INDEX sandbox_egress_sandbox_idx ON sandbox_egress (tenant, sandbox_id, sequence);
