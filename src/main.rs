use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use kube::CustomResourceExt;

use philotes::crd::CdcPipeline;
use philotes::pipeline::{Outcome, RunOptions};

#[derive(Parser)]
#[command(
    name = "philotes",
    version,
    about = "PostgreSQL change-data-capture pipelines"
)]
struct Cli {
    /// Log output format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run a pipeline from a manifest file (a CdcPipeline plus the Secrets it references),
    /// without a cluster. Stops on SIGINT/SIGTERM after flushing and checkpointing.
    Run {
        /// The manifest: YAML documents as for `kubectl apply -f`.
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Which CdcPipeline to run when the manifest holds several.
        #[arg(long)]
        pipeline: Option<String>,
        /// Exit 0 once everything committed on the source before the start is durable in
        /// the buffer (like pg_recvlogical --endpos).
        #[arg(long)]
        until_caught_up: bool,
    },
    /// Run the operator: reconcile CdcPipeline resources, one pipeline per resource.
    Controller {
        /// Watch only this namespace (default: all namespaces).
        #[arg(long)]
        namespace: Option<String>,
        /// Address of /metrics, /healthz and /readyz.
        #[arg(long, default_value = "0.0.0.0:8080")]
        metrics_addr: std::net::SocketAddr,
        /// Run every pipeline in this process, without sharing them with other replicas
        /// through Leases (only ever one replica!).
        #[arg(long)]
        no_leader_election: bool,
        /// Namespace of the replicas' Leases (default: $POD_NAMESPACE, else philotes-system).
        #[arg(long)]
        lease_namespace: Option<String>,
        /// The replicas' group: each holds the Lease <lease-name>-<pod name>.
        #[arg(long, default_value = "philotes-controller")]
        lease_name: String,
        /// Use only Secrets carrying this label (KEY=VALUE); others are refused by name.
        #[arg(long, value_parser = philotes::controller::refs::SecretLabel::parse)]
        secret_label: Option<philotes::controller::refs::SecretLabel>,
    },
    /// Check the buffer against the source: replay cdc_events and compare every captured
    /// table row by row. Exits 1 on any difference.
    Verify {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        #[arg(long)]
        pipeline: Option<String>,
    },
    /// Acknowledge a gap a start refused to stream over (SlotLost, SourceChanged): record it
    /// in the buffer's cdc_gaps, drop the unusable slot, and continue on a new one. Stop the
    /// pipeline first.
    Recover {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        #[arg(long)]
        pipeline: Option<String>,
    },
    /// Copy the rows of some tables again (README: Snapshots), then run the pipeline until
    /// they are copied and it caught up. The other tables keep streaming meanwhile. Stop
    /// the pipeline's other process first.
    Snapshot {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        #[arg(long)]
        pipeline: Option<String>,
        /// A table to copy again, as in spec.source.tables; repeat for several.
        #[arg(long = "table", required = true)]
        tables: Vec<String>,
    },
    /// Run a demo pipeline end to end on a throwaway local PostgreSQL.
    Demo,
    /// Print the CdcPipeline CustomResourceDefinition.
    Crd,
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PHILOTES_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,tokio_postgres=warn,pgwire_replication=warn")
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, never in a log file or a pipe.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    // One pipeline needs one thread: the stream reader, the loop and the buffer writer then
    // hand work to each other without waking threads on other cores. The operator runs
    // many pipelines and uses every core.
    let runtime = match &cli.command {
        Command::Run { .. }
        | Command::Demo
        | Command::Verify { .. }
        | Command::Recover { .. }
        | Command::Snapshot { .. } => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        _ => tokio::runtime::Runtime::new(),
    };
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Command::Crd => match serde_yaml::to_string(&CdcPipeline::crd()) {
            Ok(yaml) => {
                print!("{yaml}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: cannot render the CRD: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Controller {
            namespace,
            metrics_addr,
            no_leader_election,
            lease_namespace,
            lease_name,
            secret_label,
        } => {
            let opts = philotes::operator::OperatorOptions {
                namespace,
                metrics_addr,
                leader_election: !no_leader_election,
                lease_namespace: lease_namespace
                    .or_else(|| std::env::var("POD_NAMESPACE").ok())
                    .unwrap_or_else(|| "philotes-system".into()),
                lease_name,
                identity: None,
                secret_label,
            };
            match runtime.block_on(philotes::operator::run(
                opts,
                philotes::standalone::wait_for_signal(),
            )) {
                Ok(philotes::operator::Exit::Signalled) => ExitCode::SUCCESS,
                Ok(philotes::operator::Exit::LostLeadership) => ExitCode::from(3),
                Err(e) => {
                    tracing::error!("{e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Recover { file, pipeline } => {
            let cfg = match philotes::standalone::load(&file, pipeline.as_deref()) {
                Ok((_, cfg)) => cfg,
                Err(e) => {
                    tracing::error!(reason = e.reason(), "{e}");
                    return ExitCode::from(2);
                }
            };
            match runtime.block_on(philotes::pipeline::lifecycle::recover(&cfg)) {
                Ok(r) => {
                    println!("{}", r.describe(&cfg.id));
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    tracing::error!(reason = e.reason(), "{e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Snapshot {
            file,
            pipeline,
            tables,
        } => {
            let cfg = match philotes::standalone::load(&file, pipeline.as_deref()) {
                Ok((_, cfg)) => cfg,
                Err(e) => {
                    tracing::error!(reason = e.reason(), "{e}");
                    return ExitCode::from(2);
                }
            };
            let asked = match runtime.block_on(philotes::pipeline::lifecycle::request_snapshot(
                &cfg, &tables,
            )) {
                Ok(asked) => asked,
                Err(e) => {
                    tracing::error!(reason = e.reason(), "{e}");
                    return ExitCode::from(2);
                }
            };
            let opts = RunOptions {
                until_caught_up: true,
                retry_setup: false,
                ..RunOptions::default()
            };
            match runtime.block_on(philotes::standalone::run(cfg, opts)) {
                Ok(_) => {
                    let names: Vec<String> = asked.iter().map(|t| t.to_string()).collect();
                    println!("copied {} again; the pipeline caught up", names.join(", "));
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    tracing::error!(reason = e.reason(), "{e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Verify { file, pipeline } => {
            let cfg = match philotes::standalone::load(&file, pipeline.as_deref()) {
                Ok((_, cfg)) => cfg,
                Err(e) => {
                    tracing::error!(reason = e.reason(), "{e}");
                    return ExitCode::from(2);
                }
            };
            match runtime.block_on(philotes::verify::verify(&cfg)) {
                Ok(report) => {
                    print!("{report}");
                    if report.ok() {
                        println!(
                            "verified: {} events, no lost, duplicated or reordered changes",
                            report.events()
                        );
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::FAILURE
                    }
                }
                Err(e) => {
                    tracing::error!(reason = e.reason(), "{e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Demo => match runtime.block_on(philotes::demo::run()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: demo failed: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Run {
            file,
            pipeline,
            until_caught_up,
        } => {
            let result = philotes::standalone::load(&file, pipeline.as_deref()).map(|(_, cfg)| cfg);
            let cfg = match result {
                Ok(cfg) => cfg,
                Err(e) => {
                    tracing::error!(reason = e.reason(), "{e}");
                    return ExitCode::from(2);
                }
            };
            let opts = RunOptions {
                until_caught_up,
                retry_setup: false,
                ..RunOptions::default()
            };
            match runtime.block_on(philotes::standalone::run(cfg, opts)) {
                Ok(Outcome::Stopped) | Ok(Outcome::CaughtUp) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(reason = e.reason(), "{e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
