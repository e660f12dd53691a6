-- A sandbox's writable layer is a filesystem of its own size (resources.disk_mb; 0: a sandbox
-- created before disks were limited), and an exec records whether it left that disk full.
ALTER TABLE sandboxes ADD COLUMN disk_mb bigint NOT NULL DEFAULT 0;
ALTER TABLE sandbox_execs ADD COLUMN disk_full boolean NOT NULL DEFAULT false;
