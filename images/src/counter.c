/*
 * counter: a stateful test program for checkpoint/restore.
 *
 * Environment (all optional):
 *   MEM_MB       MiB of anonymous memory to allocate and fill with a
 *                pattern (default 0). The pattern is re-checked on every
 *                tick (one word per page); a mismatch exits with code 70.
 *   INTERVAL_MS  milliseconds between ticks (default 200, minimum 1).
 *   COUNT_FILE   file that receives "<n>\n" on every tick, written via
 *                "<COUNT_FILE>.tmp" + rename (default /tmp/count; set it
 *                to the empty string to disable).
 *   MAX_COUNT    exit (with EXIT_CODE) after printing count=MAX_COUNT
 *                (default 0 = never).
 *   EXIT_CODE    exit status used on SIGTERM/SIGINT and at MAX_COUNT
 *                (default 0).
 *
 * Stdout: one line "count=<n>" per tick, n = 1, 2, 3, ... flushed at once.
 * The counter lives only in memory, so a restored process resumes the
 * count where the checkpoint left it. Stderr gets a start line
 * "counter: start pid=<pid> mem_mb=<m> interval_ms=<i>" and an exit line
 * "counter: exit code=<c> count=<n>".
 * Build: gcc -static -O2 -o counter counter.c
 */
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t stop;

static void on_term(int sig) { (void)sig; stop = 1; }

static long env_long(const char *name, long def)
{
    const char *s = getenv(name);
    char *end;
    long v;

    if (s == NULL || *s == '\0')
        return def;
    v = strtol(s, &end, 10);
    return (*end == '\0' && v >= 0) ? v : def;
}

/* The value every 8-byte word of the memory block must hold. */
static uint64_t pattern(uint64_t i) { return (i * 0x9E3779B97F4A7C15ULL) ^ 0x5A5A5A5A5A5A5A5AULL; }

static void write_count_file(const char *path, unsigned long n)
{
    static int warned;
    char tmp[4096];
    FILE *f;

    snprintf(tmp, sizeof(tmp), "%s.tmp", path);
    f = fopen(tmp, "w");
    if (f != NULL) {
        fprintf(f, "%lu\n", n);
        if (fclose(f) == 0 && rename(tmp, path) == 0)
            return;
    }
    if (!warned++)
        fprintf(stderr, "counter: cannot write %s: %s\n", path, strerror(errno));
}

int main(void)
{
    long mem_mb = env_long("MEM_MB", 0);
    long interval = env_long("INTERVAL_MS", 200);
    long max_count = env_long("MAX_COUNT", 0);
    int exit_code = (int)env_long("EXIT_CODE", 0);
    const char *count_file = getenv("COUNT_FILE");
    uint64_t *mem = NULL;
    size_t words = (size_t)mem_mb * 1024 * 1024 / sizeof(uint64_t);
    unsigned long n = 0;
    struct sigaction sa;

    if (count_file == NULL)
        count_file = "/tmp/count";
    if (interval < 1)
        interval = 1;

    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_term; /* no SA_RESTART: interrupt nanosleep() */
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    if (words > 0) {
        mem = mmap(NULL, words * sizeof(uint64_t), PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (mem == MAP_FAILED) {
            perror("counter: mmap");
            return 1;
        }
        for (size_t i = 0; i < words; i++) /* touch every page */
            mem[i] = pattern(i);
    }
    fprintf(stderr, "counter: start pid=%d mem_mb=%ld interval_ms=%ld\n",
            (int)getpid(), mem_mb, interval);

    while (!stop) {
        /* Check one word per 4 KiB page: cheap, and catches lost pages. */
        for (size_t i = 0; i < words; i += 512) {
            if (mem[i] != pattern(i)) {
                fprintf(stderr, "counter: memory corrupt at offset %zu\n", i * 8);
                return 70;
            }
        }
        n++;
        printf("count=%lu\n", n);
        fflush(stdout);
        if (*count_file != '\0')
            write_count_file(count_file, n);
        if (max_count > 0 && n >= (unsigned long)max_count)
            break;

        struct timespec ts = {interval / 1000, (interval % 1000) * 1000000L};
        while (!stop && nanosleep(&ts, &ts) < 0 && errno == EINTR)
            ; /* resume the remaining sleep unless asked to stop */
    }
    fprintf(stderr, "counter: exit code=%d count=%lu\n", exit_code, n);
    return exit_code;
}
