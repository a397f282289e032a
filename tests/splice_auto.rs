//! `splice = "auto"` (the default): a direction moves to a kernel pipe while it is bulk and
//! back to its buffer when it turns quiet. Integrity across switches: bulk and sparse phases
//! alternating in both directions at once (SHA-256 each way), a half-close in the middle of
//! the other direction's bulk phase, a reset while bytes sit in a pipe, and 500 concurrent
//! bulk flows against a pipe budget of 64 per worker (the excess relays through buffers).

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::util::*;

/// One side's script: `cycles` of a 4 MiB burst then 40 writes of 100 bytes 3 ms apart.
/// Writes it to `w` and returns the SHA-256 of everything written.
fn play(w: &mut TcpStream, seed: u64, cycles: u64) -> std::io::Result<Hash> {
    let mut h = Sha256::new();
    for c in 0..cycles {
        let burst = Pattern::bytes(seed * 100 + c, 4 << 20);
        w.write_all(&burst)?;
        h.update(&burst);
        for i in 0..40u64 {
            let b = Pattern::bytes(seed * 100_000 + c * 1000 + i, 100);
            w.write_all(&b)?;
            h.update(&b);
            thread::sleep(Duration::from_millis(3));
        }
    }
    Ok(finish(h))
}

/// Bulk and sparse phases both ways at once; the client stops after 2 cycles (half-close
/// while the backend is still in its bulk phases), the backend after 4. Each side checks the
/// SHA-256 of what it received; the proxy held pipes during the transfer and none after.
#[test]
fn alternating_bulk_and_sparse_both_ways_intact() {
    let _heavy = heavy_lock();
    let backend_got: Arc<Mutex<Option<Hash>>> = Arc::new(Mutex::new(None));
    let bg = backend_got.clone();
    let srv = Server::start("127.0.0.1:0".parse().expect("addr"), move |s, _| {
        let mut r = s.try_clone().expect("clone");
        let bg2 = bg.clone();
        let reader = thread::spawn(move || {
            let got = read_to_eof_hash(&mut r, Instant::now() + scaled_secs(120)).ok();
            *bg2.lock().expect("lock") = got.map(|(_, h)| h);
        });
        let mut w = s;
        let _ = play(&mut w, 2, 4);
        let _ = w.shutdown(Shutdown::Write);
        let _ = reader.join();
    });
    let proxy = spawn_proxy_to(srv.addr(), &[]);
    let c = connect(proxy.addr());
    let mut cw = c.try_clone().expect("clone");
    let writer = thread::spawn(move || {
        let h = play(&mut cw, 1, 2);
        let _ = cw.shutdown(Shutdown::Write);
        h
    });
    let pid = proxy.pid();
    let peak = Arc::new(AtomicUsize::new(0));
    let (p2, done) = (
        peak.clone(),
        Arc::new(std::sync::atomic::AtomicBool::new(false)),
    );
    let d2 = done.clone();
    let sampler = thread::spawn(move || {
        while !d2.load(Ordering::SeqCst) {
            p2.fetch_max(pipe_fds(pid), Ordering::SeqCst);
            thread::sleep(Duration::from_millis(2));
        }
    });
    let mut cr = c;
    let (_, got) =
        read_to_eof_hash(&mut cr, Instant::now() + scaled_secs(120)).expect("client reads to EOF");
    let sent = writer.join().expect("writer").expect("client writes");
    done.store(true, Ordering::SeqCst);
    sampler.join().expect("sampler");
    // What the backend played, computed the same way.
    let mut sink = Sha256::new();
    for c in 0..4u64 {
        sink.update(Pattern::bytes(200 + c, 4 << 20));
        for i in 0..40u64 {
            sink.update(Pattern::bytes(200_000 + c * 1000 + i, 100));
        }
    }
    assert_eq!(got, finish(sink), "backend -> client bytes differ");
    assert!(wait_until(scaled_secs(30), || backend_got
        .lock()
        .expect("lock")
        .is_some()));
    assert_eq!(
        backend_got.lock().expect("lock").expect("hash"),
        sent,
        "client -> backend bytes differ"
    );
    assert!(
        peak.load(Ordering::SeqCst) >= 2,
        "no pipe seen during the bulk phases: the adaptive path never switched"
    );
    let text = exit_cleanly(proxy);
    assert_eq!(summary_sub(&text, "closed", "done"), Some(1), "{text}");
}

/// A reset from the upstream while its bulk bytes go through a pipe reaches the client as a
/// reset, after exactly the bytes that were sent before it.
#[test]
fn reset_during_a_pipe_phase_reaches_the_client() {
    upstream_reset_reaches_client(&[], 0x5A);
}

/// 500 concurrent bulk echo flows (1 MiB each way, SHA-256 checked) against 64 pipes per
/// worker: every flow intact; pipes never exceed the budget.
#[test]
fn pipe_budget_exhausted_by_500_bulk_flows() {
    let _heavy = heavy_lock();
    const FLOWS: u64 = 500;
    const LEN: u64 = 1 << 20;
    let srv = echo_server();
    let proxy = spawn_proxy_to(srv.addr(), &["--workers", "1", "--max-conns", "1000"]);
    let addr = proxy.addr();
    let pid = proxy.pid();
    let peak = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (p2, s2) = (peak.clone(), stop.clone());
    let sampler = thread::spawn(move || {
        while !s2.load(Ordering::SeqCst) {
            p2.fetch_max(pipe_fds(pid), Ordering::SeqCst);
            thread::sleep(Duration::from_millis(5));
        }
    });
    let flows: Vec<_> = (0..FLOWS)
        .map(|i| {
            thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn(move || echo_flow(addr, 9000 + i, LEN))
                .expect("spawn")
        })
        .collect();
    let mut bad = Vec::new();
    for (i, f) in flows.into_iter().enumerate() {
        if let Err(e) = f.join().expect("flow thread") {
            bad.push(format!("flow {i}: {e}"));
        }
    }
    stop.store(true, Ordering::SeqCst);
    sampler.join().expect("sampler");
    assert!(
        bad.is_empty(),
        "{} flow(s) failed: {:?}",
        bad.len(),
        &bad[..bad.len().min(5)]
    );
    let peak = peak.load(Ordering::SeqCst);
    assert!(peak >= 2, "no pipe was ever used");
    assert!(
        peak <= 2 * 64,
        "{peak} pipe fds: more than the 64-pipe budget"
    );
    println!("500 bulk flows: peak {} pipes (budget 64)", peak / 2);
    let text = exit_cleanly(proxy);
    assert_eq!(summary_value(&text, "accepted"), Some(FLOWS), "{text}");
    assert_eq!(summary_sub(&text, "closed", "done"), Some(FLOWS), "{text}");
}

/// Write `len` bytes of pattern `seed` and read the echo at once; compare SHA-256.
fn echo_flow(addr: SocketAddr, seed: u64, len: u64) -> Result<(), String> {
    let c =
        TcpStream::connect_timeout(&addr, scaled_secs(20)).map_err(|e| format!("connect: {e}"))?;
    let mut w = c.try_clone().map_err(|e| e.to_string())?;
    let writer = thread::Builder::new()
        .stack_size(256 * 1024)
        .spawn(move || {
            let h = write_pattern(&mut w, seed, len);
            let _ = w.shutdown(Shutdown::Write);
            h
        })
        .map_err(|e| e.to_string())?;
    let mut r = c;
    let (n, got) = read_to_eof_hash(&mut r, Instant::now() + scaled_secs(120))
        .map_err(|e| format!("read: {e}"))?;
    let sent = writer
        .join()
        .map_err(|_| "writer panicked".to_string())?
        .map_err(|e| format!("write: {e}"))?;
    if n != len || got != sent {
        return Err(format!("{n} bytes back, hash differs: {}", got != sent));
    }
    let _ = r.read(&mut [0u8; 1]);
    Ok(())
}
