//! Frames for the fuzzer, from a seeded generator: mostly structured ones aimed at the world's
//! frontends, backends and node ports (new flows, tracked flows, replies of flows the model
//! knows, ICMP errors quoting them, fragments, IP options, TCP flag combinations, UDP without
//! checksum, CHECKSUM_PARTIAL-looking checksums), many of them mutated (bits flipped in the
//! headers, truncated, lengths and IHL wrong, checksums fixed or not), plus non-IP frames and
//! random bytes.
use std::net::Ipv4Addr;

use super::{
    model::Model,
    wire::{be16, fix_checksums, pseudo, ETH, ICMP, TCP, UDP},
    world::{World, EXTERNAL_CLIENTS, POD_CLIENTS},
};
use crate::packet::{fragment, icmp_error, CLIENT_MAC, GW_MAC};

/// xorshift64*: small, fast and reproducible from its seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        // splitmix64 of the seed: nearby seeds give unrelated streams, and the state is never 0.
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Self((z ^ (z >> 31)) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    /// True `pct` times in 100.
    pub fn chance(&mut self, pct: u32) -> bool {
        self.below(100) < pct as usize
    }

    pub fn pick<T: Copy>(&mut self, v: &[T]) -> T {
        v[self.below(v.len())]
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }
}

/// Where a frame enters the node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// From a pod's veth: the tc program only.
    Pod,
    /// From the wire: the XDP program, then tc on what XDP passes on.
    Wire,
}

type Addr = (Ipv4Addr, u16);

/// Builds Ethernet + IPv4 + TCP/UDP with valid checksums.
#[allow(clippy::too_many_arguments)]
pub fn packet(src: Addr, dst: Addr, proto: u8, flags: u8, payload: &[u8], ttl: u8, id: u16, zero_udp: bool) -> Vec<u8> {
    let mut l4 = if proto == TCP {
        let mut t = vec![0u8; 20];
        t[4..8].copy_from_slice(&(id as u32).wrapping_mul(7919).to_be_bytes());
        t[8..12].copy_from_slice(&(id as u32).wrapping_mul(104_729).to_be_bytes());
        t[12] = 5 << 4;
        t[13] = flags;
        t[14..16].copy_from_slice(&64240u16.to_be_bytes());
        t
    } else {
        let mut u = vec![0u8; 8];
        u[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        u
    };
    l4[0..2].copy_from_slice(&src.1.to_be_bytes());
    l4[2..4].copy_from_slice(&dst.1.to_be_bytes());
    l4.extend_from_slice(payload);
    let mut f = Vec::with_capacity(ETH + 20 + l4.len());
    f.extend_from_slice(&GW_MAC);
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&[0x08, 0x00]);
    f.extend_from_slice(&[0x45, 0]);
    f.extend_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
    f.extend_from_slice(&id.to_be_bytes());
    f.extend_from_slice(&[0, 0, ttl, proto, 0, 0]);
    f.extend_from_slice(&src.0.octets());
    f.extend_from_slice(&dst.0.octets());
    f.extend_from_slice(&l4);
    fix_checksums(&mut f);
    if zero_udp && proto == UDP {
        f[ETH + 20 + 6..ETH + 20 + 8].copy_from_slice(&[0, 0]);
    }
    f
}

/// `f` (IHL 5) with `n` words of IP options (NOPs, then End of Options) after its header; the
/// header checksum is made valid, the total length grows by the options (wrapping, as the
/// input's may be anything).
pub fn add_options(f: &[u8], n: usize) -> Vec<u8> {
    if f.len() < ETH + 20 || n == 0 {
        return f.to_vec();
    }
    let mut out = f[..ETH + 20].to_vec();
    let mut opts = vec![1u8; 4 * n];
    *opts.last_mut().expect("n > 0") = 0;
    out.extend_from_slice(&opts);
    out.extend_from_slice(&f[ETH + 20..]);
    out[ETH] = 0x45 + n as u8;
    let tot = be16(&out, ETH + 2).wrapping_add(4 * n as u16);
    out[ETH + 2..ETH + 4].copy_from_slice(&tot.to_be_bytes());
    out[ETH + 10..ETH + 12].copy_from_slice(&[0, 0]);
    let c = !super::wire::ones(super::wire::sum(&out[ETH..ETH + 20 + 4 * n]));
    out[ETH + 10..ETH + 12].copy_from_slice(&c.to_be_bytes());
    out
}

/// Client ports per (frontend, address used): one client port never serves two frontends (a
/// case the datapath does not separate, see `Model::clash`); mutations still make such pairs.
const PORTS_PER_FRONTEND: usize = 40;

pub struct Gen {
    pub rng: Rng,
}

fn tcp_flags(rng: &mut Rng) -> u8 {
    match rng.below(100) {
        0..=29 => 0x02,
        30..=54 => 0x10,
        55..=69 => 0x18,
        70..=76 => 0x11,
        77..=80 => 0x04,
        81..=83 => 0x14,
        84..=87 => 0x12,
        88..=89 => 0x01,
        _ => rng.next_u64() as u8,
    }
}

fn reply_flags(rng: &mut Rng) -> u8 {
    match rng.below(100) {
        0..=24 => 0x12,
        25..=54 => 0x10,
        55..=74 => 0x18,
        75..=84 => 0x11,
        85..=89 => 0x04,
        _ => rng.next_u64() as u8,
    }
}

fn is_local_pod(ip: Ipv4Addr) -> bool {
    ip.octets()[..3] == [10, 244, 1]
}

impl Gen {
    pub fn new(seed: u64) -> Self {
        Self { rng: Rng::new(seed) }
    }

    fn ttl(&mut self) -> u8 {
        match self.rng.below(100) {
            0 => 0,
            1..=2 => 1,
            3 => 2,
            _ => 64,
        }
    }

    fn payload(&mut self, max: usize) -> Vec<u8> {
        let n = self.rng.below(max + 1);
        self.rng.bytes(n)
    }

    /// A client, the frontend it addresses (address, port) and a source port from the pool.
    fn client_to_frontend(&mut self, world: &World) -> (Path, Addr, Addr, u8) {
        let fe_i = self.rng.below(world.frontends.len());
        let fe = &world.frontends[fe_i];
        let external = self.rng.chance(50);
        let client = if external { self.rng.pick(&EXTERNAL_CLIENTS) } else { self.rng.pick(&POD_CLIENTS) };
        let (addr_i, addr) = match fe.ip {
            Some(ip) => (0, ip),
            None => {
                let i = if external && self.rng.chance(90) { 0 } else { self.rng.below(world.node_addrs.len()) };
                (i, world.node_addrs[i])
            }
        };
        let slot = (fe_i * 2 + addr_i) * PORTS_PER_FRONTEND + self.rng.below(PORTS_PER_FRONTEND);
        let sport = 20_000 + slot as u16;
        let path = if !is_local_pod(client) && self.rng.chance(90) { Path::Wire } else { Path::Pod };
        (path, (client, sport), (addr, fe.port), fe.proto)
    }

    /// The next frames (several for a fragmented datagram), each with where it enters.
    pub fn next(&mut self, model: &Model) -> Vec<(Path, Vec<u8>)> {
        let world = &model.world;
        let kind = self.rng.below(100);
        let mut frames = match kind {
            0..=29 => vec![self.client_packet(world)],
            30..=49 => self.reply(model).into_iter().collect(),
            50..=57 => vec![self.icmp(model)],
            58..=63 => self.fragments(model),
            64..=71 => vec![self.non_service(model)],
            72..=75 => return vec![self.non_ip()],
            76..=83 => return vec![self.random(world)],
            84..=85 => vec![self.partial_checksum(world)],
            _ => {
                let mut v = vec![self.client_packet(world)];
                v.extend(self.reply(model));
                v
            }
        };
        if frames.is_empty() {
            frames.push(self.client_packet(world));
        }
        for (_, f) in frames.iter_mut() {
            if self.rng.chance(25) {
                self.mutate(f);
            }
        }
        frames
    }

    fn client_packet(&mut self, world: &World) -> (Path, Vec<u8>) {
        let (path, src, dst, proto) = self.client_to_frontend(world);
        let flags = tcp_flags(&mut self.rng);
        let payload = self.payload(48);
        let ttl = self.ttl();
        let id = self.rng.next_u64() as u16;
        let zero = self.rng.chance(20);
        let mut f = packet(src, dst, proto, flags, &payload, ttl, id, zero);
        if self.rng.chance(8) {
            f = add_options(&f, 1 + self.rng.below(10));
        }
        (path, f)
    }

    /// A backend's reply to a flow the model knows.
    fn reply(&mut self, model: &Model) -> Option<(Path, Vec<u8>)> {
        let k = model.known_flow(self.rng.next_u64() as usize)?;
        let to = k.snat.unwrap_or((k.fwd.src, k.fwd.sport));
        let flags = reply_flags(&mut self.rng);
        let payload = self.payload(48);
        let ttl = self.ttl();
        let id = self.rng.next_u64() as u16;
        let zero = self.rng.chance(15);
        let mut f = packet(k.backend, to, k.fwd.proto, flags, &payload, ttl, id, zero);
        if self.rng.chance(5) {
            f = add_options(&f, 1 + self.rng.below(10));
        }
        let path = if !k.backend_local && self.rng.chance(80) { Path::Wire } else { Path::Pod };
        Some((path, f))
    }

    /// An ICMP error quoting a packet of a known flow as it travelled (either way), or a
    /// random quote, or an ICMP message that is no error.
    fn icmp(&mut self, model: &Model) -> (Path, Vec<u8>) {
        let routers = [Ipv4Addr::new(10, 244, 9, 1), Ipv4Addr::new(192, 168, 49, 3)];
        let k = model.known_flow(self.rng.next_u64() as usize);
        let proto;
        let (quoted_src, quoted_dst, sender, outer_dst) = match (k, self.rng.below(3)) {
            (Some(k), 0) => {
                // About the client's packet after translation: from the backend's side.
                proto = k.fwd.proto;
                let from = k.snat.unwrap_or((k.fwd.src, k.fwd.sport));
                let sender = if self.rng.chance(50) { k.backend.0 } else { self.rng.pick(&routers) };
                (from, k.backend, sender, from.0)
            }
            (Some(k), 1) => {
                // About the translated reply: from the client's side.
                proto = k.fwd.proto;
                let fe = (k.fwd.dst, k.fwd.dport);
                let client = (k.fwd.src, k.fwd.sport);
                let sender = if self.rng.chance(50) { client.0 } else { self.rng.pick(&routers) };
                (fe, client, sender, fe.0)
            }
            _ => {
                proto = if self.rng.chance(50) { TCP } else { UDP };
                let a = (Ipv4Addr::from(self.rng.next_u64() as u32), self.rng.next_u64() as u16);
                let b = (self.rng.pick(&POD_CLIENTS), self.rng.next_u64() as u16);
                (b, a, self.rng.pick(&routers), b.0)
            }
        };
        let flags = tcp_flags(&mut self.rng);
        let payload = self.payload(16);
        let mut quoted = packet(quoted_src, quoted_dst, proto, flags, &payload, 63, self.rng.next_u64() as u16, false);
        let mut q_opts = 0;
        if self.rng.chance(10) {
            q_opts = 1 + self.rng.below(10);
            quoted = add_options(&quoted, q_opts);
        }
        let ihl = 20 + 4 * q_opts;
        let full = if proto == TCP { 20 } else { 8 };
        let l4_len = match self.rng.below(100) {
            0..=69 => full,
            70..=84 => 8,
            85..=92 => 4 + self.rng.below(4),
            _ => self.rng.below(4),
        };
        let quote = quoted[ETH..(ETH + ihl + l4_len).min(quoted.len())].to_vec();
        let (kind, code) = match self.rng.below(100) {
            0..=59 => (3, self.rng.below(16) as u8),
            60..=74 => (11, self.rng.below(2) as u8),
            75..=84 => (12, 0),
            85..=89 => (self.rng.pick(&[0u8, 8]), 0),
            _ => (self.rng.next_u64() as u8, self.rng.next_u64() as u8),
        };
        let rest = [0, 0, 0x05, 0x78];
        let mut f = icmp_error(sender, outer_dst, kind, code, rest, &quote);
        f[ETH + 8] = self.ttl();
        fix_checksums(&mut f);
        if self.rng.chance(10) {
            f = add_options(&f, 1 + self.rng.below(10));
        }
        let path = if is_local_pod(sender) && self.rng.chance(80) { Path::Pod } else { Path::Wire };
        (path, f)
    }

    /// A datagram in fragments: in order, first then the rest shuffled, a later one first,
    /// or a later one alone whose first never comes.
    fn fragments(&mut self, model: &Model) -> Vec<(Path, Vec<u8>)> {
        let proto_udp = self.rng.chance(70);
        let n = 40 + self.rng.below(360);
        let payload = self.rng.bytes(n);
        let id = self.rng.next_u64() as u16;
        let (path, whole) = match model.known_flow(self.rng.next_u64() as usize) {
            Some(k) if self.rng.chance(30) => {
                let to = k.snat.unwrap_or((k.fwd.src, k.fwd.sport));
                let path = if k.backend_local { Path::Pod } else { Path::Wire };
                (path, packet(k.backend, to, k.fwd.proto, 0x18, &payload, 64, id, false))
            }
            _ => {
                let (path, src, dst, proto) = self.client_to_frontend(&model.world);
                let proto = if proto_udp { proto } else { TCP };
                (path, packet(src, dst, proto, 0x18, &payload, 64, id, self.rng.chance(10)))
            }
        };
        // At least two fragments: every one but the last carries a multiple of 8 bytes.
        let data = whole.len() - ETH - 20;
        let chunk = 8 * (1 + self.rng.below(((data - 1) / 8).max(1)));
        let mut frags = fragment(&whole, chunk);
        let first = frags.remove(0);
        let mut out = Vec::new();
        match self.rng.below(100) {
            0..=59 => {
                out.push(first);
                out.extend(frags);
            }
            60..=79 => {
                out.push(first);
                while !frags.is_empty() {
                    let i = self.rng.below(frags.len());
                    out.push(frags.remove(i));
                }
            }
            80..=89 if !frags.is_empty() => {
                out.push(frags.remove(0));
                out.push(first);
                out.extend(frags);
            }
            _ => {
                let mut orphan = frags.pop().unwrap_or(first);
                let id = self.rng.next_u64() as u16;
                orphan[ETH + 4..ETH + 6].copy_from_slice(&id.to_be_bytes());
                fix_checksums(&mut orphan);
                out.push(orphan);
            }
        }
        out.into_iter().map(|f| (path, f)).collect()
    }

    /// Traffic of no Service: pod to pod, a frontend's address on another port or protocol,
    /// straight to a backend from a flow's client port, other IP protocols.
    fn non_service(&mut self, model: &Model) -> (Path, Vec<u8>) {
        let world = &model.world;
        let client = self.rng.pick(&POD_CLIENTS);
        let sport = 30_000 + self.rng.below(1000) as u16;
        let ttl = self.ttl();
        let id = self.rng.next_u64() as u16;
        let payload = self.payload(32);
        let proto = if self.rng.chance(50) { TCP } else { UDP };
        let flags = tcp_flags(&mut self.rng);
        let mut f = match self.rng.below(5) {
            0 => {
                let dst = Ipv4Addr::new(10, 244, 1, 2 + self.rng.below(60) as u8);
                packet((client, sport), (dst, self.rng.next_u64() as u16), proto, flags, &payload, ttl, id, false)
            }
            1 => {
                let fe = &world.frontends[self.rng.below(world.frontends.len())];
                let dst = fe.ip.unwrap_or(world.node_ip);
                let port = fe.port.wrapping_add(1 + self.rng.below(3) as u16);
                packet((client, sport), (dst, port), proto, flags, &payload, ttl, id, false)
            }
            2 => match model.known_flow(self.rng.next_u64() as usize) {
                Some(k) => packet((k.fwd.src, k.fwd.sport), k.backend, k.fwd.proto, flags, &payload, ttl, id, false),
                None => packet((client, sport), (Ipv4Addr::new(10, 244, 1, 12), 8080), TCP, flags, &[], ttl, id, false),
            },
            3 => {
                let dst = Ipv4Addr::from(self.rng.next_u64() as u32);
                packet((client, sport), (dst, self.rng.next_u64() as u16), proto, flags, &payload, ttl, id, false)
            }
            _ => {
                let fe = &world.frontends[self.rng.below(world.frontends.len())];
                let dst = fe.ip.unwrap_or(world.node_ip);
                let mut f = packet((client, sport), (dst, fe.port), UDP, 0, &payload, ttl, id, false);
                f[ETH + 9] = self.rng.pick(&[ICMP, 47, 132, 50]);
                fix_checksums(&mut f);
                f
            }
        };
        if self.rng.chance(5) {
            f = add_options(&f, 1 + self.rng.below(10));
        }
        (if self.rng.chance(70) { Path::Pod } else { Path::Wire }, f)
    }

    fn non_ip(&mut self) -> (Path, Vec<u8>) {
        let (ethertype, len) = match self.rng.below(4) {
            0 => (0x0806u16, 42),
            1 => (0x86dd, 54 + self.rng.below(60)),
            2 => (0x8100, 18 + self.rng.below(60)),
            _ => (self.rng.next_u64() as u16, 14 + self.rng.below(60)),
        };
        let mut f = self.rng.bytes(len);
        f[12..14].copy_from_slice(&ethertype.to_be_bytes());
        (if self.rng.chance(50) { Path::Pod } else { Path::Wire }, f)
    }

    /// Random bytes, often shaped enough (IPv4, version and IHL, TCP/UDP/ICMP, a frontend's
    /// address and port, checksums) to get past the first checks.
    fn random(&mut self, world: &World) -> (Path, Vec<u8>) {
        let len = ETH + self.rng.below(110);
        let mut f = self.rng.bytes(len);
        if self.rng.chance(80) && f.len() >= 14 {
            f[12..14].copy_from_slice(&[0x08, 0x00]);
        }
        if f.len() >= ETH + 20 {
            if self.rng.chance(60) {
                f[ETH] = 0x45;
            }
            if self.rng.chance(60) {
                f[ETH + 9] = self.rng.pick(&[TCP, UDP, ICMP]);
            }
            if self.rng.chance(50) {
                f[ETH + 6] &= 0x40;
                f[ETH + 7] = 0;
            }
            if self.rng.chance(40) {
                let fe = &world.frontends[self.rng.below(world.frontends.len())];
                let dst = fe.ip.unwrap_or(world.node_ip);
                f[ETH + 16..ETH + 20].copy_from_slice(&dst.octets());
                let l4 = ETH + (f[ETH] as usize & 0xf) * 4;
                if f.len() >= l4 + 4 {
                    f[l4 + 2..l4 + 4].copy_from_slice(&fe.port.to_be_bytes());
                }
            }
            if self.rng.chance(50) {
                let tot = (f.len() - ETH) as u16;
                f[ETH + 2..ETH + 4].copy_from_slice(&tot.to_be_bytes());
            }
            if self.rng.chance(50) {
                fix_checksums(&mut f);
            }
        }
        (if self.rng.chance(50) { Path::Pod } else { Path::Wire }, f)
    }

    /// A new flow whose L4 checksum holds only the pseudo-header sum, as a locally sent
    /// CHECKSUM_PARTIAL packet's does.
    fn partial_checksum(&mut self, world: &World) -> (Path, Vec<u8>) {
        let (_, src, dst, proto) = self.client_to_frontend(world);
        let payload = self.payload(32);
        let mut f = packet(src, dst, proto, 0x02, &payload, 64, self.rng.next_u64() as u16, false);
        let len = f.len() - ETH - 20;
        let mut s = pseudo(src.0, dst.0, proto, len);
        while s > 0xffff {
            s = (s & 0xffff) + (s >> 16);
        }
        let off = ETH + 20 + if proto == TCP { 16 } else { 6 };
        f[off..off + 2].copy_from_slice(&(s as u16).to_be_bytes());
        (Path::Wire, f)
    }

    /// One to three of: a bit flipped or a byte replaced in the headers, truncation, trailing
    /// bytes, IHL, total length, fragment field, TTL, protocol, checksums, TCP flags, a zero
    /// UDP checksum, IP options; then, half the time, checksums made valid again.
    pub fn mutate(&mut self, f: &mut Vec<u8>) {
        for _ in 0..1 + self.rng.below(3) {
            let len = f.len();
            if len < ETH + 20 {
                break;
            }
            let ihl = ((f[ETH] & 0x0f) as usize * 4).max(20);
            let l4 = ETH + ihl;
            match self.rng.below(14) {
                0 => {
                    let i = self.rng.below(len.min(ETH + 60));
                    f[i] ^= 1 << self.rng.below(8);
                }
                1 => {
                    let i = ETH + self.rng.below(len.min(80) - ETH);
                    f[i] = self.rng.next_u64() as u8;
                }
                2 => {
                    let min = if self.rng.chance(80) { ETH + 20 } else { ETH };
                    let n = min + self.rng.below(len - min);
                    f.truncate(n);
                }
                3 => {
                    let n = 1 + self.rng.below(24);
                    let extra = self.rng.bytes(n);
                    f.extend_from_slice(&extra);
                }
                4 => f[ETH] = 0x40 | self.rng.below(16) as u8,
                5 => {
                    let tot = if self.rng.chance(50) {
                        self.rng.next_u64() as u16
                    } else {
                        ((len - ETH) as u16).wrapping_add(self.rng.below(9) as u16).wrapping_sub(4)
                    };
                    f[ETH + 2..ETH + 4].copy_from_slice(&tot.to_be_bytes());
                }
                6 => {
                    let v: u16 = match self.rng.below(4) {
                        0 => 0x2000,
                        1 => self.rng.below(0x2000) as u16,
                        2 => 0x4000,
                        _ => self.rng.next_u64() as u16,
                    };
                    f[ETH + 6..ETH + 8].copy_from_slice(&v.to_be_bytes());
                }
                7 => f[ETH + 8] = self.rng.below(3) as u8,
                8 => {
                    let any = self.rng.next_u64() as u8;
                    f[ETH + 9] = self.rng.pick(&[ICMP, TCP, UDP, 47, any]);
                }
                9 => {
                    let off = l4 + if f[ETH + 9] == TCP { 16 } else { 6 };
                    if off + 2 <= len {
                        f[off] ^= self.rng.next_u64() as u8 | 1;
                    }
                }
                10 => {
                    if f[ETH + 9] == TCP && l4 + 14 <= len {
                        f[l4 + 13] = self.rng.next_u64() as u8;
                    }
                }
                11 => {
                    if f[ETH + 9] == UDP && l4 + 8 <= len {
                        f[l4 + 6..l4 + 8].copy_from_slice(&[0, 0]);
                    }
                }
                12 => {
                    if f[ETH] == 0x45 {
                        *f = add_options(f, 1 + self.rng.below(10));
                    }
                }
                _ => f[ETH + 10] ^= self.rng.next_u64() as u8 | 1,
            }
        }
        if self.rng.chance(50) {
            fix_checksums(f);
        }
    }
}
