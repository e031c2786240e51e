//! `philotes demo`: a real pipeline, end to end, on a throwaway PostgreSQL. Needs only a local
//! PostgreSQL installation (the server binaries), no cluster and no Docker.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::sync::watch;

use crate::embedded::{Cluster, ClusterOptions};
use crate::manifest::Manifest;
use crate::pipeline::{self, Outcome, Progress, RunOptions};
use crate::standalone;

const MANIFEST: &str = include_str!("../examples/demo-pipeline.yaml");
const SOURCE_SQL: &str = include_str!("../examples/demo-source.sql");

pub async fn run() -> Result<()> {
    println!("==> starting a throwaway PostgreSQL (wal_level=logical) in a temporary directory");
    let cluster =
        tokio::task::spawn_blocking(|| Cluster::start(ClusterOptions::default())).await??;
    println!("    listening on 127.0.0.1:{}", cluster.port);

    let admin = connect(&cluster.uri("postgres")).await?;
    admin.batch_execute("CREATE DATABASE shop").await?;
    admin.batch_execute("CREATE DATABASE buffer").await?;
    let shop = connect(&cluster.uri("shop")).await?;
    shop.batch_execute(SOURCE_SQL).await?;
    println!("==> created database shop with tables public.customers and public.orders (examples/demo-source.sql)");

    let mut manifest = Manifest::parse(MANIFEST, "examples/demo-pipeline.yaml")?;
    manifest.set_secret("shop", "source-db", "uri", cluster.uri("shop"));
    manifest.set_secret("shop", "buffer-db", "uri", cluster.uri("buffer"));
    let cfg = standalone::config_of(&manifest, None, "examples/demo-pipeline.yaml")?;
    println!(
        "==> running pipeline {} from examples/demo-pipeline.yaml (secrets pointed at the throwaway server)",
        cfg.id
    );

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (progress_tx, mut progress_rx) = watch::channel(Progress::default());
    let run_cfg = cfg.clone();
    let task = tokio::spawn(async move {
        pipeline::run(run_cfg, RunOptions::default(), shutdown_rx, progress_tx).await
    });
    // Wait for the slot to exist and the existing row to be copied before writing, so the
    // output below is the same on every run.
    wait(
        &mut progress_rx,
        Duration::from_secs(30),
        "the pipeline to copy the rows the tables hold (a snapshot)",
        |p| {
            p.state == pipeline::State::Streaming
                && !p.snapshots.is_empty()
                && p.snapshots
                    .iter()
                    .all(|t| t.phase == pipeline::snapshot::Phase::Done)
        },
    )
    .await?;
    println!("==> copied the rows the tables already held (SNAPSHOT events), while streaming");

    println!("==> writing changes to the source");
    for sql in [
        "INSERT INTO customers (name, email) VALUES ('Ada', 'ada@example.com'), ('Grace', NULL)",
        "INSERT INTO orders (customer_id, amount) SELECT 1 + i % 2, i * 10.25 FROM generate_series(1, 5) i",
        "BEGIN; UPDATE orders SET status = 'paid' WHERE id IN (1, 2); DELETE FROM orders WHERE id = 5; COMMIT",
        "UPDATE customers SET email = 'grace@example.com' WHERE name = 'Grace'",
    ] {
        println!("    {sql}");
        shop.batch_execute(sql).await?;
    }
    let target: String = shop
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?
        .get(0);
    let target = pipeline::lsn::parse(&target).context("bad LSN")?;
    wait(
        &mut progress_rx,
        Duration::from_secs(30),
        "the changes to be checkpointed",
        |p| p.checkpoint_lsn >= target,
    )
    .await?;
    let p = progress_rx.borrow().clone();
    println!(
        "==> caught up: {} events written, checkpoint at {}",
        p.events_total,
        pipeline::lsn::format(p.checkpoint_lsn)
    );

    let buffer = connect(&cluster.uri("buffer")).await?;
    let rows = buffer
        .query(
            "SELECT commit_lsn::text, seq, operation, table_name, coalesce(before::text, ''), coalesce(after::text, '')
             FROM philotes.cdc_events WHERE pipeline = $1 ORDER BY cdc_events.commit_lsn, seq",
            &[&cfg.id],
        )
        .await?;
    println!("==> what landed in the buffer (philotes.cdc_events, in commit order):");
    println!(
        "    {:<12} {:>3}  {:<8} {:<10} before → after",
        "commit_lsn", "seq", "op", "table"
    );
    for r in &rows {
        println!(
            "    {:<12} {:>3}  {:<8} {:<10} {} → {}",
            r.get::<_, &str>(0),
            r.get::<_, i32>(1),
            r.get::<_, &str>(2),
            r.get::<_, &str>(3),
            r.get::<_, &str>(4),
            r.get::<_, &str>(5)
        );
    }
    let ckpt = buffer
        .query_one(
            "SELECT lsn::text, events_total FROM philotes.cdc_checkpoints WHERE pipeline = $1",
            &[&cfg.id],
        )
        .await?;
    println!(
        "    checkpoint: lsn {} after {} events (philotes.cdc_checkpoints)",
        ckpt.get::<_, &str>(0),
        ckpt.get::<_, i64>(1)
    );

    println!("==> stopping the pipeline (flush, checkpoint, confirm) and removing the server");
    let _ = shutdown_tx.send(true);
    match task.await? {
        Ok(Outcome::Stopped) | Ok(Outcome::CaughtUp) => {}
        Err(e) => bail!("pipeline failed: {e}"),
    }
    if rows.len() != 12 {
        bail!("expected 12 events in the buffer, found {}", rows.len());
    }
    drop(cluster);
    println!("==> done");
    Ok(())
}

async fn connect(uri: &str) -> Result<tokio_postgres::Client> {
    let (client, conn) = tokio_postgres::connect(uri, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    Ok(client)
}

async fn wait(
    rx: &mut watch::Receiver<Progress>,
    timeout: Duration,
    what: &str,
    done: impl Fn(&Progress) -> bool,
) -> Result<()> {
    let result = tokio::time::timeout(timeout, async {
        loop {
            {
                let p = rx.borrow_and_update();
                if done(&p) {
                    return Ok(());
                }
                if p.state == pipeline::State::Failed {
                    let err = p.last_error.clone().map(|e| e.1).unwrap_or_default();
                    bail!("pipeline failed: {err}");
                }
            }
            if rx.changed().await.is_err() {
                bail!("pipeline ended");
            }
        }
    })
    .await;
    match result {
        Ok(r) => r,
        Err(_) => bail!("timed out after {timeout:?} waiting for {what}"),
    }
}
