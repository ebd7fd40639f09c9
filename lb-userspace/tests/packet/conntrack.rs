//! Connection tracking through the real programs: netfilter's TCP states in both directions,
//! the move between the new-flow table and the assured table, lifetimes per state, port reuse, and a
//! flood of new flows against established ones.
use super::*;
use lb_common::{
    ct_tag, CtKey4, CtValue4, CT_CLOSE, CT_CLOSE_WAIT, CT_DIR_FORWARD, CT_DIR_REPLY, CT_ESTABLISHED, CT_FIN_WAIT,
    CT_FLAG_ASSURED, CT_FLAG_REPLIED, CT_FLAG_SNAT, CT_LAST_ACK, CT_SYN_RECV, CT_SYN_SENT, CT_TIME_WAIT, PROTO_TCP,
};

const FIN_ACK: u8 = 0x11;
const RST: u8 = 0x04;

fn be(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

fn ct_key(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), dir: u8) -> CtKey4 {
    CtKey4 {
        src: be(src.0),
        dst: be(dst.0),
        sport: src.1.to_be(),
        dport: dst.1.to_be(),
        proto: PROTO_TCP,
        dir,
        _pad: 0,
    }
}

/// Both entries of the flow `client -> VIP:80` translated to `backend`: (forward, reply), each
/// with whether it is in the assured table. Panics if a key is in both tables.
fn flow(h: &Harness, client: (Ipv4Addr, u16), backend: (Ipv4Addr, u16)) -> [Option<(CtValue4, bool)>; 2] {
    let m = h.dp.maps();
    [ct_key(client, (VIP, 80), CT_DIR_FORWARD), ct_key(backend, client, CT_DIR_REPLY)].map(|k| {
        let assured = m.conntrack.get(&k, 0).ok();
        let new = m.conntrack_new.get(&k, 0).ok();
        assert!(!(assured.is_some() && new.is_some()), "{k:?} in both tables");
        assured.map(|v| (v, true)).or(new.map(|v| (v, false)))
    })
}

/// Asserts the state and table of both entries.
#[track_caller]
fn expect(h: &Harness, client: (Ipv4Addr, u16), backend: (Ipv4Addr, u16), state: u8, assured: bool) {
    for (i, e) in flow(h, client, backend).into_iter().enumerate() {
        let (v, in_assured) = e.unwrap_or_else(|| panic!("entry {i} missing"));
        assert_eq!(
            (lb_common::ct_state_name(v.state), in_assured),
            (lb_common::ct_state_name(state), assured),
            "entry {i} ({})",
            if i == 0 { "forward" } else { "reply" }
        );
        assert_eq!(v.flags & CT_FLAG_ASSURED != 0, assured, "entry {i}: ASSURED flag and table agree");
    }
}

/// Client -> VIP packet; returns the backend it went to.
fn up(h: &Harness, client: (Ipv4Addr, u16), flags: u8) -> (Ipv4Addr, u16) {
    let (verdict, out) = h.run(&frame(client, (VIP, 80), L4::Tcp { flags }, b""));
    assert_eq!(verdict, TC_ACT_OK, "client packet {flags:#x} translated");
    parse_checked(&out).dst
}

/// Backend -> client packet (through the stack to the egress program); asserts it comes back
/// from the VIP.
fn down(h: &Harness, backend: (Ipv4Addr, u16), client: (Ipv4Addr, u16), flags: u8) {
    let (verdict, out) = h.reply(&frame(backend, client, L4::Tcp { flags }, b""));
    assert_eq!(verdict, TC_ACT_OK, "backend packet {flags:#x} translated");
    assert_eq!(parse_checked(&out).src, (VIP, 80));
}

/// A handshake through the VIP from `client` (SYN, SYN-ACK, ACK): the flow is established and
/// assured. Returns its backend.
fn establish(h: &Harness, client: (Ipv4Addr, u16)) -> (Ipv4Addr, u16) {
    let b = up(h, client, SYN);
    down(h, b, client, SYN_ACK);
    up(h, client, ACK);
    b
}

/// `establish` from each of `ports` of the client: each flow's client and backend.
fn establish_all(h: &Harness, ports: std::ops::Range<u16>) -> Vec<((Ipv4Addr, u16), (Ipv4Addr, u16))> {
    ports.map(|p| (CLIENT, p)).map(|c| (c, establish(h, c))).collect()
}

#[test]
fn tcp_states_follow_the_handshake_and_a_close_from_either_side() {
    if !privileged() {
        return;
    }
    let h = Harness::new(&lab_yaml(&BACKENDS));
    for (port, client_closes) in [(41000u16, true), (41001, false)] {
        let c = (CLIENT, port);
        let b = up(&h, c, SYN);
        expect(&h, c, b, CT_SYN_SENT, false);
        // A retransmitted SYN changes nothing.
        assert_eq!(up(&h, c, SYN), b);
        expect(&h, c, b, CT_SYN_SENT, false);
        down(&h, b, c, SYN_ACK);
        // Answered, but the handshake is not done: no established lifetime, not assured.
        expect(&h, c, b, CT_SYN_RECV, false);
        assert!(flow(&h, c, b)[0].unwrap().0.flags & CT_FLAG_REPLIED != 0);
        up(&h, c, ACK);
        expect(&h, c, b, CT_ESTABLISHED, true);
        down(&h, b, c, ACK);
        up(&h, c, ACK);
        expect(&h, c, b, CT_ESTABLISHED, true);
        // The close: the first FIN, its ACK, the second FIN, the last ACK.
        let client = |f| {
            up(&h, c, f);
        };
        let backend = |f| down(&h, b, c, f);
        let (first, second): (&dyn Fn(u8), &dyn Fn(u8)) =
            if client_closes { (&client, &backend) } else { (&backend, &client) };
        first(FIN_ACK);
        expect(&h, c, b, CT_FIN_WAIT, true);
        // Data from the side that closed carries on without erasing the FIN.
        first(ACK);
        expect(&h, c, b, CT_FIN_WAIT, true);
        second(ACK);
        expect(&h, c, b, CT_CLOSE_WAIT, true);
        // The other side keeps sending on its half: still half-closed.
        second(ACK);
        expect(&h, c, b, CT_CLOSE_WAIT, true);
        // A SYN inside a live connection is no new connection.
        assert_eq!(up(&h, c, SYN), b);
        expect(&h, c, b, CT_CLOSE_WAIT, true);
        second(FIN_ACK);
        expect(&h, c, b, CT_LAST_ACK, true);
        first(ACK);
        // Finished: back to the LRU, where it can be evicted, for the TIME_WAIT lifetime.
        expect(&h, c, b, CT_TIME_WAIT, false);
        // Late packets of the finished connection still translate.
        first(ACK);
        expect(&h, c, b, CT_TIME_WAIT, false);
    }
}

#[test]
fn a_reset_from_either_side_closes_the_flow_and_a_new_syn_reuses_the_tuple() {
    if !privileged() {
        return;
    }
    let h = Harness::new(&lab_yaml(&BACKENDS));
    let mut moved = 0;
    for port in 42000..42040u16 {
        let c = (CLIENT, port);
        let b = establish(&h, c);
        expect(&h, c, b, CT_ESTABLISHED, true);
        if port % 2 == 0 {
            up(&h, c, RST | ACK);
        } else {
            down(&h, b, c, RST | ACK);
        }
        expect(&h, c, b, CT_CLOSE, false);
        // A later ACK does not revive it.
        up(&h, c, ACK);
        expect(&h, c, b, CT_CLOSE, false);
        // A new SYN on the tuple is a new connection with a fresh choice (netfilter's port
        // reuse); the flow hash picks the same backend, unless the set changed.
        let again = up(&h, c, SYN);
        expect(&h, c, again, CT_SYN_SENT, false);
        moved += usize::from(again != b);
    }
    assert_eq!(moved, 0, "the same 5-tuple hashes to the same backend");
    // TIME_WAIT too: close one properly, then reuse.
    let c = (CLIENT, 42100);
    let b = up(&h, c, SYN);
    down(&h, b, c, SYN_ACK);
    up(&h, c, FIN_ACK);
    down(&h, b, c, FIN_ACK);
    up(&h, c, ACK);
    expect(&h, c, b, CT_TIME_WAIT, false);
    up(&h, c, SYN);
    expect(&h, c, b, CT_SYN_SENT, false);
}

/// `k`'s tag as the datapath writes it (`lb_common::CtValue::tag`).
fn own_tag(k: &CtKey4) -> u16 {
    ct_tag(k.src, k.dst, k.sport, k.dport)
}

/// Rewrites entry `i` (0 forward, 1 reply) of the assured flow `client -> backend` with `tag`.
fn retag(h: &Harness, client: (Ipv4Addr, u16), backend: (Ipv4Addr, u16), i: usize, tag: u16) {
    let k = if i == 0 { ct_key(client, (VIP, 80), CT_DIR_FORWARD) } else { ct_key(backend, client, CT_DIR_REPLY) };
    let (mut v, assured) = flow(h, client, backend)[i].expect("entry");
    assert!(assured, "entry {i} in the assured table");
    v.tag = tag;
    h.pinned_maps().conntrack.insert(k, v, 0).expect("writing entry");
    h.dp.forget_cached_flows([&k]).expect("forgetting the cached copy");
}

#[test]
fn a_state_change_is_never_written_into_an_entry_another_flow_took_over() {
    if !privileged() {
        return;
    }
    let h = Harness::new(&lab_yaml(&BACKENDS));
    // Every entry the datapath writes carries its own key's tag, through the move into the
    // assured table.
    let c = (CLIENT, 42200);
    let b = establish(&h, c);
    let keys = [ct_key(c, (VIP, 80), CT_DIR_FORWARD), ct_key(b, c, CT_DIR_REPLY)];
    for (k, e) in keys.iter().zip(flow(&h, c, b)) {
        let (v, assured) = e.expect("entry");
        assert!(assured);
        assert_eq!(v.tag, own_tag(k), "{k:?} carries its own tag");
    }
    // The forward entry as another flow's: what a packet holding its element sees when another
    // CPU reused it meanwhile (the tag is all a program can tell that by, since it does not
    // read the key again). The client's FIN still goes to the flow's backend, but closes
    // nothing.
    retag(&h, c, b, 0, own_tag(&keys[0]) ^ 1);
    assert_eq!(up(&h, c, FIN_ACK), b, "the FIN still translated");
    expect(&h, c, b, CT_ESTABLISHED, true);
    // Untagged, as userspace writes entries (a migration's, a test's): admitted.
    retag(&h, c, b, 0, 0);
    assert_eq!(up(&h, c, FIN_ACK), b);
    expect(&h, c, b, CT_FIN_WAIT, true);

    // The peer entry as another flow's: the FIN moves the flow's own entry on, and its mirror
    // is not written into the other flow's.
    let c = (CLIENT, 42201);
    let b = establish(&h, c);
    let reply = ct_key(b, c, CT_DIR_REPLY);
    retag(&h, c, b, 1, own_tag(&reply) ^ 1);
    assert_eq!(up(&h, c, FIN_ACK), b);
    let [fwd, rev] = flow(&h, c, b).map(|e| e.expect("entry").0.state);
    assert_eq!(
        (lb_common::ct_state_name(fwd), lb_common::ct_state_name(rev)),
        (lb_common::ct_state_name(CT_FIN_WAIT), lb_common::ct_state_name(CT_ESTABLISHED))
    );

    // A peer entry lost is written again by the mirror of its flow's next change, tagged as
    // every entry the datapath creates (`conntrack::insert_either`).
    let c = (CLIENT, 42202);
    let b = establish(&h, c);
    let reply = ct_key(b, c, CT_DIR_REPLY);
    h.pinned_maps().conntrack.remove(&reply).expect("removing the reply entry");
    h.dp.forget_cached_flows([&reply]).expect("forgetting the cached copy");
    assert_eq!(up(&h, c, FIN_ACK), b);
    let (v, assured) = flow(&h, c, b)[1].expect("the reply entry written again");
    assert!(assured);
    assert_eq!(lb_common::ct_state_name(v.state), lb_common::ct_state_name(CT_FIN_WAIT));
    assert_eq!(v.tag, own_tag(&reply), "the re-created entry carries its own tag");
}

#[test]
fn an_established_flows_plain_segments_are_served_from_its_cached_copy() {
    if !privileged() {
        return;
    }
    let h = Harness::new(&lab_yaml(&BACKENDS));
    let c = (CLIENT, 44000);
    let b = establish(&h, c);
    expect(&h, c, b, CT_ESTABLISHED, true);
    // A plain segment each way finds its assured entry and copies it (`LB_CT4_CACHE`).
    down(&h, b, c, ACK);
    up(&h, c, ACK);
    // The assured entries go behind the datapath's back; the copies stay.
    let keys = [ct_key(c, (VIP, 80), CT_DIR_FORWARD), ct_key(b, c, CT_DIR_REPLY)];
    let mut m = h.pinned_maps();
    for k in &keys {
        m.conntrack.remove(k).expect("removing the entry");
    }
    let count =
        || (h.counter(Counter::FwdTracked), h.counter(Counter::ReplyTranslated), h.counter(Counter::FwdNewFlow));
    // Plain segments both ways are still translated as tracked, from the copies alone.
    let before = count();
    assert_eq!(up(&h, c, ACK), b);
    down(&h, b, c, ACK);
    let after = count();
    assert_eq!((after.0 - before.0, after.1 - before.1, after.2 - before.2), (1, 1, 0));
    assert!(flow(&h, c, b).iter().all(Option::is_none), "served without an entry");
    // Without the copies the reply has nothing to be translated by, and the client's next
    // segment is picked up as a new flow.
    h.dp.forget_cached_flows(&keys).expect("forgetting the cached copies");
    let (_, out) = h.run(&frame(b, c, L4::Tcp { flags: ACK }, b""));
    assert_eq!(parse_checked(&out).src, b, "the reply is left untranslated");
    let before = count();
    assert_eq!(up(&h, c, ACK), b);
    assert_eq!(count().2 - before.2, 1, "a new flow");
}

#[test]
fn two_flows_whose_keys_share_a_cache_pair_are_both_served_from_their_copies() {
    if !privileged() {
        return;
    }
    // A small assured table, so its cache (a slot per two entries, in pairs) has 16 pairs and
    // two client ports whose forward keys pick the same pair are quick to find.
    let sizes = MapSizes { conntrack: 64, ..MapSizes::default() };
    let h = Harness::with_config(&lab_yaml(&BACKENDS), Config { sizes, ..Config::default() });
    let pair = |port: u16| {
        let k = ct_key((CLIENT, port), (VIP, 80), CT_DIR_FORWARD);
        lb_common::ct_cache_pair(k.src, k.dst, k.sport, k.dport, k.proto, 32)
    };
    let first = 45000;
    let second = (first + 1..first + 1000).find(|p| pair(*p) == pair(first)).expect("a port sharing the pair");
    let flows = [first, second].map(|p| {
        let c = (CLIENT, p);
        let b = establish(&h, c);
        (c, b)
    });
    // A plain segment of each finds its assured entry and copies it, the second beside the
    // first (a direct-mapped cache would have put it over the first).
    for (c, b) in flows {
        assert_eq!(up(&h, c, ACK), b);
    }
    let mut m = h.pinned_maps();
    for (c, b) in flows {
        for k in [ct_key(c, (VIP, 80), CT_DIR_FORWARD), ct_key(b, c, CT_DIR_REPLY)] {
            m.conntrack.remove(&k).expect("removing the entry");
        }
    }
    for (c, b) in flows {
        let (tracked, new) = (h.counter(Counter::FwdTracked), h.counter(Counter::FwdNewFlow));
        assert_eq!(up(&h, c, ACK), b, "{c:?}");
        assert_eq!(
            (h.counter(Counter::FwdTracked) - tracked, h.counter(Counter::FwdNewFlow) - new),
            (1, 0),
            "{c:?} served from its copy"
        );
    }
}

#[test]
fn a_syn_inside_a_live_flow_finds_it_through_the_live_stamps_and_a_restart() {
    if !privileged() {
        return;
    }
    let three = ["10.244.1.11", "10.244.1.12", "10.244.1.13"];
    let mut h = Harness::new(&lab_yaml(&three));
    let flows = establish_all(&h, 31000..31200);
    // Every backend replaced: selection alone would send these tuples elsewhere. A SYN inside
    // each live flow (a client reusing its port) must still find the flow in the assured
    // table, through the stamp its promotion there left (`lb-ebpf/src/ct_live.rs`), and start
    // no second flow.
    let others = ["10.244.2.11", "10.244.2.12", "10.244.2.13"];
    h.apply(&lab_yaml(&others));
    let syn_inside_each = |h: &Harness, when: &str| {
        for (c, b) in &flows {
            assert_eq!(up(h, *c, SYN), *b, "{when}: the SYN of {c:?} left its flow");
            expect(h, *c, *b, CT_ESTABLISHED, true);
        }
    };
    syn_inside_each(&h, "stamped by the datapath");
    // The collector turns the generation at every pass and restamps what its walk finds: the
    // datapath's stamps stop counting three passes on, the walk's keep the flows found.
    for _ in 0..3 {
        h.dp.restamp_live_flows();
    }
    syn_inside_each(&h, "three walks later");
    // A restarted agent: programs of its own with a new stamp map, every bit set: until its
    // programs have taken the links over, every key counts (the old ones make flows assured
    // without stamping them); then its first pass stamps the pinned assured table.
    let pin_dir = h.pin_dir.clone();
    let mut restarted = Harness { dp: Dataplane::load(&pin_dir, &Config::default()).expect("reloading"), pin_dir };
    restarted.dp.stop_ct_collector();
    syn_inside_each(&restarted, "after a restart, before the link swap");
    restarted.dp.finish_migrations();
    syn_inside_each(&restarted, "after a restart and its first pass");
}

#[test]
fn a_new_connections_syn_skips_the_assured_table_unless_its_key_is_stamped() {
    if !privileged() {
        return;
    }
    let h = Harness::new(&lab_yaml(&BACKENDS));
    h.dp.stop_ct_collector();
    // An established flow's forward entry as a model.
    let c = (CLIENT, 45000);
    let b = establish(&h, c);
    let [Some((model, true)), _] = flow(&h, c, b) else { panic!("the flow is not assured") };
    // A flow written into the assured table by hand, to a backend no service has, as a
    // migration copies one in: nothing stamped it yet.
    let (t, stray) = ((CLIENT, 45001), (Ipv4Addr::new(10, 244, 9, 9), 8080u16));
    let k = ct_key(t, (VIP, 80), CT_DIR_FORWARD);
    let mut v = model;
    v.nat_addr = be(stray.0);
    v.nat_port = stray.1.to_be();
    // Untagged, as userspace writes entries (the model's tag is its own key's).
    v.tag = 0;
    let (pk, pv) = lb_common::ct_peer(&k, &v);
    let mut m = h.pinned_maps();
    m.conntrack.insert(k, v, 0).expect("writing the forward entry");
    m.conntrack.insert(pk, pv, 0).expect("writing the reply entry");
    // Its data packets find it (they always look)...
    assert_eq!(up(&h, t, ACK), stray);
    // ...but a SYN, its slot unstamped, takes the new connection's path without looking:
    // a backend of the service, and entries of its own in the new-flow table.
    let chosen = up(&h, t, SYN);
    assert_ne!(chosen, stray, "the SYN looked into the assured table");
    assert!(m.conntrack_new.get(&k, 0).is_ok(), "no new flow was started");
    m.conntrack_new.remove(&k).expect("removing the new flow");
    m.conntrack_new.remove(&ct_key(chosen, t, CT_DIR_REPLY)).expect("removing its reply entry");
    // Once the agent has stamped the table (at load, after a migration, at every collection),
    // the SYN finds the flow.
    h.dp.restamp_live_flows();
    assert_eq!(up(&h, t, SYN), stray, "the stamped flow was not found");
    assert!(m.conntrack_new.get(&k, 0).is_err(), "a new flow was started");
}

/// Ages both entries of a flow by `secs` (their last packet that long ago).
fn age(h: &Harness, client: (Ipv4Addr, u16), backend: (Ipv4Addr, u16), secs: u64) {
    let (clock, _) = h.dp.ct_clock();
    let mut m = h.pinned_maps();
    for (i, e) in flow(h, client, backend).into_iter().enumerate() {
        let (mut v, assured) = e.expect("entry");
        v.last_seen = v.last_seen.wrapping_sub(clock.to_jiffies(secs));
        let k = if i == 0 { ct_key(client, (VIP, 80), CT_DIR_FORWARD) } else { ct_key(backend, client, CT_DIR_REPLY) };
        if assured {
            m.conntrack.insert(k, v, 0).expect("writing entry");
        } else {
            m.conntrack_new.insert(k, v, 0).expect("writing entry");
        }
        // The datapath's copy of an established entry stands for it until its next refresh:
        // time passed by hand must reach it too.
        h.dp.forget_cached_flows([&k]).expect("forgetting the cached copy");
    }
}

#[test]
fn each_state_keeps_its_own_lifetime() {
    if !privileged() {
        return;
    }
    // A set with one backend, so that "a new flow" and "the old flow" differ by their entry,
    // not by their backend: a new flow starts again in SYN_SENT.
    let h = Harness::new(&lab_yaml(&BACKENDS[..1]));
    // Half-closed and idle for 100 s: FIN_WAIT's 120 s are not over, the flow is tracked.
    let c = (CLIENT, 43000);
    let b = establish(&h, c);
    up(&h, c, FIN_ACK);
    age(&h, c, b, 100);
    up(&h, c, ACK);
    expect(&h, c, b, CT_FIN_WAIT, true);
    // Idle 130 s: over. The next packet starts afresh (picked up mid-stream: ESTABLISHED but
    // not assured until answered).
    age(&h, c, b, 130);
    up(&h, c, ACK);
    expect(&h, c, b, CT_ESTABLISHED, false);
    down(&h, b, c, ACK);
    expect(&h, c, b, CT_ESTABLISHED, true);
    // A SYN_SENT entry idle past the SYN lifetime (60 s) is gone for a retransmitted SYN's
    // purposes too, and an established one idle 5 hours of its 6 stays.
    let c = (CLIENT, 43001);
    let b = up(&h, c, SYN);
    age(&h, c, b, 61);
    up(&h, c, SYN);
    let fresh = flow(&h, c, b)[0].unwrap().0;
    assert_eq!(fresh.last_seen, fresh.created, "a new entry, not the old one refreshed");
    down(&h, b, c, SYN_ACK);
    up(&h, c, ACK);
    age(&h, c, b, 5 * 3600);
    let aged = flow(&h, c, b)[0].unwrap().0;
    up(&h, c, ACK);
    // Still assured: the old entry (a flow picked up afresh would be unassured), refreshed.
    expect(&h, c, b, CT_ESTABLISHED, true);
    let kept = flow(&h, c, b)[0].unwrap().0;
    assert_eq!(kept.created, aged.created);
    assert_ne!(kept.last_seen, aged.last_seen, "refreshed by the packet");
}

/// Client `i` of a test's many: its own address and port.
fn many(i: u32, net: u8) -> (Ipv4Addr, u16) {
    (Ipv4Addr::new(10, net, (i >> 8) as u8, i as u8), 20000 + (i % 1000) as u16)
}

#[test]
fn a_flood_of_new_flows_never_evicts_established_ones() {
    if !privileged() {
        return;
    }
    // Room for exactly 10,100 assured flows; the new-flow table is the default's eighth.
    let sizes = MapSizes { conntrack: 20_200, conntrack_new: 16_384, ..MapSizes::default() };
    let h = Harness::with_config(&lab_yaml(&BACKENDS), Config { sizes, ..Config::default() });
    let established: Vec<_> = (0..10_000)
        .map(|i| {
            let c = many(i, 245);
            let b = establish(&h, c);
            (c, b)
        })
        .collect();
    // A SYN flood from other clients: enough new flows to fill the new-flow table twice over
    // (two entries each).
    let evicted = h.counter(Counter::CtNewEvicted);
    for i in 0..16_384 {
        up(&h, many(i, 246), SYN);
    }
    // Every established flow still goes to its backend, both ways, from the assured table.
    for (c, b) in &established {
        assert_eq!(up(&h, *c, ACK), *b, "{c:?}");
        down(&h, *b, *c, ACK);
        expect(&h, *c, *b, CT_ESTABLISHED, true);
    }
    // The flood filled the new-flow table (sets fill unevenly: nearly every way), pushed out
    // about half of its own entries, and counted them; the established flows were not touched.
    let m = h.dp.maps();
    let held = m.conntrack_new.keys().count();
    assert!((15_000..=16_384).contains(&held), "{held}");
    let pushed_out = h.counter(Counter::CtNewEvicted) - evicted;
    assert!(pushed_out >= 2 * 16_384 - held as u64 - 500, "{pushed_out}");
    assert_eq!(m.conntrack.keys().count(), 20_000);
    // Handshakes beyond the assured table's room: counted, and they still work, from the LRU.
    assert_eq!(h.counter(Counter::CtAssuredFull), 0);
    for i in 0..200 {
        let c = many(i, 247);
        let b = establish(&h, c);
        assert_eq!(up(&h, c, ACK), b);
        down(&h, b, c, ACK);
    }
    assert_eq!(h.dp.maps().conntrack.keys().count(), 20_200);
    assert!(h.counter(Counter::CtAssuredFull) >= 100, "{}", h.counter(Counter::CtAssuredFull));
}

/// A SNATed flow whose reply entry is pushed out of a full set of the new-flow table goes whole:
/// left with its forward entry alone, its SNAT port would look free to the port search (which
/// probes reply keys) while its client's packets still took it.
#[test]
fn a_snated_flow_pushed_out_of_the_new_flow_table_goes_whole() {
    if !privileged() {
        return;
    }
    // Two sets of four ways: every entry competes for one of them.
    let _ns = NetNsGuard::node();
    let sizes = MapSizes { conntrack_new: 8, ..MapSizes::default() };
    let mut h = Harness::with_config(EDGE, Config { node_ip: Some(NODE_IP), sizes, ..Config::default() });
    h.dp.set_node_addresses(&[NODE_IP, Ipv4Addr::new(10, 244, 1, 1)]).unwrap();
    for i in 0..200u16 {
        // New connections to a node port whose backend is remote: SNATed to the node.
        let syn = frame((Ipv4Addr::new(192, 168, 60, 1), 1024 + i), (NODE_IP, 30081), L4::Tcp { flags: SYN }, &[]);
        let (verdict, _) = h.run(&syn);
        assert_ne!(verdict, TC_ACT_SHOT, "SYN {i}");
        let all: Vec<(CtKey4, CtValue4)> = h.dp.maps().conntrack_new.iter().filter_map(Result::ok).collect();
        assert!(all.len() <= 8);
        for (k, v) in all.iter().filter(|(k, v)| k.dir == CT_DIR_FORWARD && v.flags & CT_FLAG_SNAT != 0) {
            let (pk, _) = lb_common::ct_peer(k, v);
            assert!(
                all.iter().any(|(k2, _)| *k2 == pk),
                "after SYN {i}: a SNATed forward entry without its reply: {k:?}"
            );
        }
    }
    // Nearly every SYN found its sets full.
    assert!(h.counter(Counter::CtNewEvicted) >= 150, "{}", h.counter(Counter::CtNewEvicted));
}

/// A new flow's forward entry that pushes out a SNATed flow's reply entry takes that flow's
/// forward entry with it (see the test above). When that forward entry sat in the very way
/// chosen for the new flow's reply entry, the way is free by the time it is written: one live
/// flow was pushed out, and it is counted once, not twice (`ct_table::write`'s recheck).
#[test]
fn a_way_emptied_by_the_pairs_first_write_is_not_counted_as_pushed_out_again() {
    if !privileged() {
        return;
    }
    // Two sets of four ways, staged way by way below.
    let sizes = MapSizes { conntrack_new: 8, ..MapSizes::default() };
    let h = Harness::with_config(&lab_yaml(&BACKENDS), Config { sizes, ..Config::default() });
    let client = (Ipv4Addr::new(10, 245, 9, 1), 40_000);
    // The new flow's backend: a first SYN's (Maglev gives the SYN below the same one).
    let backend = up(&h, client, SYN);
    let fwd = ct_key(client, (VIP, 80), CT_DIR_FORWARD);
    let hash = |k: &CtKey4| lb_common::ct_set_hash(k.src, k.dst, k.sport, k.dport, k.proto, k.dir);
    let flow_hash = hash(&fwd);
    assert_eq!(flow_hash, hash(&ct_key(backend, client, CT_DIR_REPLY)), "both entries share a set");
    let set = lb_common::select_slot(flow_hash, 2);
    // The candidate each entry of the new flow evicts when it is the older of its direction's
    // two (`lb_common::ct_set_pair`): `f` for the forward entry, `r` for the reply entry.
    let ways = lb_common::CT_WAYS;
    let f = (flow_hash as usize + CT_DIR_FORWARD as usize) % ways;
    let r = (flow_hash as usize + CT_DIR_REPLY as usize) % ways;
    let (clock, _) = h.dp.ct_clock();
    let now = clock.jiffies().unwrap();
    let entry = |last_seen, flags| CtValue4 {
        nat_addr: be(Ipv4Addr::new(10, 244, 2, 21)),
        nat_port: 8080u16.to_be(),
        snat_addr: if flags & CT_FLAG_SNAT != 0 { be(Ipv4Addr::new(192, 168, 60, 2)) } else { 0 },
        snat_port: if flags & CT_FLAG_SNAT != 0 { 61_234u16.to_be() } else { 0 },
        state: CT_SYN_SENT,
        flags,
        last_seen,
        created: last_seen,
        ..Default::default()
    };
    // A SNATed flow (its forward entry's set is this one) seen a second ago: its reply entry in
    // way `f`, its forward entry in way `r`, each older than the other candidate of its way.
    let snated = (1024..u16::MAX)
        .map(|port| ct_key((Ipv4Addr::new(192, 168, 60, 1), port), (Ipv4Addr::new(10, 96, 0, 99), 80), CT_DIR_FORWARD))
        .find(|k| lb_common::select_slot(hash(k), 2) == set)
        .unwrap();
    let snated_value = entry(now.wrapping_sub(clock.to_jiffies(1)), CT_FLAG_SNAT);
    let (snated_reply, snated_reply_value) = lb_common::ct_peer(&snated, &snated_value);
    assert_eq!(lb_common::ct_forward_key(&snated_reply, &snated_reply_value), snated);
    let mut staged = [lb_common::CtWay4::default(); 4];
    staged[f] = lb_common::CtWay { key: snated_reply, value: snated_reply_value };
    staged[r] = lb_common::CtWay { key: snated, value: snated_value };
    // The other two ways: live flows seen just now, which neither entry picks.
    for (i, w) in [(f + ways / 2) % ways, (r + ways / 2) % ways].into_iter().enumerate() {
        let key = ct_key((Ipv4Addr::new(10, 245, 9, 2), 1000 + i as u16), (VIP, 80), CT_DIR_FORWARD);
        staged[w] = lb_common::CtWay { key, value: entry(now, 0) };
    }
    let map = aya::maps::Map::Array(
        aya::maps::MapData::from_pin(h.pin_dir.join(lb_common::MAP_CT4_NEW)).expect("opening the pinned table"),
    );
    let mut table = aya::maps::Array::<_, lb_common::CtWay4>::try_from(map).unwrap();
    for set_index in 0..2u32 {
        for (i, w) in staged.iter().enumerate() {
            // The other set empty: only the staged one holds anything.
            let w = if set_index == set { *w } else { lb_common::CtWay4::default() };
            table.set(set_index * ways as u32 + i as u32, w, 0).unwrap();
        }
    }

    let pushed_out = h.counter(Counter::CtNewEvicted);
    assert_eq!(up(&h, client, SYN), backend);
    let held: Vec<_> = (0..ways as u32).map(|i| table.get(&(set * ways as u32 + i), 0).unwrap()).collect();
    assert_eq!(held[f].key, fwd, "the forward entry took way {f}");
    assert_eq!(held[r].key, ct_key(backend, client, CT_DIR_REPLY), "the reply entry took way {r}");
    for w in [(f + ways / 2) % ways, (r + ways / 2) % ways] {
        assert_eq!(held[w], staged[w], "way {w} was left alone");
    }
    assert!(h.dp.maps().conntrack_new.get(&snated, 0).is_err(), "the SNATed flow went whole");
    assert_eq!(h.counter(Counter::CtNewEvicted) - pushed_out, 1, "one live flow pushed out, counted once");
}

/// A flow that leaves the assured table (reset here) goes back into the new-flow table one
/// entry at a time. When its forward entry takes the set's one free way and that way is one
/// of the reply entry's two candidates, the reply entry must push out its other candidate,
/// not the forward entry it ties with (both seen this jiffy): `ct_table::insert_inline`'s
/// `avoid`.
#[test]
fn a_flow_moved_back_entry_by_entry_keeps_both_entries_when_its_set_is_full() {
    if !privileged() {
        return;
    }
    // Two sets of four ways, staged way by way below.
    let sizes = MapSizes { conntrack_new: 8, ..MapSizes::default() };
    let h = Harness::with_config(&lab_yaml(&BACKENDS), Config { sizes, ..Config::default() });
    let client = (Ipv4Addr::new(10, 245, 9, 1), 40_000);
    let backend = establish(&h, client);
    expect(&h, client, backend, CT_ESTABLISHED, true);
    let fwd = ct_key(client, (VIP, 80), CT_DIR_FORWARD);
    let rep = ct_key(backend, client, CT_DIR_REPLY);
    let flow_hash = lb_common::ct_set_hash(fwd.src, fwd.dst, fwd.sport, fwd.dport, fwd.proto, fwd.dir);
    let set = lb_common::select_slot(flow_hash, 2);
    let ways = lb_common::CT_WAYS;
    // The reply entry's two candidates (`lb_common::ct_set_victim`): the forward entry will
    // take `r`, the set's one free way.
    let r = (flow_hash as usize + CT_DIR_REPLY as usize) % ways;
    let (clock, _) = h.dp.ct_clock();
    // Seen "after now" reads as seen now: the tie holds even if a jiffy passes meanwhile.
    let later = clock.jiffies().unwrap().wrapping_add(clock.to_jiffies(5));
    let mut staged = [lb_common::CtWay4::default(); 4];
    for (i, w) in staged.iter_mut().enumerate() {
        if i != r {
            let key = ct_key((Ipv4Addr::new(10, 245, 9, 2), 1000 + i as u16), (VIP, 80), CT_DIR_FORWARD);
            let value = CtValue4 {
                nat_addr: be(Ipv4Addr::new(10, 244, 2, 21)),
                nat_port: 8080u16.to_be(),
                state: CT_SYN_SENT,
                last_seen: later,
                created: later,
                ..Default::default()
            };
            *w = lb_common::CtWay { key, value };
        }
    }
    let map = aya::maps::Map::Array(
        aya::maps::MapData::from_pin(h.pin_dir.join(lb_common::MAP_CT4_NEW)).expect("opening the pinned table"),
    );
    let mut table = aya::maps::Array::<_, lb_common::CtWay4>::try_from(map).unwrap();
    for (i, w) in staged.iter().enumerate() {
        table.set(set * ways as u32 + i as u32, w, 0).unwrap();
    }

    let pushed_out = h.counter(Counter::CtNewEvicted);
    assert_eq!(up(&h, client, RST | ACK), backend);
    expect(&h, client, backend, CT_CLOSE, false);
    let held: Vec<_> = (0..ways as u32).map(|i| table.get(&(set * ways as u32 + i), 0).unwrap()).collect();
    assert_eq!(held[r].key, fwd, "the forward entry took the free way {r}");
    let other = (r + ways / 2) % ways;
    assert_eq!(held[other].key, rep, "the reply entry took its other candidate, way {other}");
    for w in (0..ways).filter(|&w| w != r && w != other) {
        assert_eq!(held[w], staged[w], "way {w} was left alone");
    }
    assert_eq!(h.counter(Counter::CtNewEvicted) - pushed_out, 1, "one live flow pushed out");
}

#[test]
fn snat_ports_of_finished_flows_are_reused_and_live_ones_never_are() {
    if !privileged() {
        return;
    }
    let (h, _ns) = edge();
    let span = (lb_common::SNAT_PORT_MAX - lb_common::SNAT_PORT_MIN) as usize + 1;
    let backend: (Ipv4Addr, u16) = (REMOTE_POD.parse().unwrap(), 80);
    let client = |i: u32| (Ipv4Addr::new(192, 168, (50 + i / 60_000) as u8, 1), 1024 + (i % 60_000) as u16);
    // As many connections to one remote backend as there are SNAT ports, each closed
    // (TIME_WAIT holds its port for two minutes, as netfilter's does).
    let mut used = BTreeSet::new();
    let mut i = 0;
    while used.len() < span && i < 3 * span as u32 {
        let c = client(i);
        i += 1;
        let (verdict, out) = h.run(&frame(c, (NODE_IP, 30081), L4::Tcp { flags: SYN }, &[]));
        if verdict == TC_ACT_SHOT {
            // Out of probes while few ports are left free: fine here, we want them all used.
            continue;
        }
        let p = parse_checked(&out);
        let snat = p.src;
        assert_eq!(p.dst, backend);
        used.insert(snat.1);
        h.run(&frame(backend, snat, L4::Tcp { flags: SYN_ACK }, &[]));
        h.run(&frame(c, (NODE_IP, 30081), L4::Tcp { flags: FIN_ACK }, &[]));
        h.run(&frame(backend, snat, L4::Tcp { flags: FIN_ACK }, &[]));
        h.run(&frame(c, (NODE_IP, 30081), L4::Tcp { flags: ACK }, &[]));
    }
    assert_eq!(used.len(), span, "every SNAT port held by a finished flow");
    // New connections keep getting ports: those of finished flows.
    let drops = h.counter(Counter::DropSnatPorts);
    for j in 0..1000 {
        let (_, out) = h.run(&frame(client(i + j), (NODE_IP, 30081), L4::Tcp { flags: SYN }, &[]));
        assert_eq!(parse_checked(&out).dst, backend);
    }
    assert_eq!(h.counter(Counter::DropSnatPorts), drops, "no SYN dropped for want of a port");
    // Live flows keep theirs: with every port held by a SYN_SENT flow, new ones are refused.
    let before = h.counter(Counter::DropSnatPorts);
    for j in 0..(2 * span as u32) {
        h.run(&frame(client(10 * span as u32 + j), (NODE_IP, 30081), L4::Tcp { flags: SYN }, &[]));
    }
    assert!(h.counter(Counter::DropSnatPorts) > before, "ports of live flows are never taken");
}

/// Two CPUs creating SNATed flows to one backend at the same instant: each finds the same
/// port free (no reply entry holds it yet), and only the claim one of them makes first
/// (`LB_SNAT_CLAIMS`) keeps the other off it. Staged here: another flow's fresh claim on the
/// very port this flow's search takes first.
#[test]
fn a_snat_port_another_flow_claimed_at_that_instant_is_not_taken_too() {
    if !privileged() {
        return;
    }
    let (h, _ns) = edge();
    let backend: (Ipv4Addr, u16) = (REMOTE_POD.parse().unwrap(), 80);
    let client = (Ipv4Addr::new(192, 168, 60, 7), 40_000);
    let syn = frame(client, (NODE_IP, 30081), L4::Tcp { flags: SYN }, &[]);
    let snat_port = |h: &Harness| {
        let p = parse_checked(&h.run(&syn).1);
        assert_eq!((p.dst, p.src.0), (backend, NODE_IP), "SNATed to the node, towards the remote backend");
        p.src.1
    };
    let first = snat_port(&h);
    let slot =
        lb_common::snat_claim_slot(be(NODE_IP), be(backend.0), backend.1.to_be(), first.to_be(), lb_common::PROTO_TCP);
    let mut claims = h.pinned_maps().snat_claims;
    let (clock, _) = h.dp.ct_clock();
    let jiffies = || clock.jiffies().unwrap();
    assert_ne!(claims.get(&slot, 0).unwrap(), 0, "the flow claimed its port");
    // Its entries lost moments after it began: its own claim does not keep it off its port.
    forget_all_flows(&h);
    assert_eq!(snat_port(&h), first, "a flow's own claim is no other flow's");
    // Another flow's claim, fresh while the SYN runs (retried if the clock moved on too far
    // between the two: then the claim may have gone stale before the search read it).
    let other = 0x5eed_u64 << 32;
    let mut checked = false;
    for _ in 0..20 {
        forget_all_flows(&h);
        let before = jiffies();
        claims.set(slot, other | before as u64, 0).unwrap();
        let taken = snat_port(&h);
        if jiffies().wrapping_sub(before) > lb_common::SNAT_CLAIM_JIFFIES {
            continue;
        }
        assert_ne!(taken, first, "a port another flow claimed at that instant was taken too");
        checked = true;
        break;
    }
    assert!(checked, "the clock moved on by more than a claim's life during every try");
    // A stale claim holds nothing: the port is free again for this flow.
    forget_all_flows(&h);
    let stale = jiffies().wrapping_sub(lb_common::SNAT_CLAIM_JIFFIES + 1);
    claims.set(slot, other | stale as u64, 0).unwrap();
    assert_eq!(snat_port(&h), first, "a stale claim kept the port");
}

/// Deletes both entries of every flow from both tables of the pinned maps.
fn forget_all_flows(h: &Harness) {
    let mut m = h.pinned_maps();
    let keys: Vec<CtKey4> = m.conntrack.keys().filter_map(Result::ok).collect();
    // Their cached copies too (`lb-ebpf/src/ct_cache.rs`): the entries are lost, not idle.
    h.dp.forget_cached_flows(&keys).unwrap();
    for k in keys {
        m.conntrack.remove(&k).unwrap();
    }
    let keys: Vec<CtKey4> = m.conntrack_new.keys().filter_map(Result::ok).collect();
    for k in keys {
        m.conntrack_new.remove(&k).unwrap();
    }
}

#[test]
fn a_flow_that_lost_its_entries_keeps_its_backend_and_a_removal_moves_only_its_flows() {
    if !privileged() {
        return;
    }
    let five = ["10.244.1.11", "10.244.1.12", "10.244.1.13", "10.244.1.14", "10.244.1.15"];
    let mut h = Harness::new(&lab_yaml(&five));
    let flows = establish_all(&h, 30000..30500);
    assert_eq!(flows.iter().map(|(_, b)| b.0).collect::<BTreeSet<_>>().len(), 5, "spread over all five");
    // Every entry lost (evicted, a table rebuilt): the next packet of each flow, picked up
    // mid-stream, finds the same backend through the Maglev table.
    forget_all_flows(&h);
    for (c, b) in &flows {
        assert_eq!(up(&h, *c, ACK), *b, "{c:?} moved after losing its entries");
    }
    // One backend leaves. Tracked flows keep going where they were; once their entries are
    // lost too, only the departed backend's flows move, and only to the others.
    let gone: Ipv4Addr = five[2].parse().unwrap();
    h.apply(&lab_yaml(&[five[0], five[1], five[3], five[4]]));
    for (c, b) in &flows {
        assert_eq!(up(&h, *c, ACK), *b, "a tracked flow stays on its backend");
    }
    forget_all_flows(&h);
    let mut moved = 0;
    for (c, b) in &flows {
        let now = up(&h, *c, ACK);
        if b.0 == gone {
            assert_ne!(now.0, gone);
            moved += 1;
        } else {
            assert_eq!(now, *b, "{c:?} moved though its backend stayed");
        }
    }
    assert!((60..=140).contains(&moved), "about a fifth of 500 flows were on the departed backend: {moved}");
    // A backend joins: new flows take some of every backend's share, about 1/5, and no flow
    // moves between the old ones.
    forget_all_flows(&h);
    let before: Vec<_> = flows.iter().map(|(c, _)| up(&h, *c, SYN)).collect();
    forget_all_flows(&h);
    h.apply(&lab_yaml(&[five[0], five[1], five[3], five[4], "10.244.1.16"]));
    let mut joined = 0;
    for ((c, _), b) in flows.iter().zip(&before) {
        let now = up(&h, *c, SYN);
        if now != *b {
            assert_eq!(now.0, "10.244.1.16".parse::<Ipv4Addr>().unwrap(), "moved only to the new backend");
            joined += 1;
        }
    }
    assert!((60..=140).contains(&joined), "about a fifth moved to the new backend: {joined}");
}
