//! Errors of the data plane. Each one knows a short stable `reason()` (used as a condition
//! reason, an event reason and a metric label) and whether retrying can help.
//!
//! Messages never carry a password or a full connection string: connection errors name the
//! target (`source`/`buffer`) and host, and the driver's text, which holds neither.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum Error {
    /// The spec or manifest is invalid; nothing will change until the user edits it.
    #[error("{0}")]
    InvalidSpec(String),
    /// A referenced secret or key is missing or unusable.
    #[error("{0}")]
    Secret(String),
    /// A server could not be reached (refused, timed out, DNS, TLS).
    #[error("cannot connect to the {target} database at {endpoint}: {message}")]
    Unreachable {
        target: &'static str,
        endpoint: String,
        message: String,
    },
    /// The TLS handshake failed for a reason retrying cannot heal: a certificate the
    /// sslmode's checks refuse (unknown issuer, another name, expired), or no TLS where
    /// `require` asks for it.
    #[error("cannot connect to the {target} database at {endpoint} over TLS: {message}; check sslmode and sslrootcert in the connection URI and the server's certificate")]
    Tls {
        target: &'static str,
        endpoint: String,
        message: String,
    },
    /// The server refused the credentials.
    #[error("the {target} database at {endpoint} refused the login: {message}; check the user and password in the connection secret")]
    Auth {
        target: &'static str,
        endpoint: String,
        message: String,
    },
    /// The source is not set up in a way Philotes can stream from.
    #[error("{0}")]
    SourceSetup(String),
    /// The buffer is not usable (schema owned by something else, no permission).
    #[error("{0}")]
    BufferSetup(String),
    /// Another process streams from the slot right now.
    #[error("{0}")]
    SlotInUse(String),
    /// The replication stream failed while running.
    #[error("replication stream from the source failed: {0}")]
    Stream(String),
    /// The replication stream was silent (no data, no keepalive) for longer than
    /// `streamTimeout`: the connection is presumed dead and reopened.
    #[error("{0}")]
    StreamTimeout(String),
    /// Writing to the buffer failed while running.
    #[error("writing to the buffer failed: {0}")]
    Buffer(String),
    /// The slot a checkpoint was taken on is gone, invalidated, or ahead of the checkpoint:
    /// changes may be missing, and only the user can decide how to go on.
    #[error("{0}")]
    SlotLost(String),
    /// The source is not the system, database or history the checkpoint was taken on.
    #[error("{0}")]
    SourceChanged(String),
    /// Another pipeline already checkpoints the same slot, or the spec changed what a
    /// checkpointed pipeline streams from.
    #[error("{0}")]
    SlotConflict(String),
    /// A change the buffer cannot store as an event (a text value that is not UTF-8), under
    /// `poisonEvents: Fail`.
    #[error("{0}")]
    PoisonEvent(String),
    /// The buffer server refused a value of the batch being written (a data exception, a
    /// limit, or a rule of the buffer's tables: SQLSTATE 22xxx, 54xxx, 23xxx but 23505,
    /// P0001, P0004). The loop then writes one change per transaction to
    /// find it (`at`: its `(commit_lsn, seq)` once known) and applies `poisonEvents` to it;
    /// this error stops a pipeline only when that cannot be done.
    #[error("{message}")]
    ValueRefused {
        message: String,
        at: Option<(u64, i32)>,
        /// The last change handed to the writer when it failed: the refused one is at or
        /// before it.
        upto: Option<(u64, i32)>,
        /// When the refused transaction held one change and it was a copied row: which
        /// (its position changes each time its chunk is read, its table and key do not).
        row: Option<Box<super::snapshot::CopiedRow>>,
        /// The batch that failed held copied rows.
        copied: bool,
    },
    /// Existing rows of a table cannot be copied (no key to read it in chunks by, no
    /// privilege to read it, a standby source); nothing is copied until the user acts.
    #[error("{0}")]
    Snapshot(String),
    /// Another session took over writing the pipeline to the buffer (`cdc_writers`): this
    /// one's transaction was not committed, and it stops rather than take it back.
    #[error("{0}")]
    Fenced(String),
    /// The stream carried something the decoder does not understand.
    #[error("cannot decode the replication stream: {0}")]
    Decode(String),
}

impl Error {
    /// Short stable CamelCase reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::InvalidSpec(_) => "InvalidSpec",
            Error::Secret(_) => "SecretError",
            Error::Unreachable { .. } => "Unreachable",
            Error::Auth { .. } => "AuthenticationFailed",
            Error::Tls { .. } => "TlsError",
            Error::SourceSetup(_) => "SourceNotReady",
            Error::BufferSetup(_) => "BufferNotReady",
            Error::SlotInUse(_) => "SlotInUse",
            Error::Stream(_) => "StreamError",
            Error::StreamTimeout(_) => "StreamTimeout",
            Error::Buffer(_) => "BufferError",
            Error::Decode(_) => "DecodeError",
            Error::SlotLost(_) => "SlotLost",
            Error::SourceChanged(_) => "SourceChanged",
            Error::SlotConflict(_) => "SlotConflict",
            Error::PoisonEvent(_) => "PoisonEvent",
            Error::ValueRefused { .. } => "BufferRefusedValue",
            Error::Snapshot(_) => "SnapshotFailed",
            Error::Fenced(_) => "Fenced",
        }
    }

    /// Whether trying again later, with the same spec, can succeed.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Error::Unreachable { .. }
                | Error::SlotInUse(_)
                | Error::Stream(_)
                | Error::StreamTimeout(_)
                | Error::Buffer(_)
        )
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
