//! Omega's core: the cell state in etcd and the optimistic protocol that lets many independent schedulers
//! share it.
//!
//! The path of a placement reads top to bottom through these modules: the [`model`] records stored under the
//! [`keys`] layout; the [`store`] that reads and writes them; the [`watcher`] that follows them and the
//! [`cell_state`] cache it feeds; a scheduler decides on a [`cell_state::CellSnapshot`] using the one fit
//! function in [`resources`]; its claims go through the [`commit`] protocol; the [`audit`] checks afterwards
//! that no optimistic race broke an invariant. [`etcd_process`] runs a real etcd for tests and local cells.

pub mod audit;
pub mod backpressure;
pub mod cell_state;
pub mod commit;
pub mod deployment;
pub mod discovery;
pub mod error;
pub mod etcd_process;
pub mod events;
pub mod failpoint;
pub mod health;
pub mod job_spec;
pub mod keys;
pub mod lease;
pub mod model;
pub mod ops;
pub mod placement;
pub mod proto;
pub mod release;
pub mod resources;
pub mod shutdown;
pub mod space;
pub mod store;
pub mod tls;
pub mod txn;
pub mod units;
pub mod watcher;

pub use error::{Error, Result};
