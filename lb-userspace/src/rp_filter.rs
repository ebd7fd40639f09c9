//! The kernel's reverse-path filter, relaxed on the interfaces where it would drop what the
//! datapath hands the stack.
//!
//! A reply from a pod to a pod that reached it through a ClusterIP leaves tc ingress on the
//! backend's interface with the ClusterIP as its source, and the stack then routes it (between
//! pods of one bridge it is bridged instead, and never checked). Before routing it,
//! `fib_validate_source` (net/ipv4/fib_frontend.c) checks the source against the arrival
//! interface when `rp_filter` is on: strict mode (1, the RHEL family's default; Calico's on its
//! workload interfaces) wants the route back to the ClusterIP to leave through that interface,
//! and it never does (a ClusterIP has no route of its own; the default route leads out of the
//! node); loose mode (2, systemd's default) is content with any route back, but not on an
//! interface without an IPv4 address, which point-to-point CNIs give the host side of a pod's
//! veth (the check then ends in `last_resort`, which any mode but 0 refuses). Either way the
//! reply is dropped as a martian. kube-proxy never meets this: netfilter rewrites a reply's
//! source after the input route. Cilium turns the filter off on its devices and in `all`.
//!
//! So on each interface lb attaches tc to: strict becomes loose where the interface has an
//! IPv4 address, and an interface without one gets no filter (0). The mode in force is the
//! larger of `conf/all` and `conf/<interface>`, so turning one interface's filter off also
//! takes `all` to 0, after every other interface's own value is raised to the old `all`: the
//! mode in force elsewhere stays what it was. `lb run --keep-rp-filter` leaves every setting
//! alone. IPv6 has no such filter in the kernel's input path.
use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum RpFilterError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {text:?} is not a reverse-path filter mode")]
    Parse { path: PathBuf, text: String },
}

/// No filtering.
const OFF: u8 = 0;
/// Strict filtering: the route back through the arrival interface.
const STRICT: u8 = 1;
/// Loose filtering: some route back, through any interface.
const LOOSE: u8 = 2;

/// What was changed, for the log.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Relaxed {
    /// Interfaces whose filter was made loose.
    pub loose: Vec<String>,
    /// Interfaces whose filter was turned off.
    pub off: Vec<String>,
    /// `conf/all`'s old mode, when it was taken to 0 (and the other interfaces' own values
    /// raised to it).
    pub all_was: Option<u8>,
}

/// The `net.ipv4.conf.*.rp_filter` settings under a `/proc/sys` (the host's, when the agent
/// runs in a container whose own is read-only), and the interfaces already looked at.
pub struct RpFilter {
    proc_sys: PathBuf,
    seen: BTreeSet<String>,
}

impl RpFilter {
    pub fn new(proc_sys: &Path) -> Self {
        Self { proc_sys: proc_sys.to_owned(), seen: BTreeSet::new() }
    }

    fn conf_dir(&self) -> PathBuf {
        self.proc_sys.join("net/ipv4/conf")
    }

    fn read(&self, conf: &str) -> Result<u8, RpFilterError> {
        let path = self.conf_dir().join(conf).join("rp_filter");
        let text = fs::read_to_string(&path).map_err(|source| RpFilterError::Io { path: path.clone(), source })?;
        text.trim().parse().map_err(|_| RpFilterError::Parse { path, text })
    }

    fn write(&self, conf: &str, mode: u8) -> Result<(), RpFilterError> {
        let path = self.conf_dir().join(conf).join("rp_filter");
        fs::write(&path, format!("{mode}\n")).map_err(|source| RpFilterError::Io { path, source })
    }

    /// Takes `conf/all` to 0, each other interface's own value first raised to the old `all`
    /// (but those in `off`, the attached ones without an address), so that the mode in force
    /// on them stays; the old `all`, if it was not 0.
    /// An interface whose value cannot be read or raised is reported in `errors` and does not
    /// hold the others back.
    fn lower_all(&self, off: &BTreeSet<&str>, errors: &mut Vec<RpFilterError>) -> Result<Option<u8>, RpFilterError> {
        let all = self.read("all")?;
        if all == OFF {
            return Ok(None);
        }
        let dir = self.conf_dir();
        let entries = fs::read_dir(&dir).map_err(|source| RpFilterError::Io { path: dir.clone(), source })?;
        for entry in entries {
            let entry = entry.map_err(|source| RpFilterError::Io { path: dir.clone(), source })?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name == "all" || name == "default" || off.contains(name.as_str()) {
                continue;
            }
            match self.read(&name).and_then(|own| if own < all { self.write(&name, all) } else { Ok(()) }) {
                Ok(()) => {}
                // Gone since the listing.
                Err(RpFilterError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => errors.push(e),
            }
        }
        self.write("all", OFF)?;
        Ok(Some(all))
    }

    /// Relaxes the filter on the interfaces of `attached` (each with whether it has an IPv4
    /// address) not looked at before. Each is looked at once while attached, so a read-only
    /// `/proc/sys` is reported once per interface, not at every sync.
    pub fn relax<'a>(&mut self, attached: impl IntoIterator<Item = (&'a str, bool)>) -> (Relaxed, Vec<RpFilterError>) {
        let (mut done, mut errors) = (Relaxed::default(), Vec::new());
        let mut off = BTreeSet::new();
        for (iface, addressed) in attached {
            if self.seen.contains(iface) {
                continue;
            }
            let result = self.read(iface).and_then(|mode| {
                if addressed && mode == STRICT {
                    self.write(iface, LOOSE).map(|()| done.loose.push(iface.to_owned()))
                } else if !addressed && mode != OFF {
                    self.write(iface, OFF).map(|()| done.off.push(iface.to_owned()))
                } else {
                    Ok(())
                }
            });
            match result {
                Ok(()) => {}
                // Gone meanwhile: nothing to relax, and a new interface of that name is
                // another one.
                Err(RpFilterError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => errors.push(e),
            }
            if !addressed {
                off.insert(iface);
            }
            self.seen.insert(iface.to_owned());
        }
        // An interface without an address is filtered by `all` too, its own value 0 or not.
        if !off.is_empty() {
            match self.lower_all(&off, &mut errors) {
                Ok(was) => done.all_was = was,
                Err(e) => errors.push(e),
            }
        }
        (done, errors)
    }

    /// Whether every interface of `attached` was looked at already.
    pub fn knows_all(&self, attached: &BTreeSet<String>) -> bool {
        attached.is_subset(&self.seen)
    }

    /// Forgets interfaces no longer attached, so one that comes back (a pod's veth name
    /// reused) is looked at again.
    pub fn retain(&mut self, attached: &BTreeSet<String>) {
        self.seen.retain(|i| attached.contains(i));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(tag: &str, modes: &[(&str, &str)]) -> PathBuf {
        let root = std::env::temp_dir().join(format!("lb-rp-filter-{}-{tag}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        for (conf, mode) in modes {
            let dir = root.join("net/ipv4/conf").join(conf);
            fs::create_dir_all(&dir).unwrap();
            fs::write(dir.join("rp_filter"), format!("{mode}\n")).unwrap();
        }
        root
    }

    fn mode(root: &Path, conf: &str) -> String {
        fs::read_to_string(root.join("net/ipv4/conf").join(conf).join("rp_filter")).unwrap().trim().to_string()
    }

    #[test]
    fn strict_becomes_loose_where_addressed_and_off_where_not_keeping_every_other_mode() {
        let root = tree(
            "relax",
            &[
                ("all", "1"),
                ("default", "1"),
                ("eth0", "1"),
                ("eth1", "0"),
                ("cbr0", "2"),
                ("lxc1", "1"),
                ("lxc2", "2"),
                ("bad", "x"),
            ],
        );
        let mut f = RpFilter::new(&root);
        let (done, errors) = f.relax([("eth0", true), ("cbr0", true), ("lxc1", false), ("gone", false), ("bad", true)]);
        assert_eq!(done, Relaxed { loose: vec!["eth0".into()], off: vec!["lxc1".into()], all_was: Some(1) });
        // Unreadable: reported when looked at, and again when `all` was lowered around it.
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(errors.iter().all(|e| e.to_string().contains("bad/rp_filter")), "{errors:?}");
        let modes: Vec<String> =
            ["all", "default", "eth0", "eth1", "cbr0", "lxc1", "lxc2"].iter().map(|c| mode(&root, c)).collect();
        // eth1 and lxc2, not attached here, keep the mode in force: eth1's own raised to the
        // old `all`, lxc2's above it already; `default` (for interfaces to come) as it was.
        assert_eq!(modes, ["0", "1", "2", "1", "2", "0", "2"]);
        // Looked at once: reported once, and an interface set strict again behind the agent's
        // back is not read again until it has left and come back.
        assert!(f.relax([("bad", true)]).1.is_empty(), "reported once");
        fs::write(root.join("net/ipv4/conf/eth0/rp_filter"), "1\n").unwrap();
        assert_eq!(f.relax([("eth0", true)]).0, Relaxed::default());
        f.retain(&BTreeSet::new());
        assert_eq!(f.relax([("eth0", true)]).0.loose, ["eth0"]);
        // `all` at 0 already: an interface turned off touches nothing else.
        fs::write(root.join("net/ipv4/conf/lxc2/rp_filter"), "2\n").unwrap();
        assert_eq!(f.relax([("lxc2", false)]).0, Relaxed { off: vec!["lxc2".into()], ..Default::default() });
        assert_eq!(mode(&root, "eth1"), "1");
        let _ = fs::remove_dir_all(&root);
    }

    #[test]
    fn off_and_loose_and_a_loose_all_are_left_alone_where_they_let_replies_through() {
        let root = tree("keep", &[("all", "2"), ("eth0", "2"), ("cbr0", "0")]);
        let mut f = RpFilter::new(&root);
        assert_eq!(f.relax([("eth0", true), ("cbr0", true)]).0, Relaxed::default());
        assert_eq!(
            (mode(&root, "all"), mode(&root, "eth0"), mode(&root, "cbr0")),
            ("2".into(), "2".into(), "0".into())
        );
        let _ = fs::remove_dir_all(&root);
    }
}
