//! Command line of fhir-bulk-proxy.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use fhir_bulk_proxy::config::{Config, Overrides};
use url::Url;

/// FHIR Bulk Data export proxy.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Serve(ServeArgs),
}

/// Flags win over environment variables, which win over the config file.
#[derive(clap::Args)]
struct ServeArgs {
    /// TOML configuration file.
    #[arg(long, short, env = "FBP_CONFIG")]
    config: PathBuf,
    /// Address to listen on (server.listen).
    #[arg(long, env = "FBP_LISTEN")]
    listen: Option<SocketAddr>,
    /// Upstream FHIR base URL (upstream.base_url).
    #[arg(long, env = "FBP_UPSTREAM_URL")]
    upstream_url: Option<Url>,
    /// Public FHIR base URL of the proxy (server.public_base_url).
    #[arg(long, env = "FBP_PUBLIC_BASE_URL")]
    public_base_url: Option<Url>,
    /// Data directory for the job store and files (export.data_dir).
    #[arg(long, env = "FBP_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Bearer token for the proxy's own upstream requests (upstream.bearer_token).
    #[arg(long, env = "FBP_UPSTREAM_BEARER_TOKEN", hide_env_values = true)]
    upstream_bearer_token: Option<String>,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let Command::Serve(args) = Cli::parse().command;
    let overrides = Overrides {
        listen: args.listen,
        upstream_url: args.upstream_url,
        public_base_url: args.public_base_url,
        data_dir: args.data_dir,
        upstream_bearer_token: args.upstream_bearer_token,
    };
    let config = match Config::load(&args.config, overrides.clone()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("fhir-bulk-proxy: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    match runtime.block_on(fhir_bulk_proxy::server::run(config, args.config, overrides)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "fhir-bulk-proxy stopped");
            eprintln!("fhir-bulk-proxy: {e}");
            ExitCode::FAILURE
        }
    }
}
