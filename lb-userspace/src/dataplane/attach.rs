//! Interfaces and node addresses: programs attached with pinned links (taken over from a
//! previous agent atomically), XDP where the driver can send, and the node's addresses for
//! node ports.
use std::{
    collections::{BTreeSet, HashMap as StdHashMap},
    fs,
    net::IpAddr,
    path::{Path, PathBuf},
};

use aya::programs::{
    links::{CgroupAttachMode, FdLink, PinnedLink},
    tc::{SchedClassifierLink, TcAttachType},
    xdp::XdpLink,
    CgroupSockAddr, SchedClassifier, Xdp, XdpMode,
};
use lb_common::{NodeAddrKey, MAP_NODE_ADDRS, PROGS_SOCK, PROG_TC_INGRESS, PROG_XDP};

use super::{
    maps::{addr_words, family_tag, insert_err, ip_of, local_source_key},
    sys::{error_chain, interfaces, link_kinds, local_addresses, node_port_address, LinkKind},
    Dataplane, DataplaneError, Result, XdpAttachMode, LINKS_DIR,
};
use crate::model::{Cidr, Frontend, Scope};

/// Whether the agent attaches to `name`: every interface but `lo` by default, else those
/// matching one of `globs` (`*` any run, `?` one character).
pub fn interface_wanted(globs: &[String], name: &str) -> bool {
    fn matches(p: &[u8], n: &[u8]) -> bool {
        match (p.first(), n.first()) {
            (None, None) => true,
            (Some(b'*'), _) => matches(&p[1..], n) || (!n.is_empty() && matches(p, &n[1..])),
            (Some(b'?'), Some(_)) => matches(&p[1..], &n[1..]),
            (Some(a), Some(b)) if a == b => matches(&p[1..], &n[1..]),
            _ => false,
        }
    }
    if globs.is_empty() {
        name != "lo"
    } else {
        globs.iter().any(|g| matches(g.as_bytes(), name.as_bytes()))
    }
}

/// Where a program is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Hook {
    Tc,
    /// Replies of host-network endpoints: the node's own packets pass no ingress hook.
    TcEgress,
    Xdp,
}

impl Hook {
    /// The program this hook runs on a device of `kind` (`sync_interfaces`' `wanted` says
    /// which hooks a kind gets: an L3 device's tc ingress and egress, not XDP).
    fn program(self, kind: LinkKind) -> &'static str {
        match (self, kind) {
            (Hook::Tc, LinkKind::L3) => lb_common::PROG_TC_INGRESS_L3,
            (Hook::TcEgress, LinkKind::L3) => lb_common::PROG_TC_EGRESS_L3,
            (Hook::Tc, _) => PROG_TC_INGRESS,
            (Hook::TcEgress, _) => lb_common::PROG_TC_EGRESS,
            (Hook::Xdp, _) => PROG_XDP,
        }
    }

    fn pin_prefix(self) -> &'static str {
        match self {
            Hook::Tc => "tc_ingress_",
            Hook::TcEgress => "tc_egress_",
            Hook::Xdp => "xdp_",
        }
    }
}

/// Whether `Auto` attaches native XDP on an interface: a driver that transmits native frames,
/// on a physical device (one with a bus address, as `ethtool -i` shows). Virtual devices (veth,
/// bridges, tunnels) are left to tc: a veth advertises `ndo-xmit` once its peer has GRO,
/// yet in this project's lab replies sent with native XDP_TX over such a veth were lost, and
/// a veth's packets are CHECKSUM_PARTIAL, which XDP leaves to tc anyway. Nor a device with
/// VLAN devices on top (`has_vlans`): most NICs strip the tag before XDP runs
/// (`rx-vlan-offload`), so a VLAN's frame reaches XDP looking like the parent's own, which XDP
/// would translate and send on without its tag (tc sees the stripped tag in the skb and leaves
/// the frame to the VLAN device). `--xdp-mode native` still forces it.
fn auto_native(name: &str, ifindex: Option<&u32>, can_transmit: &dyn Fn(u32) -> bool, has_vlans: bool) -> bool {
    if has_vlans {
        return false;
    }
    let physical = crate::xdp_features::driver_info(name).is_some_and(|(_, bus)| !bus.is_empty());
    physical && ifindex.is_some_and(|i| can_transmit(*i))
}

/// bpffs refuses names with a dot (`bpf_lookup` reserves them for its own files), and
/// interface names may have one (VLANs: `eth0.100`); `%` can never be in an interface name.
pub fn link_pin_name(iface: &str, hook: Hook) -> String {
    format!("{}{}", hook.pin_prefix(), iface.replace('.', "%"))
}

/// The first cgroup v2 mount (`/sys/fs/cgroup` on unified hosts, `/sys/fs/cgroup/unified` on
/// hybrid ones).
pub fn cgroup2_mount() -> Option<PathBuf> {
    let mounts = fs::read_to_string("/proc/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
    })
}

fn iface_of_link_pin(file: &str) -> Option<(String, Hook)> {
    [Hook::Tc, Hook::TcEgress, Hook::Xdp]
        .into_iter()
        .find_map(|h| file.strip_prefix(h.pin_prefix()).map(|i| (i.replace('%', "."), h)))
}

impl Dataplane {
    /// Makes `LB_NODE_ADDRS` hold exactly the addresses of this network namespace, of both
    /// families, that `cidrs` select (`model::node_port_address_selected`: every address of a
    /// family they name no CIDR of), except loopback and IPv6 link-local ones. Node ports
    /// answer on these, each on the addresses of its family.
    pub fn sync_node_addresses(&mut self, cidrs: &[Cidr]) -> Result<Vec<IpAddr>> {
        let want: Vec<IpAddr> = local_addresses()?
            .into_iter()
            .map(|(_, ip)| ip)
            .filter(|ip| node_port_address(*ip))
            .filter(|ip| crate::model::node_port_address_selected(cidrs, *ip))
            .collect();
        self.set_node_addresses(&want)
    }

    /// Makes `LB_LOCAL_SOURCES` hold exactly `cidrs` (either family): sources that are the
    /// cluster's own (its pod CIDRs, this node's), which an `externalTrafficPolicy: Local`
    /// frontend serves from cluster-wide endpoints.
    pub fn set_local_sources(&mut self, cidrs: &[Cidr]) -> Result<()> {
        let have: Vec<_> = self.maps.local_sources.keys().filter_map(|k| k.ok()).collect();
        let want: Vec<_> = cidrs.iter().map(local_source_key).collect();
        for k in have.iter().filter(|k| !want.iter().any(|w| w.prefix_len() == k.prefix_len() && w.data() == k.data()))
        {
            let _ = self.maps.local_sources.remove(k);
        }
        for (k, c) in want.iter().zip(cidrs) {
            self.maps.local_sources.insert(k, 1, 0).map_err(insert_err(
                self.sizes,
                lb_common::MAP_LOCAL_SOURCES,
                format!("cluster source {c}"),
            ))?;
        }
        Ok(())
    }

    /// Makes `LB_NODE_ADDRS` hold exactly `addrs` (either family); returns what it holds.
    pub fn set_node_addresses<A: Into<IpAddr> + Copy>(&mut self, addrs: &[A]) -> Result<Vec<IpAddr>> {
        let mut want: BTreeSet<IpAddr> = addrs.iter().map(|a| (*a).into()).collect();
        let key = |ip: &IpAddr| NodeAddrKey { addr: addr_words(*ip), family: family_tag(*ip), _pad: [0; 3] };
        let have: Vec<NodeAddrKey> = self.maps.node_addrs.keys().filter_map(|k| k.ok()).collect();
        for k in have {
            if !want.remove(&ip_of(k.family, k.addr)) {
                let _ = self.maps.node_addrs.remove(&k);
            }
        }
        // Node ports are found through these addresses: the datapath's copies of the node ports
        // it found on a removed one stand no more (also should an insert below fail; a lookup
        // that found nothing is never copied, so an added address needs no move).
        self.frontends_changed();
        for ip in &want {
            self.maps.node_addrs.insert(key(ip), 1, 0).map_err(insert_err(
                self.sizes,
                MAP_NODE_ADDRS,
                format!("node address {ip}"),
            ))?;
        }
        let now: Vec<IpAddr> =
            self.maps.node_addrs.keys().filter_map(|k| k.ok()).map(|k| ip_of(k.family, k.addr)).collect();
        let node_ports: Vec<Frontend> =
            self.programmed.keys().filter(|f| f.scope == Scope::NodePort).copied().collect();
        self.filter.set_node_addrs(&now, node_ports.iter());
        self.filter.flush(&mut self.maps.filter)?;
        Ok(now)
    }

    fn link_pin(&self, iface: &str, hook: Hook) -> PathBuf {
        self.pin_dir.join(LINKS_DIR).join(link_pin_name(iface, hook))
    }

    /// Attaches tc to every interface `tc_wanted` accepts and XDP to those `xdp_wanted`
    /// accepts, takes over links pinned by a previous agent (replacing their program
    /// atomically), and drops links of interfaces that went away or are no longer wanted.
    /// Returns the per-interface failures; the others stay attached. `Err` when the interfaces
    /// could not be listed or their link types read: then no link was attached, taken over or removed.
    pub fn sync_interfaces(
        &mut self,
        tc_wanted: &dyn Fn(&str) -> bool,
        xdp_wanted: &dyn Fn(&str) -> bool,
    ) -> Result<Vec<DataplaneError>> {
        let mut errors = Vec::new();
        let present: StdHashMap<String, u32> = interfaces()?.into_iter().collect();
        // A device without a link-layer header (a tunnel) gets programs that read the IP
        // header at the packet's start: at egress the one that restores replies leaving by
        // it, at ingress the one that gives Service traffic an Ethernet header and hands it to
        // the Ethernet program; no XDP (the Ethernet programs would misread its packets). A
        // device of another link layer gets nothing.
        let kinds = link_kinds(present.keys())?;
        for (name, kind) in &kinds {
            if let LinkKind::Other(ty) = kind {
                let text = format!("link type {ty} is neither Ethernet nor none (IP first): not attached");
                let k = (name.clone(), Hook::Tc);
                if tc_wanted(name) && self.attach_failures.get(&k) != Some(&text) {
                    tracing::warn!(iface = %name, arphrd = ty, "{text}");
                    self.attach_failures.insert(k, text);
                }
            }
        }
        let kind_of = |name: &str| kinds.get(name).copied().unwrap_or(LinkKind::Other(0));
        // Which devices take native XDP frames: the XDP program sends only to those, and `Auto`
        // attaches native XDP only on those. Without the netdev family (kernel < 6.3) none is
        // known to, so XDP leaves every packet it would send to tc.
        let features = match crate::xdp_features::all() {
            Ok(f) => f,
            Err(e) => {
                if self.attach_failures.insert((String::new(), Hook::Xdp), e.to_string()).is_none() {
                    tracing::warn!(error = %e, "cannot read the devices' XDP features; XDP sends nothing itself");
                }
                StdHashMap::new()
            }
        };
        let can_transmit =
            |ifindex: u32| features.get(&ifindex).copied().is_some_and(crate::xdp_features::can_transmit);
        self.sync_xdp_targets(present.values().copied().filter(|i| can_transmit(*i)).collect(), &mut errors);
        let vlan_parents = super::sys::vlan_parents();
        if self.xdp_mode == XdpAttachMode::Auto {
            for (name, ifindex) in &present {
                if !xdp_wanted(name) || kind_of(name) != LinkKind::Ethernet {
                    continue;
                }
                let has_vlans = vlan_parents.contains(name);
                let native = auto_native(name, Some(ifindex), &can_transmit, has_vlans);
                if self.xdp_choice.insert(name.clone(), native) != Some(native) {
                    if native {
                        tracing::info!(iface = %name, mode = "native", "XDP: the driver transmits native XDP frames");
                    } else if has_vlans {
                        tracing::info!(
                            iface = %name,
                            mode = "none (tc only)",
                            "XDP: VLAN devices on top, whose tags the NIC may strip before XDP runs; \
                             tc handles this interface alone (--xdp-mode native forces XDP)"
                        );
                    } else {
                        tracing::info!(
                            iface = %name,
                            mode = "none (tc only)",
                            features = features.get(ifindex).copied().unwrap_or(0),
                            "XDP: the driver does not transmit native XDP frames, or the device is virtual (a veth); \
                             tc handles this interface alone"
                        );
                    }
                }
            }
        }
        let auto = self.xdp_mode == XdpAttachMode::Auto;
        let wanted = |name: &str, hook: Hook| match (hook, kind_of(name)) {
            (_, LinkKind::Other(_)) | (Hook::Xdp, LinkKind::L3) => false,
            (Hook::Tc | Hook::TcEgress, _) => tc_wanted(name),
            (Hook::Xdp, LinkKind::Ethernet) => {
                xdp_wanted(name)
                    && (!auto || auto_native(name, present.get(name), &can_transmit, vlan_parents.contains(name)))
            }
        };
        // Links of interfaces that disappeared, were recreated under the same name, or are no
        // longer wanted.
        let stale: Vec<(String, Hook)> = self
            .attached
            .iter()
            .filter(|((name, hook), (idx, _))| present.get(name) != Some(idx) || !wanted(name, *hook))
            .map(|(k, _)| k.clone())
            .collect();
        for k in stale {
            if let Some((_, pinned)) = self.attached.remove(&k) {
                let _ = pinned.unpin();
                tracing::info!(iface = %k.0, hook = ?k.1, "link removed");
            }
        }
        // Failures of interfaces that went away are forgotten (a later interface of the same
        // name is reported afresh), so the records stay bounded by the interfaces present.
        self.attach_failures.retain(|(name, _), _| name.is_empty() || present.contains_key(name));
        self.xdp_choice.retain(|name, _| present.contains_key(name));
        for (name, ifindex) in &present {
            for hook in [Hook::Tc, Hook::TcEgress, Hook::Xdp] {
                let k = (name.clone(), hook);
                if !wanted(name, hook) || self.attached.contains_key(&k) {
                    continue;
                }
                match self.attach(name, hook, kind_of(name)) {
                    Ok(pinned) => {
                        if hook == Hook::Xdp && vlan_parents.contains(name) {
                            tracing::warn!(
                                iface = %name,
                                "XDP forced on an interface with VLAN devices on top: where the NIC strips \
                                 VLAN tags before XDP (rx-vlan-offload), their frames are served as this \
                                 interface's own and sent on untagged"
                            );
                        }
                        self.attach_failures.remove(&k);
                        self.attached.insert(k, (*ifindex, pinned));
                    }
                    Err(e) => {
                        let text = e.to_string();
                        if self.attach_failures.get(&k) != Some(&text) {
                            self.attach_failures.insert(k, text);
                            errors.push(e);
                        }
                    }
                }
            }
        }
        // Pins of links for interfaces no longer here or no longer wanted (a previous agent's).
        if let Ok(dir) = fs::read_dir(self.pin_dir.join(LINKS_DIR)) {
            for entry in dir.flatten() {
                let file = entry.file_name().to_string_lossy().into_owned();
                let Some((iface, hook)) = iface_of_link_pin(&file) else { continue };
                if !present.contains_key(&iface) || !wanted(&iface, hook) {
                    let _ = fs::remove_file(entry.path());
                }
            }
        }
        Ok(errors)
    }

    /// Makes `LB_XDP_TARGETS` hold exactly `want`.
    fn sync_xdp_targets(&mut self, want: BTreeSet<u32>, errors: &mut Vec<DataplaneError>) {
        for gone in self.xdp_targets.difference(&want).copied().collect::<Vec<_>>() {
            let _ = self.maps.xdp_targets.remove(&gone);
            self.xdp_targets.remove(&gone);
        }
        for new in want.difference(&self.xdp_targets).copied().collect::<Vec<_>>() {
            match self.maps.xdp_targets.insert(new, 1, 0) {
                Ok(()) => {
                    self.xdp_targets.insert(new);
                }
                Err(e) => errors.push(DataplaneError::Map { name: lb_common::MAP_XDP_TARGETS, source: e }),
            }
        }
    }

    fn attach(&mut self, iface: &str, hook: Hook, kind: LinkKind) -> Result<PinnedLink> {
        let pin = self.link_pin(iface, hook);
        let link_err = |what: &'static str| {
            let iface = iface.to_string();
            move |e: &(dyn std::error::Error + 'static)| DataplaneError::Link { iface, what, detail: error_chain(e) }
        };
        // A link pinned by an earlier agent: swap our program into it. bpf_link_update is
        // atomic, so no packet on the interface goes unprocessed during an upgrade.
        if pin.exists() {
            match self.take_over(&pin, hook, kind) {
                Ok(()) => {
                    // The pin already names this link; keep a handle by opening it again.
                    let pinned = PinnedLink::from_pin(&pin).map_err(|e| link_err("reopening pinned link")(&e))?;
                    tracing::info!(iface, ?hook, "took over pinned link");
                    return Ok(pinned);
                }
                Err(e) => {
                    // Typically the interface was recreated and the old link is defunct.
                    tracing::warn!(iface, ?hook, error = %e, "could not take over pinned link; attaching anew");
                    let _ = fs::remove_file(&pin);
                }
            }
        }
        let fd = match hook {
            Hook::Tc | Hook::TcEgress => {
                let prog: &mut SchedClassifier =
                    self.ebpf.program_mut(hook.program(kind)).expect("loaded in Dataplane::load").try_into()?;
                let at = if hook == Hook::Tc { TcAttachType::Ingress } else { TcAttachType::Egress };
                let id = prog.attach(iface, at)?;
                FdLink::try_from(prog.take_link(id)?)
                    .map_err(|e| link_err("tc link is not a TCX link (kernel < 6.6?)")(&e))?
            }
            Hook::Xdp => {
                let mode = self.xdp_mode;
                let prog: &mut Xdp = self.ebpf.program_mut(PROG_XDP).expect("loaded in Dataplane::load").try_into()?;
                let id = match mode {
                    XdpAttachMode::Generic => prog.attach(iface, XdpMode::Skb)?,
                    // Auto only gets here for a driver that transmits native frames.
                    XdpAttachMode::Native | XdpAttachMode::Auto => prog.attach(iface, XdpMode::Driver)?,
                };
                FdLink::try_from(prog.take_link(id)?).map_err(|e| link_err("XDP link is not a bpf_link")(&e))?
            }
        };
        let pinned = fd.pin(&pin).map_err(|e| link_err("pinning link")(&e))?;
        tracing::info!(iface, ?hook, ?kind, "attached");
        Ok(pinned)
    }

    /// Attaches the socket-level programs (for the node's own processes) to the cgroup v2
    /// hierarchy at `cgroup`, replacing those a previous agent pinned. They act only in this
    /// network namespace (its cookie is patched in at load time).
    pub fn attach_socket_lb(&mut self, cgroup: &Path) -> Result<()> {
        let io = |what, source| DataplaneError::Io { what, path: cgroup.to_owned(), source };
        let dir = fs::File::open(cgroup).map_err(|e| io("opening cgroup", e))?;
        for name in PROGS_SOCK {
            let link_err = |what: &'static str| {
                move |e: &(dyn std::error::Error + 'static)| DataplaneError::Link {
                    iface: format!("cgroup {}", cgroup.display()),
                    what,
                    detail: format!("{name}: {}", error_chain(e)),
                }
            };
            let prog: &mut CgroupSockAddr = self.ebpf.program_mut(name).expect("loaded").try_into()?;
            // A cgroup bpf_link always coexists with other programs; the kernel refuses the
            // BPF_F_ALLOW_MULTI flag on BPF_LINK_CREATE (EINVAL), so no mode flag is passed.
            let id = prog.attach(&dir, CgroupAttachMode::Single)?;
            let fd = FdLink::try_from(prog.take_link(id)?).map_err(|e| link_err("cgroup link")(&e))?;
            // Pin beside the previous agent's link, then rename over it: the old program is
            // detached only once ours runs (both running is harmless: the second sees a backend
            // address, which is no frontend).
            let pin = self.pin_dir.join(LINKS_DIR).join(name);
            let fresh = self.pin_dir.join(LINKS_DIR).join(format!("{name}_new"));
            let _ = fs::remove_file(&fresh);
            let pinned = fd.pin(&fresh).map_err(|e| link_err("pinning link")(&e))?;
            fs::rename(&fresh, &pin).map_err(|e| io("replacing pinned cgroup link", e))?;
            drop(pinned);
        }
        tracing::info!(cgroup = %cgroup.display(), "socket-level translation attached for this node's processes");
        Ok(())
    }

    /// Replaces the program of a link pinned at `pin` with ours.
    fn take_over(
        &mut self,
        pin: &Path,
        hook: Hook,
        kind: LinkKind,
    ) -> std::result::Result<(), Box<dyn std::error::Error>> {
        let fd = FdLink::from(PinnedLink::from_pin(pin)?);
        match hook {
            Hook::Tc | Hook::TcEgress => {
                let prog: &mut SchedClassifier =
                    self.ebpf.program_mut(hook.program(kind)).expect("loaded").try_into()?;
                let id = prog.attach_to_link(SchedClassifierLink::try_from(fd)?)?;
                // Our handle closes; the pin keeps the link (and our program in it).
                drop(prog.take_link(id)?);
            }
            Hook::Xdp => {
                let prog: &mut Xdp = self.ebpf.program_mut(PROG_XDP).expect("loaded").try_into()?;
                let id = prog.attach_to_link(XdpLink::try_from(fd)?)?;
                drop(prog.take_link(id)?);
            }
        }
        Ok(())
    }

    /// The interfaces whose tc ingress carries the program.
    pub fn tc_interfaces(&self) -> std::collections::BTreeSet<String> {
        self.attached.keys().filter(|(_, hook)| *hook == Hook::Tc).map(|(name, _)| name.clone()).collect()
    }

    pub fn attached_interfaces(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .attached
            .keys()
            .map(|(name, hook)| match hook {
                Hook::Tc => format!("{name}(tc)"),
                Hook::TcEgress => format!("{name}(tc-egress)"),
                Hook::Xdp => format!("{name}(xdp)"),
            })
            .collect();
        v.sort();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_selection() {
        let none: Vec<String> = vec![];
        assert!(interface_wanted(&none, "eth0"));
        assert!(!interface_wanted(&none, "lo"));
        let globs = vec!["veth*".to_string(), "eth?".to_string()];
        assert!(interface_wanted(&globs, "veth1a2b"));
        assert!(interface_wanted(&globs, "eth1"));
        assert!(!interface_wanted(&globs, "eth10"));
        assert!(!interface_wanted(&globs, "cbr0"));
        assert!(!interface_wanted(&globs, "lo"));
    }

    #[test]
    fn link_pin_names_survive_dotted_interface_names() {
        assert_eq!(link_pin_name("eth0.100", Hook::Tc), "tc_ingress_eth0%100");
        assert_eq!(iface_of_link_pin(&link_pin_name("eth0.100", Hook::Tc)), Some(("eth0.100".to_string(), Hook::Tc)));
        assert_eq!(iface_of_link_pin(&link_pin_name("eth0", Hook::Xdp)), Some(("eth0".to_string(), Hook::Xdp)));
        assert_eq!(iface_of_link_pin("maps.debug"), None);
    }
}
