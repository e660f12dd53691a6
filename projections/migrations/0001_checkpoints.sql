-- Where each projector stands in its stream. Updated in the same transaction as the rows
-- it covers, so a crash neither double-counts nor skips.
CREATE TABLE projection_checkpoints (
    projector      text PRIMARY KEY,
    stream         text NOT NULL,
    last_sequence  bigint NOT NULL DEFAULT 0,
    updated_at     timestamptz NOT NULL DEFAULT now()
);
