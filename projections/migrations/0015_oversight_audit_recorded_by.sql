-- Who recorded a response (Response.recorded_by): the calling token's subject over gRPC, where
-- an operator may record answers for approvers, or 'approval-page' for its signed links. NULL
-- for other events and for responses recorded before it existed.
ALTER TABLE oversight_audit ADD COLUMN recorded_by text;
