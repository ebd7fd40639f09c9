//! The datapath's pre-filter (`LB_FILTER`, see `lb_common::MAP_FILTER`): a bit per frontend
//! (address, port, protocol) and per backend, hashed into two bitmaps, so a packet that is none
//! of ours costs two array loads and no hash lookup.
//!
//! Frontend bits are counted (several frontends may share one) and cleared when the last goes.
//! A node port stands for every node address of its family, so it sets a bit per such address
//! and follows the addresses as they change. An IPv6 address is folded to 32 bits first
//! (`lb_common::fold_v6`), as the datapath folds the packet's. Backend bits are never cleared: a connection to a backend that
//! left may live on for hours and its replies must still be translated; a stale bit only costs
//! the conntrack lookups a packet from there would have cost anyway.
use std::{
    collections::{BTreeSet, HashMap},
    net::IpAddr,
};

use aya::maps::{Array, MapData};
use lb_common::{filter_bit, FILTER_BACKENDS, FILTER_FRONTENDS, FILTER_WORDS, MAP_FILTER};

use super::{maps::filter_addr as be, DataplaneError, Result};
use crate::model::{Endpoint, Frontend, IpFamily, Protocol, Scope};

#[derive(Debug, Default)]
pub(super) struct Filter {
    /// Mirror of the map's words.
    words: Vec<u64>,
    /// Words changed since the last flush.
    dirty: BTreeSet<u32>,
    /// Frontend bit -> frontends (per node address, for node ports) hashing there.
    refs: HashMap<u32, u32>,
    /// The addresses node ports answer on (each on those of its family).
    node_addrs: Vec<IpAddr>,
}

impl Filter {
    /// Starts from what the map holds (an agent restarting keeps its predecessor's bits until
    /// the first full apply settles the frontend ones).
    pub(super) fn load(map: &Array<MapData, u64>) -> Self {
        let words = (0..2 * FILTER_WORDS).map(|i| map.get(&i, 0).unwrap_or(0)).collect();
        Self { words, ..Self::default() }
    }

    /// The (address, port, protocol) keys a frontend is reached by. A short-circuit companion
    /// has none of its own: the packet matched its external frontend's.
    fn keys(&self, f: &Frontend) -> Vec<(u32, u16, u8)> {
        let (port, proto) = (f.port.to_be(), f.protocol.number());
        match f.scope {
            Scope::ClusterIp | Scope::External => vec![(be(f.ip), port, proto)],
            Scope::NodePort => self
                .node_addrs
                .iter()
                .filter(|a| IpFamily::of(**a) == f.family())
                .map(|a| (be(*a), port, proto))
                .collect(),
            Scope::ExternalFromCluster | Scope::NodePortFromCluster => Vec::new(),
        }
    }

    fn set(&mut self, base: u32, bit: u32, on: bool) {
        let (w, mask) = (base + (bit >> 6), 1u64 << (bit & 63));
        let word = &mut self.words[w as usize];
        let next = if on { *word | mask } else { *word & !mask };
        if next != *word {
            *word = next;
            self.dirty.insert(w);
        }
    }

    fn add_key(&mut self, (addr, port, proto): (u32, u16, u8)) {
        let bit = filter_bit(addr, port, proto);
        *self.refs.entry(bit).or_default() += 1;
        self.set(FILTER_FRONTENDS, bit, true);
    }

    fn remove_key(&mut self, (addr, port, proto): (u32, u16, u8)) {
        let bit = filter_bit(addr, port, proto);
        let n = self.refs.entry(bit).or_default();
        *n = n.saturating_sub(1);
        if *n == 0 {
            self.refs.remove(&bit);
            self.set(FILTER_FRONTENDS, bit, false);
        }
    }

    pub(super) fn add_frontend(&mut self, f: &Frontend) {
        for k in self.keys(f) {
            self.add_key(k);
        }
    }

    pub(super) fn remove_frontend(&mut self, f: &Frontend) {
        for k in self.keys(f) {
            self.remove_key(k);
        }
    }

    pub(super) fn add_backend(&mut self, e: &Endpoint, protocol: Protocol) {
        self.set(FILTER_BACKENDS, filter_bit(be(e.ip), e.port.to_be(), protocol.number()), true);
    }

    /// Node ports follow the node's addresses.
    pub(super) fn set_node_addrs<'a>(
        &mut self,
        addrs: &[IpAddr],
        node_ports: impl Iterator<Item = &'a Frontend> + Clone,
    ) {
        for f in node_ports.clone() {
            self.remove_frontend(f);
        }
        self.node_addrs = addrs.to_vec();
        for f in node_ports {
            self.add_frontend(f);
        }
    }

    /// Recounts the frontend bits from scratch for exactly `frontends`, clearing every other
    /// (a previous agent's, say).
    pub(super) fn rebuild<'a>(&mut self, frontends: impl Iterator<Item = &'a Frontend>) {
        self.refs.clear();
        for w in FILTER_FRONTENDS..FILTER_FRONTENDS + FILTER_WORDS {
            if self.words[w as usize] != 0 {
                self.words[w as usize] = 0;
                self.dirty.insert(w);
            }
        }
        for f in frontends {
            self.add_frontend(f);
        }
    }

    /// Writes the changed words.
    pub(super) fn flush(&mut self, map: &mut Array<MapData, u64>) -> Result<()> {
        while let Some(w) = self.dirty.first().copied() {
            map.set(w, self.words[w as usize], 0).map_err(|source| DataplaneError::Map { name: MAP_FILTER, source })?;
            self.dirty.remove(&w);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::net::{Ipv4Addr, Ipv6Addr};

    fn has(f: &Filter, base: u32, addr: impl Into<IpAddr>, port: u16, proto: Protocol) -> bool {
        let bit = filter_bit(be(addr.into()), port.to_be(), proto.number());
        f.words[(base + (bit >> 6)) as usize] & (1 << (bit & 63)) != 0
    }

    #[test]
    fn frontend_bits_are_counted_and_node_ports_follow_the_addresses() {
        let mut f = Filter { words: vec![0; 2 * FILTER_WORDS as usize], ..Filter::default() };
        let vip = Ipv4Addr::new(10, 96, 0, 10);
        let a = Frontend::cluster_ip(vip, 80, Protocol::Tcp);
        f.add_frontend(&a);
        f.add_frontend(&a);
        f.remove_frontend(&a);
        assert!(has(&f, FILTER_FRONTENDS, vip, 80, Protocol::Tcp), "still referenced once");
        f.remove_frontend(&a);
        assert!(!has(&f, FILTER_FRONTENDS, vip, 80, Protocol::Tcp));
        assert!(!has(&f, FILTER_FRONTENDS, vip, 80, Protocol::Udp));

        let np = Frontend::node_port(30080, Protocol::Tcp);
        let (n1, n2): (IpAddr, IpAddr) = (Ipv4Addr::new(192, 168, 49, 2).into(), Ipv4Addr::new(192, 168, 49, 3).into());
        f.set_node_addrs(&[n1], [].iter());
        f.add_frontend(&np);
        assert!(has(&f, FILTER_FRONTENDS, n1, 30080, Protocol::Tcp));
        f.set_node_addrs(&[n2], [np].iter());
        assert!(!has(&f, FILTER_FRONTENDS, n1, 30080, Protocol::Tcp));
        assert!(has(&f, FILTER_FRONTENDS, n2, 30080, Protocol::Tcp));
        // Companions add nothing of their own.
        f.add_frontend(&np.from_cluster().unwrap());
        f.remove_frontend(&np);
        assert!(!has(&f, FILTER_FRONTENDS, n2, 30080, Protocol::Tcp));

        let e = Endpoint { ip: Ipv4Addr::new(10, 244, 1, 11).into(), port: 8080, local: true };
        f.add_backend(&e, Protocol::Tcp);
        assert!(has(&f, FILTER_BACKENDS, e.ip, 8080, Protocol::Tcp));
        f.rebuild([a].iter());
        assert!(has(&f, FILTER_FRONTENDS, vip, 80, Protocol::Tcp));
        assert!(has(&f, FILTER_BACKENDS, e.ip, 8080, Protocol::Tcp), "backend bits stay");
    }

    #[test]
    fn node_ports_of_each_family_take_that_familys_addresses() {
        let mut f = Filter { words: vec![0; 2 * FILTER_WORDS as usize], ..Filter::default() };
        let v4: IpAddr = Ipv4Addr::new(192, 168, 49, 2).into();
        let v6: IpAddr = "fd00:49::2".parse::<Ipv6Addr>().unwrap().into();
        f.set_node_addrs(&[v4, v6], [].iter());
        f.add_frontend(&Frontend::node_port_v6(30080, Protocol::Tcp));
        assert!(has(&f, FILTER_FRONTENDS, v6, 30080, Protocol::Tcp));
        assert!(!has(&f, FILTER_FRONTENDS, v4, 30080, Protocol::Tcp), "an IPv6 node port is not on IPv4 addresses");
        f.add_frontend(&Frontend::node_port(30081, Protocol::Tcp));
        assert!(has(&f, FILTER_FRONTENDS, v4, 30081, Protocol::Tcp));
        assert!(!has(&f, FILTER_FRONTENDS, v6, 30081, Protocol::Tcp));
        // An IPv6 ClusterIP and backend hash their folded address, as the datapath does.
        let vip: IpAddr = "fd00:96::10".parse::<Ipv6Addr>().unwrap().into();
        f.add_frontend(&Frontend::cluster_ip(vip, 80, Protocol::Tcp));
        let words = crate::dataplane::maps::addr_words(vip);
        let bit = filter_bit(lb_common::fold_v6(words), 80u16.to_be(), Protocol::Tcp.number());
        assert!(f.words[(FILTER_FRONTENDS + (bit >> 6)) as usize] & (1 << (bit & 63)) != 0);
    }
}
