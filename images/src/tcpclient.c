/*
 * tcpclient: drives tcpserver over one long-lived TCP connection.
 *
 * Usage: tcpclient [HOST [PORT]]   (arguments override the environment)
 * Environment (all optional):
 *   HOST                numeric IPv4/IPv6 server address (default 127.0.0.1)
 *   PORT                server port (default 7000)
 *   INTERVAL_MS         pause between a reply and the next request (default 200)
 *   COUNT               stop after this many replies (default 0 = never)
 *   CONNECT_TIMEOUT_MS  keep retrying connect() this long (default 5000)
 *   REPLY_TIMEOUT_MS    longest wait for one reply (default 30000)
 *   RECONNECT           1: reconnect after a reset/close instead of exiting
 *
 * Sends "ping <seq>\n" (seq = 1, 2, ...). Stdout lines (flushed), each
 * prefixed with the wall-clock time "<unix seconds>.<millis> ":
 *   connected <host>:<port> local=<ip>:<port>
 *   seq=<n> rtt_ms=<ms> reply=<reply line without newline>
 *   error: <what>: <reason>
 *   reconnect
 *   done sent=<n>
 * Exit codes: 0 after COUNT replies or on SIGTERM/SIGINT; 1 bad arguments;
 * 2 could not connect within CONNECT_TIMEOUT_MS; 3 connection reset or
 * closed by the peer (with RECONNECT unset); 4 no reply within
 * REPLY_TIMEOUT_MS.
 * Build: gcc -static -O2 -o tcpclient tcpclient.c
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t stop;
static void on_term(int sig) { (void)sig; stop = 1; }

static long env_long(const char *name, long def)
{
    const char *s = getenv(name);
    return s && *s ? atol(s) : def;
}

static long now_ms(clockid_t clk)
{
    struct timespec ts;
    clock_gettime(clk, &ts);
    return ts.tv_sec * 1000L + ts.tv_nsec / 1000000L;
}

/* Print one timestamped line to stdout and flush it. */
static void say(const char *fmt, ...)
{
    long ms = now_ms(CLOCK_REALTIME);
    va_list ap;
    printf("%ld.%03ld ", ms / 1000, ms % 1000);
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    putchar('\n');
    fflush(stdout);
}

static void sleep_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    while (!stop && nanosleep(&ts, &ts) < 0 && errno == EINTR)
        ;
}

/* Connect, retrying every 100 ms for up to timeout_ms; -1 on failure. */
static int connect_retry(const struct sockaddr_storage *ss, socklen_t len, long timeout_ms,
                         const char *host, int port)
{
    long deadline = now_ms(CLOCK_MONOTONIC) + timeout_ms;
    for (;;) {
        int fd = socket(ss->ss_family, SOCK_STREAM, 0);
        if (fd >= 0 && connect(fd, (const struct sockaddr *)ss, len) == 0) {
            struct sockaddr_storage la;
            socklen_t lalen = sizeof(la);
            char ip[INET6_ADDRSTRLEN] = "?";
            int lport = 0;
            getsockname(fd, (struct sockaddr *)&la, &lalen);
            if (la.ss_family == AF_INET) {
                inet_ntop(AF_INET, &((struct sockaddr_in *)&la)->sin_addr, ip, sizeof(ip));
                lport = ntohs(((struct sockaddr_in *)&la)->sin_port);
            } else {
                inet_ntop(AF_INET6, &((struct sockaddr_in6 *)&la)->sin6_addr, ip, sizeof(ip));
                lport = ntohs(((struct sockaddr_in6 *)&la)->sin6_port);
            }
            say("connected %s:%d local=%s:%d", host, port, ip, lport);
            return fd;
        }
        if (fd >= 0)
            close(fd);
        if (stop || now_ms(CLOCK_MONOTONIC) >= deadline) {
            say("error: connect %s:%d: %s", host, port, strerror(errno));
            return -1;
        }
        sleep_ms(100);
    }
}

int main(int argc, char **argv)
{
    const char *host = argc > 1 ? argv[1] : getenv("HOST");
    const char *port_s = argc > 2 ? argv[2] : getenv("PORT");
    int port = port_s && *port_s ? atoi(port_s) : 7000;
    long interval = env_long("INTERVAL_MS", 200), count = env_long("COUNT", 0);
    long conn_to = env_long("CONNECT_TIMEOUT_MS", 5000), reply_to = env_long("REPLY_TIMEOUT_MS", 30000);
    int reconnect = env_long("RECONNECT", 0) == 1;
    struct sockaddr_storage ss;
    socklen_t sslen;
    struct sigaction sa;
    long seq = 0;
    int fd;

    if (host == NULL || *host == '\0')
        host = "127.0.0.1";
    memset(&ss, 0, sizeof(ss));
    if (inet_pton(AF_INET, host, &((struct sockaddr_in *)&ss)->sin_addr) == 1) {
        ss.ss_family = AF_INET;
        ((struct sockaddr_in *)&ss)->sin_port = htons(port);
        sslen = sizeof(struct sockaddr_in);
    } else if (inet_pton(AF_INET6, host, &((struct sockaddr_in6 *)&ss)->sin6_addr) == 1) {
        ss.ss_family = AF_INET6;
        ((struct sockaddr_in6 *)&ss)->sin6_port = htons(port);
        sslen = sizeof(struct sockaddr_in6);
    } else {
        fprintf(stderr, "usage: tcpclient [HOST [PORT]]  (HOST must be a numeric address)\n");
        return 1;
    }
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_term; /* no SA_RESTART: interrupt poll()/nanosleep() */
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    if ((fd = connect_retry(&ss, sslen, conn_to, host, port)) < 0)
        return stop ? 0 : 2;
    while (!stop && (count == 0 || seq < count)) {
        char req[64], buf[512];
        size_t len = 0;
        long t0 = now_ms(CLOCK_MONOTONIC), deadline = t0 + reply_to;
        const char *err = NULL;
        int n = snprintf(req, sizeof(req), "ping %ld\n", ++seq);

        if (send(fd, req, n, MSG_NOSIGNAL) != n)
            err = strerror(errno);
        /* Read until a full reply line arrives. */
        while (err == NULL && !stop && memchr(buf, '\n', len) == NULL) {
            struct pollfd p = {fd, POLLIN, 0};
            long left = deadline - now_ms(CLOCK_MONOTONIC);
            ssize_t r;
            if (left <= 0 || (poll(&p, 1, left) == 0 && now_ms(CLOCK_MONOTONIC) >= deadline)) {
                say("error: no reply to seq=%ld within %ld ms", seq, reply_to);
                close(fd);
                return 4;
            }
            if (!(p.revents & (POLLIN | POLLHUP | POLLERR)))
                continue; /* EINTR or spurious wakeup */
            r = recv(fd, buf + len, sizeof(buf) - 1 - len, 0);
            if (r > 0)
                len += r;
            else if (r == 0)
                err = "connection closed by peer";
            else if (errno != EINTR)
                err = strerror(errno);
            if (len == sizeof(buf) - 1)
                buf[len - 1] = '\n'; /* overlong reply: cut it */
        }
        if (stop)
            break;
        if (err != NULL) {
            say("error: seq=%ld: %s", seq, err);
            close(fd);
            if (!reconnect)
                return 3;
            say("reconnect");
            seq--; /* resend the same sequence number */
            if ((fd = connect_retry(&ss, sslen, conn_to, host, port)) < 0)
                return stop ? 0 : 2;
            continue;
        }
        *(char *)memchr(buf, '\n', len) = '\0';
        say("seq=%ld rtt_ms=%ld reply=%s", seq, now_ms(CLOCK_MONOTONIC) - t0, buf);
        if (count == 0 || seq < count)
            sleep_ms(interval);
    }
    say("done sent=%ld", seq);
    close(fd);
    return 0;
}
