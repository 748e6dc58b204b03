/* Shared by the tests that run a tool's own main (they include tools/kmed-X.c with main
   renamed): the tool exits on errors, so it runs in a child process. */
#ifndef KMED_RUN_TOOL_H
#define KMED_RUN_TOOL_H
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

/* Runs tool_main(argc, argv) in a child with stdin from in_fd (-1: inherited) and stdout /
   stderr into base.out / base.err, at most 1 MB each and 10 s (a tool that never stops
   meets a limit and is killed); the texts go to out and errs (cap bytes each) and the
   files are removed. Returns the exit status, or -1 when the child did not exit. */
static int kmed_test_run_tool(int (*tool_main)(int, char **), int argc, char **argv,
                              int in_fd, const char *base, char *out, char *errs, size_t cap)
{
    char o_path[1024], e_path[1024];
    int status = 0, k;
    pid_t pid;
    snprintf(o_path, sizeof o_path, "%s.out", base);
    snprintf(e_path, sizeof e_path, "%s.err", base);
    fflush(stdout);
    fflush(stderr);
    pid = fork();
    if (pid == 0) {
        struct rlimit lim;
        if ((in_fd >= 0 && dup2(in_fd, 0) < 0) || !freopen(o_path, "w", stdout) ||
            !freopen(e_path, "w", stderr))
            _exit(99);
        lim.rlim_cur = lim.rlim_max = (rlim_t)1 << 20;
        setrlimit(RLIMIT_FSIZE, &lim);
        alarm(10);
        exit(tool_main(argc, argv));
    }
    if (pid < 0 || waitpid(pid, &status, 0) != pid) return -1;
    for (k = 0; k < 2; k++) {
        char *data = NULL, *dst = k ? errs : out;
        size_t len;
        kmed_error e = {0};
        if (kmed_file_read(k ? e_path : o_path, (size_t)1 << 20, &data, &len, &e) == KMED_OK)
            snprintf(dst, cap, "%s", data);
        else snprintf(dst, cap, "(output not read: %s)", e.msg);
        kmed_free(data);
    }
    remove(o_path);
    remove(e_path);
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}
#endif
