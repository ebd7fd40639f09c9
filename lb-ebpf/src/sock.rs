//! Socket-level translation for the node's own processes (cgroup connect4, sendmsg4,
//! recvmsg4, getpeername4), as Cilium's socket LB does it.
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
fn rev_key(ctx: &SockAddrContext, addr: u32, port: u16) -> SockRevKey {
    SockRevKey {
        // SAFETY: helper call on our own context.
        cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
        addr: [addr, 0, 0, 0],
        port,
        family: FAMILY_IPV4,
        _pad: [0; 5],
    }
}

/// connect4 and sendmsg4: a destination that is a frontend becomes one of its backends.
#[inline(always)]
pub fn to_backend(ctx: &SockAddrContext) -> i32 {
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
    let flow = Flow { src: 0, dst: sa.user_ip4, sport, dport: sa.user_port as u16, proto };
    // The node's own processes are the cluster's: a Local Service's external frontends give
    // them cluster-wide endpoints, as kube-proxy's short-circuit does.
    let Some((svc, _)) = service::lookup(&flow, |_| true) else {
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
    let frontend = SockRevValue { addr: [flow.dst, 0, 0, 0], port: flow.dport, _pad: [0; 6] };
    let _ = LB_SOCK_REVNAT.insert(&rev_key(ctx, backend.addr[0], backend.port), &frontend, 0);
    sa.user_ip4 = backend.addr[0];
    sa.user_port = backend.port as u32;
    count(HOOK_SOCK, Counter::FwdNewFlow);
    ALLOW
}

/// recvmsg4 and getpeername4: a backend the socket was pointed at shows as its frontend.
#[inline(always)]
pub fn to_frontend(ctx: &SockAddrContext) -> i32 {
    if !ours(ctx) {
        return ALLOW;
    }
    // SAFETY: the context's sock_addr is valid for the program run.
    let sa = unsafe { &mut *ctx.sock_addr };
    // SAFETY: the value is copied out at once.
    if let Some(f) = unsafe { LB_SOCK_REVNAT.get(&rev_key(ctx, sa.user_ip4, sa.user_port as u16)) }.copied() {
        sa.user_ip4 = f.addr[0];
        sa.user_port = f.port as u32;
        count(HOOK_SOCK, Counter::ReplyTranslated);
    }
    ALLOW
}
