/*
 * pause: the sandbox "infra" process, like Kubernetes' pause container.
 *
 * It holds the pod's namespaces open and does nothing else: it sleeps in
 * pause(), reaps any child that gets reparented to it (it is PID 1 when
 * the pod shares a PID namespace), and exits 0 on SIGINT or SIGTERM.
 * Build: gcc -static -O2 -o pause pause.c
 */
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static void on_term(int sig)
{
    (void)sig;
    _exit(0);
}

static void on_chld(int sig)
{
    (void)sig;
    /* Reap every exited child without blocking. */
    while (waitpid(-1, NULL, WNOHANG) > 0)
        ;
}

int main(int argc, char **argv)
{
    struct sigaction sa;

    if (argc > 1 && (strcmp(argv[1], "-v") == 0 || strcmp(argv[1], "--version") == 0)) {
        printf("pause (criu-shim) 1\n");
        return 0;
    }
    if (getpid() != 1)
        fprintf(stderr, "Warning: pause should be the first process\n");

    memset(&sa, 0, sizeof(sa));
    sigemptyset(&sa.sa_mask);
    sa.sa_handler = on_term;
    if (sigaction(SIGINT, &sa, NULL) < 0 || sigaction(SIGTERM, &sa, NULL) < 0)
        return 1;
    sa.sa_handler = on_chld;
    sa.sa_flags = SA_NOCLDSTOP | SA_RESTART;
    if (sigaction(SIGCHLD, &sa, NULL) < 0)
        return 2;

    for (;;)
        pause();
    return 42; /* not reached */
}
