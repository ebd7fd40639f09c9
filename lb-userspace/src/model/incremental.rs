//! The translation kept up to date change by change, as kube-proxy's change trackers and
//! endpoint slice cache do: objects are recorded by name as they arrive, and a sync
//! translates only the Services that changed (or whose slices did), then settles frontend
//! claims among the Services those touch. A Node change, or a periodic resync, recomputes
//! everything; the result always equals [`super::translate`] over the same objects.
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

use super::{
    endpoints::{slice_spec, SliceSpec},
    object_name,
    service::{service_spec, ServiceSpec},
    translate::{resolve, service_output, Claim, Lost, ServiceOutput},
    DesiredState, Frontend, NodeInfo, TranslateError,
};

/// A Service as last seen: its resource version (to skip unchanged relisted copies) and what
/// validating it gave.
struct ServiceEntry {
    version: Option<String>,
    spec: Result<Option<ServiceSpec>, TranslateError>,
}

struct SliceEntry {
    version: Option<String>,
    spec: Option<SliceSpec>,
}

/// What one sync changed in [`Translator::state`].
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Frontends added, updated or removed.
    pub frontends: BTreeSet<Frontend>,
    /// The health check node ports or their counts changed.
    pub health_checks: bool,
    /// Services translated again.
    pub services: usize,
    /// Services whose result may have changed (translated again, or their claims settled
    /// again): their errors are worth reading again.
    pub touched: BTreeSet<String>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.frontends.is_empty() && !self.health_checks
    }
}

/// Services and EndpointSlices by name, and the desired state they translate to.
pub struct Translator {
    node: NodeInfo,
    services: HashMap<String, ServiceEntry>,
    /// By `namespace/name` of the slice.
    slices: HashMap<String, SliceEntry>,
    /// Service -> its slices (slice names in order).
    slices_of: HashMap<String, BTreeSet<String>>,
    /// Per valid Service, what it asks for.
    outputs: HashMap<String, ServiceOutput>,
    /// Who asks for each claim.
    claims: HashMap<Claim, BTreeSet<String>>,
    /// What Services lost to other ones' claims (only those that lost something).
    conflicts: HashMap<String, Lost>,
    /// Services that are not valid.
    invalid: HashSet<String>,
    state: DesiredState,
    /// Services to translate again at the next sync.
    dirty: BTreeSet<String>,
    /// Everything is translated again at the next sync (the Node changed).
    all_dirty: bool,
    /// Changes recorded since the last sync (kube-proxy's `*_changes_pending`).
    pub pending_service_changes: usize,
    pub pending_endpoint_changes: usize,
}

fn key(ns: Option<&String>, name: Option<&String>) -> String {
    object_name(ns, name)
}

impl Translator {
    pub fn new(node: NodeInfo) -> Self {
        Self {
            node,
            services: HashMap::new(),
            slices: HashMap::new(),
            slices_of: HashMap::new(),
            outputs: HashMap::new(),
            claims: HashMap::new(),
            conflicts: HashMap::new(),
            invalid: HashSet::new(),
            state: DesiredState::default(),
            dirty: BTreeSet::new(),
            all_dirty: false,
            pending_service_changes: 0,
            pending_endpoint_changes: 0,
        }
    }

    /// The desired state as of the last sync.
    pub fn state(&self) -> &DesiredState {
        &self.state
    }

    pub fn node(&self) -> &NodeInfo {
        &self.node
    }

    /// Whether changes wait for a sync.
    pub fn has_pending(&self) -> bool {
        self.all_dirty || !self.dirty.is_empty()
    }

    /// Everything left out as of the last sync, sorted.
    pub fn errors(&self) -> Vec<TranslateError> {
        let mut out: Vec<TranslateError> = Vec::new();
        for e in self.services.values() {
            if let Err(err) = &e.spec {
                out.push(err.clone());
            }
        }
        for o in self.outputs.values() {
            out.extend(o.notes.iter().cloned());
        }
        for s in self.slices.values().filter_map(|s| s.spec.as_ref()) {
            out.extend(s.skipped.iter().cloned());
        }
        out.extend(self.conflicts.values().flat_map(|l| l.errors.iter().cloned()));
        out.sort();
        out
    }

    /// What is left out of Service `name` (whole or in part), including its slices' skipped
    /// ports and endpoints.
    pub fn errors_of(&self, name: &str) -> Vec<TranslateError> {
        let mut out = Vec::new();
        if let Some(Err(e)) = self.services.get(name).map(|e| &e.spec) {
            out.push(e.clone());
        }
        if let Some(o) = self.outputs.get(name) {
            out.extend(o.notes.iter().cloned());
        }
        out.extend(self.conflicts.get(name).into_iter().flat_map(|l| l.errors.iter().cloned()));
        for s in self.slices_of.get(name).into_iter().flatten() {
            if let Some(spec) = self.slices.get(s).and_then(|e| e.spec.as_ref()) {
                out.extend(spec.skipped.iter().cloned());
            }
        }
        out.sort();
        out
    }

    /// Whether Service `name` asks for frontends and other Services hold every one of them.
    pub fn crowded_out(&self, name: &str) -> bool {
        match (self.outputs.get(name), self.conflicts.get(name)) {
            (Some(o), Some(lost)) => {
                !o.entries.is_empty() && o.kept(Some(lost)).next().is_none() && o.kept_health(Some(lost)).is_none()
            }
            _ => false,
        }
    }

    /// How many Services are left out as a whole: invalid ones, and valid ones that lost every
    /// frontend they ask for to other Services.
    pub fn rejected_count(&self) -> usize {
        let crowded_out = self.conflicts.keys().filter(|name| self.crowded_out(name)).count();
        self.invalid.len() + crowded_out
    }

    /// Ports with a Local policy and no endpoint on this node: (internal, external).
    pub fn no_local_endpoints(&self) -> (usize, usize) {
        self.outputs.values().fold((0, 0), |(i, e), o| (i + o.no_local.0, e + o.no_local.1))
    }

    pub fn set_node(&mut self, node: NodeInfo) {
        if node != self.node {
            self.node = node;
            self.all_dirty = true;
        }
    }

    /// Records a created or updated Service.
    pub fn upsert_service(&mut self, svc: &Service) {
        let name = key(svc.metadata.namespace.as_ref(), svc.metadata.name.as_ref());
        let version = svc.metadata.resource_version.clone();
        if let Some(e) = self.services.get(&name) {
            if version.is_some() && e.version == version {
                return;
            }
        }
        self.pending_service_changes += 1;
        let spec = service_spec(svc);
        if self.services.get(&name).is_some_and(|e| e.spec == spec) {
            self.services.get_mut(&name).expect("checked").version = version;
            return;
        }
        if spec.is_err() {
            self.invalid.insert(name.clone());
        } else {
            self.invalid.remove(&name);
        }
        self.services.insert(name.clone(), ServiceEntry { version, spec });
        self.dirty.insert(name);
    }

    pub fn delete_service(&mut self, namespace: Option<&String>, name: Option<&String>) {
        let name = key(namespace, name);
        if self.services.remove(&name).is_some() {
            self.invalid.remove(&name);
            self.pending_service_changes += 1;
            self.dirty.insert(name);
        }
    }

    /// Records a created or updated EndpointSlice.
    pub fn upsert_slice(&mut self, slice: &EndpointSlice) {
        let name = key(slice.metadata.namespace.as_ref(), slice.metadata.name.as_ref());
        let version = slice.metadata.resource_version.clone();
        if let Some(e) = self.slices.get(&name) {
            if version.is_some() && e.version == version {
                return;
            }
        }
        let spec = slice_spec(slice, &self.node.name);
        let old = self.slices.insert(name.clone(), SliceEntry { version, spec });
        let old_spec = old.and_then(|o| o.spec);
        let new_service = self.slices[&name].spec.as_ref().map(|s| s.service.clone());
        if old_spec.as_ref() == self.slices[&name].spec.as_ref() {
            return;
        }
        self.pending_endpoint_changes += 1;
        if let Some(o) = &old_spec {
            self.unlink_slice(&o.service, &name);
        }
        if let Some(service) = new_service {
            self.slices_of.entry(service.clone()).or_default().insert(name);
            self.dirty.insert(service);
        }
    }

    pub fn delete_slice(&mut self, namespace: Option<&String>, name: Option<&String>) {
        let name = key(namespace, name);
        if let Some(spec) = self.slices.remove(&name).and_then(|e| e.spec) {
            self.pending_endpoint_changes += 1;
            self.unlink_slice(&spec.service, &name);
        }
    }

    fn unlink_slice(&mut self, service: &str, slice: &str) {
        if let Some(set) = self.slices_of.get_mut(service) {
            set.remove(slice);
            if set.is_empty() {
                self.slices_of.remove(service);
            }
        }
        self.dirty.insert(service.to_string());
    }

    /// Replaces every Service with `list` (a relist): new and changed ones are recorded, and
    /// those no longer listed are deleted.
    pub fn relist_services<'a>(&mut self, list: impl IntoIterator<Item = &'a Service>) {
        let mut listed = HashSet::new();
        for svc in list {
            listed.insert(key(svc.metadata.namespace.as_ref(), svc.metadata.name.as_ref()));
            self.upsert_service(svc);
        }
        let gone: Vec<String> = self.services.keys().filter(|k| !listed.contains(*k)).cloned().collect();
        for name in gone {
            self.services.remove(&name);
            self.invalid.remove(&name);
            self.pending_service_changes += 1;
            self.dirty.insert(name);
        }
    }

    /// Replaces every EndpointSlice with `list` (a relist).
    pub fn relist_slices<'a>(&mut self, list: impl IntoIterator<Item = &'a EndpointSlice>) {
        let mut listed = HashSet::new();
        for s in list {
            listed.insert(key(s.metadata.namespace.as_ref(), s.metadata.name.as_ref()));
            self.upsert_slice(s);
        }
        let gone: Vec<String> = self.slices.keys().filter(|k| !listed.contains(*k)).cloned().collect();
        for name in gone {
            if let Some(spec) = self.slices.remove(&name).and_then(|e| e.spec) {
                self.pending_endpoint_changes += 1;
                self.unlink_slice(&spec.service, &name);
            }
        }
    }

    fn output_of(&self, name: &str) -> Option<ServiceOutput> {
        let spec = self.services.get(name)?.spec.as_ref().ok()?.as_ref()?;
        let slices: Vec<&SliceSpec> =
            self.slices_of.get(name).into_iter().flatten().filter_map(|s| self.slices.get(s)?.spec.as_ref()).collect();
        Some(service_output(spec, &slices, &self.node))
    }

    /// Takes a Service's frontends and health check out of the state, remembering what was
    /// there.
    fn withdraw(&mut self, name: &str, before: &mut BTreeMap<Frontend, Option<crate::model::ServicePort>>) {
        let Some(out) = self.outputs.get(name) else { return };
        let lost = self.conflicts.get(name);
        for (f, _) in out.kept(lost) {
            let old = self.state.services.remove(f);
            before.entry(*f).or_insert(old);
        }
        if let Some((port, _)) = out.kept_health(lost) {
            self.state.health_checks.remove(port);
        }
    }

    fn publish(&mut self, name: &str, before: &mut BTreeMap<Frontend, Option<crate::model::ServicePort>>) {
        let Some(out) = self.outputs.get(name) else { return };
        let lost = self.conflicts.get(name);
        for (f, sp) in out.kept(lost) {
            before.entry(*f).or_insert_with(|| self.state.services.get(f).cloned());
            self.state.services.insert(*f, sp.clone());
        }
        if let Some((port, hc)) = out.kept_health(lost) {
            self.state.health_checks.insert(*port, hc.clone());
        }
    }

    /// Translates what changed since the last sync and updates [`Translator::state`].
    pub fn sync(&mut self) -> Changes {
        self.pending_service_changes = 0;
        self.pending_endpoint_changes = 0;
        // Most of everything changed (a first list, a relist after a long outage): one pass
        // over all Services costs less than settling claims change by change.
        let most = self.dirty.len() > 1_000 && self.dirty.len() * 2 > self.services.len();
        if std::mem::take(&mut self.all_dirty) || most {
            self.dirty.clear();
            return self.rebuild();
        }
        let dirty = std::mem::take(&mut self.dirty);
        let mut changes = Changes { services: dirty.len(), touched: dirty.clone(), ..Default::default() };
        let health_before = self.state.health_checks.clone();
        let mut before: BTreeMap<Frontend, Option<crate::model::ServicePort>> = BTreeMap::new();
        // Services whose claims changed: they and every Service sharing a claim with them
        // (before or after) are settled again together.
        let mut seeds: BTreeSet<Claim> = BTreeSet::new();
        let mut moved: BTreeSet<String> = BTreeSet::new();
        for name in dirty {
            let new = self.output_of(&name);
            let old_frontends: Option<Vec<Frontend>> =
                self.outputs.get(&name).map(|o| o.entries.iter().map(|(f, _)| *f).collect());
            let new_frontends: Option<Vec<Frontend>> =
                new.as_ref().map(|o| o.entries.iter().map(|(f, _)| *f).collect());
            let old_health = self.outputs.get(&name).and_then(|o| o.health.as_ref().map(|h| h.0));
            let new_health = new.as_ref().and_then(|o| o.health.as_ref().map(|h| h.0));
            if old_frontends == new_frontends && old_health == new_health {
                // Same claims, so who wins is unchanged: only values move (on the claims the
                // Service holds; withdraw and publish leave the ones it lost alone).
                match new {
                    Some(o) => {
                        self.withdraw(&name, &mut before);
                        self.outputs.insert(name.clone(), o);
                        self.publish(&name, &mut before);
                    }
                    None => {
                        self.outputs.remove(&name);
                    }
                }
                continue;
            }
            if let Some(old) = self.outputs.get(&name) {
                for c in old.claims() {
                    seeds.insert(c);
                    if let Some(set) = self.claims.get_mut(&c) {
                        set.remove(&name);
                        if set.is_empty() {
                            self.claims.remove(&c);
                        }
                    }
                }
            }
            // The old frontends leave the state now; the settling below puts back what wins.
            self.withdraw(&name, &mut before);
            self.conflicts.remove(&name);
            match new {
                Some(o) => {
                    for c in o.claims() {
                        seeds.insert(c);
                        self.claims.entry(c).or_default().insert(name.clone());
                    }
                    self.outputs.insert(name.clone(), o);
                    moved.insert(name);
                }
                None => {
                    self.outputs.remove(&name);
                }
            }
        }
        if !seeds.is_empty() || !moved.is_empty() {
            let group = self.group(seeds, moved);
            for name in &group {
                self.withdraw(name, &mut before);
            }
            self.settle(&group, &mut before);
            changes.touched.extend(group);
        }
        for (f, old) in before {
            if self.state.services.get(&f) != old.as_ref() {
                changes.frontends.insert(f);
            }
        }
        changes.health_checks = self.state.health_checks != health_before;
        changes
    }

    /// Every Service connected to the `seeds` claims (or to `members`) through shared claims.
    fn group(&self, seeds: BTreeSet<Claim>, members: BTreeSet<String>) -> BTreeSet<String> {
        let mut group: BTreeSet<String> = BTreeSet::new();
        let mut claims: Vec<Claim> = seeds.into_iter().collect();
        let mut seen_claims: HashSet<Claim> = claims.iter().copied().collect();
        let mut queue: Vec<String> = members.into_iter().collect();
        loop {
            while let Some(c) = claims.pop() {
                for s in self.claims.get(&c).into_iter().flatten() {
                    if !group.contains(s) {
                        queue.push(s.clone());
                    }
                }
            }
            let Some(s) = queue.pop() else { break };
            if !group.insert(s.clone()) {
                continue;
            }
            if let Some(o) = self.outputs.get(&s) {
                for c in o.claims() {
                    if seen_claims.insert(c) {
                        claims.push(c);
                    }
                }
            }
        }
        group
    }

    /// Decides which Services of `group` (withdrawn from the state) win their claims, and
    /// publishes the winners.
    fn settle(&mut self, group: &BTreeSet<String>, before: &mut BTreeMap<Frontend, Option<crate::model::ServicePort>>) {
        let ordered: Vec<(&str, &ServiceOutput)> =
            group.iter().filter_map(|n| Some((n.as_str(), self.outputs.get(n)?))).collect();
        let lost: Vec<(String, Lost)> = resolve(&ordered).into_iter().map(|(n, l)| (n.to_string(), l)).collect();
        for name in group {
            self.conflicts.remove(name);
        }
        self.conflicts.extend(lost);
        for name in group {
            self.publish(name, before);
        }
    }

    /// Translates every Service again (a Node change, or a periodic resync).
    pub fn rebuild(&mut self) -> Changes {
        let names: Vec<String> = self.services.keys().cloned().collect();
        let mut outputs = HashMap::new();
        for name in &names {
            if let Some(o) = self.output_of(name) {
                outputs.insert(name.clone(), o);
            }
        }
        self.outputs = outputs;
        self.claims.clear();
        for (name, o) in &self.outputs {
            for c in o.claims() {
                self.claims.entry(c).or_default().insert(name.clone());
            }
        }
        let old = std::mem::take(&mut self.state);
        self.conflicts.clear();
        let mut sorted: Vec<&String> = self.outputs.keys().collect();
        sorted.sort();
        let ordered: Vec<(&str, &ServiceOutput)> = sorted.iter().map(|n| (n.as_str(), &self.outputs[*n])).collect();
        let lost: Vec<(String, Lost)> = resolve(&ordered).into_iter().map(|(n, l)| (n.to_string(), l)).collect();
        self.conflicts.extend(lost);
        let mut state = DesiredState::default();
        for (name, o) in &self.outputs {
            let lost = self.conflicts.get(name);
            state.services.extend(o.kept(lost).cloned());
            if let Some((port, hc)) = o.kept_health(lost) {
                state.health_checks.insert(*port, hc.clone());
            }
        }
        let mut changes = Changes { services: self.outputs.len(), ..Default::default() };
        changes.touched = self.services.keys().chain(self.slices_of.keys()).cloned().collect();
        for (f, sp) in &state.services {
            if old.services.get(f) != Some(sp) {
                changes.frontends.insert(*f);
            }
        }
        for f in old.services.keys() {
            if !state.services.contains_key(f) {
                changes.frontends.insert(*f);
            }
        }
        changes.health_checks = state.health_checks != old.health_checks;
        self.state = state;
        changes
    }
}
