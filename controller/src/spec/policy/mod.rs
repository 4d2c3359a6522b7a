//! A Mesh's policies: [`schedule`] (windows in the Mesh's time zone), [`eval`] (what the policies
//! say about a connection: the precedence of `docs/policies.md`), [`check`] (the field checks and
//! the policy tests run at every load) and [`explain`] (`sidenetctl explain`).

pub mod check;
pub mod compile;
pub mod eval;
pub mod explain;
pub mod schedule;
