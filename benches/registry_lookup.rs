//! Registry lookup on the IdentityInterceptor path against the floor: a
//! plain `HashMap<[u8; 32], Entry>` lookup with the same constant-time CN
//! compare. Target (DESIGN.md §11): ≤ 2× the hash map, no lock.
//!
//! `cargo bench -p clawker --bench registry_lookup`

use std::collections::HashMap;
use std::hint::black_box;

use clawker::identity::{Thumbprint, ct_str_eq};
use clawker::registry::{Entry, NewEntry, Registry, RegistryStore};
use criterion::{Criterion, criterion_group, criterion_main};

const ROWS: u32 = 1000;

fn thumb(i: u32) -> Thumbprint {
    // Spread like real SHA-256 thumbprints.
    Thumbprint::of_der(&i.to_be_bytes())
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let registry = Registry::start(RegistryStore::open(&dir.path().join("cp.redb")).expect("open"))
        .expect("start");
    let mut plain: HashMap<[u8; 32], Entry> = HashMap::new();
    rt.block_on(async {
        for i in 0..ROWS {
            let e = registry
                .add(NewEntry {
                    agent_name: format!("a{i}"),
                    project: "bench".into(),
                    container_id: format!("{i:08x}"),
                    thumbprint: thumb(i),
                    registered_at_unix: 1_700_000_000,
                    last_seen_unix: 0,
                })
                .await
                .expect("add");
            plain.insert(e.thumbprint.0, e);
        }
    });
    let reader = registry.reader().clone();
    let probe = thumb(ROWS / 2);
    let cn = format!("clawker.bench.a{}", ROWS / 2);

    let mut g = c.benchmark_group("registry_lookup");
    g.bench_function("hashmap_floor", |b| {
        b.iter(|| {
            let e = plain
                .get(&black_box(probe).0)
                .filter(|e| ct_str_eq(black_box(&cn), &e.canonical_cn));
            black_box(e.is_some())
        })
    });
    g.bench_function("registry_reader", |b| {
        b.iter(|| black_box(reader.lookup(&black_box(probe), black_box(&cn)).is_ok()))
    });
    g.bench_function("registry_reader_miss", |b| {
        let unknown = thumb(ROWS + 1);
        b.iter(|| black_box(reader.lookup(&black_box(unknown), black_box(&cn)).is_err()))
    });
    g.finish();
    rt.block_on(registry.shutdown());
}

criterion_group!(benches, bench);
criterion_main!(benches);
