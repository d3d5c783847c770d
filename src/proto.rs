//! Omega's own gRPC services, generated from `proto/` at build time.

/// The node agent's log service (`omctl logs`).
pub mod logs {
    tonic::include_proto!("omega.logs.v1");
}
