//! A backend pod: answers with its own name, like the lab's nginx pods after
//! `hostname > index.html`.
//!
//! `podserver --name NAME [--http PORT]... [--echo PORT]... [--udp PORT]...`
//! - http: `GET /` answers the name, `GET /peer` the client address the pod saw;
//! - echo: every line `L` is answered with `NAME L` (long-lived connections);
//! - udp: every datagram is answered with `NAME PEER`;
//! - sink: everything received is read and thrown away (bulk throughput).
//!
//! Prints `ready` on stdout once every socket is bound. `--bind ::` serves both families on
//! one socket per port; an IPv4 peer is then shown as IPv4, not IPv4-mapped.
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    thread,
    time::Duration,
};

fn main() {
    let mut name = String::from("pod");
    // A host-network server replies to UDP from the address the client asked for only if it
    // is bound to it (an unconnected socket on 0.0.0.0 answers from the route's source).
    let mut bind = String::from("0.0.0.0");
    let (mut http, mut echo, mut udp, mut sink) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut udp_echo, mut count, mut source) = (Vec::new(), Vec::new(), Vec::new());
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let v = args.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--name" => name = v,
            "--bind" => bind = v,
            "--http" => http.push(v.parse::<u16>().expect("--http PORT")),
            "--echo" => echo.push(v.parse::<u16>().expect("--echo PORT")),
            "--udp" => udp.push(v.parse::<u16>().expect("--udp PORT")),
            "--sink" => sink.push(v.parse::<u16>().expect("--sink PORT")),
            "--udp-echo" => udp_echo.push(v.parse::<u16>().expect("--udp-echo PORT")),
            "--count" => count.push(v.parse::<u16>().expect("--count PORT")),
            "--source" => source.push(v.parse::<u16>().expect("--source PORT")),
            _ => panic!("unknown argument {a}"),
        }
    }
    let mut handles = Vec::new();
    for port in http {
        let l = TcpListener::bind((bind.as_str(), port)).expect("bind http");
        let name = name.clone();
        handles.push(thread::spawn(move || serve_tcp(l, name, http_conn)));
    }
    for port in echo {
        let l = TcpListener::bind((bind.as_str(), port)).expect("bind echo");
        let name = name.clone();
        handles.push(thread::spawn(move || serve_tcp(l, name, echo_conn)));
    }
    for port in sink {
        let l = TcpListener::bind((bind.as_str(), port)).expect("bind sink");
        let name = name.clone();
        handles.push(thread::spawn(move || serve_tcp(l, name, sink_conn)));
    }
    for port in udp {
        let s = UdpSocket::bind((bind.as_str(), port)).expect("bind udp");
        let name = name.clone();
        handles.push(thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while let Ok((_, peer)) = s.recv_from(&mut buf) {
                let _ = s.send_to(format!("{name} {}", shown(peer)).as_bytes(), peer);
            }
        }));
    }
    for port in count {
        let l = TcpListener::bind((bind.as_str(), port)).expect("bind count");
        let name = name.clone();
        handles.push(thread::spawn(move || serve_tcp(l, name, count_conn)));
    }
    for port in source {
        let l = TcpListener::bind((bind.as_str(), port)).expect("bind source");
        let name = name.clone();
        handles.push(thread::spawn(move || serve_tcp(l, name, source_conn)));
    }
    for port in udp_echo {
        let s = UdpSocket::bind((bind.as_str(), port)).expect("bind udp echo");
        handles.push(thread::spawn(move || {
            // Whole datagrams up to the UDP maximum: fragmented ones arrive reassembled.
            let mut buf = vec![0u8; 65_536];
            while let Ok((n, peer)) = s.recv_from(&mut buf) {
                let _ = s.send_to(&buf[..n], peer);
            }
        }));
    }
    println!("ready");
    std::io::stdout().flush().ok();
    for h in handles {
        let _ = h.join();
    }
}

fn serve_tcp(l: TcpListener, name: String, f: fn(TcpStream, &str)) {
    for conn in l.incoming().flatten() {
        let name = name.clone();
        thread::spawn(move || f(conn, &name));
    }
}

fn http_conn(mut c: TcpStream, name: &str) {
    let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
    let peer = c.peer_addr().map(|p| shown(p).to_string()).unwrap_or_default();
    let mut req = Vec::new();
    let mut buf = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
        match c.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => req.extend_from_slice(&buf[..n]),
        }
    }
    let body = if req.starts_with(b"GET /peer") { format!("{peer}\n") } else { format!("{name}\n") };
    let _ = write!(
        c,
        "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

fn sink_conn(mut c: TcpStream, _name: &str) {
    let mut buf = vec![0u8; 256 * 1024];
    while matches!(c.read(&mut buf), Ok(n) if n > 0) {}
}

fn echo_conn(c: TcpStream, name: &str) {
    let Ok(mut w) = c.try_clone() else { return };
    for line in BufReader::new(c).lines() {
        let Ok(line) = line else { break };
        if writeln!(w, "{name} {line}").is_err() {
            break;
        }
    }
}

/// Reads until the client half-closes, then answers with the number of bytes read.
fn count_conn(mut c: TcpStream, _name: &str) {
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        match c.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => total += n as u64,
            Err(_) => return,
        }
    }
    let _ = writeln!(c, "{total}");
}

/// Reads a byte count on one line, sends that many bytes of `source_byte(i)`, then closes.
fn source_conn(c: TcpStream, _name: &str) {
    let Ok(mut w) = c.try_clone() else { return };
    let mut line = String::new();
    if BufReader::new(c).read_line(&mut line).is_err() {
        return;
    }
    let Ok(n) = line.trim().parse::<usize>() else { return };
    let block: Vec<u8> = (0..64 * 1024).map(source_byte).collect();
    let mut sent = 0;
    while sent < n {
        let k = (n - sent).min(block.len());
        if w.write_all(&block[..k]).is_err() {
            return;
        }
        sent += k;
    }
}

/// A peer as the client knows itself: an IPv4 client of a dual-stack socket is IPv4-mapped.
fn shown(peer: SocketAddr) -> SocketAddr {
    SocketAddr::new(peer.ip().to_canonical(), peer.port())
}

/// The byte at offset `i` (within a 64 KiB block) of what `--source` sends.
pub fn source_byte(i: usize) -> u8 {
    (i * 31 + 7) as u8
}
