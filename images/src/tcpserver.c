/*
 * tcpserver: a stateful, single-threaded TCP + UDP server (poll()) for
 * checkpoint/restore tests of established connections.
 *
 * Environment (all optional):
 *   PORT       TCP and UDP port (default 7000; 0 picks a free port, and
 *              the "listening" line tells which).
 *   BIND_ADDR  numeric IPv4 or IPv6 address to bind (default 0.0.0.0).
 *   MEM_MB     MiB of anonymous memory to allocate and touch (default 0).
 *
 * TCP: every line ("...\n") received on a connection is answered with
 *   "conn=<c> total=<t>\n", c = lines so far on this connection, t = lines
 *   and datagrams so far on the whole server. Connections stay open until
 *   the peer closes them.
 * UDP: every datagram is answered with "udp total=<t>\n" (same counter t).
 * Stdout (flushed): "tcpserver: listening <addr>:<port> pid=<pid>" once
 *   ready, "tcpserver: accept id=<k> peer=<ip>:<port>", "tcpserver: close
 *   id=<k> lines=<c>", and "tcpserver: exit total=<t>" on SIGTERM/SIGINT
 *   (exit code 0). Exit code 1 if the sockets cannot be set up.
 * Build: gcc -static -O2 -o tcpserver tcpserver.c
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAX_CONNS 256
#define LINE_MAX_LEN 4096

struct conn {
    int id;                  /* 1, 2, 3, ... in accept order */
    unsigned long lines;     /* lines answered on this connection */
    size_t len;              /* bytes buffered in buf */
    char buf[LINE_MAX_LEN];
};

static volatile sig_atomic_t stop;
static void on_term(int sig) { (void)sig; stop = 1; }

static const char *addr_str(const struct sockaddr_storage *ss, char *out, size_t n)
{
    char ip[INET6_ADDRSTRLEN] = "?";
    int port = 0;

    if (ss->ss_family == AF_INET) {
        const struct sockaddr_in *s = (const void *)ss;
        inet_ntop(AF_INET, &s->sin_addr, ip, sizeof(ip));
        port = ntohs(s->sin_port);
    } else if (ss->ss_family == AF_INET6) {
        const struct sockaddr_in6 *s = (const void *)ss;
        inet_ntop(AF_INET6, &s->sin6_addr, ip, sizeof(ip));
        port = ntohs(s->sin6_port);
    }
    snprintf(out, n, "%s:%d", ip, port);
    return out;
}

int main(void)
{
    const char *port_s = getenv("PORT"), *bind_s = getenv("BIND_ADDR"), *mem_s = getenv("MEM_MB");
    int port = port_s && *port_s ? atoi(port_s) : 7000;
    long mem_mb = mem_s && *mem_s ? atol(mem_s) : 0;
    struct sockaddr_storage ss;
    socklen_t sslen;
    struct pollfd pfd[2 + MAX_CONNS];
    static struct conn *conns[2 + MAX_CONNS]; /* indexed like pfd */
    int nfds = 2, next_id = 1, one = 1;
    unsigned long total = 0;
    char peer[INET6_ADDRSTRLEN + 8];
    struct sigaction sa;

    if (bind_s == NULL || *bind_s == '\0')
        bind_s = "0.0.0.0";
    memset(&ss, 0, sizeof(ss));
    if (inet_pton(AF_INET, bind_s, &((struct sockaddr_in *)&ss)->sin_addr) == 1) {
        ss.ss_family = AF_INET;
        ((struct sockaddr_in *)&ss)->sin_port = htons(port);
        sslen = sizeof(struct sockaddr_in);
    } else if (inet_pton(AF_INET6, bind_s, &((struct sockaddr_in6 *)&ss)->sin6_addr) == 1) {
        ss.ss_family = AF_INET6;
        ((struct sockaddr_in6 *)&ss)->sin6_port = htons(port);
        sslen = sizeof(struct sockaddr_in6);
    } else {
        fprintf(stderr, "tcpserver: BIND_ADDR %s is not a numeric address\n", bind_s);
        return 1;
    }

    if (mem_mb > 0) {
        size_t size = (size_t)mem_mb << 20;
        char *mem = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (mem == MAP_FAILED) {
            perror("tcpserver: mmap");
            return 1;
        }
        for (size_t i = 0; i < size; i++) /* touch every page, non-zero data */
            mem[i] = (char)(i * 7 + 1);
    }

    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_term; /* no SA_RESTART: interrupt poll() */
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    /* pfd[0]: TCP listener, pfd[1]: UDP socket, pfd[2..]: connections. */
    pfd[0].fd = socket(ss.ss_family, SOCK_STREAM, 0);
    pfd[1].fd = socket(ss.ss_family, SOCK_DGRAM, 0);
    if (pfd[0].fd < 0 || pfd[1].fd < 0 ||
        setsockopt(pfd[0].fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) < 0 ||
        bind(pfd[0].fd, (struct sockaddr *)&ss, sslen) < 0 || listen(pfd[0].fd, 64) < 0 ||
        getsockname(pfd[0].fd, (struct sockaddr *)&ss, &sslen) < 0 || /* PORT=0: learn it */
        bind(pfd[1].fd, (struct sockaddr *)&ss, sslen) < 0) {
        perror("tcpserver: socket setup");
        return 1;
    }
    pfd[0].events = pfd[1].events = POLLIN;
    printf("tcpserver: listening %s pid=%d\n", addr_str(&ss, peer, sizeof(peer)), (int)getpid());
    fflush(stdout);

    while (!stop) {
        if (poll(pfd, nfds, -1) < 0) {
            if (errno == EINTR)
                continue;
            perror("tcpserver: poll");
            return 1;
        }
        if (pfd[0].revents & POLLIN) { /* new connection */
            struct sockaddr_storage pa;
            socklen_t palen = sizeof(pa);
            int fd = accept(pfd[0].fd, (struct sockaddr *)&pa, &palen);
            if (fd >= 0 && nfds == 2 + MAX_CONNS) {
                close(fd); /* table full */
            } else if (fd >= 0) {
                conns[nfds] = calloc(1, sizeof(struct conn));
                conns[nfds]->id = next_id++;
                pfd[nfds].fd = fd;
                pfd[nfds].events = POLLIN;
                pfd[nfds].revents = 0;
                printf("tcpserver: accept id=%d peer=%s\n", conns[nfds]->id,
                       addr_str(&pa, peer, sizeof(peer)));
                fflush(stdout);
                nfds++;
            }
        }
        if (pfd[1].revents & POLLIN) { /* UDP datagram */
            struct sockaddr_storage pa;
            socklen_t palen = sizeof(pa);
            char buf[2048];
            if (recvfrom(pfd[1].fd, buf, sizeof(buf), 0, (struct sockaddr *)&pa, &palen) >= 0) {
                int n = snprintf(buf, sizeof(buf), "udp total=%lu\n", ++total);
                sendto(pfd[1].fd, buf, n, 0, (struct sockaddr *)&pa, palen);
            }
        }
        for (int i = 2; i < nfds; i++) {
            struct conn *c = conns[i];
            ssize_t r;
            if (!(pfd[i].revents & (POLLIN | POLLHUP | POLLERR)))
                continue;
            r = recv(pfd[i].fd, c->buf + c->len, sizeof(c->buf) - c->len, 0);
            if (r > 0) {
                char *nl;
                c->len += r;
                /* Answer every complete line; a full buffer counts as a line. */
                while ((nl = memchr(c->buf, '\n', c->len)) != NULL || c->len == sizeof(c->buf)) {
                    size_t used = nl ? (size_t)(nl - c->buf) + 1 : c->len;
                    char out[96];
                    int n = snprintf(out, sizeof(out), "conn=%lu total=%lu\n", ++c->lines, ++total);
                    send(pfd[i].fd, out, n, MSG_NOSIGNAL);
                    memmove(c->buf, c->buf + used, c->len - used);
                    c->len -= used;
                }
            } else if (r == 0 || (errno != EINTR && errno != EAGAIN)) {
                /* Peer closed or reset: drop the connection, keep order. */
                printf("tcpserver: close id=%d lines=%lu\n", c->id, c->lines);
                fflush(stdout);
                close(pfd[i].fd);
                free(c);
                memmove(&pfd[i], &pfd[i + 1], (nfds - i - 1) * sizeof(pfd[0]));
                memmove(&conns[i], &conns[i + 1], (nfds - i - 1) * sizeof(conns[0]));
                nfds--;
                i--;
            }
        }
    }
    printf("tcpserver: exit total=%lu\n", total);
    fflush(stdout);
    return 0;
}
