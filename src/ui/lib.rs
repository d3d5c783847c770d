//! Omega's web UI: the cell, its schedulers, its jobs and its nodes, as pages that update themselves.
//!
//! The server keeps its own copy of the cell exactly as a scheduler does (the core's watch-fed
//! [`omega::cell_state::CellState`]) plus a watch on the job statuses (why work is pending, which live outside
//! the cell range), and never reads etcd to answer a page: a page costs what it shows, not what the cell holds.
//! Reading top to bottom:
//!
//! - [`cache`]: the copy of the cell, and the indexes built beside it as it changes ([`index`] for jobs,
//!   [`zones`] for nodes), published together as one immutable [`cache::View`] per change;
//! - [`history`]: what only a watcher that stays can know: scheduler counters over time, node liveness;
//! - [`pages`]: one module per page, each rendering HTML from a view; [`heatmap`] and [`chart`] draw their
//!   inline SVG, [`html`] escapes every string that came from outside;
//! - [`sse`]: server-sent events that push a page's changed content to the browser;
//! - [`actions`]: cancel and drain, only with `--allow-actions`, through the same library calls as omctl;
//! - [`server`]: the HTTP routes.

pub mod actions;
pub mod assets;
pub mod cache;
pub mod chart;
pub mod config;
pub mod error;
pub mod heatmap;
pub mod history;
pub mod html;
pub mod index;
pub mod pages;
pub mod server;
pub mod sse;
pub mod zones;

pub use error::{Error, Result};
