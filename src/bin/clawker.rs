use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = clawker::cli::Cli::parse();
    match clawker::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("clawker: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
