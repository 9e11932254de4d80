use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = clawker::cli::Cli::parse();
    match clawker::cli::run(cli) {
        // Exit codes are 0..=255; a remote status is passed on as is.
        Ok(code) => std::process::ExitCode::from((code & 0xff) as u8),
        Err(e) => {
            eprintln!("clawker: {e:#}");
            match e.downcast_ref::<clawker::cli::ExitWith>() {
                Some(x) => std::process::ExitCode::from(x.code),
                None => std::process::ExitCode::FAILURE,
            }
        }
    }
}
