//! Log setup: `debug` selects debug-level logs for sdserve; `use_structured_logging` JSON lines.
//! `RUST_LOG` overrides both.

use sdserve_settings::ServerSettings;
use tracing_subscriber::EnvFilter;

pub fn init(server: &ServerSettings) {
    let default = if server.debug {
        "info,sdserve=debug,sdserve_engine=debug,sdserve_serving=debug,sdserve_http=debug,sdserve_grpc=debug,sdserve_pipeline=debug"
    } else {
        "info"
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    // Colour only on a terminal: pod logs and files must not carry escape codes.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let _ = if server.use_structured_logging {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
