//! Performance probes for DESIGN §11 (ignored by default; run with
//! `cargo test --release -p clawker --test clawkerd_perf -- --ignored --nocapture`).
//! They print numbers and assert only loose floors, so a slow CI box does
//! not flake.

mod common;

use std::time::{Duration, Instant};

use common::*;

#[tokio::test(flavor = "multi_thread")]
#[ignore]
async fn shell_true_round_trip_and_stdout_throughput() {
    let pki = TestPki::new();
    let d = Clawkerd::spawn(&pki);
    let mut c = CpClient::connect(d.addr, &pki).await.unwrap();
    let mut s = c.open_session().await.unwrap();

    // Round trip of `true` (ShellCommand + CloseStdin → Done) on an open session.
    for i in 0..20 {
        s.run(&format!("w{i}"), pipeline(vec![stage(&["/bin/true"])]))
            .await;
    }
    let mut samples = Vec::new();
    for i in 0..300 {
        let t = Instant::now();
        let o = s
            .run(&format!("t{i}"), pipeline(vec![stage(&["/bin/true"])]))
            .await;
        samples.push(t.elapsed());
        assert_eq!(o.done, Some(0));
    }
    samples.sort();
    let p50 = samples[samples.len() / 2];
    let p99 = samples[samples.len() * 99 / 100];
    println!("true round trip: p50 {p50:?} p99 {p99:?}");

    // Throughput of one command's stdout.
    let bytes: u64 = 2 << 30;
    let id = "tp";
    s.send(shell(
        id,
        sh(&format!(
            "dd if=/dev/zero bs=1M count={} 2>/dev/null",
            bytes >> 20
        )),
    ))
    .await;
    s.send(close_stdin(id)).await;
    let t = Instant::now();
    let mut got = 0u64;
    loop {
        let r = s.next_for(id, Duration::from_secs(60)).await.unwrap();
        match r.payload {
            Some(clawker::proto::clawkerd::v1::response::Payload::Stdout(c)) => {
                got += c.data.len() as u64
            }
            Some(clawker::proto::clawkerd::v1::response::Payload::Done(_)) => break,
            _ => {}
        }
    }
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(got, bytes);
    println!(
        "stdout throughput: {:.0} MB/s ({} MiB in {:.2}s)",
        got as f64 / secs / 1e6,
        got >> 20,
        secs
    );
    assert!(p50 < Duration::from_millis(50));
}
