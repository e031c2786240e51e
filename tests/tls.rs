//! TLS: `verify-full` against a server whose certificate comes from a throwaway CA, for the
//! replication stream and the ordinary connections alike; a certificate for another name is
//! refused by `verify-full` and accepted by `verify-ca`.

mod common;

use common::*;
use philotes::embedded::{Cluster, ClusterOptions};
use philotes::pipeline::Outcome;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};

struct Pki {
    ca_pem: String,
    cert_pem: String,
    key_pem: String,
}

fn pki(server_name: &str) -> Pki {
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "philotes throwaway test CA");
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec![server_name.to_string()]).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, server_name);
    let cert = params.signed_by(&key, &ca).unwrap();
    Pki {
        ca_pem: ca.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    }
}

/// A server that accepts only TLS connections, with a certificate for `server_name`.
fn tls_cluster(p: &Pki) -> Cluster {
    own_cluster(ClusterOptions {
        extra_conf: vec![
            "ssl = on".into(),
            "ssl_cert_file = 'server.crt'".into(),
            "ssl_key_file = 'server.key'".into(),
        ],
        extra_hba: vec!["hostnossl all all 127.0.0.1/32 reject".into()],
        files: vec![
            ("server.crt".into(), p.cert_pem.clone().into_bytes(), 0o644),
            ("server.key".into(), p.key_pem.clone().into_bytes(), 0o600),
        ],
        ..ClusterOptions::default()
    })
}

fn uri(c: &Cluster, db: &str, mode: &str, ca: &std::path::Path) -> String {
    format!(
        "postgres://postgres:{}@localhost:{}/{db}?sslmode={mode}&sslrootcert={}",
        c.password(),
        c.port,
        ca.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_streams_over_tls() {
    let p = pki("localhost");
    let c = tls_cluster(&p);
    let ca = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(ca.path(), &p.ca_pem).unwrap();
    let src = uri(&c, "postgres", "verify-full", ca.path());

    // The server refuses plain connections, so everything below went over TLS.
    let plain = philotes::pipeline::conn::ConnInfo::parse(&c.uri("postgres"), "plain").unwrap();
    let err = plain.connect("source").await.expect_err("plain refused");
    assert!(
        err.to_string().contains("no encryption") || err.to_string().contains("pg_hba"),
        "{err}"
    );

    let src_info = philotes::pipeline::conn::ConnInfo::parse(&src, "tls").unwrap();
    let db = src_info.connect("source").await.unwrap();
    db.batch_execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        .await
        .unwrap();
    let ssl: bool = db
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(ssl);
    let cfg = config(&manifest("tls", &src, &src, &["t"], "flushInterval: 50ms"));
    assert_eq!(catch_up(&cfg).await, Outcome::CaughtUp);
    db.batch_execute("INSERT INTO t VALUES (1, 'over tls'), (2, 'still tls')")
        .await
        .unwrap();
    assert_eq!(catch_up(&cfg).await, Outcome::CaughtUp);
    let n: i64 = db
        .query_one(
            "SELECT count(*) FROM philotes.cdc_events WHERE pipeline = 'test/tls'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_refuses_a_certificate_for_another_name() {
    let p = pki("db.elsewhere.example");
    let c = tls_cluster(&p);
    let ca = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(ca.path(), &p.ca_pem).unwrap();

    let full = uri(&c, "postgres", "verify-full", ca.path());
    let file = manifest_file(&manifest("wrongname", &full, &full, &["t"], ""));
    let (code, out) = catch_up_cli(file.path());
    assert_ne!(code, 0, "{out}");
    assert!(
        out.contains("cannot connect to the buffer database at localhost"),
        "{out}"
    );
    assert!(out.to_lowercase().contains("certificate"), "{out}");
    assert!(out.contains("TlsError"), "retrying cannot heal it: {out}");
    assert!(!out.contains(c.password()), "{out}");

    // verify-ca checks the chain only: the same server is accepted.
    let ca_only = philotes::pipeline::conn::ConnInfo::parse(
        &uri(&c, "postgres", "verify-ca", ca.path()),
        "verify-ca",
    )
    .unwrap();
    ca_only.connect("source").await.expect("verify-ca accepts");

    // A CA that did not sign the certificate is refused by verify-ca too.
    let stranger = pki("localhost");
    std::fs::write(ca.path(), &stranger.ca_pem).unwrap();
    let err = ca_only
        .connect("source")
        .await
        .expect_err("unknown CA refused");
    assert!(
        err.to_string().to_lowercase().contains("certificate"),
        "{err}"
    );
    assert_eq!(err.reason(), "TlsError", "{err}");
    assert!(!err.is_transient());
}

/// `sslmode=require` against a server without TLS is refused for good (TlsError), not
/// retried as if the network were down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_against_a_server_without_tls_is_a_tls_error() {
    let uri = shared()
        .uri("postgres")
        .replace("sslmode=disable", "sslmode=require");
    assert!(uri.contains("sslmode=require"), "{uri}");
    let info = philotes::pipeline::conn::ConnInfo::parse(&uri, "test").unwrap();
    let err = info
        .connect("source")
        .await
        .expect_err("no TLS on the server");
    assert_eq!(err.reason(), "TlsError", "{err}");
    assert!(!err.is_transient());
}
