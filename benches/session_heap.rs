//! Heap profile of idle CP sessions (dhat-rs as the global allocator).
//!
//! ```text
//! cargo bench -p clawker --bench session_heap [-- N]     # N = 1000 default
//! python3 scripts/dhat_top.py target/session-heap.json --metric eb --group
//! ```
//!
//! The agents are the load generator's (`support/loadgen.rs`, a child
//! process: only the CP is profiled); the CP side is the real session
//! machinery. One warm-up session first (lazy statics, the bus, the
//! supervisor), then N sessions dialed at once and left idle for 2 s; the
//! live heap difference divided by N is the per-session cost. The profile
//! is written at exit with the sessions still open, so its "live at exit"
//! (`eb`) metric is exactly what the idle sessions hold.
//!
//! Under `cargo test --all-targets` this binary is only built and exits.

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

#[allow(dead_code)]
#[path = "support/fleet.rs"]
mod fleet;
#[allow(dead_code)]
#[path = "support/loadgen.rs"]
mod loadgen;

use std::time::Duration;

fn main() {
    loadgen::child_main_if_requested();
    let args: Vec<String> = std::env::args().collect();
    if !args.iter().any(|a| a == "--bench") {
        println!("session_heap: run with `cargo bench --bench session_heap [-- N]`");
        return;
    }
    let n: usize = args
        .iter()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(1000);
    loadgen::raise_fd_limit();
    let lg = loadgen::LoadGen::spawn(n + 1);
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/session-heap.json");
    actix::System::new().block_on(async move {
        let cp = fleet::Cp::start(&lg);
        cp.dial_all(n..n + 1).await; // warm-up, not counted
        tokio::time::sleep(Duration::from_millis(500)).await;
        let profiler = dhat::Profiler::builder().file_name(&out).build();
        let before = dhat::HeapStats::get();
        let rss_before = fleet::rss_mb();
        let took = cp.dial_all(0..n).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let after = dhat::HeapStats::get();
        let rss_after = fleet::rss_mb();
        let bytes = after.curr_bytes as f64 - before.curr_bytes as f64;
        let blocks = after.curr_blocks as f64 - before.curr_blocks as f64;
        println!("== heap of {n} idle sessions (dhat) ==");
        println!("all connected after      {:.2} s (dhat slows every allocation)", took.as_secs_f64());
        println!("live heap per session    {:.0} B in {:.1} blocks", bytes / n as f64, blocks / n as f64);
        println!(
            "allocated per session    {:.0} B in {:.0} allocations (handshake churn included)",
            (after.total_bytes - before.total_bytes) as f64 / n as f64,
            (after.total_blocks - before.total_blocks) as f64 / n as f64
        );
        println!(
            "RSS                      {rss_before:.1} → {rss_after:.1} MB ({:.1} KB/session; dhat's own bookkeeping included)",
            (rss_after - rss_before) * 1024.0 / n as f64
        );
        drop(profiler);
        println!("profile: {}", out.display());
        std::process::exit(0);
    });
}
