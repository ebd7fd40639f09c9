//! Maglev tables (Eisenbud et al., NSDI 2016, as Katran and Cilium use them): every frontend
//! has a table of `M` slots (a prime), each naming a backend, filled so that every backend
//! owns about `M / N` slots. A new flow takes the slot its 5-tuple hashes to
//! (`select_slot`), so a flow whose conntrack entry was lost maps back to the same backend.
//!
//! Maglev's own population is nearly, not exactly, stable: removing one of N backends also
//! moves a few percent of the other backends' slots. `update` therefore starts from the
//! frontend's current table: slots of backends that stay are kept, slots of departed
//! backends go to the pure table's choice for that slot, and a new backend takes exactly the
//! slots the pure table gives it. So a change moves only the flows of departed backends, or
//! those taken over by new ones (~1/N), and the balance stays Maglev's. The table thus
//! depends on this node's history of changes, not on the set alone; the agent keeps it
//! across restarts by reading it back from the pinned map.
//!
//! Only the agent and the tests build tables; the datapath reads them.
use crate::{flow_hash, Backend};

/// Slots per backend aimed at: the balance is within 1/16 of a backend's share, and a table
/// keeps its size while its backend count stays within a factor two or four of that.
const SLOTS_PER_BACKEND: u32 = 16;
const MIN_SIZE: u32 = 31;

fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2u32;
    while d * d <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

/// The table size for `n` backends: the smallest prime of at least 16 slots per backend; one
/// slot for one backend (nothing to balance; a second backend gets a table of its own).
pub fn table_size(n: usize) -> u32 {
    if n <= 1 {
        return 1;
    }
    let mut m = (n as u32).saturating_mul(SLOTS_PER_BACKEND).max(MIN_SIZE);
    while !is_prime(m) {
        m += 1;
    }
    m
}

/// Whether a table of `m` slots still suits `n` backends (so a change keeps it, and with it
/// every slot of the backends that stay).
pub fn size_suits(m: u32, n: usize) -> bool {
    let n = n as u32;
    if m == 1 {
        return n <= 1;
    }
    m >= MIN_SIZE && m >= n * SLOTS_PER_BACKEND / 2 && (m <= n * SLOTS_PER_BACKEND * 4 || m <= MIN_SIZE * 2)
}

/// A backend's place in every table: its own permutation of the slots.
fn permutation(b: &Backend, m: u32) -> (u32, u32) {
    let a = flow_hash(b.addr[0], b.addr[1] ^ b.addr[2] ^ b.addr[3], b.port, 0, b.family);
    let s = flow_hash(b.addr[3], b.addr[0] ^ b.addr[1], b.port, 1, b.family ^ 0x5a);
    (a % m, s % (m - 1) + 1)
}

/// Maglev's population of `m` slots (a prime) among `backends`, which must be non-empty and
/// in a canonical order (sorted): slot -> index into `backends`.
pub fn populate(backends: &[Backend], m: u32) -> Vec<u32> {
    assert!(!backends.is_empty() && (m == 1 || is_prime(m)), "{} backends, {m} slots", backends.len());
    if m == 1 {
        return vec![0];
    }
    let perms: Vec<(u32, u32)> = backends.iter().map(|b| permutation(b, m)).collect();
    let mut next = vec![0u32; backends.len()];
    let mut table = vec![u32::MAX; m as usize];
    let mut filled = 0;
    loop {
        for (i, &(offset, skip)) in perms.iter().enumerate() {
            let mut c = ((offset as u64 + next[i] as u64 * skip as u64) % m as u64) as usize;
            while table[c] != u32::MAX {
                next[i] += 1;
                c = ((offset as u64 + next[i] as u64 * skip as u64) % m as u64) as usize;
            }
            table[c] = i as u32;
            next[i] += 1;
            filled += 1;
            if filled == m {
                return table;
            }
        }
    }
}

/// The table for `backends` (sorted, non-empty) given the frontend's current one (`old`, slot
/// -> backend; empty for a new frontend). See the module comment for what moves.
pub fn update(old: &[Backend], backends: &[Backend]) -> Vec<Backend> {
    let m = if !old.is_empty() && size_suits(old.len() as u32, backends.len()) {
        old.len() as u32
    } else {
        table_size(backends.len())
    };
    let pure: Vec<Backend> = populate(backends, m).into_iter().map(|i| backends[i as usize]).collect();
    if m as usize != old.len() {
        return pure;
    }
    let stays = |b: &Backend| backends.binary_search(b).is_ok();
    let was = |b: &Backend| old.contains(b);
    let mut table: Vec<Option<Backend>> = (0..m as usize)
        .map(|i| {
            if !was(&pure[i]) {
                // A new backend takes its slots of the pure table.
                Some(pure[i])
            } else if stays(&old[i]) {
                Some(old[i])
            } else {
                None
            }
        })
        .collect();
    // Slots of departed backends: the pure table's choice, unless that backend has its share
    // already, then the one with the fewest slots, so the shares stay within one slot.
    let mut count: Vec<u32> = vec![0; backends.len()];
    let index = |b: &Backend| backends.binary_search(b).expect("a backend of the set");
    for b in table.iter().flatten() {
        count[index(b)] += 1;
    }
    let share = m.div_ceil(backends.len() as u32);
    for i in 0..m as usize {
        if table[i].is_some() {
            continue;
        }
        let mut pick = index(&pure[i]);
        if count[pick] >= share {
            pick = (0..backends.len()).min_by_key(|&j| (count[j], j)).expect("non-empty");
        }
        count[pick] += 1;
        table[i] = Some(backends[pick]);
    }
    table.into_iter().map(|b| b.expect("every slot filled")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn b(i: u32) -> Backend {
        Backend {
            addr: [u32::from_ne_bytes([10, 244, (i >> 8) as u8, i as u8]), 0, 0, 0],
            port: 8080u16.to_be(),
            family: 4,
            ..Default::default()
        }
    }

    fn counts(t: &[Backend]) -> BTreeMap<Backend, usize> {
        let mut c = BTreeMap::new();
        for x in t {
            *c.entry(*x).or_default() += 1;
        }
        c
    }

    #[test]
    fn sizes_are_primes_with_sixteen_slots_a_backend() {
        assert_eq!(table_size(1), 1);
        assert_eq!(table_size(2), 37);
        assert_eq!(table_size(3), 53);
        assert_eq!(table_size(10), 163);
        assert_eq!(table_size(4096), 65_537);
        for n in 2..300 {
            assert!(is_prime(table_size(n)) && size_suits(table_size(n), n), "{n}");
        }
    }

    #[test]
    fn backends_share_the_slots_evenly() {
        for n in [1u32, 2, 3, 7, 50, 300] {
            let set: Vec<Backend> = (0..n).map(b).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
            let t = update(&[], &set);
            let c = counts(&t);
            assert_eq!(c.len(), n as usize);
            let (lo, hi) = (c.values().min().unwrap(), c.values().max().unwrap());
            assert!(hi - lo <= 1, "{n} backends: {lo}..{hi}");
        }
    }

    #[test]
    fn a_change_moves_only_the_departed_or_taken_over_slots() {
        let sorted = |v: &[u32]| {
            let mut s: Vec<Backend> = v.iter().map(|&i| b(i)).collect();
            s.sort();
            s
        };
        let mut t = update(&[], &sorted(&[0, 1, 2, 3, 4]));
        // Removal: only the removed backend's slots change.
        let next = update(&t, &sorted(&[0, 1, 3, 4]));
        for (a, z) in t.iter().zip(&next) {
            assert!(a == z || *a == b(2), "a slot of a remaining backend moved");
        }
        let c = counts(&next);
        assert!(c.values().max().unwrap() - c.values().min().unwrap() <= 1, "{c:?}");
        t = next;
        // Addition: slots only move to the new backend, about 1/N of them.
        let next = update(&t, &sorted(&[0, 1, 3, 4, 5]));
        let moved = t.iter().zip(&next).filter(|(a, z)| a != z).count();
        assert!(next.iter().zip(&t).all(|(z, a)| z == a || *z == b(5)));
        assert!(moved * 5 <= t.len() + 5 && moved * 7 >= t.len(), "{moved} of {}", t.len());
        // Many backends at once leaving and coming keep a usable balance.
        let many: Vec<u32> = (0..40).collect();
        let mut t = update(&[], &sorted(&many));
        for round in 0..20u32 {
            let set: Vec<u32> = many.iter().map(|i| i + round).filter(|i| i % 7 != round % 7).collect();
            t = update(&t, &sorted(&set));
            let c = counts(&t);
            assert_eq!(c.len(), set.len());
            assert!(*c.values().max().unwrap() <= 2 * *c.values().min().unwrap() + 2, "round {round}: {c:?}");
        }
    }

    #[test]
    fn a_set_far_from_its_table_size_gets_a_new_table() {
        let small: Vec<Backend> = (0..2).map(b).collect();
        let t = update(&[], &small);
        let big: Vec<Backend> = {
            let mut v: Vec<Backend> = (0..100).map(b).collect();
            v.sort();
            v
        };
        let t2 = update(&t, &big);
        assert_eq!(t2.len() as u32, table_size(100));
    }
}
