//! The data plane: source (replication stream + decoding) → buffer (event persistence) →
//! checkpoint → confirmation to the source. It knows nothing about Kubernetes.

pub mod buffer;
pub mod config;
pub mod conn;
pub mod decode;
pub mod error;
pub mod identity;
pub mod lifecycle;
pub mod lsn;
pub mod migrate;
mod run;
pub mod snapshot;
pub mod source;
pub mod status;

pub use config::PipelineConfig;
pub use error::{Error, Result};
pub use run::{run, BatchObserver, Outcome, Progress, RunOptions, State};
