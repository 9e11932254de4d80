//! clawkerd: PID 1 of every agent container. All logic lives in
//! `clawker::clawkerd`; the container CMD arrives as our arguments
//! (optionally after `--`).

fn main() {
    std::process::exit(clawker::clawkerd::main());
}
