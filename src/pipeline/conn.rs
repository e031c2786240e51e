//! Connection URIs, TLS, and the two kinds of connection a pipeline opens: ordinary SQL
//! sessions (tokio-postgres) and the logical replication stream (pgwire-replication).
//!
//! The URI is parsed once into [`ConnInfo`]; its `Debug` and `Display` never show the password.

use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Once};
use std::time::Duration;

use percent_encoding::percent_decode_str;
use pgwire_replication::{Lsn, ReplicationConfig, SslMode as ReplSslMode, TlsConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres::config::SslMode as PgSslMode;
use tokio_postgres::Client;

use super::error::{Error, Result};

/// libpq's `sslmode` values that Philotes honours.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

/// A parsed `postgres://` URI.
#[derive(Clone, PartialEq, Eq)]
pub struct ConnInfo {
    pub host: String,
    pub port: u16,
    pub user: String,
    password: String,
    pub dbname: String,
    pub sslmode: SslMode,
    pub sslrootcert: Option<PathBuf>,
    pub connect_timeout: Duration,
    pub application_name: String,
}

impl fmt::Debug for ConnInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnInfo")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .field("dbname", &self.dbname)
            .field("sslmode", &self.sslmode)
            .finish()
    }
}

impl fmt::Display for ConnInfo {
    /// `host:port/dbname`: enough to find the server, nothing secret.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.host, self.port, self.dbname)
    }
}

impl ConnInfo {
    /// Parses a `postgres://` or `postgresql://` URI. `what` names the value in errors (for
    /// example `secret shop/source-db key uri`); the URI itself is never echoed back, since it
    /// may hold a password.
    pub fn parse(uri: &str, what: &str) -> Result<ConnInfo> {
        let bad = |why: &str| {
            Error::Secret(format!(
                "{what} is not a usable connection URI: {why}; expected postgres://user:password@host:port/dbname?sslmode=..."
            ))
        };
        let uri = uri.trim();
        let url = url::Url::parse(uri).map_err(|e| bad(&e.to_string()))?;
        if url.scheme() != "postgres" && url.scheme() != "postgresql" {
            return Err(bad(&format!(
                "the scheme is `{}`, not postgres",
                url.scheme()
            )));
        }
        let decode = |s: &str| -> Result<String> {
            percent_decode_str(s)
                .decode_utf8()
                .map(|c| c.into_owned())
                .map_err(|_| bad("it has percent-encoding that is not UTF-8"))
        };
        let mut info = ConnInfo {
            host: decode(url.host_str().unwrap_or(""))?,
            port: url.port().unwrap_or(5432),
            user: decode(url.username())?,
            password: decode(url.password().unwrap_or(""))?,
            dbname: decode(url.path().trim_start_matches('/'))?,
            sslmode: SslMode::Prefer,
            sslrootcert: None,
            connect_timeout: Duration::from_secs(10),
            application_name: "philotes".into(),
        };
        for (key, value) in url.query_pairs() {
            let value = value.into_owned();
            match key.as_ref() {
                "sslmode" => {
                    info.sslmode = match value.as_str() {
                        "disable" => SslMode::Disable,
                        "prefer" | "allow" => SslMode::Prefer,
                        "require" => SslMode::Require,
                        "verify-ca" => SslMode::VerifyCa,
                        "verify-full" => SslMode::VerifyFull,
                        other => {
                            return Err(bad(&format!(
                            "sslmode `{other}` is not one of disable, prefer, require, verify-ca, verify-full"
                        )))
                        }
                    }
                }
                "sslrootcert" => info.sslrootcert = Some(PathBuf::from(value)),
                "host" => info.host = value,
                "port" => info.port = value.parse().map_err(|_| bad("port is not a number"))?,
                "user" => info.user = value,
                "password" => info.password = value,
                "dbname" => info.dbname = value,
                "application_name" => info.application_name = value,
                "connect_timeout" => {
                    let secs: u64 = value
                        .parse()
                        .map_err(|_| bad("connect_timeout is not a number of seconds"))?;
                    info.connect_timeout = Duration::from_secs(secs.max(1));
                }
                other => return Err(bad(&format!("parameter `{other}` is not supported"))),
            }
        }
        if info.host.is_empty() {
            return Err(bad("it names no host"));
        }
        if info.user.is_empty() {
            return Err(bad("it names no user"));
        }
        if info.dbname.is_empty() {
            info.dbname = info.user.clone();
        }
        if matches!(info.sslmode, SslMode::VerifyCa | SslMode::VerifyFull)
            && info.sslrootcert.is_none()
        {
            // Without a root certificate only the public web PKI would be trusted, which almost
            // never signs database certificates: say so instead of failing on the handshake.
            return Err(bad(
                "sslmode verify-ca/verify-full needs sslrootcert=/path/to/ca.pem naming the CA that signed the server certificate",
            ));
        }
        Ok(info)
    }

    /// The password, for a client library that connects by itself (never shown).
    pub(crate) fn password(&self) -> &str {
        &self.password
    }

    /// Same server, another database (used by tests and the demo).
    pub fn with_dbname(&self, dbname: &str) -> ConnInfo {
        ConnInfo {
            dbname: dbname.to_string(),
            ..self.clone()
        }
    }

    /// Connects an ordinary SQL session and drives its connection in the background.
    pub async fn connect(&self, target: &'static str) -> Result<Client> {
        let mut cfg = tokio_postgres::Config::new();
        if self.host.starts_with('/') {
            cfg.host_path(&self.host);
        } else {
            cfg.host(&self.host);
        }
        cfg.port(self.port)
            .user(&self.user)
            .password(&self.password)
            .dbname(&self.dbname)
            .application_name(&self.application_name)
            .connect_timeout(self.connect_timeout)
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(30));
        let result = match self.sslmode {
            SslMode::Disable => {
                cfg.ssl_mode(PgSslMode::Disable);
                cfg.connect(tokio_postgres::NoTls)
                    .await
                    .map(|(c, conn)| (c, spawn_connection(conn)))
            }
            mode => {
                cfg.ssl_mode(if mode == SslMode::Prefer {
                    PgSslMode::Prefer
                } else {
                    PgSslMode::Require
                });
                let tls = tokio_postgres_rustls::MakeRustlsConnect::new(self.rustls_config()?);
                cfg.connect(tls)
                    .await
                    .map(|(c, conn)| (c, spawn_connection(conn)))
            }
        };
        let client = result
            .map(|(client, ())| client)
            .map_err(|e| self.connect_error(target, &e))?;
        // The server's end probes too: a buffer session holds the pipeline's writer lock, and
        // a client that vanished with its node (no FIN, no RST) would otherwise keep it, and
        // the pipeline from its next owner, for the OS default of about two hours. Idle: 30 s,
        // then every 10 s, 3 misses; with data unacknowledged: 60 s. Set after connecting,
        // not as startup options, which poolers such as PgBouncer refuse; where the settings
        // cannot be made (a pooler that refuses them), the session goes on without.
        if let Err(e) = client
            .batch_execute(
                "SET tcp_keepalives_idle = 30; SET tcp_keepalives_interval = 10; \
                 SET tcp_keepalives_count = 3; SET tcp_user_timeout = 60000",
            )
            .await
        {
            tracing::debug!(target = target, error = %e, "server-side TCP keepalive not set");
        }
        Ok(client)
    }

    /// Asks the server to cancel what the session of `token` is running, over a connection
    /// of its own made as [`ConnInfo::connect`] makes them, within `connect_timeout` (the
    /// TLS handshake and the request included: a server that accepts and goes silent does
    /// not hold the caller).
    pub async fn cancel(
        &self,
        target: &'static str,
        token: &tokio_postgres::CancelToken,
    ) -> Result<()> {
        let sent = async {
            match self.sslmode {
                SslMode::Disable => token.cancel_query(tokio_postgres::NoTls).await,
                _ => {
                    let tls = tokio_postgres_rustls::MakeRustlsConnect::new(self.rustls_config()?);
                    token.cancel_query(tls).await
                }
            }
            .map_err(|e| self.connect_error(target, &e))
        };
        // Dropping the request on timeout loses nothing: it only asked to stop a read.
        tokio::time::timeout(self.connect_timeout, sent)
            .await
            .unwrap_or_else(|_| {
                Err(Error::Stream(format!(
                    "no answer to a cancel request to the {target} database {self} within {:?}",
                    self.connect_timeout
                )))
            })
    }

    fn connect_error(&self, target: &'static str, e: &tokio_postgres::Error) -> Error {
        let message = describe_pg_error(e);
        let endpoint = self.to_string();
        // A certificate the sslmode refuses, or a server without TLS where `require` asks
        // for it: the same answer until someone changes the server or the URI.
        if refused_by_tls(e) || message.contains("does not support TLS") {
            return Error::Tls {
                target,
                endpoint,
                message,
            };
        }
        match e.code().map(|c| c.code()) {
            // invalid_password, invalid_authorization_specification
            Some("28P01") | Some("28000") => Error::Auth {
                target,
                endpoint,
                message,
            },
            // invalid_catalog_name: the database does not exist.
            Some("3D000") => Error::InvalidSpec(format!(
                "the {target} database at {endpoint} does not exist: {message}; fix the dbname in the connection URI"
            )),
            _ => Error::Unreachable {
                target,
                endpoint,
                message,
            },
        }
    }

    /// The rustls client configuration for this URI's sslmode and sslrootcert.
    fn rustls_config(&self) -> Result<rustls::ClientConfig> {
        install_crypto_provider();
        let roots = self.root_store()?;
        let verifier: Arc<dyn ServerCertVerifier> = match self.sslmode {
            SslMode::VerifyFull => rustls::client::WebPkiServerVerifier::builder(Arc::new(roots))
                .build()
                .map_err(|e| Error::Secret(format!("cannot use sslrootcert: {e}")))?,
            SslMode::VerifyCa => Arc::new(ChainOnly(
                rustls::client::WebPkiServerVerifier::builder(Arc::new(roots))
                    .build()
                    .map_err(|e| Error::Secret(format!("cannot use sslrootcert: {e}")))?,
            )),
            // prefer/require encrypt but, like libpq, do not verify.
            _ => Arc::new(NoVerification(
                rustls::crypto::CryptoProvider::get_default()
                    .cloned()
                    .ok_or_else(|| Error::Secret("no TLS crypto provider".into()))?,
            )),
        };
        Ok(rustls::ClientConfig::builder()
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth())
    }

    fn root_store(&self) -> Result<RootCertStore> {
        let mut roots = RootCertStore::empty();
        match &self.sslrootcert {
            Some(path) => {
                let certs = CertificateDer::pem_file_iter(path)
                    .and_then(|it| it.collect::<std::result::Result<Vec<_>, _>>())
                    .map_err(|e| {
                        Error::Secret(format!(
                            "cannot read sslrootcert {}: {e}; mount the CA certificate there or fix the path",
                            path.display()
                        ))
                    })?;
                let (added, _) = roots.add_parsable_certificates(certs);
                if added == 0 {
                    return Err(Error::Secret(format!(
                        "sslrootcert {} holds no PEM certificate",
                        path.display()
                    )));
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        Ok(roots)
    }

    /// Configuration of the logical replication stream for this server.
    pub fn replication_config(
        &self,
        slot: &str,
        publication: &str,
        start_lsn: u64,
        buffer_events: usize,
        status_interval: Duration,
        stream_timeout: Duration,
    ) -> ReplicationConfig {
        let tls = match self.sslmode {
            SslMode::Disable => TlsConfig::disabled(),
            SslMode::Prefer => TlsConfig {
                mode: ReplSslMode::Prefer,
                ..TlsConfig::disabled()
            },
            SslMode::Require => TlsConfig::require(),
            SslMode::VerifyCa => TlsConfig::verify_ca(self.sslrootcert.clone()),
            SslMode::VerifyFull => TlsConfig::verify_full(self.sslrootcert.clone()),
        };
        install_crypto_provider();
        ReplicationConfig::new(
            self.host.clone(),
            self.user.clone(),
            self.password.clone(),
            self.dbname.clone(),
            slot,
            publication,
        )
        .with_port(self.port)
        .with_tls(tls)
        .with_start_lsn(Lsn(start_lsn))
        .with_buffer_size(buffer_events.max(1))
        .with_status_interval(status_interval)
        // Liveness both ways (see `streamTimeout`): this walsender pings us when it has heard
        // nothing for half of the timeout and gives up on us after all of it, which frees the
        // slot for the next connection once ours died. An idle client stays quiet at least as
        // long, so the pings come (a client status would count as the reply).
        .with_wakeup_interval(stream_timeout)
        .with_application_name(format!("{}-stream", self.application_name))
        // The decoder turns text output into JSON: pin every setting that shapes that text.
        // The client library offers no hook to set TCP keepalive on its socket: the server's
        // end of it probes instead (30 s idle, then every 10 s, 3 misses), and our side has
        // the receive deadline (`streamTimeout`).
        .with_options(format!(
            "-c datestyle=ISO,MDY -c intervalstyle=postgres -c extra_float_digits=1 -c bytea_output=hex \
             -c wal_sender_timeout={}ms -c tcp_keepalives_idle=30 -c tcp_keepalives_interval=10 -c tcp_keepalives_count=3",
            stream_timeout.as_millis()
        ))
    }
}

fn spawn_connection<S, T>(conn: tokio_postgres::Connection<S, T>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "database connection closed");
        }
    });
}

/// The driver's error with the server's message and detail, if any.
/// Whether a connection failed on a TLS check (a rustls error anywhere in its causes, also
/// inside an I/O error), not on the network.
fn refused_by_tls(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if c.downcast_ref::<rustls::Error>().is_some() {
            return true;
        }
        if let Some(inner) = c
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            if inner.downcast_ref::<rustls::Error>().is_some() {
                return true;
            }
        }
        cause = c.source();
    }
    false
}

/// Whether an error of a statement on an open connection heals by retrying, whatever the
/// statement was: the connection lost (the server restarting, the session terminated, the
/// network), the server shutting down or not accepting connections yet, out of resources
/// for a while, a serialization failure or deadlock, or a timeout of the server's (a
/// statement, lock, idle-session or transaction timeout of the role or database: creating a
/// slot waits for running transactions, which end).
pub fn heals_by_retrying(e: &tokio_postgres::Error) -> bool {
    match e.code().map(|c| c.code()) {
        None => {
            e.is_closed() || std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>())
        }
        Some(c) => {
            c.starts_with("08")
                || c.starts_with("53")
                || matches!(
                    c,
                    "57P01"
                        | "57P02"
                        | "57P03"
                        | "57P05"
                        | "57014"
                        | "55P03"
                        | "25P03"
                        | "25P04"
                        | "40001"
                        | "40P01"
                )
        }
    }
}

pub fn describe_pg_error(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => match db.detail() {
            Some(detail) => format!("{} ({detail})", db.message()),
            None => db.message().to_string(),
        },
        None => {
            let mut msg = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(s) = source {
                let text = s.to_string();
                if !msg.contains(&text) {
                    msg.push_str(": ");
                    msg.push_str(&text);
                }
                source = s.source();
            }
            msg
        }
    }
}

static PROVIDER: Once = Once::new();

/// Both of rustls's crypto back-ends are compiled in (one by a dependency); pick one.
pub fn install_crypto_provider() {
    PROVIDER.call_once(|| {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    });
}

/// `verify-ca`: the chain must lead to a trusted root; the name may differ.
#[derive(Debug)]
struct ChainOnly(Arc<rustls::client::WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName
                | rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// `prefer`/`require`: encrypted, not authenticated (libpq's behaviour for these modes).
#[derive(Debug)]
struct NoVerification(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_uri_and_hides_password() {
        let c = ConnInfo::parse(
            "postgres://app:s%40cret@db.example:6543/shop?sslmode=require",
            "secret x",
        )
        .unwrap();
        assert_eq!(c.host, "db.example");
        assert_eq!(c.port, 6543);
        assert_eq!(c.user, "app");
        assert_eq!(c.password, "s@cret");
        assert_eq!(c.dbname, "shop");
        assert_eq!(c.sslmode, SslMode::Require);
        assert!(!format!("{c:?}").contains("s@cret"));
        assert!(!c.to_string().contains("s@cret"));
    }

    #[test]
    fn bad_uris_are_named_without_echoing_them() {
        for uri in [
            "mysql://u:hunter2@h/db",
            "postgres://u:hunter2@h/db?sslmode=bogus",
            "postgres://u:hunter2@h/db?sslmode=verify-full",
            "not a uri hunter2",
            "postgres://:hunter2@h/db",
        ] {
            let err = ConnInfo::parse(uri, "secret shop/src key uri")
                .unwrap_err()
                .to_string();
            assert!(err.contains("secret shop/src key uri"), "{err}");
            assert!(!err.contains("hunter2"), "{err}");
        }
    }
}
