//! Regression test of PATCH(atelier 2): an accept error (here EMFILE) no longer ends the
//! accept loop. Its own test binary: it lowers this process's descriptor limit.

use std::any::Any;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tiny_http::{Next, Options, Response, Server};

/// Open descriptors of this process now.
fn open_fds() -> u64 {
    std::fs::read_dir("/proc/self/fd").map(|d| d.count() as u64).unwrap_or(16)
}

fn set_nofile(n: u64) {
    let lim = libc_rlimit(n);
    // SAFETY: setrlimit reads a plain struct we own.
    assert_eq!(unsafe { setrlimit(7 /* RLIMIT_NOFILE */, &lim) }, 0);
}

#[repr(C)]
struct RLimit {
    cur: u64,
    max: u64,
}

fn libc_rlimit(n: u64) -> RLimit {
    let mut lim = RLimit { cur: 0, max: 0 };
    // SAFETY: getrlimit writes a plain struct we own.
    unsafe { getrlimit(7, &mut lim) };
    RLimit { cur: n.min(lim.max), max: lim.max }
}

extern "C" {
    fn setrlimit(resource: i32, rlim: *const RLimit) -> i32;
    fn getrlimit(resource: i32, rlim: *mut RLimit) -> i32;
}

#[test]
fn the_server_accepts_again_after_running_out_of_descriptors() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let errors = Arc::new(AtomicUsize::new(0));
    let counted = errors.clone();
    let _server = Server::from_listener_with(
        listener,
        None,
        Options {
            on_accept_error: Some(Box::new(move |_| {
                counted.fetch_add(1, Ordering::SeqCst);
            })),
            handler: Some(Arc::new(|_: &mut (dyn Any + Send), rq: tiny_http::Request| {
                let _ = rq.respond(Response::from_string("ok"));
                Next::Close
            })),
            ..Options::default()
        },
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    set_nofile(open_fds() + 40);
    // Connect until this process is out of descriptors: the server's accepts fail too.
    let mut clients = Vec::new();
    while let Ok(c) = TcpStream::connect(addr) {
        clients.push(c);
        if clients.len() > 10_000 {
            break;
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    assert!(errors.load(Ordering::SeqCst) > 0, "an accept failed with EMFILE");
    drop(clients);
    set_nofile(4096);
    std::thread::sleep(Duration::from_millis(300));
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    assert!(String::from_utf8_lossy(&out).starts_with("HTTP/1.1 200"), "served again");
}
