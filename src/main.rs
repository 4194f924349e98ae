//! The `portcullis` binary: parses the command line and runs it.
#![forbid(unsafe_code)]

use clap::Parser;
use portcullis::cli::{self, Cli, Command};

fn main() {
    // An error ends the run with one line (its causes joined), never a backtrace dump.
    if let Err(e) = run() {
        eprintln!("portcullis: error: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> anyhow::Result<()> {
    let args = Cli::parse();
    // A panic on the main thread ends the process: take every child process group with it.
    // (A panic inside one request's task is contained by the runtime and ends only that task.)
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if std::thread::current().name() == Some("main") {
            portcullis::mcp::upstream::stdio::kill_all();
        }
        default_hook(info);
    }));
    match args.command {
        Command::Check { config } => std::process::exit(cli::check(config)),
        Command::Schema => {
            print!("{}", portcullis::config::schema::schema_text());
            Ok(())
        }
        Command::Token { config, action } => std::process::exit(cli::token(config, action)),
        Command::Login { server, config, no_browser, timeout } => {
            std::process::exit(cli::login(config, &server, no_browser, &timeout))
        }
        Command::Logout { server, config } => std::process::exit(cli::logout(config, &server)),
        Command::Serve {
            config,
            listen,
            workers,
            log_format,
            test_panic_after,
            test_no_randomness,
            generate_token,
            allow_unauthenticated,
        } => {
            cli::init_logging(log_format);
            if test_no_randomness {
                portcullis::random::fail_from_now_on();
            }
            let config = cli::load_config(config)?;
            // One worker (asked for, or all this process may use: one core, a CPU quota of
            // one) runs the current-thread scheduler, which runs a woken task without the
            // work-stealing queues, their atomics and the wake-ups of idle workers: 0.68× the
            // CPU per proxied call of a one-worker multi-thread runtime (docs/performance.md).
            let n = workers.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
            let mut rt = if n <= 1 {
                tokio::runtime::Builder::new_current_thread()
            } else {
                let mut b = tokio::runtime::Builder::new_multi_thread();
                b.worker_threads(n);
                b
            };
            let rt = rt.enable_all().build()?;
            let opts =
                cli::ServeOptions { listen, panic_after: test_panic_after, generate_token, allow_unauthenticated };
            rt.block_on(cli::serve(config, opts))
        }
        Command::Stdio { config, server, as_identity } => {
            cli::init_logging(cli::LogFormat::Text);
            let config = cli::load_config(config)?;
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            rt.block_on(cli::stdio(config, server, as_identity))
        }
        Command::DemoServer { http, page_size, name, session_only, unknown_session_400, fixtures } => {
            cli::init_logging(cli::LogFormat::Text);
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            rt.block_on(portcullis::demo::run(portcullis::demo::Options {
                http,
                page_size,
                name,
                session_only,
                unknown_session_400,
                fixtures,
            }))
        }
    }
}
