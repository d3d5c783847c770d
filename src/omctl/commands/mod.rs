//! One module per command (or group of closely related commands).

pub mod audit;
pub mod cancel;
pub mod drain;
pub mod events;
pub mod job;
pub mod jobs;
pub mod logs;
pub mod nodes;
pub mod quota;
pub mod schedulers;
pub mod services;
pub mod submit;
pub mod tasks;
pub mod versions;
pub mod watch;
