//! Changes to the cell that people (and programs acting for them) ask for: cancel a job, drain a node.
//!
//! They live in the core library, not in `omctl`, because the controller, a web UI and any future component
//! make the same changes: each is a few guarded writes through the same protocol as everything else (a
//! compare-and-swap on the record, then [`crate::release`] for what holds resources), and each returns a report
//! of what it did, for its caller to render.

pub mod cancel;
pub mod drain;

pub use cancel::{cancel_job, CancelReport};
pub use drain::{drain_node, start_drain, undrain_node, DrainReport};
