//! The buffer schema's migrations, run by sqlx's migrator: `migrations/*.sql`, embedded at
//! build time with their checksums, recorded in `_sqlx_migrations` inside the pipeline's own
//! schema (`spec.buffer.schema`, so several pipelines' schemas in one database each have their
//! own), applied under an advisory lock so concurrent starts do not race.
//!
//! A migration that was edited after a buffer applied it is refused by its checksum, a buffer
//! migrated by a newer Philotes is refused by the version it does not know, and a schema that
//! holds tables Philotes did not create is refused before anything is created in it.
//!
//! Buffers created before sqlx took over (0.1 and the first 0.2 builds) record their
//! migrations in `philotes_migrations (version, name, applied_at)`. On the first start of this
//! version that table is turned into `_sqlx_migrations` rows in one transaction (versions and
//! times kept, checksums of the embedded files: the old runner applied exactly those), and the
//! migrator then applies what is missing. Older binaries find no `philotes_migrations`
//! afterwards and refuse the schema instead of writing into a layout they do not know.

use sqlx::migrate::{MigrateError, Migrator};
use sqlx::postgres::{PgConnectOptions, PgSslMode};
use sqlx::{ConnectOptions, Connection};
use tokio_postgres::Client;

use super::config::{quote_ident, PipelineConfig};
use super::conn::{describe_pg_error, ConnInfo, SslMode};
use super::error::{Error, Result};

/// `migrations/`, embedded with their checksums.
pub static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// Held by every Philotes process while it migrates a buffer schema (sqlx's migrator also
/// takes its own, per database).
const MIGRATION_LOCK: &str = "SELECT pg_advisory_lock(hashtextextended('philotes-migrate', 0))";
const MIGRATION_UNLOCK: &str = "SELECT pg_advisory_unlock(hashtextextended('philotes-migrate', 0))";

/// The table sqlx's migrator keeps, as its Postgres driver creates it.
const SQLX_MIGRATIONS_TABLE: &str = "CREATE TABLE IF NOT EXISTS _sqlx_migrations (
    version BIGINT PRIMARY KEY,
    description TEXT NOT NULL,
    installed_on TIMESTAMPTZ NOT NULL DEFAULT now(),
    success BOOLEAN NOT NULL,
    checksum BYTEA NOT NULL,
    execution_time BIGINT NOT NULL
)";

/// What the buffer schema holds, read before anything is created.
struct Found {
    exists: bool,
    /// Tables and other relations in it.
    objects: i64,
    /// `_sqlx_migrations` is there.
    sqlx: bool,
    /// `philotes_migrations` (the runner before sqlx) is there.
    legacy: bool,
}

async fn inspect(
    client: &Client,
    schema: &str,
) -> std::result::Result<Found, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1), \
                    (SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1), \
                    to_regclass(quote_ident($1) || '._sqlx_migrations') IS NOT NULL, \
                    to_regclass(quote_ident($1) || '.philotes_migrations') IS NOT NULL",
            &[&schema],
        )
        .await?;
    Ok(Found {
        exists: row.get(0),
        objects: row.get(1),
        sqlx: row.get(2),
        legacy: row.get(3),
    })
}

/// Brings the buffer schema up to date (see the module docs).
pub async fn migrate(client: &Client, cfg: &PipelineConfig) -> Result<()> {
    let name = &cfg.buffer_schema;
    let found = inspect(client, name)
        .await
        .map_err(|e| pg_fail(cfg, "inspect", &e))?;
    if found.sqlx && up_to_date(client, cfg).await? {
        // Nothing to create, which also works on a read-only buffer.
        return Ok(());
    }
    if found.exists && found.objects > 0 && !found.sqlx && !found.legacy {
        return Err(foreign(cfg, found.objects));
    }
    // Held by this session until released below, or until the session ends (a failed or
    // cancelled start drops the connection). Waiting for it is bounded: another process
    // that holds it for a minute is stuck, and this start is retried later.
    client
        .batch_execute(&format!(
            "SET lock_timeout = '60s'; {MIGRATION_LOCK}; RESET lock_timeout"
        ))
        .await
        .map_err(|e| pg_fail(cfg, "lock", &e))?;
    let result = locked(client, cfg).await;
    let unlocked = client
        .batch_execute(MIGRATION_UNLOCK)
        .await
        .map_err(|e| pg_fail(cfg, "unlock", &e));
    result.and(unlocked)
}

/// Under the lock: check again (another process may have migrated meanwhile), create the
/// schema and take over a legacy runner's record in one transaction, then run the migrator
/// on a session of its own whose search_path is the schema.
async fn locked(client: &Client, cfg: &PipelineConfig) -> Result<()> {
    let name = &cfg.buffer_schema;
    let schema = quote_ident(name);
    client
        .batch_execute("BEGIN")
        .await
        .map_err(|e| pg_fail(cfg, "prepare", &e))?;
    let prepared = async {
        let found = inspect(client, name)
            .await
            .map_err(|e| pg_fail(cfg, "inspect", &e))?;
        if found.exists && found.objects > 0 && !found.sqlx && !found.legacy {
            return Err(foreign(cfg, found.objects));
        }
        client
            .batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {schema}"))
            .await
            .map_err(|e| pg_fail(cfg, "create", &e))?;
        if found.legacy && !found.sqlx {
            take_over_legacy(client, cfg).await?;
        }
        Ok(())
    }
    .await;
    let end = if prepared.is_ok() {
        "COMMIT"
    } else {
        "ROLLBACK"
    };
    client
        .batch_execute(end)
        .await
        .map_err(|e| pg_fail(cfg, "prepare", &e))?;
    prepared?;

    let mut conn = tokio::time::timeout(
        cfg.buffer.connect_timeout,
        sqlx_options(&cfg.buffer, &schema).connect(),
    )
    .await
    .map_err(|_| {
        Error::Buffer(format!(
            "cannot reach the buffer database {} to migrate schema {name}: no answer within {:?}",
            cfg.buffer, cfg.buffer.connect_timeout
        ))
    })?
    .map_err(|e| sqlx_fail(cfg, "connect to migrate", &e))?;
    let result = MIGRATOR
        .run_direct(&mut conn)
        .await
        .map_err(|e| migrate_fail(cfg, &e));
    let _ = conn.close().await;
    result
}

/// Turns `philotes_migrations` into `_sqlx_migrations` (inside the caller's transaction).
async fn take_over_legacy(client: &Client, cfg: &PipelineConfig) -> Result<()> {
    let schema = quote_ident(&cfg.buffer_schema);
    let fail = |e: tokio_postgres::Error| pg_fail(cfg, "upgrade the migration record of", &e);
    let applied: Vec<i32> = client
        .query(
            &format!("SELECT version FROM {schema}.philotes_migrations ORDER BY version"),
            &[],
        )
        .await
        .map_err(fail)?
        .iter()
        .map(|r| r.get(0))
        .collect();
    client
        .batch_execute(&format!(
            "SET LOCAL search_path TO {schema}; {SQLX_MIGRATIONS_TABLE}; RESET search_path"
        ))
        .await
        .map_err(fail)?;
    for version in applied {
        let Some(m) = MIGRATOR.iter().find(|m| m.version == i64::from(version)) else {
            return Err(Error::BufferSetup(format!(
                "schema {} in the buffer database {} records migration {version}, which this version of Philotes does not know: \
                 a newer version wrote it; run that version (or newer)",
                cfg.buffer_schema, cfg.buffer
            )));
        };
        client
            .execute(
                &format!(
                    "INSERT INTO {schema}._sqlx_migrations (version, description, installed_on, success, checksum, execution_time) \
                     SELECT version, $2, applied_at, TRUE, $3, -1 FROM {schema}.philotes_migrations WHERE version = $1"
                ),
                &[&version, &&*m.description, &&*m.checksum],
            )
            .await
            .map_err(fail)?;
    }
    client
        .batch_execute(&format!("DROP TABLE {schema}.philotes_migrations"))
        .await
        .map_err(fail)?;
    tracing::info!(
        schema = %cfg.buffer_schema,
        "buffer schema: the migration record moved from philotes_migrations to _sqlx_migrations"
    );
    Ok(())
}

fn pg_fail(cfg: &PipelineConfig, what: &str, e: &tokio_postgres::Error) -> Error {
    classify(
        cfg,
        what,
        &describe_pg_error(e),
        e.code().map(|c| c.code()),
        e.is_closed(),
    )
}

/// Every embedded migration is recorded, successful and with the same checksum, and nothing
/// else is: then there is nothing to do. Any difference goes to the migrator, which applies
/// what is missing or says what is wrong.
async fn up_to_date(client: &Client, cfg: &PipelineConfig) -> Result<bool> {
    let rows = client
        .query(
            &format!(
                "SELECT version, checksum, success FROM {}._sqlx_migrations ORDER BY version",
                quote_ident(&cfg.buffer_schema)
            ),
            &[],
        )
        .await
        .map_err(|e| pg_fail(cfg, "read migrations of", &e))?;
    let applied = rows.iter().map(|r| {
        (
            r.get::<_, i64>(0),
            r.get::<_, Vec<u8>>(1),
            r.get::<_, bool>(2),
        )
    });
    let embedded = MIGRATOR
        .iter()
        .map(|m| (m.version, m.checksum.to_vec(), true));
    Ok(applied.eq(embedded))
}

fn foreign(cfg: &PipelineConfig, objects: i64) -> Error {
    Error::BufferSetup(format!(
        "schema {} in the buffer database {} already holds {objects} tables or other objects that Philotes did not create; \
         set spec.buffer.schema to a schema of its own",
        cfg.buffer_schema, cfg.buffer
    ))
}

/// Read-only, shutting down or unreachable: a passing state of the buffer, retried. Anything
/// else the server refused is for the user to fix.
fn classify(
    cfg: &PipelineConfig,
    what: &str,
    message: &str,
    code: Option<&str>,
    connection_lost: bool,
) -> Error {
    let text = format!(
        "cannot {what} schema {} in the buffer database {}: {message}",
        cfg.buffer_schema, cfg.buffer
    );
    // 55P03: the migration lock was held by another process for longer than lock_timeout.
    if connection_lost || matches!(code, Some("25006" | "57P01" | "57P03" | "55P03")) {
        return Error::Buffer(text);
    }
    let hint = if code == Some("42501") {
        "; grant the buffer user CREATE on the database (or create the schema for it)"
    } else {
        ""
    };
    Error::BufferSetup(format!("{text}{hint}"))
}

fn sqlx_fail(cfg: &PipelineConfig, what: &str, e: &sqlx::Error) -> Error {
    match e {
        sqlx::Error::Database(db) => {
            let message = match db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>() {
                Some(pg) => match pg.detail() {
                    Some(detail) => format!("{}: {} ({detail})", pg.code(), pg.message()),
                    None => format!("{}: {}", pg.code(), pg.message()),
                },
                None => db.message().to_string(),
            };
            classify(cfg, what, &message, db.code().as_deref(), false)
        }
        sqlx::Error::Tls(e) => Error::Tls {
            target: "buffer",
            endpoint: cfg.buffer.to_string(),
            message: e.to_string(),
        },
        sqlx::Error::Configuration(e) => classify(cfg, what, &e.to_string(), None, false),
        // The network, a dropped connection, the server going away: retried.
        other => classify(cfg, what, &other.to_string(), None, true),
    }
}

fn migrate_fail(cfg: &PipelineConfig, e: &MigrateError) -> Error {
    let (name, buffer) = (&cfg.buffer_schema, &cfg.buffer);
    match e {
        MigrateError::Execute(e) => sqlx_fail(cfg, "migrate", e),
        MigrateError::ExecuteMigration(e, version) => {
            sqlx_fail(cfg, &format!("apply migration {version} to"), e)
        }
        MigrateError::VersionMismatch(version) => Error::BufferSetup(format!(
            "schema {name} in the buffer database {buffer}: migration {version} as applied differs from migrations/ of this \
             version of Philotes (its checksum in _sqlx_migrations does not match: was a migration edited?); \
             nothing was changed. Restore the original migration, or use a new spec.buffer.schema"
        )),
        MigrateError::VersionMissing(version) => Error::BufferSetup(format!(
            "schema {name} in the buffer database {buffer} records migration {version}, which this version of Philotes \
             does not know: a newer version wrote it; run that version (or newer)"
        )),
        MigrateError::Dirty(version) => Error::BufferSetup(format!(
            "schema {name} in the buffer database {buffer}: migration {version} failed partway before (_sqlx_migrations \
             marks it unsuccessful); repair the schema by hand and delete that row, or use a new spec.buffer.schema"
        )),
        other => Error::BufferSetup(format!(
            "cannot migrate schema {name} in the buffer database {buffer}: {other}"
        )),
    }
}

/// The same server, user, database and TLS settings as the buffer's other connections;
/// unqualified names (the migrations' and `_sqlx_migrations`) resolve in `schema`.
fn sqlx_options(info: &ConnInfo, schema: &str) -> PgConnectOptions {
    let ssl_mode = match info.sslmode {
        SslMode::Disable => PgSslMode::Disable,
        SslMode::Prefer => PgSslMode::Prefer,
        SslMode::Require => PgSslMode::Require,
        SslMode::VerifyCa => PgSslMode::VerifyCa,
        SslMode::VerifyFull => PgSslMode::VerifyFull,
    };
    let mut options = PgConnectOptions::new_without_pgpass()
        .host(&info.host)
        .port(info.port)
        .username(&info.user)
        .password(info.password())
        .database(&info.dbname)
        .ssl_mode(ssl_mode)
        .application_name(&format!("{}-migrate", info.application_name))
        // Its statements would be logged at INFO with their text; ours say what they do.
        .disable_statement_logging()
        // Startup options are split at spaces unless escaped with a backslash (the server's
        // pg_split_opts), and a schema name may hold spaces.
        .options([("search_path", escape_option(schema))]);
    if let Some(root) = &info.sslrootcert {
        options = options.ssl_root_cert(root);
    }
    options
}

/// A value for the startup `options` parameter: backslashes and spaces escaped.
fn escape_option(value: &str) -> String {
    value.replace('\\', "\\\\").replace(' ', "\\ ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn startup_option_values_keep_spaces_and_backslashes() {
        assert_eq!(escape_option(r#""my schema""#), r#""my\ schema""#);
        assert_eq!(escape_option(r#""a\b""#), r#""a\\b""#);
    }

    /// The embedded migrations are the files in migrations/, in order, one per version.
    #[test]
    fn every_migration_file_is_embedded_in_order() {
        let mut files: Vec<String> = std::fs::read_dir("migrations")
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|f| f.ends_with(".sql"))
            .collect();
        files.sort();
        let versions: Vec<i64> = MIGRATOR.iter().map(|m| m.version).collect();
        let expected: Vec<i64> = files.iter().map(|f| f[..4].parse().unwrap()).collect();
        assert_eq!(versions, expected);
        assert_eq!(versions, (1..=versions.len() as i64).collect::<Vec<_>>());
    }
}
