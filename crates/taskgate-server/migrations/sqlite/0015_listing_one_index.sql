-- The listing walks `tasks_by_tenant (tenant_id, id)` alone; a model filter is checked row by
-- row within a bounded walk, like a state filter. The per-model index cost every submit one
-- more index write (the submit benchmark lost about 15 % to the listing's two indexes), for
-- pages that a bounded walk serves as well.
DROP INDEX IF EXISTS tasks_by_tenant_model;
