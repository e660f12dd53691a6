-- A policy removed by DeletePolicy keeps its row (its last definition and the version that
-- removed it, so a replayed older definition cannot bring it back) with removed = true.
ALTER TABLE oversight_policies ADD COLUMN removed boolean NOT NULL DEFAULT false;
