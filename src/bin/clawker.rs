use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = clawker::cli::Cli::parse();
    match clawker::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("clawker: {e:#}");
            match e.downcast_ref::<clawker::cli::ExitWith>() {
                Some(x) => std::process::ExitCode::from(x.code),
                None => std::process::ExitCode::FAILURE,
            }
        }
    }
}
