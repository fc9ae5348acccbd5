/*
 * shmcounter: a test program that keeps its state in POSIX shared memory.
 *
 * It is what PostgreSQL's dynamic shared memory, Python's
 * multiprocessing.shared_memory and Chromium do: a file in /dev/shm
 * (shm_open), mapped MAP_SHARED. The file lives in the pod's /dev/shm
 * tmpfs, not in the process, so a checkpoint that does not carry /dev/shm
 * cannot be restored.
 *
 * Environment (all optional):
 *   SHM_NAME     shm_open name, without the slash (default "shmcounter")
 *   SHM_KB       size of the segment in KiB (default 256, minimum 4)
 *   INTERVAL_MS  milliseconds between ticks (default 100, minimum 1)
 *
 * At start it creates /dev/shm/<SHM_NAME> (mode 0600), fills it with a
 * pattern, maps it, and writes /dev/shm/<SHM_NAME>.d/note ("note of
 * <SHM_NAME>\n"), a file nobody maps. Every tick it checks the pattern (a
 * mismatch exits with code 70), increments the count kept in the segment's
 * first 8 bytes (so `od -An -tu8 -N8 /dev/shm/<SHM_NAME>` reads it from
 * outside) and prints "shm=<n>", flushed at once. Exit code 71: setup failed.
 * Build: gcc -static -O2 -o shmcounter shmcounter.c
 */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t stop;

static void on_term(int sig) { (void)sig; stop = 1; }

static long env_long(const char *name, long def, long min)
{
    const char *s = getenv(name);
    char *end;
    long v;

    if (s == NULL || *s == '\0')
        return def;
    v = strtol(s, &end, 10);
    return (*end == '\0' && v >= min) ? v : def;
}

static uint64_t pattern(uint64_t i) { return (i * 0x9E3779B97F4A7C15ULL) ^ 0xC3C3C3C3C3C3C3C3ULL; }

static int fail(const char *what)
{
    fprintf(stderr, "shmcounter: %s: %s\n", what, strerror(errno));
    return 71;
}

static int write_note(const char *name)
{
    char path[512], text[512];
    int fd, len;

    snprintf(path, sizeof(path), "/dev/shm/%s.d", name);
    if (mkdir(path, 0755) != 0 && errno != EEXIST)
        return -1;
    snprintf(path, sizeof(path), "/dev/shm/%s.d/note", name);
    len = snprintf(text, sizeof(text), "note of %s\n", name);
    fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0)
        return -1;
    if (write(fd, text, (size_t)len) != len) {
        close(fd);
        return -1;
    }
    return close(fd);
}

int main(void)
{
    const char *name = getenv("SHM_NAME");
    char shm[512];
    size_t size, words, i;
    long interval_ms;
    struct timespec tick;
    volatile uint64_t *map;
    int fd;

    if (name == NULL || *name == '\0')
        name = "shmcounter";
    size = (size_t)env_long("SHM_KB", 256, 4) * 1024;
    interval_ms = env_long("INTERVAL_MS", 100, 1);
    tick.tv_sec = interval_ms / 1000;
    tick.tv_nsec = (interval_ms % 1000) * 1000000L;
    words = size / sizeof(uint64_t);
    signal(SIGTERM, on_term);
    signal(SIGINT, on_term);

    snprintf(shm, sizeof(shm), "/%s", name);
    fd = shm_open(shm, O_RDWR | O_CREAT | O_EXCL, 0600);
    if (fd < 0)
        return fail("shm_open");
    if (ftruncate(fd, (off_t)size) != 0)
        return fail("ftruncate");
    map = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (map == MAP_FAILED)
        return fail("mmap");
    close(fd); /* only the mapping holds the file from now on */
    for (i = 1; i < words; i++)
        map[i] = pattern(i);
    map[0] = 0;
    if (write_note(name) != 0)
        return fail("note");
    fprintf(stderr, "shmcounter: start pid=%d shm=/dev/shm/%s size=%zu\n", (int)getpid(), name, size);

    while (!stop) {
        for (i = 1; i < words; i += 512 / sizeof(uint64_t)) {
            if (map[i] != pattern(i)) {
                fprintf(stderr, "shmcounter: pattern mismatch at word %zu\n", i);
                return 70;
            }
        }
        map[0] = map[0] + 1;
        printf("shm=%llu\n", (unsigned long long)map[0]);
        fflush(stdout);
        nanosleep(&tick, NULL);
    }
    fprintf(stderr, "shmcounter: exit count=%llu\n", (unsigned long long)map[0]);
    return 0;
}
