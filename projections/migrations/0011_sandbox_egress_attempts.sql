-- An egress row may stand for several connection attempts with the same outcome: past its
-- recording budget, a sandbox's decisions are summarized (one event per second and outcome).
ALTER TABLE sandbox_egress ADD COLUMN attempts bigint NOT NULL DEFAULT 1;
