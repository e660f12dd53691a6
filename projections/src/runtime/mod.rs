//! The runtime read model in PostgreSQL (`migrations/0004_runtime.sql`): sandboxes with their
//! current state and folded aggregate, their Execs and checkpoints, and the audit of egress
//! decisions, projected from the RUNTIME stream; the gauges (live and warm-pool sandboxes by
//! backend) are counted from it.
//!
//! The state logic is the domain's ([`creto_domain::runtime::sandbox::Aggregate::apply`]):
//! the projector only loads the stored aggregate, folds the next event in and writes the
//! result. States are stored by the domain's names ([`state_name`]).

pub mod projector;
pub mod query;

use creto_schemas::runtime::v1::State;

pub use creto_domain::runtime::sandbox::state_name;
pub use projector::{decode, encode_sandbox, rebuild, Decoded, RuntimeProjector, PRODUCT};
pub use query::{count_by_state, get_sandbox, list_sandboxes, SandboxCounts};

/// The read-model tables, in the order a rebuild empties them.
pub const TABLES: &[&str] = &[
    "sandboxes",
    "sandbox_execs",
    "sandbox_checkpoints",
    "sandbox_egress",
];

/// The stored name of a state (`unspecified` for unknown values).
pub fn state_name_of(s: i32) -> &'static str {
    state_name(State::try_from(s).unwrap_or(State::Unspecified))
}
