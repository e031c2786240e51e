//! Philotes: a Kubernetes operator for PostgreSQL change-data-capture pipelines.
//!
//! - [`crd`]: the `CdcPipeline` resource types.
//! - [`pipeline`]: the data plane (replication stream → buffer → checkpoint).
//! - [`manifest`] and [`standalone`]: `philotes run -f`, the same pipeline without a cluster.
//! - [`embedded`]: a throwaway PostgreSQL server for the demo and the tests.

pub mod controller;
pub mod crd;
pub mod demo;
pub mod duration;
pub mod embedded;
pub mod http;
pub mod manifest;
pub mod metrics;
pub mod operator;
pub mod pipeline;
pub mod standalone;
pub mod verify;
