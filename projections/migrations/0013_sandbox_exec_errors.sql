-- Why the backend could not run an exec's command (ExecResult.error); NULL when it ran. Without
-- it such an exec read as killed by a signal (exit_code NULL, signal 0). Execs projected before
-- this migration keep NULL until a rebuild (`enablement replay runtime --rebuild`).
ALTER TABLE sandbox_execs ADD COLUMN error text;
