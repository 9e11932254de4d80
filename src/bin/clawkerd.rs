//! clawkerd: PID 1 of every agent container. Filled in by its own issue.

fn main() {
    if std::env::args().any(|a| a == "--help" || a == "-h") {
        println!("clawkerd: the agent daemon (PID 1 in agent containers)");
        return;
    }
    eprintln!("clawkerd: not implemented yet");
    std::process::exit(2);
}
