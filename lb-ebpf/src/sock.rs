//! Socket-level translation for the node's own processes (cgroup connect, sendmsg, recvmsg,
//! getpeername, for IPv4 and IPv6), as Cilium's socket LB does it.
//!
//! A packet a local process sends never passes XDP or tc ingress, and without a route to a
//! ClusterIP `connect()` fails before any packet exists. So the destination is rewritten where
//! the socket is given it: connect() (TCP, connected UDP) and each sendmsg() (unconnected UDP)
//! get the backend, and `getpeername()`/`recvmsg()` show the frontend again. Established
//! sockets then cost nothing per packet.
//!
//! cgroup programs see every process of the cgroup whatever its network namespace, so they act
//! only in the agent's own (`NETNS_COOKIE`): pods and other agents' namespaces are left alone.
use aya_ebpf::{
    helpers::{bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_set_retval},
    programs::SockAddrContext,
    EbpfContext,
};
use lb_common::{Counter, SockRevKey, SockRevValue, FAMILY_IPV4, HOOK_SOCK, PROTO_TCP, PROTO_UDP};

use crate::addr::Addr;

use crate::{maps::LB_SOCK_REVNAT, parse::Flow, select, service, stats::count};

/// The agent's network namespace cookie (`SO_NETNS_COOKIE`); zero disables these programs.
#[no_mangle]
static NETNS_COOKIE: u64 = 0;

const ECONNREFUSED: i32 = 111;
/// cgroup sock_addr verdicts.
const ALLOW: i32 = 1;
const REJECT: i32 = 0;

#[inline(always)]
fn ours(ctx: &SockAddrContext) -> bool {
    // SAFETY: reading a static the loader patches.
    let want = unsafe { core::ptr::read_volatile(&NETNS_COOKIE) };
    // SAFETY: helper call on our own context.
    want != 0 && unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } == want
}

#[inline(always)]
fn rev_key<A: Addr>(ctx: &SockAddrContext, addr: A, port: u16) -> SockRevKey {
    SockRevKey {
        // SAFETY: helper call on our own context.
        cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
        addr: addr.words(),
        port,
        family: A::FAMILY,
        _pad: [0; 5],
    }
}

/// The address the socket call carries (`user_ip4` or `user_ip6`).
#[inline(always)]
fn user_addr<A: Addr>(sa: &aya_ebpf::bindings::bpf_sock_addr) -> A {
    if A::FAMILY == FAMILY_IPV4 {
        A::from_words([sa.user_ip4, 0, 0, 0])
    } else {
        // One 4-byte load per word straight off the context: the verifier refuses a
        // context pointer moved before the load, which a 16-byte copy turns into.
        // SAFETY: reads of the context's own fields.
        unsafe {
            A::from_words([
                core::ptr::read_volatile(&sa.user_ip6[0]),
                core::ptr::read_volatile(&sa.user_ip6[1]),
                core::ptr::read_volatile(&sa.user_ip6[2]),
                core::ptr::read_volatile(&sa.user_ip6[3]),
            ])
        }
    }
}

#[inline(always)]
fn set_user_addr<A: Addr>(sa: &mut aya_ebpf::bindings::bpf_sock_addr, addr: A) {
    if A::FAMILY == FAMILY_IPV4 {
        sa.user_ip4 = addr.words()[0];
    } else {
        // The verifier allows 4-byte stores into user_ip6 only: one word at a time.
        let w = addr.words();
        // SAFETY: writes of the context's own fields.
        unsafe {
            core::ptr::write_volatile(&mut sa.user_ip6[0], w[0]);
            core::ptr::write_volatile(&mut sa.user_ip6[1], w[1]);
            core::ptr::write_volatile(&mut sa.user_ip6[2], w[2]);
            core::ptr::write_volatile(&mut sa.user_ip6[3], w[3]);
        }
    }
}

/// connect4/6 and sendmsg4/6: a destination that is a frontend becomes one of its backends.
/// (A v4-mapped address on an IPv6 socket is left alone; see the README's limits.)
#[inline(always)]
pub fn to_backend<A: Addr>(ctx: &SockAddrContext) -> i32 {
    if !ours(ctx) {
        return ALLOW;
    }
    // SAFETY: the context's sock_addr is valid for the program run.
    let sa = unsafe { &mut *ctx.sock_addr };
    let proto = sa.protocol as u8;
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return ALLOW;
    }
    // No source port exists yet; a random one spreads connections like the hash does flows.
    // SAFETY: helper without arguments.
    let sport = unsafe { bpf_get_prandom_u32() } as u16;
    let flow = Flow { src: A::default(), dst: user_addr::<A>(sa), sport, dport: sa.user_port as u16, proto };
    // The node's own processes are the cluster's: a Local Service's external frontends give
    // them cluster-wide endpoints, as kube-proxy's short-circuit does.
    let Some(svc) = service::lookup(&flow, |_| true) else {
        return ALLOW;
    };
    if svc.backend_count == 0 {
        count(HOOK_SOCK, Counter::RejectNoBackend);
        // kube-proxy's REJECT shows as "connection refused"; say the same, not EPERM.
        // SAFETY: helper call; cgroup programs may set the syscall's return value.
        unsafe { bpf_set_retval(-ECONNREFUSED) };
        return REJECT;
    }
    let Some(backend) = select::select(HOOK_SOCK, &svc, &flow) else {
        count(HOOK_SOCK, Counter::DropSlotMissing);
        return ALLOW;
    };
    let frontend = SockRevValue { addr: flow.dst.words(), port: flow.dport, _pad: [0; 6] };
    let backend_addr = A::from_words(backend.addr);
    let _ = LB_SOCK_REVNAT.insert(&rev_key(ctx, backend_addr, backend.port), &frontend, 0);
    set_user_addr(sa, backend_addr);
    sa.user_port = backend.port as u32;
    count(HOOK_SOCK, Counter::FwdNewFlow);
    ALLOW
}

/// recvmsg4/6 and getpeername4/6: a backend the socket was pointed at shows as its frontend.
#[inline(always)]
pub fn to_frontend<A: Addr>(ctx: &SockAddrContext) -> i32 {
    if !ours(ctx) {
        return ALLOW;
    }
    // SAFETY: the context's sock_addr is valid for the program run.
    let sa = unsafe { &mut *ctx.sock_addr };
    // SAFETY: the value is copied out at once.
    let addr = user_addr::<A>(sa);
    if let Some(f) = unsafe { LB_SOCK_REVNAT.get(&rev_key(ctx, addr, sa.user_port as u16)) }.copied() {
        set_user_addr(sa, A::from_words(f.addr));
        sa.user_port = f.port as u32;
        count(HOOK_SOCK, Counter::ReplyTranslated);
    }
    ALLOW
}
