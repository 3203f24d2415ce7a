#!/usr/bin/env python3
# Usage: python3 bench/account.py PROFILE.folded CPU_S_PER_100K
# Splits a folded perf profile of the agent into where each request's CPU
# goes; with the measured CPU-s per 100k requests, prints µs per request.
# Kernel time is split by the system call it runs under; user time goes to
# the innermost frame that names a part of the proxy.
import sys, collections
path, cpu_per_100k = sys.argv[1], float(sys.argv[2])
us = cpu_per_100k * 10
SEND = {'tcp_sendmsg','__x64_sys_sendto','__x64_sys_write','__x64_sys_writev','do_writev','__x64_sys_sendmsg'}
RECV = {'tcp_recvmsg','__x64_sys_recvfrom','__x64_sys_read','ksys_read','__x64_sys_recvmsg'}
SCHED = {'__x64_sys_epoll_wait','__x64_sys_futex','schedule','__x64_sys_sched_yield','__x64_sys_epoll_ctl'}
user = [
 ('TLS (rustls, ring)', ('rustls::', 'ring::', 'ring_core')),
 ('HTTP/2 tunnel (h2, hyper h2)', ('h2::', 'hyper::proto::h2')),
 ('HTTP/1 codec (parse, encode, bodies)', ('http::h1::', 'hyper::proto::h1', 'httparse', 'http_pool::Pool::send', 'pool::Pool::send', 'inbound::request::PodConn')),
 ('routing, balancing, metrics, tap, trace', ('forward::', 'http_metrics', 'waymark_agent::balance', 'inbound::request::', 'diagnostics::', 'telemetry::', 'routing::', 'headers::strip')),
 ('tokio runtime (scheduler, io driver, timers)', ('tokio::runtime', 'tokio::time')),
]
order = ['kernel: TCP send, and delivery to the receiver (its softirq runs in our context)', 'kernel: TCP receive', 'kernel: epoll_wait, futex, scheduling', 'kernel: other (interrupts, timers)'] + [u[0] for u in user] + ['allocator (malloc/free)', 'other user space']
tot = 0; acc = collections.Counter()
for line in open(path):
    stack, _, n = line.rstrip().rpartition(' ')
    n = int(n); tot += n
    fr = stack.split(';')
    fs = set(fr)
    if fs & SEND: acc[order[0]] += n; continue
    if fs & RECV: acc[order[1]] += n; continue
    if fs & SCHED: acc[order[2]] += n; continue
    if 'entry_SYSCALL_64_after_hwframe' in fs or any(f.startswith('asm_') for f in fr):
        acc[order[3]] += n; continue
    leaf = fr[-1]
    if any(x in leaf for x in ('malloc', 'free', '_int_', 'unlink_chunk', 'realloc')):
        acc['allocator (malloc/free)'] += n; continue
    done = False
    for f in reversed(fr):
        for name, pats in user:
            if any(p in f for p in pats):
                acc[name] += n; done = True; break
        if done: break
    if not done:
        acc['other user space'] += n
print(f"{us:.1f} µs of CPU per request ({cpu_per_100k} CPU-s/100k)")
for name in order:
    v = acc[name]
    print(f"| {name} | {v/tot:5.1%} | {v/tot*us:5.1f} |")
