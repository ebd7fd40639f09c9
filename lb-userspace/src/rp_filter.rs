//! The kernel's reverse-path filter, relaxed on the interfaces where it dropped what the
//! datapath handed the stack before replies were restored at egress: with `--relax-rp-filter`
//! only, since 2026-12-06 night (the default before).
//!
//! No longer needed by the datapath: since 2026-12-06 a backend's reply goes through the stack
//! as the backend sent it and is restored at tc egress, after the input route. What it still
//! lets through: the reply of a flow SNATed to the node that tc finds no route for (a policy
//! route, encapsulation) and so hands the stack translated. Before, a reply from a pod to a pod
//! that reached it through a ClusterIP left tc ingress on the backend's interface with the
//! ClusterIP as its source, and the stack then routed it (between
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
//! takes `all` to 0, after every other interface's own value (and `default`, which interfaces
//! made later start from) is raised to the old `all`: the mode in force elsewhere stays what
//! it was. Each attached interface is looked at again at every sync of the links: systemd's
//! udev rules apply `net.ipv4.conf.*.rp_filter` to a new interface as it appears, which may
//! come after the agent's write. Without `--relax-rp-filter` every setting is left alone. IPv6
//! has no such filter in the kernel's input path.
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
/// runs in a container whose own is read-only), and the interfaces whose errors were reported.
pub struct RpFilter {
    proc_sys: PathBuf,
    reported: BTreeSet<String>,
    /// `conf/all` could not be read, and that was reported.
    all_reported: bool,
}

impl RpFilter {
    pub fn new(proc_sys: &Path) -> Self {
        Self { proc_sys: proc_sys.to_owned(), reported: BTreeSet::new(), all_reported: false }
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

    /// Takes `conf/all` to 0, each other interface's own value and `default` first raised to
    /// the old `all` (but those in `off`, the attached ones without an address), so that the
    /// mode in force on them stays; the old `all`, if it was not 0. An interface whose value
    /// cannot be read or raised is reported in `errors` and does not hold the others back.
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
            if name == "all" || off.contains(name.as_str()) {
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
    /// address), all of them each time: a setting put back behind the agent's back is found
    /// at the next sync. An interface's error is returned once while it stays attached (a
    /// read-only `/proc/sys` is not reported at every sync); an unreadable interface met while
    /// lowering `all` is returned each time `all` is lowered.
    pub fn relax<'a>(&mut self, attached: impl IntoIterator<Item = (&'a str, bool)>) -> (Relaxed, Vec<RpFilterError>) {
        let (mut done, mut errors) = (Relaxed::default(), Vec::new());
        // Unreadable (no `/proc/sys` where `--proc-sys` says): nothing can be relaxed.
        let all = match self.read("all") {
            Ok(all) => all,
            Err(e) => {
                let first = !std::mem::replace(&mut self.all_reported, true);
                return (done, if first { vec![e] } else { Vec::new() });
            }
        };
        let mut off = BTreeSet::new();
        let mut seen = BTreeSet::new();
        for (iface, addressed) in attached {
            seen.insert(iface.to_owned());
            let result = self.read(iface).and_then(|own| {
                if addressed && own.max(all) == STRICT {
                    self.write(iface, LOOSE).map(|()| done.loose.push(iface.to_owned()))
                } else if !addressed && own != OFF {
                    self.write(iface, OFF).map(|()| done.off.push(iface.to_owned()))
                } else {
                    Ok(())
                }
            });
            match result {
                Ok(()) => {}
                // Gone meanwhile: nothing to relax.
                Err(RpFilterError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => {
                    if self.reported.insert(iface.to_owned()) {
                        errors.push(e);
                    }
                }
            }
            if !addressed {
                off.insert(iface);
            }
        }
        self.reported.retain(|i| seen.contains(i));
        // An interface without an address is filtered by `all` too, its own value 0 or not.
        if !off.is_empty() && all != OFF {
            match self.lower_all(&off, &mut errors) {
                Ok(was) => done.all_was = was,
                Err(e) => errors.push(e),
            }
        }
        (done, errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake `/proc/sys` with these modes, removed on drop (also when a test fails).
    struct Tree(PathBuf);

    impl Tree {
        fn new(tag: &str, modes: &[(&str, &str)]) -> Self {
            let root = std::env::temp_dir().join(format!("lb-rp-filter-{}-{tag}", std::process::id()));
            let _ = fs::remove_dir_all(&root);
            for (conf, mode) in modes {
                let dir = root.join("net/ipv4/conf").join(conf);
                fs::create_dir_all(&dir).unwrap();
                fs::write(dir.join("rp_filter"), format!("{mode}\n")).unwrap();
            }
            Self(root)
        }

        fn mode(&self, conf: &str) -> String {
            fs::read_to_string(self.0.join("net/ipv4/conf").join(conf).join("rp_filter")).unwrap().trim().to_string()
        }

        fn set(&self, conf: &str, mode: &str) {
            fs::write(self.0.join("net/ipv4/conf").join(conf).join("rp_filter"), format!("{mode}\n")).unwrap();
        }
    }

    impl Drop for Tree {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn strict_becomes_loose_where_addressed_and_off_where_not_keeping_every_other_mode() {
        let t = Tree::new(
            "relax",
            &[
                ("all", "1"),
                ("default", "0"),
                ("eth0", "0"),
                ("eth1", "0"),
                ("cbr0", "2"),
                ("lxc1", "1"),
                ("lxc2", "2"),
                ("bad", "x"),
            ],
        );
        let mut f = RpFilter::new(&t.0);
        let (done, errors) = f.relax([("eth0", true), ("cbr0", true), ("lxc1", false), ("gone", false), ("bad", true)]);
        // eth0's own 0 was strict in force (`all` 1): made loose.
        assert_eq!(done, Relaxed { loose: vec!["eth0".into()], off: vec!["lxc1".into()], all_was: Some(1) });
        // Unreadable: reported when looked at, and again when `all` was lowered around it.
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(errors.iter().all(|e| e.to_string().contains("bad/rp_filter")), "{errors:?}");
        let modes: Vec<String> =
            ["all", "default", "eth0", "eth1", "cbr0", "lxc1", "lxc2"].iter().map(|c| t.mode(c)).collect();
        // eth1 and lxc2, not attached here, keep the mode in force, and so do interfaces made
        // later: eth1's own and `default` raised to the old `all`, lxc2's above it already.
        assert_eq!(modes, ["0", "1", "2", "1", "2", "0", "2"]);
        // Every sync looks again (systemd may set a new interface's value after the agent);
        // an error is reported once while the interface stays.
        t.set("lxc1", "2");
        t.set("eth0", "1");
        let (done, errors) = f.relax([("eth0", true), ("lxc1", false), ("bad", true)]);
        assert_eq!(done, Relaxed { loose: vec!["eth0".into()], off: vec!["lxc1".into()], all_was: None });
        assert!(errors.is_empty(), "reported once: {errors:?}");
        // Gone and back: reported again.
        assert!(f.relax([("eth0", true)]).1.is_empty());
        assert_eq!(f.relax([("bad", true)]).1.len(), 1);
        // `all` at 0 already: an interface turned off touches nothing else.
        assert_eq!(f.relax([("lxc2", false)]).0, Relaxed { off: vec!["lxc2".into()], ..Default::default() });
        assert_eq!(t.mode("eth1"), "1");
    }

    #[test]
    fn off_and_loose_and_a_loose_all_are_left_alone_where_they_let_replies_through() {
        let t = Tree::new("keep", &[("all", "2"), ("eth0", "2"), ("cbr0", "0")]);
        let mut f = RpFilter::new(&t.0);
        let (done, errors) = f.relax([("eth0", true), ("cbr0", true)]);
        assert_eq!(done, Relaxed::default());
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!((t.mode("all"), t.mode("eth0"), t.mode("cbr0")), ("2".into(), "2".into(), "0".into()));
    }

    #[test]
    fn no_proc_sys_is_reported_once() {
        let mut f = RpFilter::new(Path::new("/nonexistent-proc-sys"));
        let (done, errors) = f.relax([("eth0", true)]);
        assert_eq!((done, errors.len()), (Relaxed::default(), 1));
        assert!(errors[0].to_string().contains("all/rp_filter"), "{}", errors[0]);
        assert!(f.relax([("eth0", true)]).1.is_empty());
    }
}
