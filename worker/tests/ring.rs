//! The TCP ring all-reduce: sums equal the sequential sum on every rank, bit-identical across
//! ranks and runs, for any buffer length (shorter than the ring included); a dead peer or a
//! stranger fails the call with an error naming the link instead of hanging.
#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::net::TcpListener;
use std::time::Duration;

use tessera_worker::ring::{Ring, RingError};

const TIMEOUT: Duration = Duration::from_secs(20);

/// One listener per rank on an ephemeral loopback port, bound before anyone connects.
fn listeners(world: usize) -> Vec<TcpListener> {
    (0..world)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect()
}

/// Runs `f(ring)` on `world` ranks (threads), ring `id`, and returns each rank's result.
fn on_ring<R: Send>(world: usize, id: u64, f: impl Fn(&mut Ring) -> R + Sync) -> Vec<R> {
    let ls = listeners(world);
    let addrs: Vec<_> = ls.iter().map(|l| l.local_addr().unwrap()).collect();
    std::thread::scope(|s| {
        let handles: Vec<_> = ls
            .iter()
            .enumerate()
            .map(|(rank, l)| {
                let (f, next) = (&f, addrs[(rank + 1) % world]);
                s.spawn(move || f(&mut Ring::connect(rank, world, id, l, next, TIMEOUT).unwrap()))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn contribution(rank: usize, len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((i * 7 + rank * 13) % 29) as f32 * 0.37 - 3.0 + rank as f32 * 1e-3)
        .collect()
}

#[test]
fn sums_match_the_sequential_sum_on_every_rank() {
    for world in [2usize, 3, 4] {
        for len in [0usize, 1, 3, 1000, 250_007] {
            let results = on_ring(world, 1, |ring| {
                let mut buf = contribution(ring.rank(), len);
                ring.all_reduce_sum(&mut buf).unwrap();
                buf
            });
            let parts: Vec<Vec<f32>> = (0..world).map(|r| contribution(r, len)).collect();
            let expect: Vec<f64> = (0..len)
                .map(|i| parts.iter().map(|p| f64::from(p[i])).sum())
                .collect();
            for (rank, got) in results.iter().enumerate() {
                assert_eq!(got.len(), len);
                for (i, (&g, &e)) in got.iter().zip(&expect).enumerate() {
                    assert!(
                        (f64::from(g) - e).abs() <= 1e-5 * (1.0 + e.abs()),
                        "world {world}, len {len}, rank {rank}, element {i}: {g} vs {e}"
                    );
                }
                let same_bits = got
                    .iter()
                    .zip(&results[0])
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(
                    same_bits,
                    "world {world}, len {len}: rank {rank} differs from rank 0"
                );
            }
        }
    }
}

#[test]
fn repeated_calls_reuse_the_links_and_reproduce_bits() {
    let runs = on_ring(3, 2, |ring| {
        (0..5)
            .map(|round| {
                let mut buf = contribution(ring.rank() + round, 10_001);
                ring.all_reduce_sum(&mut buf).unwrap();
                buf
            })
            .collect::<Vec<_>>()
    });
    let again = on_ring(3, 2, |ring| {
        let mut buf = contribution(ring.rank() + 4, 10_001);
        ring.all_reduce_sum(&mut buf).unwrap();
        buf
    });
    assert!(
        runs[0][4]
            .iter()
            .zip(&again[1])
            .all(|(a, b)| a.to_bits() == b.to_bits()),
        "a fresh ring reproduces the bits"
    );
}

#[test]
fn a_dead_peer_fails_the_call_with_the_link_named() {
    let results = on_ring(3, 3, |ring| {
        let mut buf = contribution(ring.rank(), 100_000);
        ring.all_reduce_sum(&mut buf).unwrap();
        if ring.rank() == 1 {
            return None; // rank 1 leaves: its links close when the ring drops
        }
        Some(ring.all_reduce_sum(&mut buf).map_err(|e| e.to_string()))
    });
    // Rank 2 receives from rank 1 and rank 0 sends to it: both see the dead link. The error
    // names the peer.
    let errors: Vec<String> = results
        .into_iter()
        .flatten()
        .filter_map(Result::err)
        .collect();
    assert!(!errors.is_empty(), "the survivors' next call fails");
    assert!(
        errors
            .iter()
            .all(|e| e.contains("rank 1") || e.contains("rank 2") || e.contains("rank 0")),
        "{errors:?}"
    );
}

#[test]
fn a_stranger_or_a_bad_rank_is_refused() {
    let e = Ring::connect(
        2,
        2,
        9,
        &TcpListener::bind("127.0.0.1:0").unwrap(),
        "127.0.0.1:9".parse().unwrap(),
        TIMEOUT,
    )
    .unwrap_err();
    assert!(
        matches!(e, RingError::Setup { .. }) && e.to_string().contains("rank 2 of a ring of 2"),
        "{e}"
    );
    // Two rings with different ids cross-wired: the greeting check refuses the link.
    let ls = listeners(2);
    let addrs: Vec<_> = ls.iter().map(|l| l.local_addr().unwrap()).collect();
    let errors: Vec<String> = std::thread::scope(|s| {
        let a = s.spawn(|| {
            Ring::connect(0, 2, 10, &ls[0], addrs[1], Duration::from_secs(5)).map(|_| ())
        });
        let b = s.spawn(|| {
            Ring::connect(1, 2, 11, &ls[1], addrs[0], Duration::from_secs(5)).map(|_| ())
        });
        [a.join().unwrap(), b.join().unwrap()]
            .into_iter()
            .filter_map(Result::err)
            .map(|e| e.to_string())
            .collect()
    });
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(
        errors.iter().all(|e| e.contains("is not rank")),
        "{errors:?}"
    );
}

#[test]
fn one_rank_is_the_identity() {
    let mut ring = Ring::single();
    let mut buf = contribution(0, 17);
    ring.all_reduce_sum(&mut buf).unwrap();
    assert_eq!(buf, contribution(0, 17));
    assert_eq!((ring.rank(), ring.world()), (0, 1));
}

#[test]
fn broadcast_gives_every_rank_rank_zeros_bytes() {
    for world in [2, 3, 4] {
        let got = on_ring(world, 31, |ring| {
            let mut bytes = [ring.rank() as u8; 128];
            if ring.rank() == 0 {
                bytes
                    .iter_mut()
                    .enumerate()
                    .for_each(|(i, b)| *b = i as u8 ^ 0xa5);
            }
            ring.broadcast_from_rank0(&mut bytes).unwrap();
            bytes
        });
        let expected: Vec<u8> = (0..128).map(|i| i as u8 ^ 0xa5).collect();
        assert!(got.iter().all(|b| b[..] == expected[..]), "world {world}");
    }
}
