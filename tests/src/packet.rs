//! Frames for packet tests and benchmarks, and an independent parser that checks them.
//!
//! Independent of the datapath on purpose: checksums are recomputed from scratch here, never
//! updated incrementally, so a wrong incremental update in the datapath cannot hide.
use std::net::Ipv4Addr;

pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const GW_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xfe];

pub fn sum16(data: &[u8]) -> u32 {
    data.chunks(2).map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32).sum()
}

pub fn fold(mut s: u32) -> u16 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

pub fn l4_checksum(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, l4: &[u8]) -> u16 {
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, proto]);
    pseudo.extend_from_slice(&(l4.len() as u16).to_be_bytes());
    fold(sum16(&pseudo) + sum16(l4))
}

#[derive(Clone, Copy)]
pub enum L4 {
    Tcp { flags: u8 },
    Udp { zero_csum: bool },
}

/// Builds Ethernet + IPv4 + TCP/UDP with correct checksums.
pub fn frame(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), l4: L4, payload: &[u8]) -> Vec<u8> {
    let (proto, mut l4b) = match l4 {
        L4::Tcp { flags } => {
            let mut t = vec![0u8; 20];
            t[0..2].copy_from_slice(&src.1.to_be_bytes());
            t[2..4].copy_from_slice(&dst.1.to_be_bytes());
            t[4..8].copy_from_slice(&1000u32.to_be_bytes());
            t[12] = 5 << 4;
            t[13] = flags;
            t[14..16].copy_from_slice(&65535u16.to_be_bytes());
            (6u8, t)
        }
        L4::Udp { .. } => {
            let mut u = vec![0u8; 8];
            u[0..2].copy_from_slice(&src.1.to_be_bytes());
            u[2..4].copy_from_slice(&dst.1.to_be_bytes());
            u[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
            (17u8, u)
        }
    };
    l4b.extend_from_slice(payload);
    let csum = l4_checksum(src.0, dst.0, proto, &l4b);
    match l4 {
        L4::Tcp { .. } => l4b[16..18].copy_from_slice(&csum.to_be_bytes()),
        L4::Udp { zero_csum: false } => {
            l4b[6..8].copy_from_slice(&(if csum == 0 { 0xffff } else { csum }).to_be_bytes())
        }
        L4::Udp { zero_csum: true } => {}
    }
    let mut ip = vec![0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((20 + l4b.len()) as u16).to_be_bytes());
    ip[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
    ip[8] = 64;
    ip[9] = proto;
    ip[12..16].copy_from_slice(&src.0.octets());
    ip[16..20].copy_from_slice(&dst.0.octets());
    let c = fold(sum16(&ip));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut f = Vec::new();
    f.extend_from_slice(&GW_MAC);
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&l4b);
    f
}

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub struct Parsed {
    pub src: (Ipv4Addr, u16),
    pub dst: (Ipv4Addr, u16),
    pub proto: u8,
    pub l4_csum: u16,
}

/// Parses a frame and checks both checksums from scratch; panics with a reason if invalid.
pub fn parse_checked(f: &[u8]) -> Parsed {
    try_parse_checked(f).unwrap_or_else(|e| panic!("{e}"))
}

/// `parse_checked` that says what is wrong instead of panicking (for the fuzzer, which reports
/// the frame and its seed).
pub fn try_parse_checked(f: &[u8]) -> Result<Parsed, String> {
    let check = |ok: bool, what: String| if ok { Ok(()) } else { Err(what) };
    check(f.len() >= 34, format!("frame too short: {}", f.len()))?;
    check(f[12..14] == [0x08, 0x00], "not IPv4".into())?;
    check(f[14] >> 4 == 4, "IP version".into())?;
    let ihl = (f[14] & 0x0f) as usize * 4;
    check(ihl >= 20 && f.len() >= 14 + ihl, format!("IHL {ihl}"))?;
    let ip = &f[14..14 + ihl];
    check(fold(sum16(ip)) == 0, "IPv4 header checksum invalid".into())?;
    let tot = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    check(tot >= ihl && 14 + tot <= f.len(), format!("IP total length {tot} for a frame of {}", f.len()))?;
    let l4 = &f[14 + ihl..14 + tot];
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let proto = ip[9];
    let csum_off = if proto == 6 { 16 } else { 6 };
    check(l4.len() >= csum_off + 2, format!("L4 header cut at {} bytes", l4.len()))?;
    let l4_csum = u16::from_be_bytes([l4[csum_off], l4[csum_off + 1]]);
    if !(proto == 17 && l4_csum == 0) {
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&src.octets());
        pseudo.extend_from_slice(&dst.octets());
        pseudo.extend_from_slice(&[0, proto]);
        pseudo.extend_from_slice(&(l4.len() as u16).to_be_bytes());
        check(fold(sum16(&pseudo) + sum16(l4)) == 0, "L4 checksum invalid".into())?;
    }
    Ok(Parsed {
        src: (src, u16::from_be_bytes([l4[0], l4[1]])),
        dst: (dst, u16::from_be_bytes([l4[2], l4[3]])),
        proto,
        l4_csum,
    })
}

/// Splits an unfragmented IPv4 frame into fragments of at most `payload` IP payload bytes
/// (a multiple of 8) each, every one with its own valid header checksum.
pub fn fragment(f: &[u8], payload: usize) -> Vec<Vec<u8>> {
    assert_eq!(payload % 8, 0);
    let (eth, ip, data) = (&f[..14], &f[14..34], &f[34..]);
    let mut out = Vec::new();
    for (i, chunk) in data.chunks(payload).enumerate() {
        let off = i * payload;
        let more = off + chunk.len() < data.len();
        let mut h = ip.to_vec();
        h[2..4].copy_from_slice(&((20 + chunk.len()) as u16).to_be_bytes());
        let flags_off = ((off / 8) as u16) | if more { 0x2000 } else { 0 };
        h[6..8].copy_from_slice(&flags_off.to_be_bytes());
        h[10..12].copy_from_slice(&[0, 0]);
        let c = fold(sum16(&h));
        h[10..12].copy_from_slice(&c.to_be_bytes());
        let mut fr = eth.to_vec();
        fr.extend_from_slice(&h);
        fr.extend_from_slice(chunk);
        out.push(fr);
    }
    out
}

/// Reassembles fragments (any order) into one frame, checking each fragment's header checksum
/// and that all agree on addresses, protocol and id.
pub fn reassemble(frags: &[Vec<u8>]) -> Vec<u8> {
    let mut parts: Vec<(usize, &[u8])> = Vec::new();
    let first = &frags[0];
    for f in frags {
        let ip = &f[14..34];
        assert_eq!(fold(sum16(ip)), 0, "fragment header checksum invalid");
        assert_eq!(&ip[12..20], &first[26..34], "fragments disagree on addresses");
        assert_eq!((ip[4], ip[5], ip[9]), (first[18], first[19], first[23]), "fragments disagree on id/protocol");
        let off = (u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff) as usize * 8;
        let tot = u16::from_be_bytes([ip[2], ip[3]]) as usize;
        parts.push((off, &f[34..14 + tot]));
    }
    parts.sort_by_key(|p| p.0);
    let mut data = Vec::new();
    for (off, p) in parts {
        assert_eq!(off, data.len(), "fragments leave a gap or overlap");
        data.extend_from_slice(p);
    }
    let mut h = first[14..34].to_vec();
    h[2..4].copy_from_slice(&((20 + data.len()) as u16).to_be_bytes());
    h[6..8].copy_from_slice(&[0, 0]);
    h[10..12].copy_from_slice(&[0, 0]);
    let c = fold(sum16(&h));
    h[10..12].copy_from_slice(&c.to_be_bytes());
    let mut out = first[..14].to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(&data);
    out
}

/// Builds an ICMP error from `src` to `dst` quoting `quote` (an IP packet's first bytes).
pub fn icmp_error(src: Ipv4Addr, dst: Ipv4Addr, kind: u8, code: u8, rest: [u8; 4], quote: &[u8]) -> Vec<u8> {
    let mut icmp = vec![kind, code, 0, 0];
    icmp.extend_from_slice(&rest);
    icmp.extend_from_slice(quote);
    let c = fold(sum16(&icmp));
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let mut ip = vec![0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((20 + icmp.len()) as u16).to_be_bytes());
    ip[8] = 64;
    ip[9] = 1;
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    let c = fold(sum16(&ip));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut f = Vec::new();
    f.extend_from_slice(&GW_MAC);
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&icmp);
    f
}

/// An ICMP error frame, checked: outer IP checksum, ICMP checksum over the whole message, the
/// quoted IP header's checksum (either header may carry options). Returns (outer source, outer
/// destination, the quote).
pub fn parse_icmp_checked(f: &[u8]) -> (Ipv4Addr, Ipv4Addr, Vec<u8>) {
    try_parse_icmp_checked(f).unwrap_or_else(|e| panic!("{e}"))
}

/// `parse_icmp_checked` that says what is wrong instead of panicking.
pub fn try_parse_icmp_checked(f: &[u8]) -> Result<(Ipv4Addr, Ipv4Addr, Vec<u8>), String> {
    let check = |ok: bool, what: String| if ok { Ok(()) } else { Err(what) };
    check(f.len() >= 34 && f[12..14] == [0x08, 0x00], "not IPv4".into())?;
    let ihl = (f[14] & 0x0f) as usize * 4;
    check(ihl >= 20 && f.len() >= 14 + ihl, format!("IHL {ihl}"))?;
    let ip = &f[14..14 + ihl];
    check(fold(sum16(ip)) == 0, "outer IPv4 header checksum invalid".into())?;
    check(ip[9] == 1, "not ICMP".into())?;
    let tot = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    check(tot >= ihl + 8 && 14 + tot <= f.len(), format!("IP total length {tot} for a frame of {}", f.len()))?;
    let icmp = &f[14 + ihl..14 + tot];
    check(fold(sum16(icmp)) == 0, "ICMP checksum invalid".into())?;
    let quote = icmp[8..].to_vec();
    check(!quote.is_empty(), "nothing quoted".into())?;
    let quoted_ihl = (quote[0] & 0x0f) as usize * 4;
    check(quoted_ihl >= 20 && quote.len() >= quoted_ihl, format!("quoted IHL {quoted_ihl}"))?;
    check(fold(sum16(&quote[..quoted_ihl])) == 0, "quoted IPv4 header checksum invalid".into())?;
    Ok((Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]), Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]), quote))
}

/// `f` with `n` 4-byte words of IP options (NOPs ending in End of Options) after its header,
/// which must have none yet.
pub fn with_ip_options(f: &[u8], n: usize) -> Vec<u8> {
    if n == 0 {
        return f.to_vec();
    }
    let mut out = f[..34].to_vec();
    let mut opts = vec![1u8; 4 * n];
    *opts.last_mut().unwrap() = 0;
    out.extend_from_slice(&opts);
    out.extend_from_slice(&f[34..]);
    out[14] = 0x45 + n as u8;
    let tot = u16::from_be_bytes([out[16], out[17]]) + 4 * n as u16;
    out[16..18].copy_from_slice(&tot.to_be_bytes());
    out[24..26].copy_from_slice(&[0, 0]);
    let c = fold(sum16(&out[14..34 + 4 * n]));
    out[24..26].copy_from_slice(&c.to_be_bytes());
    out
}
